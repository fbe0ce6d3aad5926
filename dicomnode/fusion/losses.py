"""Unsupervised fusion losses: SSIM to both sources, max-gradient (Sobel) and max-intensity terms.

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


def _gaussian_1d(device: torch.device, dtype: torch.dtype, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - size // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _window_mean(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Separable (row then column): the 2-D 11x11 kernel's backward pass is ~10x slower on CPU.
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang 2004, 11x11 Gaussian sigma 1.5, K1 0.01, K2 0.03, data range 1), valid region."""
    g = _gaussian_1d(x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _window_mean(x, g), _window_mean(y, g)
    sxx = _window_mean(x * x, g) - mx**2
    syy = _window_mean(y * y, g) - my**2
    sxy = _window_mean(x * y, g) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))


def fusion_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
    """The weighted total and its terms (each a scalar tensor)."""
    l_ssim = 1 - 0.5 * (ssim_map(fused, a).mean() + ssim_map(fused, b).mean())
    ga, gb, gf = sobel_magnitude(a), sobel_magnitude(b), sobel_magnitude(fused)
    l_grad = F.l1_loss(gf, torch.maximum(ga, gb))
    l_int = F.l1_loss(fused, torch.maximum(a, b))
    total = weights.ssim * l_ssim + weights.gradient * l_grad + weights.intensity * l_int
    return {"total": total, "ssim": l_ssim, "gradient": l_grad, "intensity": l_int}
