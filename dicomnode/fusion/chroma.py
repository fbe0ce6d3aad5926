"""Colour-on-luminance fusion: the fixed image is the luminance, the moving image the colour.

Y (BT.601 luma) of every fused pixel is the prepared fixed image, untouched, so the anatomy keeps
its full contrast and no edge of the moving field of view can show in the luminance. The moving
value picks a chroma (Cb, Cr) from a colour map whose low end is grey: values below a threshold
add no colour, higher ones run blue -> cyan -> green -> yellow -> orange -> red. Chroma is scaled
down per pixel to stay inside the RGB gamut at that luminance (hue and Y kept), and faded out over
a few pixels inside the moving field-of-view edge. Tensors (N, C, H, W) float in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dicomnode.fusion.color import colorize, rgb_to_ycbcr

# (Cb, Cr) -> (R, G, B) offsets of full-range BT.601.
_CHROMA_TO_RGB = ((0.0, 1.402), (-0.344136286, -0.714136286), (1.772, 0.0))
# The colour map whose chroma the moving value selects (its luminance is not used).
CHROMA_MAP = "fusion"


def moving_chroma(moving: torch.Tensor, colormap: str = CHROMA_MAP) -> torch.Tensor:
    """(N, 1, H, W) moving values in [0, 1] -> (N, 2, H, W) chroma (Cb, Cr centred on 0)."""
    rgb = colorize(moving[:, 0].clamp(0, 1), colormap)
    return rgb_to_ycbcr(rgb)[:, 1:] - 0.5


def gamut_scale(y: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """Largest t in [0, 1] per pixel with Y + t * chroma inside the RGB cube; y (N,1,H,W), chroma (N,2,H,W)."""
    t = torch.ones_like(y)
    for kb, kr in _CHROMA_TO_RGB:
        k = kb * chroma[:, :1] + kr * chroma[:, 1:]
        up = torch.where(k > 1e-9, (1 - y) / k.clamp_min(1e-9), torch.ones_like(y))
        down = torch.where(k < -1e-9, y / (-k).clamp_min(1e-9), torch.ones_like(y))
        t = torch.minimum(t, torch.minimum(up, down))
    return t.clamp(0, 1)


def feather(fov: torch.Tensor, pixels: int) -> torch.Tensor:
    """(N, 1, H, W) 0/1 field of view -> weight rising from 0 at its edge to 1 ``pixels`` inside."""
    if pixels <= 0 or bool(fov.all()):  # a moving image covering the slices has no edge to fade
        return fov
    weight = fov
    for _ in range(pixels):  # repeated 3x3 erosion: the weight is the in-plane distance to the edge
        weight = weight + -F.max_pool2d(-fov, 3, 1, 1)
        fov = -F.max_pool2d(-fov, 3, 1, 1)
    return ((weight - 1).clamp_min(0) / pixels).clamp(0, 1)


def colour_strength(fused: torch.Tensor, colormap: str = CHROMA_MAP, saturation: float = 1.0) -> torch.Tensor:
    """(N, 3, H, W) fused RGB -> (N, H, W) chroma magnitude over the colour map's full colour, in [0, 1].

    In this fusion the moving image contributes the colour and none of the luminance, so this is
    its share of the pixel: 0 where the pixel is the fixed image alone, 1 at full colour. Full
    colour is 0.8 of the map's strongest chroma, below which its saturated hues never dip (so the
    share does not ripple with the hue).
    """
    ramp = torch.linspace(0, 1, 256, dtype=fused.dtype, device=fused.device).view(1, 1, 1, -1)
    strongest = 0.8 * float(moving_chroma(ramp, colormap).norm(dim=1).max()) * saturation
    ycc = rgb_to_ycbcr(fused)
    chroma = torch.hypot(ycc[:, 1] - 0.5, ycc[:, 2] - 0.5)
    return (chroma / max(strongest, 1e-6)).clamp(0, 1)


def chroma_fusion(fixed: torch.Tensor, moving: torch.Tensor, fov: torch.Tensor | None = None, *,
                  saturation: float = 1.0, feather_px: int = 4, colormap: str = CHROMA_MAP,
                  lift: float = 0.0) -> torch.Tensor:
    """Fixed luminance with the moving image as colour -> (N, 3, H, W) RGB in [0, 1].

    fixed, moving: (N, 1, H, W) prepared to [0, 1]; fov: (N, 1, H, W) 1 inside the moving field
    of view (None: everywhere). ``saturation`` scales the chroma before the gamut limit; ``lift``
    maps the fixed image onto Y in [lift, 1 - lift], so black and white pixels can carry colour too.
    """
    y = lift + (1 - 2 * lift) * fixed.clamp(0, 1)
    chroma = saturation * moving_chroma(moving, colormap)
    if fov is not None:
        chroma = chroma * feather(fov.to(chroma.dtype), feather_px)
    chroma = chroma * gamut_scale(y, chroma)
    r = y + _CHROMA_TO_RGB[0][1] * chroma[:, 1:]
    g = y + _CHROMA_TO_RGB[1][0] * chroma[:, :1] + _CHROMA_TO_RGB[1][1] * chroma[:, 1:]
    b = y + _CHROMA_TO_RGB[2][0] * chroma[:, :1]
    return torch.cat([r, g, b], dim=1).clamp(0, 1)
