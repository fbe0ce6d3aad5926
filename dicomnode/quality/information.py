"""Information-theoretic fusion metrics: fast FMI (Haghighat & Razian 2014) and QNCIE (Wang, Shen & Jin 2008).

Inputs are float arrays on 0..255 indexed (row, column).
"""

from __future__ import annotations

import numpy as np
import pywt
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sfft

from dicomnode.quality.perceptual import normalize_255

FMI_FEATURES = ("pixel", "dct", "wavelet", "gradient")


def fmi_feature(x: np.ndarray, feature: str) -> np.ndarray:
    """The feature image FMI compares: raw pixels, global orthonormal 2-D DCT-II, the 4 one-level Meyer
    DWT sub-bands tiled [cA cH; cV cD] and stretched to [0, 1], or the horizontal central-difference
    derivative (what the reference code's one-output ``gradient`` returns)."""
    x = x.astype(np.float64)
    if feature == "pixel":
        return x
    if feature == "dct":
        return sfft.dctn(x, type=2, norm="ortho")
    if feature == "gradient":
        return np.gradient(x, axis=1)
    if feature == "wavelet":
        ca, (ch, cv, cd) = pywt.dwt2(x, "dmey", mode="symmetric")
        tiled = np.block([[ca, ch], [cv, cd]])
        lo, hi = tiled.min(), tiled.max()
        return np.ones_like(tiled) if hi == lo else (tiled - lo) / (hi - lo)
    raise ValueError(f"unknown FMI feature {feature!r}; expected one of {FMI_FEATURES}")


def _windows(x: np.ndarray, w: int) -> np.ndarray:
    # Column-major order inside each window, as the reference flattens with (:): it fixes the CDFs.
    v = sliding_window_view(x, (w, w))
    return np.ascontiguousarray(v.transpose(0, 1, 3, 2)).reshape(-1, w * w)


def _xlogx(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p != 0, -p * np.log2(np.abs(np.where(p != 0, p, 1))), 0.0)


def _window_nmi(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Normalised MI of each pair of windows (rows of s and f), joint PDF by the Nelsen/Frechet-bound copula."""
    same = np.all(s == f, axis=1)
    out = np.ones(len(s))
    s, f = s[~same], f[~same]
    if len(s) == 0:
        return out

    def to_pdf(x: np.ndarray) -> np.ndarray:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        flat = hi == lo
        x = np.where(flat, 1.0, (x - lo) / np.where(flat, 1, hi - lo))
        return x / x.sum(axis=1, keepdims=True)

    sp, fp = to_pdf(s), to_pdf(f)
    sc, fc = np.cumsum(sp, axis=1), np.cumsum(fp, axis=1)
    st, ft = sp - sp.mean(axis=1, keepdims=True), fp - fp.mean(axis=1, keepdims=True)
    num = (st * ft).sum(axis=1)
    den = np.sqrt((st * st).sum(axis=1) * (ft * ft).sum(axis=1))
    c = np.where(num == 0, 0.0, num / np.where(den > 0, den, 1))
    idx = np.arange(1, s.shape[1] + 1, dtype=np.float64)

    def sd(p: np.ndarray) -> np.ndarray:
        e = p @ idx
        return np.sqrt(np.maximum(p @ (idx * idx) - e * e, 0))

    s_sd, f_sd = sd(sp), sd(fp)
    fci, scj = fc[:, :, None], sc[:, None, :]
    upper = np.minimum(fci, scj)
    lower = np.maximum(fci + scj - 1, 0)
    prod = fci * scj
    positive = c >= 0
    bound = np.where(positive[:, None, None], upper, lower)
    cov = (bound - prod).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr_bound = cov / (f_sd * s_sd)
        weight = c / corr_bound
    degenerate = (f_sd == 0) | (s_sd == 0) | (positive & (c == 0))
    weight = np.where(degenerate, 0.0, weight)
    # Probability mass of each cell of the bound copula: 2-D differences of the CDF with a zero row/column.
    mass = np.diff(np.diff(np.pad(bound, ((0, 0), (1, 0), (1, 0))), axis=1), axis=2)
    jpdf = weight[:, None, None] * mass + (1 - weight[:, None, None]) * fp[:, :, None] * sp[:, None, :]
    h_joint = _xlogx(jpdf).sum(axis=(1, 2))
    h_s, h_f = _xlogx(sp).sum(axis=1), _xlogx(fp).sum(axis=1)
    mi = h_s + h_f - h_joint
    with np.errstate(divide="ignore", invalid="ignore"):
        nmi = np.where(mi == 0, 0.0, 2 * mi / (h_s + h_f))
    out[~same] = nmi
    return out


def fmi(a: np.ndarray, b: np.ndarray, f: np.ndarray, feature: str = "pixel", window: int = 3, chunk: int = 8192) -> float:
    """Fast FMI: mean over sliding w x w windows of (NMI(A,F) + NMI(B,F)) / 2 on the chosen feature images."""
    fa, fb, ff = (fmi_feature(v, feature) for v in (a, b, f))
    wa, wb, wf = (_windows(v, window) for v in (fa, fb, ff))
    total = 0.0
    for start in range(0, len(wa), chunk):
        sl = slice(start, start + chunk)
        total += (_window_nmi(wa[sl], wf[sl]) + _window_nmi(wb[sl], wf[sl])).sum() / 2
    return float(total / len(wa))


def _ncc(x: np.ndarray, y: np.ndarray, bins: int = 256) -> float:
    """Nonlinear correlation coefficient: (H(X) + H(Y) - H(X,Y)) / log2(b) on 0..255 integer images."""
    ix = np.clip(x, 0, bins - 1).astype(np.intp).ravel()
    iy = np.clip(y, 0, bins - 1).astype(np.intp).ravel()
    h = np.bincount(ix * bins + iy, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    h /= h.sum()
    hx = _xlogx(h.sum(axis=1)).sum()
    hy = _xlogx(h.sum(axis=0)).sum()
    hxy = _xlogx(h).sum()
    return float((hx + hy - hxy) / np.log2(bins))


def qncie(a: np.ndarray, b: np.ndarray, f: np.ndarray, bins: int = 256) -> float:
    """QNCIE = 1 + sum_i (l_i/3) log_b(l_i/3), l_i the eigenvalues of the 3x3 nonlinear correlation matrix.

    Images are min-max normalised to 0..255 and rounded first, as the reference does.
    """
    na, nb, nf = (normalize_255(v) for v in (a, b, f))
    ab, af, bf = _ncc(na, nb, bins), _ncc(na, nf, bins), _ncc(nb, nf, bins)
    r = np.array([[1, ab, af], [ab, 1, bf], [af, bf, 1]])
    lam = np.linalg.eigvalsh(r) / 3.0
    lam = lam[lam > 0]
    return float(1 + (lam * np.log2(lam)).sum() / np.log2(bins))
