"""Pareto domination of the network by a baseline (the fusion quality target)."""

from __future__ import annotations

import math

from dicomnode.lab.evaluate import dominated_by


def test_dominated_by_needs_every_metric_at_least_as_good_and_one_better():
    table = {
        "network": {"Qabf": 0.7, "VIF": 0.8, "Kept": 0.95},
        "copy_mri": {"Qabf": 0.8, "VIF": 0.9, "Kept": 0.10},  # better on two, worse on kept: no domination
        "equal": {"Qabf": 0.7, "VIF": 0.8, "Kept": 0.95},  # equal everywhere: no domination
        "better": {"Qabf": 0.7, "VIF": 0.81, "Kept": 0.95},  # equal on two, better on one: dominates
        "nan": {"Qabf": math.nan, "VIF": 0.9, "Kept": 0.99},  # a missing value cannot dominate
    }
    assert dominated_by(table) == ["better"]
    assert dominated_by(table, "absent") == []
