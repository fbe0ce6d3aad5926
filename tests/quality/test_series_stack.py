"""The stacked per-series metrics equal the 2-D reference functions slice by slice."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.quality.metrics import compute_metrics, score_series

NAMES = ["EN", "MI", "SSIM", "SSIM_A", "SSIM_B", "Qabf", "VIF", "PSNR"]


def _assert_matches_per_slice(a, b, f, names=NAMES, **options):
    q = score_series(a, b, f, names, **options)
    for i, row in enumerate(q.per_slice):
        if i in q.skipped:
            continue
        ref = compute_metrics(a[i], b[i], f[i], names, **options)
        for name in names:
            if math.isnan(ref[name]):
                assert math.isnan(row[name]), (i, name)
            else:
                assert row[name] == pytest.approx(ref[name], rel=1e-11, abs=1e-11), (i, name)
    return q


def test_stacked_equals_per_slice_on_random_slices():
    rng = np.random.default_rng(11)
    shape = (7, 45, 61)  # odd sizes: the downsampled VIF scales and crops hit uneven edges
    a = ndimage.gaussian_filter(rng.normal(size=shape), (0, 2, 2))
    a = (a - a.min()) / (a.max() - a.min()) * 255
    b = rng.uniform(0, 255, shape)
    b[2] = 0
    b[2, 10:30, 5:25] = 180.5  # a flat block: VIF's flat-region branches and Qabf's zero gradients
    a[4] = 37.0  # a flat source: SSIM/VIF against a constant
    a[5], b[5] = 0.0, 0.0  # a blank slice: skipped
    f = 0.6 * a + 0.4 * b + rng.normal(size=shape) * 4
    q = _assert_matches_per_slice(a, b, f)
    assert q.skipped == [5]
    _assert_matches_per_slice(a, b, f, ["MI", "SSIM", "VIF"], mi_unit="nats", ssim_combine="sum", vif_combine="mean")


def test_stacked_equals_per_slice_across_chunks(monkeypatch):
    import dicomnode.quality.metrics as metrics

    rng = np.random.default_rng(2)
    a, b = rng.uniform(0, 255, (2, 5, 20, 24))
    f = (a + b) / 2
    monkeypatch.setattr(metrics, "_STACK_PIXELS", 2 * 20 * 24)  # two slices per call, a last call of one
    _assert_matches_per_slice(a, b, f)


def test_stacked_equals_per_slice_on_real_ct(sts_dir):
    from dicomnode.imaging.volume import load_series

    ct = load_series([sts_dir / "CT" / "dicom" / "image"]).array
    mid = ct.shape[0] // 2
    slab = np.asarray(ct[mid - 2 : mid + 2, ::4, ::4], dtype=np.float64)  # 4 real slices, 128 x 128
    a = np.clip((slab + 160) / 400, 0, 1) * 255  # soft-tissue window
    b = np.clip((slab - 200) / 1000, 0, 1) * 255  # bone window: a second, different view
    f = ndimage.gaussian_filter(np.maximum(a, b), (0, 1, 1))
    q = _assert_matches_per_slice(a, b, f)
    assert q.scored == 4 and all(np.isfinite(v) for v in q.summary.values())


def test_a_series_scored_in_parts_equals_scoring_it_at_once():
    """What the pipeline does with quality.max_slices = 0: parts of whole stacked calls, then joined."""
    from dicomnode.quality.metrics import joined_quality, slices_per_call

    rng = np.random.default_rng(5)
    shape = (23, 128, 128)
    a = ndimage.gaussian_filter(rng.normal(size=shape), (0, 2, 2))
    a = (a - a.min()) / (a.max() - a.min()) * 255
    b = rng.uniform(0, 255, shape)
    f = 0.5 * a + 0.5 * b
    a[3], b[3] = 0.0, 0.0  # a blank slice inside the first part
    whole = score_series(a, b, f, NAMES)
    step = slices_per_call(shape[1:]) * 2
    assert step < shape[0]  # more than one part
    joined = joined_quality([score_series(a[lo:lo + step], b[lo:lo + step], f[lo:lo + step], NAMES)
                             for lo in range(0, shape[0], step)])
    assert joined.summary == whole.summary and len(joined.per_slice) == shape[0]
    for x, y in zip(joined.per_slice, whole.per_slice, strict=True):
        assert all(x[n] == y[n] or (math.isnan(x[n]) and math.isnan(y[n])) for n in NAMES)
    assert joined.skipped == whole.skipped == [3] and joined.scored_slices == whole.scored_slices
