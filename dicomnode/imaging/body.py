"""The patient's body on the fixed grid: where fused pixels and explanation maps mean something.

CT: voxels above -400 HU (air and lung below, soft tissue above), axial holes filled so lungs and
bowel gas count as body, then the largest 3-D component (drops the table and loose objects).
Other modalities (MR, PET, NM): Otsu's threshold of the intensities instead of the HU cut.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

CT_BODY_HU = -400.0


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of the finite values (SimpleITK's, 256 bins)."""
    finite = np.asarray(values, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        return float(finite.max()) if finite.size else 0.0
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(finite.reshape(1, 1, -1)))
    return float(otsu.GetThreshold())


def body_mask(volume: np.ndarray, modality: str) -> np.ndarray:
    """Boolean (z, y, x) mask of the body in ``volume`` (stored real values: HU for CT)."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"body mask needs a (z, y, x) volume, got shape {volume.shape}")
    threshold = CT_BODY_HU if modality.upper() == "CT" else otsu_threshold(volume)
    mask = volume > threshold
    # Holes are filled per axial slice: in 3-D a lung open to the FOV edge is no hole.
    mask = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask
