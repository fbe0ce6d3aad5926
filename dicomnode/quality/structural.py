"""Structural and information-fidelity similarity: SSIM (Wang 2004), VIFp (Sheikh-Bovik 2006), VIFF (Han 2013).

Inputs are float arrays on 0..255 indexed (row, column).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

_EPS = 1e-10


def ssim_skimage(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM as CDDFuse's evaluator computes it: scikit-image's ``structural_similarity`` with its
    defaults (7x7 uniform window, sample moments) on 0..255 floats, at data range 2."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(y.astype(np.float64), x.astype(np.float64), data_range=2.0))


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Mean SSIM over the valid map: 11x11 Gaussian (sigma 1.5), K1 0.01, K2 0.03, population moments.

    The map is cropped by the window radius (5 px) on every side, so no padded pixel counts.
    """
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    radius = int(3.5 * sigma + 0.5)

    def blur(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, truncate=3.5, mode="reflect")

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    crop = smap[radius:-radius, radius:-radius] if min(smap.shape) > 2 * radius else smap
    return float(crop.mean())


def _gauss1d(n: int, sigma: float) -> np.ndarray:
    r = (n - 1) / 2.0
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """2-D correlation with the separable kernel outer(g, g), 'valid' part only (no padded pixel)."""
    r = len(g) // 2
    out = ndimage.correlate1d(img, g, axis=0, mode="constant")
    out = ndimage.correlate1d(out, g, axis=1, mode="constant")
    return out[r : img.shape[0] - r, r : img.shape[1] - r]


def vif_terms(s1: np.ndarray, s2: np.ndarray, s12: np.ndarray, sigma_nsq: float):
    """Gain, information with and without distortion per pixel, the reference's corrections in its order.

    ``s1``, ``s2``: local variances of reference and distorted image (``s2`` clipped at 0 by the
    caller), ``s12`` their covariance; ``s1`` is modified in place.
    """
    s1[s1 < 0] = 0
    gain = s12 / (s1 + _EPS)
    sv = s2 - gain * s12
    flat_ref = s1 < _EPS
    gain[flat_ref] = 0
    sv[flat_ref] = s2[flat_ref]
    s1[flat_ref] = 0
    flat_dist = s2 < _EPS
    gain[flat_dist] = 0
    sv[flat_dist] = 0
    neg = gain < 0
    sv[neg] = s2[neg]
    gain[neg] = 0
    sv[sv <= _EPS] = _EPS
    vid = np.log10(1 + gain**2 * s1 / (sv + sigma_nsq))
    vind = np.log10(1 + s1 / sigma_nsq)
    return gain, vid, vind


def _vif_scales(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float) -> Iterator[tuple[np.ndarray, ...]]:
    """Per scale (4 scales, Gaussian N = 2^(5-s)+1, sigma N/5): gain g, information with and without distortion."""
    ref = ref.astype(np.float64)
    dist = dist.astype(np.float64)
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        g = _gauss1d(n, n / 5.0)
        if scale > 1:
            ref = _filter_valid(ref, g)[::2, ::2]
            dist = _filter_valid(dist, g)[::2, ::2]
        if min(ref.shape) < n:
            break
        mu1, mu2 = _filter_valid(ref, g), _filter_valid(dist, g)
        s1 = _filter_valid(ref * ref, g) - mu1 * mu1
        s2 = _filter_valid(dist * dist, g) - mu2 * mu2
        s12 = _filter_valid(ref * dist, g) - mu1 * mu2
        s2[s2 < 0] = 0
        yield vif_terms(s1, s2, s12, sigma_nsq)


def vifp(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0) -> float:
    """Pixel-domain VIF of ``dist`` against ``ref``: sum of information with / without distortion over 4 scales.

    1 for identical images with texture; NaN when ``ref`` is flat at every scale (no information).
    """
    num = den = 0.0
    for _, vid, vind in _vif_scales(ref, dist, sigma_nsq):
        num += vid.sum()
        den += vind.sum()
    return float(num / den) if den > 0 else float("nan")


def viff(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """VIFF (Han et al. 2013): per scale, each pixel takes the source with the smaller gain; weighted scale sum.

    Visual noise 0.005*255^2, C = 1e-7, scale weights (1, 0, 0.15, 1) / 2.15.
    """
    sigma_nsq = 0.005 * 255 * 255
    weights = np.array([1.0, 0.0, 0.15, 1.0]) / 2.15
    total = 0.0
    scales = zip(_vif_scales(a, f, sigma_nsq), _vif_scales(b, f, sigma_nsq), strict=False)
    for w, ((g1, vid1, vind1), (g2, vid2, vind2)) in zip(weights, scales, strict=False):
        take1 = g1 < g2
        vid = np.where(take1, vid1, vid2)
        vind = np.where(take1, vind1, vind2)
        total += w * (vid + 1e-7).sum() / (vind + 1e-7).sum()
    return float(total)
