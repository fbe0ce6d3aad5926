"""Align a moving volume onto a fixed one: rigid -> affine -> deformable (SimpleITK)."""

from __future__ import annotations

from dataclasses import dataclass, field

import SimpleITK as sitk

from dicomnode.config import RegistrationConfig
from dicomnode.imaging.volume import Volume


class RegistrationFailed(Exception):
    """The volumes cannot be aligned reliably; the message is meant for a PACS administrator."""


@dataclass
class StageReport:
    name: str  # "rigid", "affine", "deformable"
    metric_before: float  # held-out Mattes MI (lower is better, SimpleITK sign)
    metric_after: float
    kept: bool  # False: the stage did not improve the held-out metric; previous transform used
    iterations: int
    seconds: float
    note: str = ""


@dataclass
class Registration:
    """``transform`` maps fixed-space points (LPS mm) to moving-space points, as sitk.Resample uses."""

    transform: sitk.Transform
    stages: list[StageReport] = field(default_factory=list)
    skipped_reason: str | None = None  # e.g. "same FrameOfReferenceUID"
    displacement_mm: sitk.Image | None = None  # |deformable part| in mm on the fixed grid


def register_volumes(fixed: Volume, moving: Volume, config: RegistrationConfig) -> Registration:
    """Register ``moving`` onto ``fixed`` with the configured stages (auto: skip on shared frame)."""
    raise NotImplementedError
