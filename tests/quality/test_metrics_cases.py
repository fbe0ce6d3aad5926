"""Metrics on hand-computable cases: identical, constant and shifted images, and the pinned conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.quality.metrics import (
    METRIC_NAMES,
    METRICS,
    MetricInputError,
    compute_metrics,
    round_half_away,
    score_series,
    threshold_failures,
    to_luminance,
)


def test_registry_has_every_issue_key_with_direction():
    expected = ["EN", "SD", "SF", "AG", "MI", "SSIM", "SSIM_A", "SSIM_B", "MSE", "PSNR", "CC", "SCD", "Qabf",
                "VIF", "VIFF", "FMI_pixel", "FMI_dct", "FMI_w", "FMI_gradient", "Qcb", "Qcv", "QNCIE", "EPI",
                "FSIM", "DFRS", "Kept"]
    assert list(METRIC_NAMES) == expected
    assert [n for n in expected if not METRICS[n].higher_is_better] == ["MSE", "Qcv"]


def test_single_image_statistics_by_hand():
    f = np.array([[0.0, 0.0, 255.0, 255.0]] * 4)  # half 0, half 255
    v = compute_metrics(f, f, f, ["EN", "SD", "SF", "AG"])
    assert v["EN"] == pytest.approx(1.0)  # two equally likely levels: 1 bit
    assert v["SD"] == pytest.approx(127.5)  # population SD
    # Row differences: one jump of 255 among 3 per row; no column differences.
    assert v["SF"] == pytest.approx(math.sqrt(255**2 / 3))
    # np.gradient: columns 1 and 2 see 127.5, borders 0 -> sqrt(127.5^2/2) on half the pixels.
    assert v["AG"] == pytest.approx(0.5 * 127.5 / math.sqrt(2))


def test_identical_images(texture):
    a, _ = texture
    v = compute_metrics(a, a, a, [n for n in METRIC_NAMES if n not in ("SCD", "DFRS")])
    assert v["MI"] == pytest.approx(2 * v["EN"])  # MI(A,A) = H(A), twice
    for name in ("SSIM", "SSIM_A", "SSIM_B", "CC", "FMI_pixel", "FMI_dct", "FMI_w", "FMI_gradient", "EPI", "FSIM", "Qcb"):
        assert v[name] == pytest.approx(1.0, abs=1e-9), name
    assert v["MSE"] == 0 and v["PSNR"] == math.inf and v["Qcv"] == pytest.approx(0, abs=1e-12)
    assert v["VIF"] == pytest.approx(2.0, rel=1e-6)  # VIFp = 1 per source, summed
    assert v["VIFF"] == pytest.approx(1.0, rel=1e-3)
    # Qabf of a perfect fusion is the product of the two sigmoids at G = 1, A = 1.
    perfect = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert v["Qabf"] == pytest.approx(perfect, rel=1e-12)


def test_qncie_is_one_for_identical_uniform_histograms():
    rng = np.random.default_rng(0)
    img = rng.permutation(np.repeat(np.arange(256.0), 16)).reshape(64, 64)  # every level equally often
    assert compute_metrics(img, img, img, ["QNCIE"])["QNCIE"] == pytest.approx(1.0)


def test_constant_images():
    c = np.full((32, 32), 100.0)
    d = np.full((32, 32), 60.0)
    v = compute_metrics(c, c, d, ["EN", "SD", "SF", "AG", "MI", "MSE", "PSNR", "CC", "Qabf", "VIF"])
    assert v["EN"] == 0 and v["SD"] == 0 and v["SF"] == 0 and v["AG"] == 0 and v["MI"] == 0
    assert v["MSE"] == 1600 and v["PSNR"] == pytest.approx(10 * math.log10(255**2 / 1600))
    # Undefined, not invented: correlation with a constant, edge preservation without edges, VIF without information.
    assert math.isnan(v["CC"]) and math.isnan(v["VIF"])
    # Qabf pads with zeros (as its reference), so only all-zero sources have no edge at all.
    zero = np.zeros((32, 32))
    assert math.isnan(compute_metrics(zero, zero, d, ["Qabf"])["Qabf"])
    # SSIM of constants is the luminance term alone: (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 255) ** 2
    assert compute_metrics(c, c, d, ["SSIM_A"])["SSIM_A"] == pytest.approx((2 * 100 * 60 + c1) / (100**2 + 60**2 + c1))


def test_shifted_image_scores_worse_than_itself(texture):
    a, b = texture
    shifted = np.roll(a, 3, axis=1)
    same = compute_metrics(a, b, a, ["SSIM_A", "FSIM", "EPI", "FMI_pixel", "Qabf", "VIF"])
    moved = compute_metrics(a, b, shifted, ["SSIM_A", "FSIM", "EPI", "FMI_pixel", "Qabf", "VIF"])
    for name, value in moved.items():
        assert value < same[name], name
    # Shifting does not change histogram statistics of F.
    assert compute_metrics(a, b, shifted, ["EN"])["EN"] == pytest.approx(compute_metrics(a, b, a, ["EN"])["EN"])


def test_noise_raises_qcv_and_lowers_qcb(texture):
    a, b = texture
    f = np.floor((a + b) / 2 + 0.5)
    noisy = np.clip(f + np.random.default_rng(2).normal(0, 20, f.shape), 0, 255)
    clean, dirty = compute_metrics(a, b, f, ["Qcv", "Qcb"]), compute_metrics(a, b, noisy, ["Qcv", "Qcb"])
    assert dirty["Qcv"] > clean["Qcv"] and dirty["Qcb"] < clean["Qcb"]


def test_scd_by_definition(texture):
    a, b = texture
    f = np.floor(0.5 * a + 0.5 * b + 0.5)
    expected = np.corrcoef((f - b).ravel(), a.ravel())[0, 1] + np.corrcoef((f - a).ravel(), b.ravel())[0, 1]
    assert compute_metrics(a, b, f, ["SCD"])["SCD"] == pytest.approx(expected)


def test_fused_image_is_rounded_half_away_from_zero():
    assert list(round_half_away(np.array([0.5, 1.5, 2.5, -0.5, 2.4999]))) == [1, 2, 3, -1, 2]
    a = np.tile(np.arange(0.0, 64.0), (8, 1))
    f = a + 0.5  # half-way: rounds up to a + 1 (numpy's round would send even values down)
    assert compute_metrics(a, a, f, ["MSE"])["MSE"] == pytest.approx(1.0)
    assert compute_metrics(a, a, f, ["MSE"], round_fused=False)["MSE"] == pytest.approx(0.25)


def test_colour_is_scored_on_bt601_luma():
    rgb = np.zeros((16, 16, 3))
    rgb[..., 0] = 255
    assert to_luminance(rgb)[0, 0] == pytest.approx(76.245)
    grey = np.full((16, 16), 76.0)  # luma 76.245 rounds to 76
    assert compute_metrics(grey, grey, rgb, ["MSE"])["MSE"] == 0
    with pytest.raises(MetricInputError):
        compute_metrics(grey, grey[:8], grey)
    with pytest.raises(MetricInputError):
        compute_metrics(grey, grey, grey, ["NOPE"])


def test_dfrs_weights_and_overlap(texture):
    a, _ = texture
    mask = a > 128
    v = compute_metrics(a, a, a, ["DFRS"], saliency=mask.astype(float), mask=mask)
    assert v["DFRS"] == pytest.approx(100.0, rel=1e-6)
    half = compute_metrics(a, a, a, ["DFRS"], saliency=np.zeros_like(a), mask=mask)
    assert half["DFRS"] == pytest.approx(80.0, rel=1e-6)  # overlap 0 removes its 20 points
    assert math.isnan(compute_metrics(a, a, a, ["DFRS"])["DFRS"])  # no saliency/mask: undefined


def test_score_series_skips_blank_slices_and_averages(texture):
    a, b = texture
    blank = np.zeros_like(a)
    sa, sb = np.stack([a, blank, b]), np.stack([b, blank, a])
    sf = np.floor((sa + sb) / 2 + 0.5)
    q = score_series(sa, sb, sf)
    assert q.names == ["EN", "MI", "SSIM", "Qabf", "VIF"] and q.skipped == [1] and q.scored == 2
    assert all(math.isnan(v) for v in q.per_slice[1].values())
    for name in q.names:
        assert q.summary[name] == pytest.approx((q.per_slice[0][name] + q.per_slice[2][name]) / 2)
    # the series path computes these on the whole stack: equal to the 2-D functions up to rounding
    assert q.per_slice[0] == pytest.approx(compute_metrics(a, b, sf[0], q.names), rel=1e-12)


def test_threshold_failures_respect_direction():
    summary = {"SSIM": 0.5, "Qcv": 300.0, "VIF": float("nan")}
    assert threshold_failures(summary, {"SSIM": 0.6, "Qcv": 200.0}) == ["SSIM", "Qcv"]
    assert threshold_failures(summary, {"SSIM": 0.4, "Qcv": 400.0}) == []
    assert threshold_failures(summary, {"VIF": 0.1}) == ["VIF"]
