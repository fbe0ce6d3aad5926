"""The fusion interface every method sits behind, and the registry of methods.

``fuse(fixed, moving, method)`` takes slices already resampled onto the fixed grid and prepared
to [0, 1] (``dicomnode.fusion.prepare``). A colour (RGB) moving image, or a grey functional one
given a colour map, is fused on luminance: RGB -> YCbCr, fuse Y with the fixed image, keep the
moving chroma, back to RGB. Slices are processed in batches; no statistic crosses slices, so the
result does not depend on the batch size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dicomnode.domain import CHROMA  # a colour method: runs in FusionEngine, has no grey-level form for get_method
from dicomnode.fusion import classical
from dicomnode.fusion.chroma import chroma_fusion, colour_strength
from dicomnode.fusion.color import colorize, is_grey, luma, rgb_to_ycbcr, ycbcr_to_rgb
from dicomnode.fusion.explain import luminance_share, series_scale

log = logging.getLogger(__name__)

NETWORK = "network"
# The installed package: ``models/`` in it holds the shipped weights (package data in a wheel; a
# link to the project's models/ folder in a source checkout).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FusionResult:
    """Fused slices and what explains them, all on the fixed grid.

    fused: (N, C, H, W) in [0, 1]; C = 3 (RGB) when the moving input was colour, else 1.
    contribution: (N, H, W) in [0, 1], the share of the fused luminance that comes from the moving
    image (``explain.luminance_share``, the same definition for every method).
    saliency: (N, H, W) in [0, 1], one scale for the whole series, or None when the method has none.
    """

    fused: torch.Tensor
    contribution: torch.Tensor
    saliency: torch.Tensor | None
    method: str


class UnknownMethod(ValueError):
    """A fusion method name that is not in the registry."""


# A method maps grey (N,1,H,W) fixed and moving luminance to (fused Y, contribution, saliency|None).
GreyMethod = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]

_DESCRIPTIONS = {
    "average": "weighted average, w = 0.5",
    "maxabs": "per-pixel max-abs selection",
    "pca": "PCA-weighted average",
    "laplacian": "Laplacian pyramid, max-abs details",
    "dwt": "Haar DWT, averaged approximation, max-abs details",
    "gff": "guided-filter fusion (Li et al. 2013)",
    "alpha": "the node's overlay: colour-mapped moving over grey fixed, alpha where it has signal",
    CHROMA: "fixed image as the luminance, moving image as the colour (hue by value), feathered at its field-of-view edge",
    NETWORK: "the trained attention fusion network (models/fusion_net.pt)",
}


def available_methods() -> dict[str, str]:
    """Method name -> one-line description."""
    return dict(_DESCRIPTIONS)


def resolve_weights(path: Path) -> Path:
    """A relative weights path is tried from the working directory, then from the installed package."""
    if path.is_absolute() or path.exists():
        return path
    candidate = PACKAGE_ROOT / path
    return candidate if candidate.exists() else path


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("fusion device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def check_method_available(name: str, fusion_config=None) -> None:
    """Raise UnknownMethod / WeightsError when ``name`` cannot run with this configuration."""
    if name not in _DESCRIPTIONS:
        raise UnknownMethod(f"unknown fusion method {name!r}; available: {', '.join(sorted(_DESCRIPTIONS))}")
    if name == NETWORK:
        from dicomnode.fusion.network import load_model

        load_model(resolve_weights(_config(fusion_config).weights), "cpu")


def _config(fusion_config):
    if fusion_config is None:
        from dicomnode.config import FusionConfig

        return FusionConfig()
    return fusion_config


def get_method(name: str, fusion_config=None, device: str | torch.device = "cpu") -> GreyMethod:
    """The grey-level fusion function for ``name`` (the network is loaded onto ``device``)."""
    cfg = _config(fusion_config)
    simple: dict[str, Callable] = {
        "average": classical.average,
        "maxabs": classical.max_abs,
        "pca": classical.pca_weighted,
        "laplacian": classical.laplacian_pyramid,
        "dwt": classical.dwt,
        "gff": classical.gff,
    }
    if name in simple:
        fn = simple[name]
        return lambda a, b: (*fn(a, b), None)
    if name == "alpha":
        return lambda a, b: (*classical.alpha_blend(a, b, cfg.alpha, cfg.alpha_threshold), None)
    if name == CHROMA:
        raise UnknownMethod("chroma fuses into colour and has no grey-level form; use FusionEngine")
    if name == NETWORK:
        from dicomnode.fusion.explain import network_method
        from dicomnode.fusion.network import load_model

        model = load_model(resolve_weights(cfg.weights), resolve_device(device))
        return network_method(model, saliency=cfg.saliency)
    raise UnknownMethod(f"unknown fusion method {name!r}; available: {', '.join(sorted(_DESCRIPTIONS))}")


class FusionEngine:
    """One method bound to a device and configuration; reuse it for many batches."""

    def __init__(self, method: str, fusion_config=None, device: str | torch.device = "auto"):
        self.config = _config(fusion_config)
        self.method = method
        self.device = resolve_device(device)
        if method not in _DESCRIPTIONS:
            raise UnknownMethod(f"unknown fusion method {method!r}; available: {', '.join(sorted(_DESCRIPTIONS))}")
        self._grey = None if method == CHROMA else get_method(method, self.config, self.device)
        self._lift = 0.0

    def fuse(self, fixed: torch.Tensor, moving: torch.Tensor, colormap: str | None = None,
             fov: torch.Tensor | None = None, modality: str | None = None, scale_saliency: bool = True) -> FusionResult:
        """fixed: (N,1,H,W) grey in [0,1]; moving: (N,1,H,W) grey or (N,3,H,W) RGB.

        ``colormap``: colour-map a grey moving image first (functional modalities; not chroma,
        which has its own). ``fov``: (N,1,H,W) 1 inside the moving field of view (chroma fades its
        colour out at that edge). ``modality``: the moving modality (chroma's luminance lift).
        ``scale_saliency`` False returns the raw saliency, for a caller that scales a series it
        fuses slab by slab itself (``series_scale`` over all slabs).
        """
        self._lift = dict(self.config.chroma_lift).get((modality or "").upper(), 0.0)
        if fixed.ndim != 4 or fixed.shape[1] != 1:
            raise ValueError(f"fixed must be (N, 1, H, W), got {tuple(fixed.shape)}")
        if moving.ndim != 4 or moving.shape[1] not in (1, 3) or moving.shape[0] != fixed.shape[0] or moving.shape[-2:] != fixed.shape[-2:]:
            raise ValueError(f"moving {tuple(moving.shape)} does not match fixed {tuple(fixed.shape)}")
        step = self.config.batch_size
        parts = [self._fuse_batch(fixed[i : i + step], moving[i : i + step], colormap,
                                  None if fov is None else fov[i : i + step])
                 for i in range(0, fixed.shape[0], step)]
        saliency = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        if saliency is not None and scale_saliency:
            saliency = series_scale(saliency)
        return FusionResult(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), saliency, self.method)

    def _fuse_batch(self, fixed: torch.Tensor, moving: torch.Tensor, colormap: str | None, fov: torch.Tensor | None):
        fixed = fixed.to(self.device, torch.float32)
        moving = moving.to(self.device, torch.float32)
        if self.method == CHROMA:
            cfg = self.config
            fused = chroma_fusion(fixed, luma(moving), None if fov is None else fov.to(self.device, torch.float32),
                                  saturation=cfg.chroma_saturation, feather_px=cfg.chroma_feather_px,
                                  colormap=cfg.chroma_colormap, lift=self._lift)
            return fused.cpu(), colour_strength(fused, cfg.chroma_colormap, cfg.chroma_saturation).cpu(), None
        if moving.shape[1] == 3 and is_grey(moving):
            moving = moving.mean(dim=1, keepdim=True)
        if moving.shape[1] == 1 and colormap:
            moving = colorize(moving[:, 0], colormap)
        if self.method == "alpha":
            # The overlay blends in RGB: colour-mapped moving over the grey fixed image.
            base = fixed.expand(-1, moving.shape[1], -1, -1)
            fused, _, saliency = self._grey(base, moving)
            return fused.cpu(), self._share(luma(fused), fixed, luma(moving)), saliency
        if moving.shape[1] == 1:
            fused, _, saliency = self._grey(fixed, moving)
            fused = fused.clamp(0, 1)
            return fused.cpu(), self._share(fused, fixed, moving), None if saliency is None else saliency.cpu()
        ycc = rgb_to_ycbcr(moving)
        fused_y, _, saliency = self._grey(fixed, ycc[:, :1])
        fused = ycbcr_to_rgb(torch.cat([fused_y, ycc[:, 1:]], dim=1)).clamp(0, 1)
        return fused.cpu(), self._share(fused_y, fixed, ycc[:, :1]), None if saliency is None else saliency.cpu()

    def _share(self, fused_y: torch.Tensor, fixed: torch.Tensor, moving_y: torch.Tensor) -> torch.Tensor:
        # One definition for every method, so a 0/1 selection head still yields a graded share.
        return luminance_share(fused_y, fixed, moving_y, self.config.contribution_tau).cpu()


def fuse(fixed: torch.Tensor, moving: torch.Tensor, method: str, device: str = "auto",
         fusion_config=None, colormap: str | None = None, fov: torch.Tensor | None = None,
         modality: str | None = None) -> FusionResult:
    """Fuse batches of slices. fixed: (N,1,H,W) grey in [0,1]; moving: (N,1,H,W) grey or (N,3,H,W) RGB."""
    return FusionEngine(method, fusion_config, device).fuse(fixed, moving, colormap, fov, modality)
