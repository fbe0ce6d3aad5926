"""Metrics against independent implementations: scikit-image, scikit-learn, sewar, piq, and loop ports in the test."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys

import numpy as np
import pytest
from scipy.signal import convolve2d

from tests.conftest import require
from dicomnode.quality import basic, information, perceptual, structural
from dicomnode.quality.fsim import fsim
from dicomnode.quality.metrics import compute_metrics

# Dev dependencies that `make install` installs: a missing one is a broken setup, so it fails here.
import sewar.full_ref as sewar_full_ref
import skimage.metrics as skimage_metrics
import sklearn.metrics as sklearn_metrics


def test_ssim_matches_scikit_image(ct_mri):
    a, b, f = ct_mri
    for src in (a, b):
        ref = skimage_metrics.structural_similarity(
            src, f, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
        )
        assert structural.ssim(src, f) == pytest.approx(ref, abs=1e-12)
    values = compute_metrics(a, b, f, ["SSIM", "SSIM_A", "SSIM_B"])
    assert values["SSIM"] == pytest.approx((values["SSIM_A"] + values["SSIM_B"]) / 2)
    assert compute_metrics(a, b, f, ["SSIM"], ssim_combine="sum")["SSIM"] == pytest.approx(2 * values["SSIM"])


def test_psnr_matches_scikit_image(ct_mri):
    a, b, f = ct_mri
    ref = skimage_metrics.peak_signal_noise_ratio(a, f, data_range=255)
    assert basic.psnr_from_mse(basic.mse(a, f)) == pytest.approx(ref, abs=1e-10)
    # The fused PSNR uses the mean of the two MSEs.
    mean_mse = (skimage_metrics.mean_squared_error(a, f) + skimage_metrics.mean_squared_error(b, f)) / 2
    values = compute_metrics(a, b, f, ["MSE", "PSNR"])
    assert values["MSE"] == pytest.approx(mean_mse)
    assert values["PSNR"] == pytest.approx(10 * math.log10(255**2 / mean_mse))


def test_mutual_information_matches_scikit_learn_in_bits(ct_mri):
    a, b, f = ct_mri
    nats = sum(sklearn_metrics.mutual_info_score(s.ravel().astype(int), f.ravel().astype(int)) for s in (a, b))
    assert compute_metrics(a, b, f, ["MI"])["MI"] == pytest.approx(nats / math.log(2), rel=1e-10)
    assert compute_metrics(a, b, f, ["MI"], mi_unit="nats")["MI"] == pytest.approx(nats, rel=1e-10)


def test_vif_matches_sewar_vifp_summed_over_sources(ct_mri):
    a, b, f = ct_mri
    # sewar.full_ref.vifp(reference, distorted) is the 4-scale pixel VIF with sigma_nsq = 2, one source at a time.
    ref_a, ref_b = sewar_full_ref.vifp(a, f), sewar_full_ref.vifp(b, f)
    assert structural.vifp(a, f) == pytest.approx(ref_a, rel=1e-9)
    assert compute_metrics(a, b, f, ["VIF"])["VIF"] == pytest.approx(ref_a + ref_b, rel=1e-9)
    assert compute_metrics(a, b, f, ["VIF"], vif_combine="mean")["VIF"] == pytest.approx((ref_a + ref_b) / 2, rel=1e-9)


def _qabf_loop(a, b, f):
    """Xydeas-Petrovic written out with MATLAB-style conv2 (flipped kernels), element by element."""
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)

    def grad(x):
        sx, sy = convolve2d(x, h3, mode="same"), convolve2d(x, h1, mode="same")
        g = np.sqrt(sx**2 + sy**2)
        ang = np.empty_like(g)
        for idx in np.ndindex(g.shape):
            ang[idx] = math.pi / 2 if sx[idx] == 0 else math.atan(sy[idx] / sx[idx])
        return g, ang

    ga, aa = grad(a)
    gb, ab = grad(b)
    gf, af = grad(f)

    def q(gs, as_):
        out = np.empty_like(gs)
        for idx in np.ndindex(gs.shape):
            if gs[idx] == 0 or gf[idx] == 0:
                rel = 0.0
            elif gs[idx] > gf[idx]:
                rel = gf[idx] / gs[idx]
            else:
                rel = gs[idx] / gf[idx]
            orient = 1 - abs(as_[idx] - af[idx]) / (math.pi / 2)
            qg = 0.9994 / (1 + math.exp(-15 * (rel - 0.5)))
            qa = 0.9879 / (1 + math.exp(-22 * (orient - 0.8)))
            out[idx] = qg * qa
        return out

    return float((q(ga, aa) * ga + q(gb, ab) * gb).sum() / (ga + gb).sum())


def test_qabf_matches_an_elementwise_port(texture):
    a, b = texture
    f = np.floor(0.6 * a + 0.4 * b + 0.5)
    assert perceptual.qabf(a, b, f) == pytest.approx(_qabf_loop(a, b, f), rel=1e-12)


def _nmi_loop(x, y):
    """Fast-FMI normalised MI of two windows, written out as in the paper's reference code (loops)."""
    if np.array_equal(x, y):
        return 1.0

    def pdf(w):
        w = np.ones_like(w) if w.max() == w.min() else (w - w.min()) / (w.max() - w.min())
        v = w.flatten(order="F")
        return v / v.sum()

    xp, yp = pdf(x), pdf(y)
    n = len(xp)
    xc, yc = np.cumsum(xp), np.cumsum(yp)
    xt, yt = xp - xp.mean(), yp - yp.mean()
    c = 0.0 if (xt * yt).sum() == 0 else (xt * yt).sum() / math.sqrt((xt * xt).sum() * (yt * yt).sum())
    i = np.arange(1, n + 1)
    xsd = math.sqrt(max((i * i * xp).sum() - (i * xp).sum() ** 2, 0))
    ysd = math.sqrt(max((i * i * yp).sum() - (i * yp).sum() ** 2, 0))
    if c >= 0:
        def bound(u, v):
            return min(u, v)
        zero = c == 0 or xsd == 0 or ysd == 0
    else:
        def bound(u, v):
            return max(u + v - 1, 0.0)
        zero = xsd == 0 or ysd == 0
    if zero:
        w = 0.0
    else:
        cov = sum(bound(yc[p], xc[q]) - yc[p] * xc[q] for p in range(n) for q in range(n))
        w = c / (cov / (xsd * ysd))
    joint = 0.0
    for p in range(n):
        for q in range(n):
            cell = bound(yc[p], xc[q])
            cell -= bound(yc[p - 1], xc[q]) if p else 0.0
            cell -= bound(yc[p], xc[q - 1]) if q else 0.0
            cell += bound(yc[p - 1], xc[q - 1]) if p and q else 0.0
            j = w * cell + (1 - w) * yp[p] * xp[q]
            if j != 0:
                joint -= j * math.log2(abs(j))
    hx = -sum(v * math.log2(v) for v in xp if v)
    hy = -sum(v * math.log2(v) for v in yp if v)
    mi = hx + hy - joint
    return 0.0 if mi == 0 else 2 * mi / (hx + hy)


@pytest.mark.parametrize("feature", ["pixel", "dct", "gradient"])
def test_fast_fmi_matches_a_loop_port(feature):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (11, 11)).astype(float)
    b = rng.integers(0, 256, (11, 11)).astype(float)
    a[:4, :4] = b[:4, :4] = 0  # identical windows count 1
    a[6:, 6:] = 9  # flat windows
    f = np.floor((a + b) / 2 + 0.5)
    f[0, :] = 255 - f[0, :]  # some negative correlations
    fa, fb, ff = (information.fmi_feature(v, feature) for v in (a, b, f))
    expected = np.mean([
        (_nmi_loop(fa[p - 1 : p + 2, q - 1 : q + 2], ff[p - 1 : p + 2, q - 1 : q + 2])
         + _nmi_loop(fb[p - 1 : p + 2, q - 1 : q + 2], ff[p - 1 : p + 2, q - 1 : q + 2])) / 2
        for p in range(1, 10) for q in range(1, 10)
    ])
    assert information.fmi(a, b, f, feature=feature) == pytest.approx(expected, rel=1e-10)


def _piq(module: str):
    """A piq submodule, loaded without piq/__init__.py: that imports torchvision, which the venv must not
    have (it would replace the pinned torch); fsim and vif need only torch."""
    spec = importlib.util.find_spec("piq")
    require(spec is not None and spec.submodule_search_locations is not None,
            "piq is not installed (make install adds it with --no-deps)")
    if "piq" not in sys.modules:
        package = importlib.util.module_from_spec(spec)
        sys.modules["piq"] = package  # bare package: submodules import from it, __init__ never runs
    return importlib.import_module(f"piq.{module}")


def _distortions(a: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [np.clip(a + rng.normal(0, 10, a.shape), 0, 255), np.roll(a, 3, axis=1), 0.6 * a + 40]


def _t(x: np.ndarray):
    import torch

    return torch.tensor(x, dtype=torch.float64)[None, None]


def test_fsim_matches_piq(ct_mri):
    piq_fsim = _piq("fsim").fsim
    a, b, f = ct_mri
    for ref in (a, b):
        for dist in [f, *_distortions(ref)]:
            theirs = float(piq_fsim(_t(dist), _t(ref), data_range=255.0, chromatic=False))
            assert fsim(ref, dist) == pytest.approx(theirs, abs=2e-4)


def test_vif_matches_piq(ct_mri):
    # piq.vif_p(x, y): x is the distorted image, y the reference. Its flat-region threshold is 1e-8
    # (ours and sewar's 1e-10), hence agreement to 1e-4 here and to 1e-9 with sewar above.
    piq_vif = _piq("vif").vif_p
    a, b, f = ct_mri
    for ref in (a, b):
        for dist in [f, *_distortions(ref)]:
            theirs = float(piq_vif(_t(dist), _t(ref), data_range=255.0))
            assert structural.vifp(ref, dist) == pytest.approx(theirs, rel=1e-4)
