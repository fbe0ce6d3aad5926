"""Slabs of slices: how processing walks a whole-body series in bounded memory.

A slab is a run of consecutive fixed slices that goes through prepare -> fuse -> explain as one
piece; what must see the whole series (saliency's one scale, the quality sample, the encoding that
names the quality) is kept per slice in a ``ScratchStack`` on disk and finished after the last
slab, so the result equals processing the series at once.
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
    """(N, *plane) planes written slab by slab to a scratch file and read back by slice or slab.

    Plain file reads rather than a memory map: pages of a map would count as the process's memory.
    Indexing with one slice number gives that plane (what ``FusedSeries`` reads).
    """

    def __init__(self, folder: Path, name: str, plane: tuple[int, ...], dtype=np.float32):
        self.path = Path(folder) / f"{name}.raw"
        self.plane = tuple(int(v) for v in plane)
        self.dtype = np.dtype(dtype)
        self.values = int(np.prod(self.plane))
        self.count = 0
        self._out = open(self.path, "wb")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.plane)

    def append(self, planes: np.ndarray) -> None:
        planes = np.ascontiguousarray(planes, dtype=self.dtype)
        self._out.write(planes.tobytes())
        self.count += planes.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        if not self._out.closed:
            self._out.close()
        stop = min(stop, self.count)
        return np.fromfile(self.path, dtype=self.dtype, count=(stop - start) * self.values,
                           offset=start * self.values * self.dtype.itemsize).reshape(stop - start, *self.plane)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.read(int(k), int(k) + 1)[0]

    def slices(self, indices) -> np.ndarray:
        """The planes at ``indices`` stacked (K, *plane), in the order given."""
        return np.stack([self[i] for i in indices]) if len(indices) else np.zeros((0, *self.plane), self.dtype)

    def close(self) -> None:
        if not self._out.closed:
            self._out.close()


def scratch_folder(root: Path) -> tempfile.TemporaryDirectory:
    """A scratch folder beside the job's outputs (the spool's disk, not a RAM-backed /tmp)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".slabs-", dir=root)


class SlabPass:
    """Everything the single pass over the slabs leaves for the series-wide steps after it.

    rgb: the fused slices (N, H, W, 3) uint8, colour bar burnt in, on scratch; contribution: the
    map's uint16 planes (``quantise`` on 0..1), on scratch; flat / signal: the quality sample's per-slice facts;
    fused_luma: the fused luminance (0..255) on scratch, read back for the sampled slices only;
    raw_saliency and peak: the saliency before its series scale; saliency: after it (``scaled_saliency``).
    """

    def __init__(self, count: int, shape: tuple[int, int], folder: Path):
        self.rgb = ScratchStack(folder, "rgb", (*shape, 3), np.uint8)
        self.contribution = ScratchStack(folder, "contribution", shape, np.uint16)
        self.flat = np.zeros(count, bool)
        self.signal = np.zeros(count, np.float64)
        self.fused_luma = ScratchStack(folder, "fused_luma", shape)
        self.raw_saliency = ScratchStack(folder, "raw_saliency", shape)
        self.saliency = ScratchStack(folder, "saliency", shape, np.uint16)  # the map's planes (``scaled_saliency``)
        self.peak = None  # the raw saliency's series maximum, float32 as ``series_scale`` takes it
        self.method = ""

    def close(self) -> None:
        for stack in (self.rgb, self.contribution, self.fused_luma, self.raw_saliency, self.saliency):
            stack.close()


def run_slabs(engine, fixed_arr, moving_arr, fov, body, fixed_range, moving_range, *, colormap: str | None,
              modality: str, slabs: list[tuple[int, int]], folder: Path, bar=None) -> SlabPass:
    """Prepare, fuse and explain slab by slab (``bar``: a colour bar (layer, mask) to burn in)."""
    import torch

    from dicomnode.dicomio.parametric_map import quantise
    from dicomnode.fusion.color import colorize, luma
    from dicomnode.fusion.colorbar import burn_in
    from dicomnode.fusion.prepare import apply_range

    out = SlabPass(fixed_arr.shape[0], fixed_arr.shape[1:], folder)
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
                             fov=None if fov is None else torch.from_numpy(fov[lo:hi][:, None].astype(np.float32)),
                             modality=modality,
                             scale_saliency=False)
        out.method = result.method
        fused = result.fused.detach().float().cpu().clamp(0, 1)
        if fused.shape[1] == 1:
            fused = fused.repeat(1, 3, 1, 1)
        rgb = (fused.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        if bar is not None:
            burn_in(rgb, bar[0], bar[1])
        out.rgb.append(rgb)
        out.fused_luma.append(luma(fused)[:, 0].numpy() * 255.0)
        # The maps explain the patient, not the air around them: zero outside the body.
        out.contribution.append(quantise(result.contribution.detach().float().cpu().numpy() * body[lo:hi],
                                         (0.0, 1.0)).stored)
        if result.saliency is not None:
            raw = result.saliency.detach().float().cpu()
            out.peak = raw.max() if out.peak is None else torch.maximum(out.peak, raw.max())
            out.raw_saliency.append(raw.numpy())
        del result, fused, moving_in, rgb
    return out


def in_body_scale(values, body, peak: float | None = None) -> np.ndarray:
    """``values`` zeroed outside ``body`` and divided by their series maximum inside it (one scale).

    ``peak``: that maximum when ``values`` is one slab of the series (``in_body_peak`` of every slab).
    """
    inside = np.where(body, values, 0.0).astype(np.float32)
    if peak is None:
        peak = in_body_peak(values, body)
    return inside / peak if peak > 0 else inside


def in_body_peak(values, body) -> float:
    inside = np.where(body, values, 0.0).astype(np.float32)
    return float(inside.max()) if inside.size else 0.0


def scaled_saliency(done: SlabPass, body, slabs) -> None:
    """series_scale, then in_body_scale, then quantise, slab by slab, into ``done.saliency`` (uint16
    on scratch): equal to the whole-series steps, and the body mask is not needed after it."""
    import torch

    from dicomnode.dicomio.parametric_map import quantise

    if done.peak is None:
        return
    raw, denominator = done.raw_saliency, done.peak.clamp_min(1e-12)

    def scaled(lo, hi):
        return (torch.from_numpy(raw.read(lo, hi)) / denominator).clamp(0, 1).numpy()

    body_peak = max(in_body_peak(scaled(lo, hi), body[lo:hi]) for lo, hi in slabs)
    for lo, hi in slabs:
        done.saliency.append(quantise(in_body_scale(scaled(lo, hi), body[lo:hi], body_peak), (0.0, 1.0)).stored)
