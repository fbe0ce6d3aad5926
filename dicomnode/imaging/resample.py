"""Resample a moving volume onto the fixed grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dicomnode.imaging.volume import Volume


class ImageArray(np.ndarray):
    """A NumPy view of a SimpleITK image's buffer that keeps the image alive (no copy of the grid).

    Views and slices of it hold it through ``base``, so the buffer lives as long as any of them;
    arrays computed from it are new arrays and hold nothing.
    """

    image: sitk.Image | None = None

    @classmethod
    def of(cls, image: sitk.Image) -> ImageArray:
        view = sitk.GetArrayViewFromImage(image).view(cls)
        view.image = image
        return view


def resample_image(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform | None = None,
                   default: float = 0.0) -> sitk.Image:
    """``moving`` on ``fixed``'s grid (linear, float32); ``transform`` maps fixed LPS points to moving ones."""
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(moving, fixed, transform, sitk.sitkLinear, float(default), sitk.sitkFloat32)


def resample_onto(fixed: Volume, moving: Volume, transform: sitk.Transform | None = None) -> np.ndarray:
    """Moving intensities on the fixed grid, linear interpolation, float32, array order (z, y, x).

    Fixed voxels that map outside the moving volume get the moving image's minimum (its background:
    0 for PET/MR, air for CT), so no artificial edge appears at the moving field-of-view border.
    """
    background = float(sitk.GetArrayViewFromImage(moving.image).min())
    out = resample_image(fixed.image, moving.image, transform, background)
    return ImageArray.of(out)


def field_of_view(fixed: Volume, moving: Volume, transform: sitk.Transform | None = None) -> np.ndarray:
    """Boolean (z, y, x) on the fixed grid: True where the moving image has data (inside its FOV)."""
    ones = sitk.Image(moving.image.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving.image)
    on_fixed = resample_image(fixed.image, ones, transform, 0.0)
    # Compared through a view while the image lives: no float copy of a whole-body grid.
    return sitk.GetArrayViewFromImage(on_fixed) > 0.5
