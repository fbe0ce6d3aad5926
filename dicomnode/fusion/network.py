"""The attention fusion network: a small multi-scale, edge-aware, attention-gated fusion CNN.

In the spirit of EMA-FuseNet (multi-scale encoder with channel, spatial and cross-modal
attention, edge-aware decoder) and ECFusion (Sobel edge prior). The network predicts, per
pixel, a weight map ``w`` (the moving image's share) and a small detail residual ``d``:
``F = (1 - w) A + w B + d``. Predicting weights keeps source intensities (what MI and SSIM
reward) while the residual can restore edges that a convex blend softens (what Qabf rewards).
The selection head (``select=True``, tag ``attention-selection-v2``, the shipped weights) uses the
same layers without the residual and rounds ``w`` at inference, so each fused pixel copies a source.

Inputs are grey luminance slices (N, 1, H, W) in [0, 1]; any H, W (padded to a multiple of 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.fusion.classical import sobel_magnitude

ARCHITECTURE = "attention-fusion-v1"  # blend head: F = (1 - w) A + w B + d
SELECTION_ARCHITECTURE = "attention-selection-v2"  # same layers, selection head: F = A or B per pixel


@dataclass(frozen=True)
class NetOutput:
    """fused (N,1,H,W) in [0,1]; weight (N,1,H,W) share of B; bottleneck features for Grad-CAM;
    logit: the weight before its sigmoid (the selection head's training target is set on it)."""

    fused: torch.Tensor
    weight: torch.Tensor
    detail: torch.Tensor
    features: torch.Tensor
    logit: torch.Tensor | None = None


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    # Zero padding: replicate padding costs a full copy per layer on CPU, and the borders of
    # medical slices are background.
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2), nn.LeakyReLU(0.1, inplace=True))


class ChannelSpatialAttention(nn.Module):
    """CBAM-style: squeeze-excite channel gate (mean-pooled), then a 7x7 spatial gate from mean/max maps."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LeakyReLU(0.1), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.channel(x.mean(dim=(2, 3), keepdim=True)))
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))


class CrossModalAttention(nn.Module):
    """Per-pixel, per-channel gate choosing between the two modalities' features."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv2d(3 * channels, channels, 1)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([fa, fb, (fa - fb).abs()], dim=1)))
        return F.leaky_relu(self.mix(torch.lerp(fa, fb, g)), 0.1)  # g * fb + (1 - g) * fa


class Encoder(nn.Module):
    """Shared by both modalities: image + Sobel edge in, features at 1/2, 1/4 and 1/8 scale."""

    def __init__(self, widths: tuple[int, int, int]):
        super().__init__()
        c1, c2, c3 = widths
        self.stages = nn.ModuleList([
            _conv(2, c1, 2),
            nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2)),
            nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3)),
        ])
        self.attention = nn.ModuleList([ChannelSpatialAttention(c) for c in widths])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage, attend in zip(self.stages, self.attention):
            x = attend(stage(x))
            feats.append(x)
        return feats


class FusionNet(nn.Module):
    """Multi-scale attention fusion network (~50 k parameters with the default widths).

    The heavy layers run at 1/2-1/8 scale; a small full-resolution edge-aware refinement sees
    both sources, their Sobel edges and the upsampled coarse decision, so edges stay sharp.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 32), refine: int = 8, select: bool = False):
        super().__init__()
        self.widths = tuple(widths)
        self.refine_width = refine
        # Selection head: no residual; in eval mode w is rounded, so F copies A or B exactly per pixel
        # (source intensities and local structure survive 8-bit storage unchanged).
        self.select = select
        c1, c2, c3 = widths
        self.encoder = Encoder(self.widths)
        self.cross = nn.ModuleList([CrossModalAttention(c) for c in widths])
        self.up2 = _conv(c3 + c2, c2)
        self.up1 = _conv(c2 + c1, c1, kernel=1)
        self.coarse_head = nn.Conv2d(c1, 4, 1)
        # Edge-aware refinement at full resolution: coarse decision + A, B + Sobel edges of both.
        self.refine = nn.Sequential(_conv(8, refine), nn.Conv2d(refine, 2, 3, padding=1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> NetOutput:
        h, w = a.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8
        if ph or pw:
            a = F.pad(a, (0, pw, 0, ph), mode="replicate")
            b = F.pad(b, (0, pw, 0, ph), mode="replicate")
        # Sobel magnitudes are small (<= ~0.35 for unit steps); rescale to roughly [0, 1].
        ea, eb = sobel_magnitude(a) * 3, sobel_magnitude(b) * 3
        n = a.shape[0]
        x = torch.cat([torch.cat([a, ea], 1), torch.cat([b, eb], 1)], dim=0)
        feats = self.encoder(x.contiguous(memory_format=torch.channels_last))
        f1, f2, f3 = (cross(f[:n], f[n:]) for cross, f in zip(self.cross, feats))
        bottleneck = f3
        x = self.up2(torch.cat([F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False), f2], 1))
        x = self.up1(torch.cat([F.interpolate(x, size=f1.shape[-2:], mode="bilinear", align_corners=False), f1], 1))
        coarse = F.interpolate(self.coarse_head(x), size=a.shape[-2:], mode="bilinear", align_corners=False)
        out = self.refine(torch.cat([coarse, a, b, ea, eb], dim=1))
        logit = out[:, :1] + coarse[:, :1]
        weight = torch.sigmoid(logit)
        if self.select:
            detail = torch.zeros_like(weight)
            if self.training:
                fused = (1 - weight) * a + weight * b
            elif torch.is_grad_enabled():
                # Straight-through for a gradient (Grad-CAM): the value is the hard choice.
                weight = (logit > 0).to(weight.dtype) + (weight - weight.detach())
                fused = (1 - weight) * a + weight * b
            else:
                choose_b = logit > 0
                weight = choose_b.to(weight.dtype)
                fused = torch.where(choose_b, b, a)  # the same values as the blend with w in {0, 1}, one pass
        else:
            detail = 0.25 * torch.tanh(out[:, 1:] + coarse[:, 1:2])
            fused = ((1 - weight) * a + weight * b + detail).clamp(0, 1)
        return NetOutput(fused[..., :h, :w].contiguous(), weight[..., :h, :w].contiguous(),
                         detail[..., :h, :w].contiguous(), bottleneck, logit[..., :h, :w].contiguous())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class WeightsError(RuntimeError):
    """Configured network weights are missing, unreadable or built for another architecture."""


def save_weights(model: FusionNet, path: Path, meta: dict | None = None) -> None:
    """Write a plain dict (architecture tag, widths, tensors, metadata) loadable with weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "architecture": SELECTION_ARCHITECTURE if model.select else ARCHITECTURE,
        "widths": list(model.widths),
        "refine": model.refine_width,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_model(path: Path, device: torch.device | str = "cpu") -> FusionNet:
    """Build the network from a weights file; WeightsError with the reason when it cannot."""
    if not path.is_file():
        raise WeightsError(f"fusion network weights not found at {path} (set fusion.weights or run 'dicomnode train')")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same admin problem
        raise WeightsError(f"fusion network weights at {path} are unreadable: {exc}") from exc
    known = (ARCHITECTURE, SELECTION_ARCHITECTURE)
    if not isinstance(payload, dict) or payload.get("architecture") not in known:
        found = payload.get("architecture") if isinstance(payload, dict) else type(payload).__name__
        raise WeightsError(f"weights at {path} are for architecture {found!r}, this node runs {' or '.join(map(repr, known))}")
    tag = payload["architecture"]
    try:
        model = FusionNet(tuple(payload["widths"]), int(payload["refine"]), select=tag == SELECTION_ARCHITECTURE)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise WeightsError(f"weights at {path} do not match the {tag} network: {exc}") from exc
    # channels_last: the small-channel convolutions run ~1.3x faster on CPU (oneDNN) in this layout.
    return model.to(device, memory_format=torch.channels_last).eval()
