"""`dicomnode metrics` and `dicomnode bench` on shared AANLIB pairs, run as a user runs them."""

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
from dicomnode.quality.commands import load_for_scoring
from dicomnode.quality.metrics import METRIC_NAMES, compute_metrics, round_half_away, to_luminance


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_metrics_command_prints_every_metric(aanlib_dir, tmp_path):
    folder = aanlib_dir / "PET-MRI"
    a, b = folder / "25015_MRI.png", folder / "25015_PET.png"
    lines = _run("metrics", str(a), str(b), str(a), cwd=tmp_path)
    assert lines.returncode == 0, lines.stderr
    printed = dict(line.split(" ") for line in lines.stdout.strip().splitlines())
    assert list(printed) == list(METRIC_NAMES)
    as_json = _run("metrics", str(a), str(b), str(a), "--json", cwd=tmp_path)
    values = json.loads(as_json.stdout)
    assert list(values) == list(METRIC_NAMES) and values["DFRS"] is None  # no saliency map from files
    # The colour PET is scored on its 8-bit BT.601 luma.
    expected = compute_metrics(load_for_scoring(a), load_for_scoring(b), load_for_scoring(a), ["SSIM_A", "SSIM_B", "MI"])
    assert values["SSIM_A"] == pytest.approx(1.0)
    assert values["SSIM_B"] == pytest.approx(expected["SSIM_B"]) and values["MI"] == pytest.approx(expected["MI"])
    assert float(printed["MI"]) == pytest.approx(values["MI"], rel=1e-5)
    rgb = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(b).convert("RGB"), dtype=float)
    assert load_for_scoring(b) == pytest.approx(np.floor(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2] + 0.5))


def test_metrics_command_rejects_mismatched_images(aanlib_dir, tmp_path):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small)
    a = aanlib_dir / "CT-MRI" / "2010_CT.png"
    result = _run("metrics", str(a), str(a), str(small), cwd=tmp_path)
    assert result.returncode == 2 and "one shape" in result.stderr


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


def _eight_bit(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> 0..255 integers as float64, rounded half away from zero (how the bench quantises images)."""
    return np.clip(round_half_away(np.clip(x, 0, 1) * 255.0), 0, 255)
