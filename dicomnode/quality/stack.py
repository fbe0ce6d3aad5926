"""The per-series default metrics (EN, MI, SSIM, Qabf, VIF) computed on a stack of slices at once.

Each function takes (N, H, W) float arrays on 0..255, slice index first, and returns one value per
slice: the same value the 2-D reference in basic.py, structural.py or perceptual.py gives for that
slice (agreeing to rounding, about 1e-12). Why a second implementation: a series holds tens of
small slices, and slice by slice the fixed cost of each filter call and numpy operation outweighs
the arithmetic. Filters run along the row and column axes only (never across slices), in the
reference's axis order, so every filtered pixel is computed as in the reference; terms that only
depend on F are computed once for both sources.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, special

from dicomnode.quality.structural import _gauss1d, vif_terms


def _bin_index(x: np.ndarray, bins: int) -> np.ndarray:
    """Histogram bin of every pixel as basic.histogram_256 bins it: equal width over [0, 256), clipped."""
    return np.clip(np.floor(x * (bins / 256.0)), 0, bins - 1).astype(np.intp)


def entropy_stack(x: np.ndarray, bins: int = 256, base: float = 2.0) -> np.ndarray:
    """Per-slice Shannon entropy of the grey-level histogram (basic.entropy), bits when base=2."""
    n = x.shape[0]
    idx = _bin_index(x, bins).reshape(n, -1) + (np.arange(n) * bins)[:, None]
    counts = np.bincount(idx.ravel(), minlength=n * bins).reshape(n, bins).astype(np.float64)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) / np.log(base)), 0.0)
    return -terms.sum(axis=1)


def _entropy_of_counts(counts: np.ndarray, pixels: int, base: float) -> np.ndarray:
    """Per-row entropy of (N, bins) counts over ``pixels`` samples: log n - sum c log c / n."""
    return (np.log(pixels) - special.xlogy(counts, counts).sum(axis=1) / pixels) / np.log(base)


class _JointHistograms:
    """Per-slice 256-bin histograms of F and of each source jointly with F, for MI = H(X) + H(F) - H(X, F)."""

    def __init__(self, f: np.ndarray, bins: int = 256):
        self.n, self.bins = f.shape[0], bins
        self.pixels = f[0].size
        self.iy = _bin_index(f, bins).reshape(self.n, -1)
        self.hy = self._entropy(self.iy, bins)

    def _entropy(self, code: np.ndarray, bins: int, base: float = np.e) -> np.ndarray:
        offset = (np.arange(self.n) * bins)[:, None]
        counts = np.bincount((code + offset).ravel(), minlength=self.n * bins).reshape(self.n, bins)
        return _entropy_of_counts(counts.astype(np.float64), self.pixels, base)

    def mutual_information(self, x: np.ndarray, base: float = 2.0) -> np.ndarray:
        """Per-slice I(X;F) from the 256-bin joint histogram (basic.mutual_information), in log ``base``."""
        ix = _bin_index(x, self.bins).reshape(self.n, -1)
        hx = self._entropy(ix, self.bins)
        hxy = self._entropy(ix * self.bins + self.iy, self.bins * self.bins)
        return (hx + self.hy - hxy) / np.log(base)


def _blur_valid(v: np.ndarray, sigma: float, crop: int) -> np.ndarray:
    """structural.ssim's Gaussian blur on every slice, cropped by ``crop`` pixels on each side.

    Same kernel, reflected borders and axis order (rows, then columns) as gaussian_filter in 2-D;
    the column pass runs on the kept rows only, which gives the same pixels.
    """
    rows, cols = v.shape[1:]
    out = ndimage.gaussian_filter1d(v, sigma, axis=1, truncate=3.5, mode="reflect")[:, crop : rows - crop]
    out = ndimage.gaussian_filter1d(out, sigma, axis=2, truncate=3.5, mode="reflect")
    return out[:, :, crop : cols - crop]


def ssim_stack(
    sources: list[np.ndarray], f: np.ndarray, data_range: float = 255.0, sigma: float = 1.5
) -> list[np.ndarray]:
    """Per-slice mean SSIM of each source against F over the valid map (structural.ssim)."""
    radius = int(3.5 * sigma + 0.5)
    crop = radius if min(f.shape[1:]) > 2 * radius else 0
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    my = _blur_valid(f, sigma, crop)
    my2 = my * my
    vy = _blur_valid(f * f, sigma, crop) - my2
    out = []
    for x in sources:
        mx = _blur_valid(x, sigma, crop)
        vx = _blur_valid(x * x, sigma, crop) - mx * mx
        cxy = _blur_valid(x * f, sigma, crop) - mx * my
        smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my2 + c1) * (vx + vy + c2))
        out.append(smap.mean(axis=(1, 2)))
    return out


def _filter_valid(img: np.ndarray, g: np.ndarray, step: int = 1) -> np.ndarray:
    """structural._filter_valid on every slice, optionally keeping every ``step``-th row and column.

    Only the rows kept go through the column pass, which gives the same pixels as filtering all
    and cropping afterwards (each output line is computed on its own).
    """
    r = len(g) // 2
    rows, cols = img.shape[1:]
    out = ndimage.correlate1d(img, g, axis=1, mode="constant")[:, r : rows - r : step]
    out = ndimage.correlate1d(out, g, axis=2, mode="constant")
    return out[:, :, r : cols - r : step]


def vifp_stack(sources: list[np.ndarray], f: np.ndarray, sigma_nsq: float = 2.0) -> list[np.ndarray]:
    """Per-slice pixel-domain VIF of F against each source (structural.vifp); NaN where a source is flat."""
    n = f.shape[0]
    refs = [x.astype(np.float64) for x in sources]
    dist = f.astype(np.float64)
    num = [np.zeros(n) for _ in refs]
    den = [np.zeros(n) for _ in refs]
    for scale in range(1, 5):
        width = 2 ** (4 - scale + 1) + 1
        g = _gauss1d(width, width / 5.0)
        if scale > 1:
            refs = [_filter_valid(x, g, step=2) for x in refs]
            dist = _filter_valid(dist, g, step=2)
        if min(dist.shape[1:]) < width:
            break
        mu2 = _filter_valid(dist, g)
        s2 = _filter_valid(dist * dist, g) - mu2 * mu2
        s2[s2 < 0] = 0
        for k, ref in enumerate(refs):
            mu1 = _filter_valid(ref, g)
            s1 = _filter_valid(ref * ref, g) - mu1 * mu1
            s12 = _filter_valid(ref * dist, g) - mu1 * mu2
            _, vid, vind = vif_terms(s1, s2, s12, sigma_nsq)
            num[k] += vid.sum(axis=(1, 2))
            den[k] += vind.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return [np.where(d > 0, nm / np.where(d > 0, d, 1), np.nan) for nm, d in zip(num, den, strict=True)]


def _sobel_qabf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """perceptual's ndimage.convolve with _QABF_H3 and _QABF_H1 (zero padding) on every slice.

    The terms are added in the order ndimage takes the kernel's non-zero weights and the weights are
    +-1, +-2, so every sum is the one ndimage computes; slicing skips ndimage's per-call setup.
    """
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    rows, cols = x.shape[1:]

    def at(dr: int, dc: int) -> np.ndarray:  # x shifted so that out[i, j] reads x[i + dr, j + dc]
        return p[:, 1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]

    gx = at(-1, -1) - at(-1, 1) + 2 * at(0, -1) - 2 * at(0, 1) + at(1, -1) - at(1, 1)
    gy = -at(-1, -1) - 2 * at(-1, 0) - at(-1, 1) + at(1, -1) + 2 * at(1, 0) + at(1, 1)
    return gx, gy


def _edge_strength_orientation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = _sobel_qabf(x)
    vertical = gx == 0
    angle = np.divide(gy, gx, out=np.zeros_like(gy), where=~vertical)
    np.arctan(angle, out=angle)
    angle[vertical] = np.pi / 2
    return np.hypot(gx, gy), angle


def qabf_stack(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Per-slice Q^AB/F with the standard constants (perceptual.qabf defaults); NaN where no source has an edge."""
    gamma_g, kappa_g, sigma_g = 0.9994, -15.0, 0.5
    gamma_a, kappa_a, sigma_a = 0.9879, -22.0, 0.8
    gf, af = _edge_strength_orientation(f)

    def preserved_weighted(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gs, as_ = _edge_strength_orientation(x)
        # min/max is the reference's gf/gs or gs/gf, whichever is below 1; 0 where either edge is 0.
        hi = np.maximum(gs, gf)
        rel = np.divide(np.minimum(gs, gf), hi, out=np.zeros_like(hi), where=hi > 0)
        orient = 1 - np.abs(as_ - af) / (np.pi / 2)
        qg = gamma_g / (1 + np.exp(kappa_g * (rel - sigma_g)))
        qa = gamma_a / (1 + np.exp(kappa_a * (orient - sigma_a)))
        return (qg * qa * gs).sum(axis=(1, 2)), gs.sum(axis=(1, 2))

    num_a, den_a = preserved_weighted(a)
    num_b, den_b = preserved_weighted(b)
    num, den = num_a + num_b, den_a + den_b
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
