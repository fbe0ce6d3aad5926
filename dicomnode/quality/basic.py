"""Statistics of one image and of image pairs: EN, SD, SF, AG, MI, MSE, PSNR, CC, SCD, EPI, Kept.

Every function takes float arrays on the 0..255 scale, indexed (row, column); none rescales.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _log(p: np.ndarray, base: float) -> np.ndarray:
    return np.log(p) / np.log(base)


def histogram_256(x: np.ndarray, bins: int = 256) -> np.ndarray:
    """Counts of ``bins`` equal-width bins over [0, 256); values outside are clipped to the end bins."""
    idx = np.clip(np.floor(x * (bins / 256.0)), 0, bins - 1).astype(np.intp)
    return np.bincount(idx.ravel(), minlength=bins)


def entropy(x: np.ndarray, bins: int = 256, base: float = 2.0) -> float:
    """Shannon entropy of the grey-level histogram: -sum p log p (bits when base=2)."""
    p = histogram_256(x, bins).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * _log(p, base)).sum())


def standard_deviation(x: np.ndarray) -> float:
    """Population standard deviation (divides by H*W)."""
    return float(np.std(x, dtype=np.float64))


def spatial_frequency(x: np.ndarray) -> float:
    """SF = sqrt(RF^2 + CF^2); RF^2, CF^2 = means of squared first differences along rows, columns."""
    x = x.astype(np.float64)
    rf2 = np.mean(np.diff(x, axis=1) ** 2)
    cf2 = np.mean(np.diff(x, axis=0) ** 2)
    return float(np.sqrt(rf2 + cf2))


def average_gradient(x: np.ndarray) -> float:
    """AG = mean over H*W of sqrt((Gx^2 + Gy^2) / 2), central differences, one-sided at the borders."""
    gy, gx = np.gradient(x.astype(np.float64))
    return float(np.mean(np.sqrt((gx**2 + gy**2) / 2.0)))


def joint_histogram(x: np.ndarray, y: np.ndarray, bins: int = 256) -> np.ndarray:
    """(bins, bins) counts of (x, y) pairs, equal-width bins over [0, 256)."""
    ix = np.clip(np.floor(x * (bins / 256.0)), 0, bins - 1).astype(np.intp).ravel()
    iy = np.clip(np.floor(y * (bins / 256.0)), 0, bins - 1).astype(np.intp).ravel()
    return np.bincount(ix * bins + iy, minlength=bins * bins).reshape(bins, bins)


def mutual_information(x: np.ndarray, y: np.ndarray, bins: int = 256, base: float = 2.0) -> float:
    """I(X;Y) = sum p(x,y) log(p(x,y) / (p(x) p(y))) from the joint histogram (bits when base=2)."""
    pxy = joint_histogram(x, y, bins).astype(np.float64)
    pxy /= pxy.sum()
    px = pxy.sum(axis=1, keepdims=True)
    py = pxy.sum(axis=0, keepdims=True)
    nz = pxy > 0
    return float((pxy[nz] * _log(pxy[nz] / (px @ py)[nz], base)).sum())


def mse(x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error over all pixels."""
    return float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))


def psnr_from_mse(value: float, peak: float = 255.0) -> float:
    """10 log10(peak^2 / MSE) in dB; +inf when MSE is 0."""
    if value == 0:
        return float("inf")
    return float(10.0 * np.log10(peak**2 / value))


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation coefficient; NaN when either image is constant (undefined)."""
    x = x.astype(np.float64).ravel() - x.mean()
    y = y.astype(np.float64).ravel() - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def scd(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Sum of the correlations of differences (Aslantas 2015): r(F - B, A) + r(F - A, B)."""
    a, b, f = (v.astype(np.float64) for v in (a, b, f))
    return correlation(f - b, a) + correlation(f - a, b)


def edge_preservation(src: np.ndarray, f: np.ndarray) -> float:
    """EPI (Sattar 1997): correlation of the 3x3 Laplacian high-pass of source and fused image.

    Laplacian with reflected borders. 1 when neither image has any edge, 0 when only one has.
    """
    ds = ndimage.laplace(src.astype(np.float64), mode="reflect")
    df = ndimage.laplace(f.astype(np.float64), mode="reflect")
    ds -= ds.mean()
    df -= df.mean()
    ss, sf = (ds * ds).sum(), (df * df).sum()
    if ss == 0 and sf == 0:
        return 1.0
    if ss == 0 or sf == 0:
        return 0.0
    return float((ds * df).sum() / np.sqrt(ss * sf))


def functional_kept(a: np.ndarray, b: np.ndarray, f: np.ndarray, margin: float = 25.5) -> float:
    """Share of what B adds over A that F shows: sum clip(F - A, 0, B - A) / sum (B - A), where B - A > margin.

    A is the anatomical source (MRI), B the functional or CT one, F the fused image, all on 0..255
    (``margin`` 25.5 = 10 % of the range). 1 = all of B's excess kept, 0 = F shows only A. Qabf, VIF
    and FMI rise when that excess is dropped, so this is reported beside them. NaN where no pixel
    qualifies.
    """
    a, b, f = (np.asarray(x, dtype=np.float64) for x in (a, b, f))
    excess = b - a
    mask = excess > margin
    if not mask.any():
        return float("nan")
    shown = np.clip(f[mask] - a[mask], 0.0, excess[mask])
    return float(shown.sum() / excess[mask].sum())
