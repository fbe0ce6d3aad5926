"""The fused series: one RGB Secondary Capture instance per fixed slice (highdicom).

Each instance carries the fixed slice's plane geometry and FrameOfReferenceUID so viewers can
link it with the anatomical series, although the SC IOD does not list the Image Plane module
(dciodvfy reports those attributes as warnings, not errors).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator

import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicomnode.dicomio.derived import (
    MANUFACTURER,
    EncodingError,
    check_fixed_geometry,
    check_frame_of_reference,
    check_series_number,
    check_sources,
    check_stack,
    check_text,
    clip_copied_strings,
    common_instance_references,
    copy_anatomy,
    copy_study_and_deidentification,
    derivation_description,
    derived_series_description,
    display_order,
    overlapping_slices,
    patient_orientation,
    software_versions,
    source_equipment,
    source_image_item,
    spatial_resampling,
)
from dicomnode.imaging.volume import Volume
from dicomnode.log import event

log = logging.getLogger(__name__)

# Plane and patient attributes copied from the fixed slice when present.
_COPIED = ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "SliceLocation",
           "FrameOfReferenceUID", "PositionReferenceIndicator")


def fused_series_description(fixed: Volume, moving: Volume, method: str) -> str:
    return derived_series_description(f"FUSED {moving.modality}->{fixed.modality} {method}")


class FusedSeries:
    """The fused series of one job: one RGB Secondary Capture instance per fixed slice.

    As highdicom's IODs do, the constructor takes everything the series needs and checks it
    before anything is built (fixed geometry and frame of reference, the RGB stack, the source
    slices it references, series number and texts), raising ``EncodingError`` with the reason.
    Iterating then yields the instances, each complete (no caller adds to or repairs them), one
    at a time so a caller can write each and let it go (``list()`` them to hold them all).

    rgb: an array, or anything with shape, dtype and one plane per integer index
    (``dicomnode.slabs.ScratchStack``), (N, rows, columns, 3) uint8 with N == len(fixed.headers), slice k on fixed.headers[k]
    (increasing z). Instances come and are numbered (1..N) in ``display_order``, the order of
    the Parametric Map frames (head to feet for axial slices).
    """

    def __init__(
        self,
        fixed: Volume,
        moving: Volume,
        rgb: np.ndarray,
        *,
        method: str,
        derivation: str,
        series_number: int = 9001,
        series_description: str | None = None,
    ) -> None:
        rows, cols = check_fixed_geometry(fixed)
        check_frame_of_reference(fixed)
        check_sources([moving])
        # An array, or anything with shape, dtype and one plane per index (slabs.ScratchStack):
        # a whole-body series is then never held in memory at once.
        rgb = rgb if hasattr(rgb, "shape") and hasattr(rgb, "dtype") else np.asarray(rgb)
        if rgb.dtype != np.uint8:
            raise EncodingError(f"fused slices must be uint8 RGB, got {rgb.dtype}")
        check_stack(rgb, fixed, rows, cols, "fused RGB stack", channels=3)
        self.fixed, self.moving, self.rgb = fixed, moving, rgb
        self.method = check_text(method, "fusion method")
        self.series_number = check_series_number(series_number)
        self.series_description = derived_series_description(check_text(series_description, "series description")) \
            if series_description else fused_series_description(fixed, moving, method)
        self.derivation_description = derivation_description(method, check_text(derivation, "derivation"))
        self.series_uid = generate_uid()

    def __len__(self) -> int:
        return len(self.fixed.headers)

    def __iter__(self) -> Iterator[Dataset]:
        now = datetime.datetime.now()
        moving_slices = overlapping_slices(self.fixed, self.moving)
        count = 0
        for number, k in enumerate(display_order(self.fixed.headers), 1):
            yield self._instance(self.fixed, self.moving, self.fixed.headers[k], self.rgb[k], moving_slices[k], number,
                                 now)
            count += 1
        event(log, "fused_series_encoded", method=self.method, slices=count, series_number=self.series_number)

    def _instance(self, fixed: Volume, moving: Volume, header: Dataset, pixels: np.ndarray,
                  moving_slices: list[Dataset], number: int, now: datetime.datetime) -> Dataset:
        sc = SCImage.from_ref_dataset(
            header,
            pixel_array=np.ascontiguousarray(pixels),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=self.series_uid,
            series_number=self.series_number,
            sop_instance_uid=generate_uid(),
            instance_number=number,
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(v) for v in header.PixelSpacing),
            patient_orientation=patient_orientation(header.ImageOrientationPatient),
            series_description=self.series_description,
            manufacturer_model_name=f"{MANUFACTURER} fusion",
            software_versions=software_versions(),
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
            contributing_equipment=source_equipment([moving]),  # highdicom adds the fixed one's
        )
        # What the SC IOD's highdicom constructor does not take: plane, derivation, references, study.
        for keyword in _COPIED:
            if keyword in header and header[keyword].value not in (None, ""):
                setattr(sc, keyword, header[keyword].value)
        copy_anatomy(sc, header)
        sc.ImageType = ["DERIVED", "SECONDARY", "FUSION"]
        sc.BurnedInAnnotation = "NO"
        sc.RecognizableVisualFeatures = "NO"
        sc.LossyImageCompression = "00"
        sc.DerivationDescription = self.derivation_description
        sc.DerivationCodeSequence = DicomSequence([spatial_resampling()])
        # Every source series: this fixed slice and the moving slices that overlap it.
        sc.SourceImageSequence = DicomSequence([source_image_item(h) for h in (header, *moving_slices)])
        # Its own sources only (never every moving instance: that grew as N fixed x M moving); a
        # slice beyond the moving field of view references the fixed series alone.
        sources = [(fixed, [header])] + ([(moving, moving_slices)] if moving_slices else [])
        sc.update(common_instance_references(fixed.study_uid, sources))
        copy_study_and_deidentification(sc, header)
        clipped = clip_copied_strings(sc)
        if clipped:
            event(log, "source_values_clipped", logging.DEBUG, keywords=",".join(clipped))
        return sc


def build_fused_series(fixed: Volume, moving: Volume, rgb: np.ndarray, **options) -> list[Dataset]:
    """The instances of ``FusedSeries(fixed, moving, rgb, **options)``, as a list."""
    return list(FusedSeries(fixed, moving, rgb, **options))
