"""The model card's evaluation: method tables, wins, and the functional-signal share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.lab.datasets import PairSample
from dicomnode.lab.evaluate import evaluate_methods, excess_kept, wins


def _sample(task: str, seed: int) -> PairSample:
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(0.0, 0.5, (32, 32)).astype(np.float32)
    moving = fixed.copy()
    moving[8:20, 8:20] += 0.4  # "uptake": the moving image is clearly brighter here
    return PairSample(task, "1", str(seed), fixed, moving)


def test_excess_kept_on_hand_cases():
    a = np.zeros((4, 4))
    b = a.copy()
    b[:2] = 0.8
    assert excess_kept(a, b, a) == 0.0
    assert excess_kept(a, b, b) == 1.0
    assert excess_kept(a, b, (a + b) / 2) == pytest.approx(0.5)
    assert math.isnan(excess_kept(a, a, a))  # no pixel where B exceeds A by the margin


def test_tables_per_task_and_method():
    samples = [_sample("PET-MRI", 0), _sample("PET-MRI", 1), _sample("CT-MRI", 2)]
    evaluation = evaluate_methods(samples, None, methods=("average", "maxabs"), metrics=("MI", "SSIM"))
    table, kept = evaluation.metrics, evaluation.kept
    assert set(table) == {"PET-MRI", "CT-MRI"} and set(table["PET-MRI"]) == {"average", "maxabs"}
    assert all(np.isfinite(v) for row in table["PET-MRI"].values() for v in row.values())
    assert kept["PET-MRI"]["maxabs"] == pytest.approx(1.0) and kept["PET-MRI"]["average"] == pytest.approx(0.5, abs=0.01)
    assert wins({"network": {"MI": 2.0, "SSIM": 0.5}, "average": {"MI": 1.0, "SSIM": 0.6}}) == ["MI"]
