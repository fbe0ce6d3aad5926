"""Resample a moving volume onto the fixed grid."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import SimpleITK as sitk

from dicomnode.imaging.volume import Volume

# Slices per resampling call when a resampled volume is walked whole (``OnFixedGrid.slabs``).
_SLAB_SLICES = 16


def resample_image(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None,
                   default: float = 0.0) -> sitk.Image:
    """``moving`` on ``fixed``'s grid (linear, float32); ``transform`` maps fixed LPS points to moving ones."""
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(moving, fixed, transform, sitk.sitkLinear, float(default), sitk.sitkFloat32)


def slab_grid(image: sitk.Image, start: int, stop: int) -> sitk.Image:
    """Slices ``start``..``stop - 1`` (z) of ``image``'s grid as a reference image (uint8, geometry only).

    Resampling onto it gives, voxel for voxel, those slices of resampling onto the whole grid:
    each output point is computed from its own index, never from its neighbours.
    """
    size = image.GetSize()
    grid = sitk.Image(size[0], size[1], stop - start, sitk.sitkUInt8)
    grid.SetSpacing(image.GetSpacing())
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, int(start))))
    return grid


class OnFixedGrid:
    """A moving image on the fixed grid, resampled slab by slab when read: the whole grid is never held.

    ``grid[a:b]`` (slices of z, step 1) and ``grid[[i, j, ...]]`` give float32 arrays (z, y, x),
    equal to the same slices of ``resample_image`` onto the whole grid; with ``above`` set they
    are boolean (value > above). ``stage``: a context manager factory each resampling runs in
    (the pipeline's stage timer).
    """

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None,
                 default: float = 0.0, *, above: float | None = None,
                 stage: Callable[[], AbstractContextManager] | None = None):
        self.fixed, self.moving, self.transform = fixed, moving, transform
        self.default, self.above, self.stage = float(default), above, stage or nullcontext
        x, y, z = fixed.GetSize()
        self.shape = (z, y, x)
        self.dtype = np.dtype(bool if above is not None else np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole grid at once (``np.asarray(grid)``), for tools and tests; never element by element."""
        whole = self[0:self.shape[0]]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("slabs of the fixed grid are read with step 1")
            return self._read(start, max(start, stop))
        indices = np.asarray(key, dtype=np.intp).reshape(-1)
        if not indices.size:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.concatenate([self._read(int(i), int(i) + 1) for i in indices % self.shape[0]])

    def slabs(self, step: int = _SLAB_SLICES) -> Iterator[np.ndarray]:
        """The whole grid, ``step`` slices at a time."""
        for start in range(0, self.shape[0], step):
            yield self[start:start + step]

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        with self.stage():
            values = sitk.GetArrayFromImage(resample_image(slab_grid(self.fixed, start, stop), self.moving,
                                                           self.transform, self.default))
        return values > self.above if self.above is not None else values


def moving_background(moving: Volume) -> float:
    """What fixed voxels outside the moving volume get: its minimum (0 for PET/MR, air for CT)."""
    return float(sitk.GetArrayViewFromImage(moving.image).min())


def resample_onto(fixed: Volume, moving: Volume, transform: sitk.Transform | None = None) -> np.ndarray:
    """Moving intensities on the fixed grid, linear interpolation, float32, array order (z, y, x).

    Fixed voxels that map outside the moving volume get the moving image's minimum (its background:
    0 for PET/MR, air for CT), so no artificial edge appears at the moving field-of-view border.
    The whole grid at once, for tools and tests; processing reads it slab by slab (``moving_on_fixed``).
    """
    return sitk.GetArrayFromImage(resample_image(fixed.image, moving.image, transform, moving_background(moving)))


def moving_on_fixed(fixed: Volume, moving: Volume, transform: sitk.Transform | None = None,
                    stage: Callable[[], AbstractContextManager] | None = None) -> OnFixedGrid:
    """``resample_onto``, read slab by slab (``OnFixedGrid``)."""
    return OnFixedGrid(fixed.image, moving.image, transform, moving_background(moving), stage=stage)


def _ones(moving: Volume) -> sitk.Image:
    ones = sitk.Image(moving.image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving.image)
    return ones


def field_of_view(fixed: Volume, moving: Volume, transform: sitk.Transform | None = None,
                  stage: Callable[[], AbstractContextManager] | None = None) -> OnFixedGrid:
    """Boolean (z, y, x) on the fixed grid, read slab by slab: True where the moving image has data."""
    return OnFixedGrid(fixed.image, _ones(moving), transform, 0.0, above=0.5, stage=stage)
