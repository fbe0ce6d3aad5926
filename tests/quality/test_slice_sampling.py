"""Limiting the scored slices of a series: which slices, and what the series value then means."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.config import ConfigError, load_config
from dicomnode.quality.metrics import MetricInputError, compute_metrics, score_series
from dicomnode.quality.sampling import select_slices, stratified_pick


def test_pick_one_middle_slice_per_run_spread_over_the_whole_range():
    picks = stratified_pick(list(range(48)), 16)
    assert picks == [1 + 3 * j for j in range(16)]  # runs of 3, the middle of each
    uneven = stratified_pick(list(range(10, 33)), 5)  # 23 candidates in 5 runs of 4 or 5
    assert len(uneven) == 5 and uneven == sorted(set(uneven))
    assert uneven[0] <= 10 + 23 // 5 and uneven[-1] >= 32 - 23 // 5  # both ends of the range are covered
    assert max(np.diff(uneven)) <= 2 * math.ceil(23 / 5)


def test_pick_keeps_the_peak_in_its_run_and_all_when_few():
    picks = stratified_pick(list(range(48)), 16, keep=47)
    assert picks[-1] == 47 and picks[:-1] == [1 + 3 * j for j in range(15)]
    assert stratified_pick(list(range(48)), 16, keep=0)[0] == 0
    assert stratified_pick([3, 5, 8], 16, keep=5) == [3, 5, 8]
    assert stratified_pick([3, 5, 8], 0) == [3, 5, 8]  # 0: no limit


def _series(n: int = 30, seed: int = 4):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=(n, 40, 48)), (0, 2, 2))
    a = (a - a.min()) / (a.max() - a.min()) * 255
    b = rng.uniform(0, 60, (n, 40, 48))
    b[17, 10:30, 10:30] += 190  # a hot spot: the moving-image peak, off every run's middle
    a[[0, 1, n - 1]], b[[0, 1, n - 1]] = 0.0, 0.0  # blank slices beyond the body
    f = np.floor(0.6 * a + 0.4 * b + 0.5)
    return a, b, f


def test_selection_skips_blank_slices_and_keeps_the_moving_peak():
    a, b, _ = _series()
    sel = select_slices(a, b, 8)
    assert sel.blank == [0, 1, 29] and sel.peak == 17
    assert len(sel.scored) == 8 and 17 in sel.scored and not set(sel.scored) & set(sel.blank)
    assert sel == select_slices(a.copy(), b.copy(), 8)  # deterministic: the images alone decide
    assert select_slices(a, b, 0).scored == list(range(2, 29))


def test_series_value_is_the_mean_of_the_2d_metric_on_the_scored_slices():
    a, b, f = _series()
    names = ["EN", "MI", "SSIM", "Qabf", "VIF", "PSNR"]  # PSNR takes the slice-by-slice path
    q = score_series(a, b, f, names, max_slices=8)
    assert q.scored_slices == select_slices(a, b, 8).scored and q.scored == 8 and q.skipped == [0, 1, 29]
    for i, row in enumerate(q.per_slice):
        assert all(math.isnan(v) for v in row.values()) == (i not in q.scored_slices)
    reference = [compute_metrics(a[i], b[i], f[i], names) for i in q.scored_slices]
    for name in names:
        assert q.summary[name] == pytest.approx(np.mean([r[name] for r in reference]), rel=1e-11)
    full = score_series(a, b, f, names)
    assert full.scored == 27 and full.summary != q.summary  # the limit changes which slices count
    with pytest.raises(MetricInputError, match="max_slices"):
        score_series(a, b, f, names, max_slices=-1)


def test_max_slices_config_default_and_validation():
    assert load_config().quality.max_slices == 16
    assert load_config(overrides={"quality": {"max_slices": 0}}).quality.max_slices == 0
    for bad in (-1, 2.5, "all"):
        with pytest.raises(ConfigError, match="quality.max_slices"):
            load_config(overrides={"quality": {"max_slices": bad}})


def test_score_series_converts_only_the_slices_it_scores():
    """A whole-body series is not copied to float64 to score 4 slices (issue: quality grew with N)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, h, w = 200, 96, 96
    a = rng.uniform(0, 255, (n, h, w)).astype(np.float32)
    b = rng.uniform(0, 255, (n, h, w)).astype(np.float32)
    f = ((a + b) / 2).astype(np.float32)
    whole_float64 = n * h * w * 8
    tracemalloc.start()
    quality = score_series(a, b, f, ("EN", "MI", "SSIM", "Qabf", "VIF"), max_slices=4)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert quality.scored == 4
    assert peak < whole_float64, (peak, whole_float64)
    # The values are those of scoring the same slices from float64 copies.
    again = score_series(a.astype(np.float64), b.astype(np.float64), f.astype(np.float64),
                         ("EN", "MI", "SSIM", "Qabf", "VIF"), max_slices=4)
    assert quality.scored_slices == again.scored_slices
    for name, value in quality.summary.items():
        assert value == pytest.approx(again.summary[name], rel=1e-9)
