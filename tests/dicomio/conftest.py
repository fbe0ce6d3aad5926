"""Volumes for the output builders, made straight from synthetic or real slices.

The builders only need ``Volume.headers`` and the image geometry, so these fixtures assemble
Volumes directly (sorted along the slice normal) instead of going through the loader.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicomnode.imaging.volume import Volume
from dicomnode.testing.study import synthetic_datasets


def volume_from_slices(datasets: Sequence[Dataset], units: str = "") -> Volume:
    """Single-frame axial/oblique slices -> Volume (z increasing along the slice normal)."""
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ordered = sorted(datasets, key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    planes = [d.pixel_array.astype(np.float32) * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))
              for d in ordered]
    image = sitk.GetImageFromArray(np.stack(planes))
    positions = [np.array([float(v) for v in d.ImagePositionPatient]) for d in ordered]
    dz = float(np.dot(normal, positions[1] - positions[0])) if len(positions) > 1 else float(ordered[0].SliceThickness)
    row_spacing, col_spacing = (float(v) for v in ordered[0].PixelSpacing)
    image.SetSpacing((col_spacing, row_spacing, dz))
    image.SetOrigin(tuple(positions[0]))
    image.SetDirection(tuple(np.column_stack([iop[:3], iop[3:], normal]).ravel()))
    headers = []
    for d in ordered:
        h = copy.deepcopy(d)
        del h.PixelData
        headers.append(h)
    first = ordered[0]
    return Volume(image=image, modality=first.Modality, units=units, study_uid=first.StudyInstanceUID,
                  series_uid=first.SeriesInstanceUID, frame_of_reference_uid=first.FrameOfReferenceUID,
                  headers=headers)


def volume_from_files(paths: Sequence[Path], units: str = "") -> Volume:
    return volume_from_slices([pydicom.dcmread(p) for p in paths], units)


@pytest.fixture(scope="module")
def synthetic_volumes() -> dict[str, Volume]:
    """Small CT (fixed) and PET (moving) volumes of one synthetic study."""
    data = synthetic_datasets(modalities=("CT", "PT"), shape=(8, 32, 32), seed=3)
    return {"CT": volume_from_slices(data["CT"], "HU"), "PT": volume_from_slices(data["PT"], "BQML")}


def as_multiframe(volume: Volume) -> Volume:
    """The same volume as if its slices were frames of one Enhanced CT object (one header per frame)."""
    headers = [copy.deepcopy(h) for h in volume.headers]
    uid = headers[0].SOPInstanceUID
    for number, h in enumerate(headers, 1):
        h.SOPInstanceUID = uid
        h.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
        h.ReferencedFrameNumber = number
    return Volume(image=volume.image, modality=volume.modality, units=volume.units, study_uid=volume.study_uid,
                  series_uid=volume.series_uid, frame_of_reference_uid=volume.frame_of_reference_uid,
                  headers=headers)
