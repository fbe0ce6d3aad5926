"""Slabs of slices: how processing walks a whole-body series in bounded memory.

A slab is a run of consecutive fixed slices that goes through prepare -> fuse -> explain as one
piece; what must see the whole series (saliency's one scale, the quality sample) is kept per slice
in a ``ScratchStack`` on disk and finished after the last slab, so the result equals processing
the series at once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def slab_bounds(count: int, slab_slices: int, batch_size: int) -> tuple[int, list[tuple[int, int]]]:
    """(batch, [(start, stop), ...]) covering ``count`` slices.

    The fusion batch is at most one slab and a slab is a whole number of batches, so every batch
    holds the same slices whatever the slab size: the network sees what it would see on the
    whole series.
    """
    batch = max(1, min(int(batch_size), int(slab_slices)))
    step = max(batch, int(slab_slices) // batch * batch)
    return batch, [(lo, min(lo + step, count)) for lo in range(0, count, step)]


class ScratchStack:
    """float32 (N, H, W) planes written slab by slab to a scratch file and read back by slice.

    Plain file reads rather than a memory map: pages of a map would count as the process's memory.
    """

    def __init__(self, folder: Path, name: str, shape: tuple[int, int]):
        self.path = Path(folder) / f"{name}.f32"
        self.plane = int(shape[0]) * int(shape[1])
        self.shape = (int(shape[0]), int(shape[1]))
        self.count = 0
        self._out = open(self.path, "wb")

    def append(self, planes: np.ndarray) -> None:
        planes = np.ascontiguousarray(planes, dtype=np.float32)
        self._out.write(planes.tobytes())
        self.count += planes.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        if not self._out.closed:
            self._out.close()
        stop = min(stop, self.count)
        return np.fromfile(self.path, dtype=np.float32, count=(stop - start) * self.plane,
                           offset=start * self.plane * 4).reshape(stop - start, *self.shape)

    def slices(self, indices) -> np.ndarray:
        """The planes at ``indices`` stacked (K, H, W), in the order given."""
        return np.stack([self.read(int(i), int(i) + 1)[0] for i in indices]) if len(indices) else \
            np.zeros((0, *self.shape), np.float32)

    def close(self) -> None:
        if not self._out.closed:
            self._out.close()


def scratch_folder(root: Path) -> tempfile.TemporaryDirectory:
    """A scratch folder beside the job's outputs (the spool's disk, not a RAM-backed /tmp)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".slabs-", dir=root)


class SlabPass:
    """Everything the single pass over the slabs leaves for the series-wide steps after it.

    rgb: (N, H, W, 3) uint8 fused slices; contribution / saliency: uint16 planes of the maps
    (``quantise`` on 0..1); flat / signal: the quality sample's per-slice facts; fused_luma: the
    fused luminance (0..255) on scratch, read back for the sampled slices only.
    """

    def __init__(self, count: int, shape: tuple[int, int], folder: Path):
        self.rgb = np.zeros((count, *shape, 3), np.uint8)
        self.contribution = np.zeros((count, *shape), np.uint16)
        self.saliency: np.ndarray | None = None
        self.flat = np.zeros(count, bool)
        self.signal = np.zeros(count, np.float64)
        self.fused_luma = ScratchStack(folder, "fused_luma", shape)
        self.raw_saliency = ScratchStack(folder, "saliency", shape)
        self.method = ""

    def close(self) -> None:
        self.fused_luma.close()
        self.raw_saliency.close()


def run_slabs(engine, fixed_arr, moving_arr, fov, body, fixed_range, moving_range, *, colormap: str | None,
              modality: str, slabs: list[tuple[int, int]], folder: Path) -> SlabPass:
    """Prepare, fuse and explain slab by slab; the saliency gets its one series scale at the end."""
    import torch

    from dicomnode.dicomio.parametric_map import quantise
    from dicomnode.fusion.color import colorize, luma
    from dicomnode.fusion.prepare import apply_range

    out = SlabPass(fixed_arr.shape[0], fixed_arr.shape[1:], folder)
    peak = None  # the raw saliency's series maximum, float32 as ``series_scale`` takes it
    for lo, hi in slabs:
        a = apply_range(fixed_arr[lo:hi], fixed_range)
        b = apply_range(moving_arr[lo:hi], moving_range)
        b_t = torch.from_numpy(b)
        moving_in = colorize(b_t, colormap) if colormap else b_t[:, None]
        b_seen = luma(moving_in)[:, 0].numpy() if moving_in.shape[1] == 3 else b
        a255, b255 = a * 255.0, b_seen * 255.0
        out.flat[lo:hi] = (np.ptp(a255, axis=(1, 2)) == 0) & (np.ptp(b255, axis=(1, 2)) == 0)
        out.signal[lo:hi] = b255.sum(axis=(1, 2), dtype=np.float64)
        result = engine.fuse(torch.from_numpy(a)[:, None], moving_in,
                             fov=torch.from_numpy(fov[lo:hi, None].astype(np.float32)), modality=modality,
                             scale_saliency=False)
        out.method = result.method
        fused = result.fused.detach().float().cpu().clamp(0, 1)
        if fused.shape[1] == 1:
            fused = fused.repeat(1, 3, 1, 1)
        out.rgb[lo:hi] = (fused.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        out.fused_luma.append(luma(fused)[:, 0].numpy() * 255.0)
        # The maps explain the patient, not the air around them: zero outside the body.
        quantise(result.contribution.detach().float().cpu().numpy() * body[lo:hi], (0.0, 1.0),
                 out=out.contribution[lo:hi])
        if result.saliency is not None:
            raw = result.saliency.detach().float().cpu()
            peak = raw.max() if peak is None else torch.maximum(peak, raw.max())
            out.raw_saliency.append(raw.numpy())
        del result, fused, moving_in
    if peak is not None:
        out.saliency = _scale_saliency(out.raw_saliency, peak, body, slabs)
    return out


def _scale_saliency(raw: ScratchStack, peak, body, slabs) -> np.ndarray:
    """series_scale, then in_body_scale, then quantise, slab by slab: equal to the whole-series steps."""
    import torch

    from dicomnode.dicomio.parametric_map import quantise
    from dicomnode.pipeline import in_body_peak, in_body_scale

    denominator = peak.clamp_min(1e-12)

    def scaled(lo, hi):
        return (torch.from_numpy(raw.read(lo, hi)) / denominator).clamp(0, 1).numpy()

    body_peak = max(in_body_peak(scaled(lo, hi), body[lo:hi]) for lo, hi in slabs)
    stored = np.zeros((raw.count, *raw.shape), np.uint16)
    for lo, hi in slabs:
        quantise(in_body_scale(scaled(lo, hi), body[lo:hi], body_peak), (0.0, 1.0), out=stored[lo:hi])
    return stored
