"""Colour handling: BT.601 RGB <-> YCbCr and colour maps for functional images.

All tensors are float in [0, 1] with channels on dim 1: RGB / YCbCr (N, 3, H, W).
Full-range BT.601 (JPEG convention): Y in [0, 1], Cb and Cr centred on 0.5.
"""

from __future__ import annotations

import torch

from dicomnode import domain

# Full-range BT.601 (ITU-R BT.601 luma weights, JPEG/JFIF scaling).
_RGB_TO_YCBCR = (
    domain.LUMA_WEIGHTS,
    (-0.168735892, -0.331264108, 0.5),
    (0.5, -0.418687589, -0.081312411),
)
_YCBCR_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136286, -0.714136286),
    (1.0, 1.772, 0.0),
)

# Colour maps as piecewise-linear (position, r, g, b) control points on [0, 1].
_COLORMAPS: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    # black -> red -> yellow -> white, the classic PET "hot" map
    "hot": ((0.0, 0, 0, 0), (0.365, 1, 0, 0), (0.746, 1, 1, 0), (1.0, 1, 1, 1)),
    # dark blue -> blue -> cyan -> yellow -> red -> dark red
    "jet": ((0.0, 0, 0, 0.5), (0.11, 0, 0, 1), (0.125, 0, 0, 1), (0.34, 0, 1, 1),
            (0.65, 1, 1, 0), (0.89, 1, 0, 0), (1.0, 0.5, 0, 0)),
    # PET rainbow used by nuclear medicine viewers: black -> purple -> blue -> green -> yellow -> red -> white
    "pet": ((0.0, 0, 0, 0), (0.15, 0.4, 0, 0.55), (0.3, 0, 0, 1), (0.45, 0, 0.8, 0.3),
            (0.6, 0.9, 0.9, 0), (0.8, 1, 0.1, 0), (1.0, 1, 1, 1)),
    "gray": ((0.0, 0, 0, 0), (1.0, 1, 1, 1)),
    # Grey (no colour) up to 0.1, then blue -> cyan -> green -> yellow -> orange -> red: every value
    # above the floor has its own hue. Used for its chroma by the colour-on-luminance fusion.
    "fusion": ((0.0, 0.5, 0.5, 0.5), (0.1, 0.5, 0.5, 0.5), (0.25, 0, 0, 1), (0.4, 0, 1, 1), (0.55, 0, 1, 0),
               (0.7, 1, 1, 0), (0.85, 1, 0.5, 0), (1.0, 1, 0, 0)),
}


class UnknownColormap(ValueError):
    """A configured colour map name that this node does not provide."""


def colormap_names() -> tuple[str, ...]:
    return tuple(sorted(_COLORMAPS))


def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> YCbCr in [0, 1] (Cb, Cr offset by 0.5), BT.601 full range."""
    out = torch.einsum("ij,njhw->nihw", _matrix(_RGB_TO_YCBCR, rgb), rgb)
    offset = torch.tensor([0.0, 0.5, 0.5], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return out + offset


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_ycbcr``; not clamped, so the round trip is exact in float."""
    offset = torch.tensor([0.0, 0.5, 0.5], dtype=ycbcr.dtype, device=ycbcr.device).view(1, 3, 1, 1)
    return torch.einsum("ij,njhw->nihw", _matrix(_YCBCR_TO_RGB, ycbcr), ycbcr - offset)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) BT.601 luma; a one-channel image is returned as it is."""
    if rgb.shape[1] == 1:
        return rgb
    return domain.luma(rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3])


def is_grey(rgb: torch.Tensor, tolerance: float = 1.0 / 255.0) -> bool:
    """True when a (N, 3, H, W) image has equal channels (a grey image stored as RGB)."""
    return bool((rgb.amax(dim=1) - rgb.amin(dim=1)).max() <= tolerance)


def colorize(gray: torch.Tensor, name: str = "hot") -> torch.Tensor:
    """Map (N, H, W) values in [0, 1] through a colour map -> (N, 3, H, W) RGB in [0, 1]."""
    if name not in _COLORMAPS:
        raise UnknownColormap(f"unknown colour map {name!r}; available: {', '.join(colormap_names())}")
    points = torch.tensor(_COLORMAPS[name], dtype=torch.float32, device=gray.device)
    pos, colours = points[:, 0].contiguous(), points[:, 1:]
    x = gray.float().clamp(0, 1)
    idx = torch.searchsorted(pos, x.reshape(-1).contiguous(), right=True).clamp(1, len(pos) - 1)
    lo, hi = pos[idx - 1], pos[idx]
    t = ((x.reshape(-1) - lo) / (hi - lo).clamp_min(1e-12)).unsqueeze(1)
    rgb = colours[idx - 1] * (1 - t) + colours[idx] * t
    n, h, w = gray.shape
    return rgb.reshape(n, h, w, 3).permute(0, 3, 1, 2).to(gray.dtype if gray.is_floating_point() else torch.float32)
