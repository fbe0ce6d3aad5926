"""Edge- and perception-based fusion metrics: Qabf (Xydeas-Petrovic 2000), Qcb (Chen-Blum 2009), Qcv (Chen-Varshney 2007).

Inputs are float arrays on 0..255 indexed (row, column). Border handling, filters and constants
follow the reference implementations the fusion literature uses (zero padding for spatial filters).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_SOBEL_X = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
_SOBEL_Y = np.array([[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]])


def normalize_255(x: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0..255 and round half away from zero (the references' normalize1); flat images unchanged."""
    x = x.astype(np.float64)
    lo, hi = x.min(), x.max()
    if hi == lo:
        return x
    y = (x - lo) / (hi - lo) * 255.0
    return np.floor(y + 0.5)


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gx = ndimage.correlate(x, _SOBEL_X, mode="constant")
    gy = ndimage.correlate(x, _SOBEL_Y, mode="constant")
    return gx, gy


# Qabf's reference convolves (flipped kernels) with these; the sign convention matters where gx = 0.
_QABF_H1 = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
_QABF_H3 = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])


def _edge_strength_orientation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    gx = ndimage.convolve(x, _QABF_H3, mode="constant")
    gy = ndimage.convolve(x, _QABF_H1, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(gx == 0, np.pi / 2, np.arctan(gy / np.where(gx == 0, 1, gx)))
    return np.hypot(gx, gy), angle


def qabf(
    a: np.ndarray,
    b: np.ndarray,
    f: np.ndarray,
    gamma_g: float = 0.9994,
    kappa_g: float = -15.0,
    sigma_g: float = 0.5,
    gamma_a: float = 0.9879,
    kappa_a: float = -22.0,
    sigma_a: float = 0.8,
    weight_exponent: float = 1.0,
) -> float:
    """Q^AB/F: edge strength and orientation preserved from each source, weighted by source edge strength^L.

    Sobel (zero padding), orientation arctan(gy/gx) (pi/2 where gx = 0), relative strength min/max,
    orientation agreement 1 - |da|/(pi/2), sigmoids with the given constants. NaN when no source has an edge.
    """
    ga, aa = _edge_strength_orientation(a)
    gb, ab = _edge_strength_orientation(b)
    gf, af = _edge_strength_orientation(f)

    def preserved(gs: np.ndarray, as_: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(gs > gf, gf / np.where(gs > 0, gs, 1), gs / np.where(gf > 0, gf, 1))
        rel = np.where((gs == 0) | (gf == 0), 0.0, rel)
        orient = 1 - np.abs(as_ - af) / (np.pi / 2)
        qg = gamma_g / (1 + np.exp(kappa_g * (rel - sigma_g)))
        qa = gamma_a / (1 + np.exp(kappa_a * (orient - sigma_a)))
        return qg * qa

    wa, wb = ga**weight_exponent, gb**weight_exponent
    den = (wa + wb).sum()
    if den == 0:
        return float("nan")
    return float((preserved(ga, aa) * wa + preserved(gb, ab) * wb).sum() / den)


def _freqspace_radius(shape: tuple[int, int], scale_rows: float, scale_cols: float) -> np.ndarray:
    """Radial frequency on the centred (fftshift) grid: MATLAB freqspace(meshgrid) scaled per axis."""
    rows, cols = shape
    u = (np.arange(cols) - cols // 2) * (2.0 / cols) * scale_cols
    v = (np.arange(rows) - rows // 2) * (2.0 / rows) * scale_rows
    uu, vv = np.meshgrid(u, v)
    return np.sqrt(uu**2 + vv**2)


def _csf_filter(x: np.ndarray, response: np.ndarray) -> np.ndarray:
    spectrum = np.fft.fftshift(np.fft.fft2(x)) * response
    # The reference keeps the complex result; its imaginary part is rounding-level, so we keep the real part.
    return np.real(np.fft.ifft2(np.fft.ifftshift(spectrum)))


def _gauss_31(x: np.ndarray, sigma: float) -> np.ndarray:
    """31x31 Gaussian exp(-r^2/2s^2)/(2 pi s^2), zero padding, 'same' size (not renormalised, as the reference)."""
    g = np.exp(-(np.arange(-15, 16) ** 2) / (2 * sigma**2))
    out = ndimage.correlate1d(x, g, axis=0, mode="constant")
    out = ndimage.correlate1d(out, g, axis=1, mode="constant")
    return out / (2 * np.pi * sigma**2)


def _ratio_min_max(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """min(p, q) / max(p, q), 1 where both are 0."""
    hi = np.maximum(p, q)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hi > 0, np.minimum(p, q) / np.where(hi > 0, hi, 1), 1.0)


def qcb(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Chen-Blum: CSF-filtered (DoG f0 15.3870, f1 1.3456, a 0.7622) local contrast preservation, saliency-weighted.

    Images are min-max normalised to 0..255 first; contrast = G_sigma2 * I / G_sigma4 * I - 1, masked
    |C|^3 / (|C|^2 + 1e-4); mean over the image of lambda_A Q_AF + lambda_B Q_BF.
    """
    imgs = [normalize_255(v) for v in (a, b, f)]
    rows, cols = imgs[0].shape
    r = _freqspace_radius((rows, cols), rows / 30.0, cols / 30.0)
    sd = np.exp(-((r / 15.3870) ** 2)) - 0.7622 * np.exp(-((r / 1.3456) ** 2))
    masked = []
    for img in imgs:
        filtered = _csf_filter(img, sd)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.abs(_gauss_31(filtered, 2.0) / _gauss_31(filtered, 4.0) - 1)
        c = np.nan_to_num(c, nan=0.0, posinf=0.0)
        masked.append(c**3 / (c**2 + 1e-4))
    c1, c2, cf = masked
    q1f, q2f = _ratio_min_max(c1, cf), _ratio_min_max(c2, cf)
    tot = c1 * c1 + c2 * c2
    with np.errstate(divide="ignore", invalid="ignore"):
        lam1 = np.where(tot > 0, c1 * c1 / np.where(tot > 0, tot, 1), 0.5)
    return float(np.mean(lam1 * q1f + (1 - lam1) * q2f))


def _block_reduce(x: np.ndarray, size: int, func) -> np.ndarray:
    rows, cols = x.shape
    pr, pc = -rows % size, -cols % size
    x = np.pad(x, ((0, pr), (0, pc)))  # zero padding of partial blocks, as blkproc
    blocks = x.reshape(x.shape[0] // size, size, x.shape[1] // size, size)
    return func(blocks, axis=(1, 3))


def qcv(a: np.ndarray, b: np.ndarray, f: np.ndarray, window: int = 16, alpha: float = 5.0) -> float:
    """Chen-Varshney (lower is better): saliency-weighted CSF-filtered squared difference per 16x16 region.

    Images min-max normalised to 0..255; saliency = sum of Sobel magnitude^alpha per region; CSF
    Mannos-Sakrison on the frequency grid scaled by size/8. 0 when F equals both sources.
    """
    ia, ib, ifu = (normalize_255(v) for v in (a, b, f))
    rows, cols = ia.shape
    r = _freqspace_radius((rows, cols), rows / 8.0, cols / 8.0)
    theta_m = 2.6 * (0.0192 + 0.144 * r) * np.exp(-((0.144 * r) ** 1.1))
    num = den = 0.0
    for src in (ia, ib):
        gx, gy = _sobel(src)
        lam = _block_reduce(np.hypot(gx, gy) ** alpha, window, np.sum)
        d = _block_reduce(_csf_filter(src - ifu, theta_m) ** 2, window, np.mean)
        num += (lam * d).sum()
        den += lam.sum()
    return float(num / den) if den > 0 else float("nan")
