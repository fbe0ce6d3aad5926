"""Explanations of a fused slice: per-pixel modality contribution and a Grad-CAM style saliency map.

Contribution (N, H, W) in [0, 1]: the share of the fused value attributable to the moving image.
For the network, F = (1 - w) A + w B + d, so the moving share is w B / ((1 - w) A + w B) (the
attention weight scaled by what each source brings); where both sources are dark it is w itself.
Saliency (N, H, W): Grad-CAM on the fused bottleneck features, target = sum of the fused slice,
left unnormalised here; the engine scales the whole series by one value (``series_scale``), so
a slice without lesion does not peak in air as a per-slice maximum would make it.

What the node writes as the contribution map is ``luminance_share`` for every method: the
share of the fused luminance that comes from the moving image, from the luminances alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dicomnode.fusion.network import FusionNet


def weighted_contribution(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """Moving share from the weight map w (N,1,H,W) and the sources: w B / ((1 - w) A + w B)."""
    part_b = weight * b
    total = (1 - weight) * a + part_b
    share = torch.where(total > floor, part_b / total.clamp_min(floor), weight)
    return share[:, 0].clamp(0, 1)


def luminance_share(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Share of fused luminance F that comes from the moving luminance B over the fixed A, (N, H, W) in [0, 1].

    F = (1 - s) A + s B solved for s in the least-squares sense with a floor ``tau`` on |B - A|:
    s = (F - A)(B - A) / ((B - A)^2 + tau^2). Where the sources differ clearly this is the blend
    weight of any linear method; where they agree (|B - A| << tau) the moving image adds nothing
    the fixed one did not show, so s -> 0. Inputs (N, 1, H, W) in [0, 1].
    """
    diff = b - a
    share = (fused - a) * diff / (diff * diff + tau * tau)
    return share[:, 0].clamp(0, 1)


def series_scale(values: torch.Tensor) -> torch.Tensor:
    """``values`` divided by their maximum over the whole series (one scale for every slice)."""
    return (values / values.max().clamp_min(1e-12)).clamp(0, 1)


def grad_cam(features: torch.Tensor, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM: ReLU(sum_c mean(dT/dA_c) A_c), upsampled to ``size``; raw (not normalised)."""
    grads = torch.autograd.grad(target, features, retain_graph=False)[0]
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0].detach()


def network_method(model: FusionNet, saliency: bool = True):
    """Wrap the network as a registry method: (a, b) -> (fused, contribution, saliency or None)."""

    def run(a: torch.Tensor, b: torch.Tensor):
        if not saliency:
            with torch.inference_mode():
                out = model(a, b)
            # A selection copies one source per pixel: its 0/1 weight is the contribution (what
            # weighted_contribution returns for w in {0, 1}, without its full-size passes).
            share = out.weight[:, 0] if model.select else weighted_contribution(out.weight, a, b)
            return out.fused, share, None
        with torch.enable_grad():
            out = model(a, b)
            # Per-slice sums keep each slice's Grad-CAM independent of the others in the batch.
            cam = grad_cam(out.features, out.fused.sum(), a.shape[-2:])
        return out.fused.detach(), weighted_contribution(out.weight.detach(), a, b), cam

    return run
