"""The fusion interface every method sits behind."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FusionResult:
    """Fused slices and what explains them, all on the fixed grid.

    fused: (N, C, H, W) in [0, 1]; C = 3 (RGB) when the moving input was colour, else 1.
    contribution: (N, H, W) in [0, 1], the share of the fused value attributable to the moving image.
    saliency: (N, H, W) in [0, 1] or None when the method has no saliency notion.
    """

    fused: torch.Tensor
    contribution: torch.Tensor
    saliency: torch.Tensor | None
    method: str


def fuse(fixed: torch.Tensor, moving: torch.Tensor, method: str, device: str = "auto") -> FusionResult:
    """Fuse batches of slices. fixed: (N,1,H,W) grey in [0,1]; moving: (N,1,H,W) grey or (N,3,H,W) RGB."""
    raise NotImplementedError
