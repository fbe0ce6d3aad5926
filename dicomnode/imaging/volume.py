"""DICOM series -> a 3-D volume in LPS patient space (SimpleITK image, float32)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
from pydicom.dataset import Dataset


class VolumeError(Exception):
    """A series cannot be made into a volume (gaps, uneven spacing, mixed geometry, ...)."""


@dataclass
class Volume:
    """A series as one image in patient space.

    ``image``: float32, origin/spacing/direction in LPS mm, index order (x=column, y=row,
    z=slice along the slice normal, increasing). ``headers``: one pixel-less dataset per z slice
    (in z order) for output builders that need per-slice references and geometry.
    """

    image: sitk.Image
    modality: str
    units: str  # "HU", "SUVbw", "BQML", "" for MR and unknown
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    headers: list[Dataset] = field(default_factory=list)


def load_series(paths: Sequence[Path]) -> Volume:
    """Read the instances of one series and build its volume (see Volume)."""
    raise NotImplementedError
