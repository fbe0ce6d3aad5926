"""`dicomnode bench` on shared AANLIB pairs, run as a user runs them."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from dicomnode.fusion.api import FusionEngine
from dicomnode.fusion.images import find_pairs, load_image
from dicomnode.lab.bench import spread
from dicomnode.quality.metrics import compute_metrics, round_half_away, to_luminance


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_bench_writes_table_csv_json_and_plots(aanlib_dir, tmp_path):
    out = tmp_path / "bench"
    names = ["EN", "MI", "SSIM", "Qabf", "VIF"]
    result = _run(
        "bench", str(aanlib_dir / "CT-MRI"), str(aanlib_dir / "PET-MRI"), "--limit", "2",
        "--methods", "average,maxabs,laplacian", "--metrics", ",".join(names), "--device", "cpu",
        "--out", str(out), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CT-MRI: 2 pairs" in result.stdout and "PET-MRI: 2 pairs" in result.stdout
    assert "bench" in result.stderr  # the progress bar
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "average" and summary["methods"] == ["average", "maxabs", "laplacian"]
    for task in ("CT-MRI", "PET-MRI"):
        for name in names:
            entry = summary["tasks"][task]["metrics"][name]
            for method in summary["methods"]:
                values = [float(r[name]) for r in rows if r["task"] == task and r["method"] == method]
                assert entry["summary"][method]["mean"] == pytest.approx(np.mean(values))
                assert entry["summary"][method]["sd"] == pytest.approx(np.std(values, ddof=1))
            assert {c["method"] for c in entry["paired"]} == {"maxabs", "laplacian"}
            assert entry["omnibus"]["k"] == 3
            mean = entry["summary"]["maxabs"]["mean"]
            assert f"{mean:.4g}" in result.stdout  # the terminal table shows the same numbers
    assert "| metric |" in (out / "table.md").read_text()
    for name in names:
        assert (out / "boxplots" / f"{name}.png").stat().st_size > 1000
    for task in ("CT-MRI", "PET-MRI"):
        assert (out / "examples" / f"{task}.png").stat().st_size > 1000
    # Every CSV row equals scoring the same fusion directly: 8-bit A, B luma and F luma (docs/metrics.md).
    pairs = {(task, p.pair_id): p for task in ("CT-MRI", "PET-MRI") for p in find_pairs(aanlib_dir / task)[0]}
    engines = {m: FusionEngine(m, device="cpu") for m in summary["methods"]}
    for row in rows:
        pair = pairs[(row["task"], row["pair_id"])]
        fixed, moving = load_image(pair.fixed), load_image(pair.moving)
        a = _eight_bit(fixed.grey)
        b_colour = _eight_bit(moving.rgb if moving.rgb is not None else moving.grey)
        b = round_half_away(to_luminance(b_colour, axis=0)) if b_colour.ndim == 3 else b_colour
        moving_t = torch.from_numpy(moving.rgb if moving.rgb is not None else moving.grey[None])[None]
        fused = _eight_bit(engines[row["method"]].fuse(torch.from_numpy(fixed.grey)[None, None], moving_t)
                           .fused[0].numpy().astype(np.float64))
        f = round_half_away(to_luminance(fused, axis=0)) if fused.shape[0] == 3 else fused[0]
        expected = compute_metrics(a, b, f, names)
        for name in names:
            assert math.isfinite(float(row[name]))
            assert float(row[name]) == pytest.approx(expected[name], rel=1e-6, abs=1e-9), (row["task"], row["pair_id"],
                                                                                          row["method"], name)


def test_limited_bench_spreads_over_the_whole_folder():
    assert spread(list(range(10)), 3) == [0, 4, 9] or spread(list(range(10)), 3) == [0, 5, 9]
    assert spread([1, 2], 5) == [1, 2] and spread([1, 2], None) == [1, 2] and spread([1, 2], 0) == []


def _eight_bit(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> 0..255 integers as float64, rounded half away from zero (how the bench quantises images)."""
    return np.clip(round_half_away(np.clip(x, 0, 1) * 255.0), 0, 255)
