"""The fused series: one RGB Secondary Capture instance per fixed slice (highdicom).

Each instance carries the fixed slice's plane geometry and FrameOfReferenceUID so viewers can
link it with the anatomical series, although the SC IOD does not list the Image Plane module
(dciodvfy reports those attributes as warnings, not errors).
"""

from __future__ import annotations

import datetime
import logging

import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicomnode.dicomio.derived import (
    MANUFACTURER,
    EncodingError,
    check_fixed_geometry,
    check_stack,
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

log = logging.getLogger(__name__)

# Plane and patient attributes copied from the fixed slice when present.
_COPIED = ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "SliceLocation",
           "FrameOfReferenceUID", "PositionReferenceIndicator")


def fused_series_description(fixed: Volume, moving: Volume, method: str) -> str:
    return derived_series_description(f"FUSED {moving.modality}->{fixed.modality} {method}")


def build_fused_series(
    fixed: Volume,
    moving: Volume,
    rgb: np.ndarray,
    *,
    method: str,
    derivation: str,
    series_number: int = 9001,
    series_description: str | None = None,
) -> list[Dataset]:
    """One RGB Secondary Capture per fixed slice (``iter_fused_series``, as a list)."""
    return list(iter_fused_series(fixed, moving, rgb, method=method, derivation=derivation,
                                  series_number=series_number, series_description=series_description))


def iter_fused_series(
    fixed: Volume,
    moving: Volume,
    rgb: np.ndarray,
    *,
    method: str,
    derivation: str,
    series_number: int = 9001,
    series_description: str | None = None,
):
    """One RGB Secondary Capture per fixed slice, in the fixed series' study and frame of reference.

    Yields the instances one at a time, so a caller can write each and let it go (a whole-body
    series is never held encoded in memory). ``rgb``: an array, or anything with shape, dtype and
    one plane per integer index (``dicomnode.slabs.ScratchStack``).

    rgb: (N, rows, columns, 3) uint8 with N == len(fixed.headers), slice k on fixed.headers[k]
    (increasing z). Instances are returned and numbered (1..N) in ``display_order``, the order of
    the Parametric Map frames (head to feet for axial slices).
    """
    rows, cols = check_fixed_geometry(fixed)
    rgb = rgb if hasattr(rgb, "shape") and hasattr(rgb, "dtype") else np.asarray(rgb)  # or slices on disk
    if rgb.dtype != np.uint8:
        raise EncodingError(f"fused slices must be uint8 RGB, got {rgb.dtype}")
    check_stack(rgb, fixed, rows, cols, "fused RGB stack", channels=3)
    description = derived_series_description(series_description) if series_description \
        else fused_series_description(fixed, moving, method)
    derivation_text = derivation_description(method, derivation)
    series_uid = generate_uid()
    now = datetime.datetime.now()
    moving_slices = overlapping_slices(fixed, moving)
    count = 0
    for number, k in enumerate(display_order(fixed.headers), 1):
        header = fixed.headers[k]
        sc = SCImage.from_ref_dataset(
            header,
            pixel_array=np.ascontiguousarray(rgb[k]),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=number,
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(v) for v in header.PixelSpacing),
            patient_orientation=patient_orientation(header.ImageOrientationPatient),
            series_description=description,
            manufacturer_model_name=f"{MANUFACTURER} fusion",
            software_versions=software_versions(),
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
            contributing_equipment=source_equipment([moving]),  # highdicom adds the fixed one's
        )
        _add_derivation(sc, fixed, moving, header, moving_slices[k], derivation_text)
        count += 1
        yield sc
    log.info("event=fused_series_encoded method=%s slices=%d series_number=%d", method, count, series_number)


def _add_derivation(sc: Dataset, fixed: Volume, moving: Volume, header: Dataset, moving_slices: list[Dataset],
                    text: str) -> None:
    for keyword in _COPIED:
        if keyword in header and header[keyword].value not in (None, ""):
            setattr(sc, keyword, header[keyword].value)
    copy_anatomy(sc, header)
    sc.ImageType = ["DERIVED", "SECONDARY", "FUSION"]
    sc.BurnedInAnnotation = "NO"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.DerivationDescription = text
    sc.DerivationCodeSequence = DicomSequence([spatial_resampling()])
    # Every source series: this fixed slice and the moving slices that overlap it.
    sc.SourceImageSequence = DicomSequence([source_image_item(h) for h in (header, *moving_slices)])
    # Its own sources only (never every moving instance: that grew as N fixed x M moving); a slice
    # beyond the moving field of view references the fixed series alone.
    sources = [(fixed, [header])] + ([(moving, moving_slices)] if moving_slices else [])
    references = common_instance_references(fixed.study_uid, sources)
    sc.update(references)
    copy_study_and_deidentification(sc, header)
    clipped = clip_copied_strings(sc)
    if clipped:
        log.debug("event=source_values_clipped keywords=%s", ",".join(clipped))
    if "FrameOfReferenceUID" not in sc:
        raise EncodingError(f"fixed series {fixed.series_uid} has no FrameOfReferenceUID to link the fused series")
