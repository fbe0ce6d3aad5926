"""`dicomnode metrics` on shared AANLIB pairs, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dicomnode.commands.metrics import load_for_scoring
from dicomnode.quality.metrics import METRIC_NAMES, compute_metrics


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
