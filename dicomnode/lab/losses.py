"""Unsupervised fusion losses: SSIM to both sources, max-gradient (Sobel), max-intensity and
local-activity selection terms.

All inputs (N, 1, H, W) float in [0, 1]. Losses are means over the batch (lower is better).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dicomnode.fusion.classical import sobel_magnitude


@dataclass(frozen=True)
class LossWeights:
    ssim: float = 1.0
    gradient: float = 20.0
    intensity: float = 4.0
    selection: float = 0.0  # L1 to the local-activity selection target (activity_selection)
    rule: float = 0.0  # BCE of the selection head's logit to the guarded_selection map


def _gaussian_1d(device: torch.device, dtype: torch.dtype, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - size // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _window_mean(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Separable (row then column): the 2-D 11x11 kernel's backward pass is ~10x slower on CPU.
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius 3 sigma, replicate borders; (N, 1, H, W) -> same shape."""
    radius = int(3 * sigma)
    g = _gaussian_1d(x.device, x.dtype, 2 * radius + 1, sigma)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), g.view(1, 1, -1, 1))


def activity_selection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A near-binary per-pixel selection of the source with more local activity: the fusion target.

    Activity = Gaussian-weighted (sigma 3 px) Sobel magnitude, plus a weaker vote for the brighter
    neighbourhood (sigma 2 px). Copies source intensities where one source dominates (MI, FMI),
    keeps the stronger edges (Qabf); the transition is smooth only where activities are close.
    """
    activity = gaussian_blur(sobel_magnitude(b), 3.0) - gaussian_blur(sobel_magnitude(a), 3.0)
    brighter = gaussian_blur(b, 2.0) - gaussian_blur(a, 2.0)
    w = torch.sigmoid(activity / 0.01 + brighter / 0.05)
    return a + w * (b - a)


def guarded_selection(a: torch.Tensor, b: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """A binary selection map (1 = take B), the selection head's training target.

    Regions, not pixels: per pixel the source with more local activity (Gaussian-weighted Sobel,
    sigma 5 px) plus a vote for the brighter one, then a majority filter (sigma 5 px), so F copies
    whole neighbourhoods of one source (what FMI_pixel, VIF and Qabf reward). Guard: wherever B is
    brighter than A by more than ``margin``, smoothed (sigma 2 px) and also pixel by pixel, B is
    kept, so uptake of the functional image is not dropped for busier anatomy (the metrics alone
    would drop it). The smoothed guard alone lost small and thin uptake (SPECT's, mostly).
    """
    activity = gaussian_blur(sobel_magnitude(b), 5.0) - gaussian_blur(sobel_magnitude(a), 5.0)
    pick_b = (activity / 0.003 + (b - a) / 0.03 > 0).to(a.dtype)
    regions = (gaussian_blur(pick_b, 5.0) > 0.5).to(a.dtype)
    guard = (gaussian_blur((gaussian_blur(b - a, 2.0) > margin).to(a.dtype), 2.0) > 0.5).to(a.dtype)
    exact = (b - a > margin).to(a.dtype)
    return torch.maximum(torch.maximum(regions, guard), exact)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang 2004, 11x11 Gaussian sigma 1.5, K1 0.01, K2 0.03, data range 1), valid region."""
    g = _gaussian_1d(x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _window_mean(x, g), _window_mean(y, g)
    sxx = _window_mean(x * x, g) - mx**2
    syy = _window_mean(y * y, g) - my**2
    sxy = _window_mean(x * y, g) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))


def fusion_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: LossWeights,
                logit: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted total and its terms (each a scalar tensor); ``logit``: the selection head's, for ``rule``."""
    l_ssim = 1 - 0.5 * (ssim_map(fused, a).mean() + ssim_map(fused, b).mean())
    ga, gb, gf = sobel_magnitude(a), sobel_magnitude(b), sobel_magnitude(fused)
    l_grad = F.l1_loss(gf, torch.maximum(ga, gb))
    l_int = F.l1_loss(fused, torch.maximum(a, b))
    total = weights.ssim * l_ssim + weights.gradient * l_grad + weights.intensity * l_int
    terms = {"ssim": l_ssim, "gradient": l_grad, "intensity": l_int}
    if weights.selection:
        with torch.no_grad():
            target = activity_selection(a, b)
        terms["selection"] = F.l1_loss(fused, target)
        total = total + weights.selection * terms["selection"]
    if weights.rule and logit is not None:
        with torch.no_grad():
            target = guarded_selection(a, b)
        terms["rule"] = F.binary_cross_entropy_with_logits(logit, target)
        total = total + weights.rule * terms["rule"]
    return {"total": total, **terms}
