"""Classical fusion baselines in torch (so they run on the GPU too).

Every function fuses grey slices ``a`` (fixed, anatomical) and ``b`` (moving, functional),
both (N, 1, H, W) float in [0, 1], slice by slice (no statistic crosses slices, so results do
not depend on the batch size), and returns ``(fused, contribution)``: fused (N, 1, H, W) in
[0, 1] and the per-pixel share of the fused value attributable to ``b``, (N, H, W) in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
_EPS = 1e-8


def contribution_from_output(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Share of ``fused`` attributable to ``b``: |F-A| / (|F-A| + |F-B|), 0.5 where A = B = F."""
    da, db = (fused - a).abs(), (fused - b).abs()
    total = da + db
    share = torch.where(total > 1e-6, da / total.clamp_min(_EPS), torch.full_like(total, 0.5))
    return share[:, 0].clamp(0, 1)


def average(a: Tensor, b: Tensor, weight: float = 0.5) -> tuple[Tensor, Tensor]:
    """F = (1 - w) A + w B."""
    fused = (1 - weight) * a + weight * b
    return fused, torch.full_like(a[:, 0], weight)


def max_abs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per pixel, the source with the larger absolute value (ties go to the fixed image)."""
    pick_b = b.abs() > a.abs()
    return torch.where(pick_b, b, a), pick_b[:, 0].to(a.dtype)


def pca_weighted(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Weights from the principal eigenvector of the 2x2 covariance of (A, B), per slice."""
    n = a.shape[0]
    x = torch.stack([a.reshape(n, -1), b.reshape(n, -1)], dim=1)  # (N, 2, P)
    x = x - x.mean(dim=2, keepdim=True)
    cov = x @ x.transpose(1, 2) / max(x.shape[2] - 1, 1)
    # Closed-form principal eigenvector of a symmetric 2x2 matrix [[p, q], [q, r]].
    p, q, r = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    lam = (p + r) / 2 + torch.sqrt(((p - r) / 2) ** 2 + q**2)
    v1 = torch.where(q.abs() > 1e-12, lam - r, torch.where(p >= r, torch.ones_like(p), torch.zeros_like(p)))
    v2 = torch.where(q.abs() > 1e-12, q, torch.where(p >= r, torch.zeros_like(p), torch.ones_like(p)))
    v1, v2 = v1.abs(), v2.abs()
    total = v1 + v2
    wa = torch.where(total > 1e-12, v1 / total.clamp_min(1e-12), torch.full_like(total, 0.5)).view(n, 1, 1, 1)
    fused = wa * a + (1 - wa) * b
    return fused, (1 - wa).expand_as(a)[:, 0].clone()


def _gauss_kernel(device: torch.device, dtype: torch.dtype) -> Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device, dtype=dtype) / 16
    return (k[:, None] * k[None, :]).view(1, 1, 5, 5)


def _blur(x: Tensor) -> Tensor:
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), _gauss_kernel(x.device, x.dtype))


def _down(x: Tensor) -> Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    up = torch.zeros(x.shape[0], x.shape[1], size[0], size[1], device=x.device, dtype=x.dtype)
    up[:, :, ::2, ::2] = x
    return _blur(up) * 4


def _laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    pyramid = []
    for _ in range(levels):
        if min(x.shape[-2:]) < 8:
            break
        down = _down(x)
        pyramid.append(x - _up(down, x.shape[-2:]))
        x = down
    pyramid.append(x)
    return pyramid


def laplacian_pyramid(a: Tensor, b: Tensor, levels: int = 4) -> tuple[Tensor, Tensor]:
    """Laplacian pyramids; details by max-abs, the coarsest level averaged (Burt & Adelson)."""
    pa, pb = _laplacian_pyramid(a, levels), _laplacian_pyramid(b, levels)
    fused_levels = [torch.where(lb.abs() > la.abs(), lb, la) for la, lb in zip(pa[:-1], pb[:-1])]
    fused_levels.append((pa[-1] + pb[-1]) / 2)
    out = fused_levels[-1]
    for detail in reversed(fused_levels[:-1]):
        out = _up(out, detail.shape[-2:]) + detail
    fused = out.clamp(0, 1)
    return fused, contribution_from_output(fused, a, b)


def _haar(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    p, q, r, s = x[:, :, ::2, ::2], x[:, :, ::2, 1::2], x[:, :, 1::2, ::2], x[:, :, 1::2, 1::2]
    return (p + q + r + s) / 2, (p - q + r - s) / 2, (p + q - r - s) / 2, (p - q - r + s) / 2


def _ihaar(ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
    n, c, h, w = ll.shape
    out = torch.empty(n, c, h * 2, w * 2, device=ll.device, dtype=ll.dtype)
    out[:, :, ::2, ::2] = (ll + lh + hl + hh) / 2
    out[:, :, ::2, 1::2] = (ll - lh + hl - hh) / 2
    out[:, :, 1::2, ::2] = (ll + lh - hl - hh) / 2
    out[:, :, 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return out


def dwt(a: Tensor, b: Tensor, levels: int = 3) -> tuple[Tensor, Tensor]:
    """Haar DWT; approximation averaged, detail coefficients by max-abs."""
    h, w = a.shape[-2:]
    step = 2**levels
    ph, pw = (-h) % step, (-w) % step
    xa = F.pad(a, (0, pw, 0, ph), mode="replicate") if ph or pw else a
    xb = F.pad(b, (0, pw, 0, ph), mode="replicate") if ph or pw else b
    details = []
    for _ in range(levels):
        ca, cb = _haar(xa), _haar(xb)
        details.append(tuple(torch.where(db.abs() > da.abs(), db, da) for da, db in zip(ca[1:], cb[1:])))
        xa, xb = ca[0], cb[0]
    out = (xa + xb) / 2
    for lh, hl, hh in reversed(details):
        out = _ihaar(out, lh, hl, hh)
    fused = out[:, :, :h, :w].clamp(0, 1)
    return fused, contribution_from_output(fused, a, b)


def box_filter(x: Tensor, r: int) -> Tensor:
    """Mean over a (2r+1)^2 window with replicated borders, O(1) per pixel via integral images."""
    k = 2 * r + 1
    padded = F.pad(x, (r + 1, r, r + 1, r), mode="replicate")
    padded[:, :, 0, :] = 0
    padded[:, :, :, 0] = 0
    integral = padded.cumsum(dim=2).cumsum(dim=3)
    total = integral[:, :, k:, k:] - integral[:, :, :-k, k:] - integral[:, :, k:, :-k] + integral[:, :, :-k, :-k]
    return total / (k * k)


def guided_filter(guide: Tensor, src: Tensor, r: int, eps: float) -> Tensor:
    """He et al. guided filter with a grey guide."""
    r = max(1, min(r, (min(guide.shape[-2:]) - 1) // 2))
    # Float64 sums keep large windows' integral images exact enough on float32 inputs.
    g, p = guide.double(), src.double()
    mean_g, mean_p = box_filter(g, r), box_filter(p, r)
    cov = box_filter(g * p, r) - mean_g * mean_p
    var = box_filter(g * g, r) - mean_g**2
    coef_a = cov / (var + eps)
    coef_b = mean_p - coef_a * mean_g
    return (box_filter(coef_a, r) * g + box_filter(coef_b, r)).to(src.dtype)


def _gaussian_blur(x: Tensor, sigma: float, radius: int) -> Tensor:
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def gff(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Guided-filter fusion (Li, Kang & Hu 2013): two-scale, Laplacian saliency, guided weights."""
    base_a, base_b = box_filter(a, 15), box_filter(b, 15)
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=a.device, dtype=a.dtype)
    sal = [
        _gaussian_blur(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), lap.view(1, 1, 3, 3)).abs(), 5.0, 5)
        for x in (a, b)
    ]
    pick_b = (sal[1] > sal[0]).to(a.dtype)
    w_base = [guided_filter(x, p, 45, 0.3) for x, p in ((a, 1 - pick_b), (b, pick_b))]
    w_detail = [guided_filter(x, p, 7, 1e-6) for x, p in ((a, 1 - pick_b), (b, pick_b))]
    wb = _normalise_pair(*w_base)
    wd = _normalise_pair(*w_detail)
    fused = wb[0] * base_a + wb[1] * base_b + wd[0] * (a - base_a) + wd[1] * (b - base_b)
    fused = fused.clamp(0, 1)
    return fused, contribution_from_output(fused, a, b)


def _normalise_pair(wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
    wa, wb = wa.clamp(0, 1), wb.clamp(0, 1)
    total = wa + wb
    half = torch.full_like(total, 0.5)
    wa = torch.where(total > 1e-6, wa / total.clamp_min(1e-6), half)
    return wa, 1 - wa


def alpha_blend(a: Tensor, b: Tensor, alpha: float = 0.5, threshold: float = 0.02) -> tuple[Tensor, Tensor]:
    """The node's simple overlay: B over A with weight ``alpha`` where B has signal (> threshold).

    ``a`` and ``b`` may have 1 or 3 channels (colour-mapped moving image over grey fixed image);
    signal is judged on the moving image's channel maximum, with a soft edge of one threshold.
    """
    signal = ((b.amax(dim=1, keepdim=True) - threshold) / max(threshold, _EPS)).clamp(0, 1)
    weight = alpha * signal
    fused = (1 - weight) * a + weight * b
    return fused.clamp(0, 1), weight[:, 0]


def sobel_magnitude(x: Tensor) -> Tensor:
    """Sobel gradient magnitude of (N, 1, H, W), replicated borders.

    Separable, from shifted slices: a one-channel 3x3 convolution is a poor fit for oneDNN on CPU.
    """
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    diff = p[..., :, 2:] - p[..., :, :-2]  # [-1 0 1] along x
    smooth = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]  # [1 2 1] along x
    gx = diff[..., :-2, :] + 2 * diff[..., 1:-1, :] + diff[..., 2:, :]
    gy = smooth[..., 2:, :] - smooth[..., :-2, :]
    return torch.sqrt(gx * gx + gy * gy + 1e-12) / (4 * math.sqrt(2))
