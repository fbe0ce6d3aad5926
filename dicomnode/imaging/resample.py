"""Resample a moving volume onto the fixed grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dicomnode.imaging.volume import Volume


def resample_onto(fixed: Volume, moving: Volume, transform: sitk.Transform | None = None) -> np.ndarray:
    """Moving intensities on the fixed grid, linear interpolation, float32, array order (z, y, x)."""
    raise NotImplementedError
