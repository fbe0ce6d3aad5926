"""Heat-map series (uint16 Parametric Map with a Real World Value Mapping, highdicom).

Float Parametric Maps are valid DICOM but common viewers (DCMTK, Orthanc's preview) do not
render them; uint16 frames with a linear Real World Value Mapping are rendered and keep the
real values recoverable: value = stored * slope + intercept.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass
from enum import Enum

import numpy as np
from highdicom import (
    PixelMeasuresSequence,
    PlaneOrientationSequence,
    PlanePositionSequence,
    VOILUTTransformation,
)
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
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
    software_versions,
    source_equipment,
    source_image_item,
    spatial_resampling,
)
from dicomnode.imaging.volume import Volume
from dicomnode.log import event

log = logging.getLogger(__name__)

STORED_MAX = 65535
# Private coding scheme for concepts DICOM has no code for (designators starting "99" are private).
PRIVATE_SCHEME = "99DICOMNODE"


class HeatmapKind(str, Enum):
    """The heat maps the node writes next to a fused series."""

    CONTRIBUTION = "contribution"  # share of the fused value from the moving modality, 0..1
    SALIENCY = "saliency"  # Grad-CAM style relevance, 0..1
    DISPLACEMENT = "displacement"  # registration displacement magnitude, mm


@dataclass(frozen=True)
class HeatmapCoding:
    """Quantity (CID 7180 where one fits) and unit (UCUM) of a heat map, plus a default label."""

    quantity: Code
    unit: Code
    content_label: str
    value_range: tuple[float, float] | None  # fixed real-value range, None = from the data


_CODINGS = {
    # No standard concept for a per-pixel modality weight: private code.
    HeatmapKind.CONTRIBUTION: HeatmapCoding(
        Code("MODCONTRIB", PRIVATE_SCHEME, "Moving modality contribution"),
        Code("1", "UCUM", "no units"), "CONTRIBUTION", (0.0, 1.0)),
    # DCM 130403 is in CID 7180, made for Grad-CAM style maps.
    HeatmapKind.SALIENCY: HeatmapCoding(
        Code("130403", "DCM", "Gradient-weighted class activation"),
        Code("1", "UCUM", "no units"), "SALIENCY", (0.0, 1.0)),
    HeatmapKind.DISPLACEMENT: HeatmapCoding(
        Code("110856", "DCM", "Linear Displacement"),
        Code("mm", "UCUM", "millimeter"), "DISPLACEMENT", None),
}


def heatmap_coding(kind: HeatmapKind | str) -> HeatmapCoding:
    """Quantity and unit codes for one of the node's heat-map kinds."""
    try:
        return _CODINGS[HeatmapKind(kind)]
    except ValueError:
        raise EncodingError(f"unknown heat-map kind {kind!r}; known: {[k.value for k in HeatmapKind]}") from None


_UCUM_MEANINGS = {"1": "no units", "mm": "millimeter", "%": "percent", "{SUVbw}g/ml": "Standardized Uptake Value body weight"}


def ucum(code: str) -> Code:
    """A UCUM unit code ("1" for ratios and unitless scores)."""
    return Code(code, "UCUM", _UCUM_MEANINGS.get(code, code))


def valid_content_label(text: str) -> str:
    """A valid ContentLabel (CS, one token): upper case letters, digits and underscore, at most 16."""
    label = re.sub(r"[^A-Z0-9_]", "_", text.strip().upper())[:16]
    if not label:
        raise EncodingError(f"content label {text!r} has no usable characters")
    return label


@dataclass(frozen=True)
class Quantised:
    """uint16 planes and the linear map back: value = stored * slope + intercept."""

    stored: np.ndarray
    slope: float
    intercept: float


# Slices converted to float64 at a time by ``quantise``: the map is never copied whole in float64.
_QUANTISE_SLICES = 8


def value_bounds(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values, slab by slab; EncodingError when there is none."""
    values = np.asarray(values)
    lo, hi = np.inf, -np.inf
    for part in _slabs(values):
        finite = part[np.isfinite(part)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if lo > hi:
        raise EncodingError("heat map has no finite values")
    return lo, hi


def _slabs(values: np.ndarray):
    if values.ndim < 2:
        yield values
        return
    for i in range(0, values.shape[0], _QUANTISE_SLICES):
        yield values[i : i + _QUANTISE_SLICES]


def quantise(values: np.ndarray, value_range: tuple[float, float] | None = None,
             out: np.ndarray | None = None) -> Quantised:
    """Map values linearly onto 0..65535; values outside ``value_range`` are clipped, NaN -> range low.

    Works through the slices a few at a time (linear time, bounded memory); ``out``: a uint16 array
    of ``values``' shape to fill (e.g. a slab of a series-wide buffer).
    """
    values = np.asarray(values)
    if value_range is None:
        lo, hi = value_bounds(values)
    else:
        lo, hi = (float(v) for v in value_range)
        if not hi >= lo:
            raise EncodingError(f"value range {value_range} is empty")
    # A constant map still needs a positive slope for the mapping to be valid.
    slope = (hi - lo) / STORED_MAX if hi > lo else 1.0 / STORED_MAX
    stored = np.empty(values.shape, np.uint16) if out is None else out
    for part, target in zip(_slabs(values), _slabs(stored), strict=True):
        part = np.asarray(part, dtype=np.float64)
        clean = np.where(np.isfinite(part), np.clip(part, lo, hi), lo)
        target[...] = np.round((clean - lo) / slope).clip(0, STORED_MAX).astype(np.uint16)
    return Quantised(stored=stored, slope=slope, intercept=lo)


class ParametricMapSeries:
    """One heat-map series: a multi-frame uint16 Parametric Map on the fixed grid, frame k on fixed.headers[k].

    As highdicom's IODs do, the constructor takes everything the series needs and checks it
    before anything is built (fixed geometry and frame of reference, the value stack, the sources
    it references, quantity and unit codes, label, series number and texts), raising
    ``EncodingError`` with the reason. ``dataset`` is then complete: no caller adds to or repairs it.

    values: (N, rows, columns) float real-world values, stored as uint16 with a linear Real World
    Value Mapping, or a ``Quantised`` already made slab by slab by ``quantise``. highdicom stores the frames in its own spatial order (for axial slices, z
    decreasing): read them back by their per-frame positions (``decode_parametric_map``).
    ``quantity`` is a Code or a HeatmapKind name (its unit is then implied); ``unit``: a Code or a
    UCUM code string ("1", "mm"). ``sources``: the input volumes, all referenced (the fixed one always is).
    """

    def __init__(
        self,
        fixed: Volume,
        values: np.ndarray,
        *,
        content_label: str = "HEATMAP",
        quantity: Code | str,
        unit: Code | str | None = None,
        series_number: int,
        series_description: str,
        sources: list[Volume],
        value_range: tuple[float, float] | None = None,
        derivation: str = "",
        method: str = "",
    ) -> None:
        if isinstance(quantity, str):
            coding = heatmap_coding(quantity)
            quantity, unit = coding.quantity, unit or coding.unit
            value_range = value_range if value_range is not None else coding.value_range
        if isinstance(unit, str):
            unit = ucum(unit)
        if unit is None:
            raise EncodingError("a parametric map needs a unit code (UCUM, '1' for ratios)")
        rows, cols = check_fixed_geometry(fixed)
        check_frame_of_reference(fixed)
        others = [v for v in sources if v.series_uid != fixed.series_uid]
        check_sources(others)
        if isinstance(values, Quantised):  # quantised slab by slab by the caller
            check_stack(values.stored, fixed, rows, cols, "heat map", channels=None)
        else:
            values = np.asarray(values)
            check_stack(values, fixed, rows, cols, "heat map", channels=None)
        self.series_number = check_series_number(series_number)
        self.label = valid_content_label(content_label)
        description = derived_series_description(check_text(series_description, "series description"))
        derivation_text = derivation_description(check_text(method, "fusion method"),
                                                 check_text(derivation, "derivation") or quantity.meaning)
        self.quantised = q = values if isinstance(values, Quantised) else quantise(values, value_range)
        mapping = RealWorldValueMapping(
            lut_label=self.label,
            lut_explanation=f"{quantity.meaning} ({unit.value})"[:64],
            unit=unit,
            value_range=(0, STORED_MAX),
            slope=q.slope,
            intercept=q.intercept,
            quantity_definition=quantity,
        )
        headers = fixed.headers
        h0 = headers[0]
        now = datetime.datetime.now()
        pm = ParametricMap(
            source_images=_source_images(headers),
            pixel_array=q.stored,
            series_instance_uid=generate_uid(),
            series_number=self.series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=f"{MANUFACTURER} heatmap",
            software_versions=software_versions(),
            device_serial_number="0",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[_display_window(q.stored)],
            content_label=self.label,
            content_description=f"{quantity.meaning}"[:64],
            pixel_measures=PixelMeasuresSequence(
                pixel_spacing=[float(v) for v in h0.PixelSpacing],
                slice_thickness=float(h0.get("SliceThickness") or fixed.image.GetSpacing()[2]),
                spacing_between_slices=float(fixed.image.GetSpacing()[2]),
            ),
            plane_orientation=PlaneOrientationSequence("PATIENT", [float(v) for v in h0.ImageOrientationPatient]),
            plane_positions=[PlanePositionSequence("PATIENT", [float(v) for v in h.ImagePositionPatient])
                             for h in headers],
            series_description=description,
            coding_schemes=_private_schemes(quantity, unit),
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
            contributing_equipment=source_equipment(others),  # highdicom adds the fixed one's
        )
        _add_derivation(pm, fixed, others, derivation_text)
        self.dataset: Dataset = pm
        event(log, "parametric_map_encoded", label=self.label, frames=len(headers), series_number=self.series_number,
              slope=q.slope, intercept=q.intercept)


def build_parametric_map(fixed: Volume, values: np.ndarray, **options) -> Dataset:
    """The dataset of ``ParametricMapSeries(fixed, values, **options)``."""
    return ParametricMapSeries(fixed, values, **options).dataset


def _add_derivation(pm: Dataset, fixed: Volume, others: list[Volume], text: str) -> None:
    """What ParametricMap's constructor does not take: anatomy, derivation, every source's references, study."""
    copy_anatomy(pm, fixed.headers[0])
    pm.DerivationDescription = text
    pm.DerivationCodeSequence = DicomSequence([spatial_resampling()])
    references = common_instance_references(
        fixed.study_uid, [(fixed, fixed.headers), *((v, v.headers) for v in others)])
    pm.update(references)
    # The other sources' instances join the fixed ones highdicom put there (once per instance).
    seen = {item.ReferencedSOPInstanceUID for item in pm.get("SourceImageSequence", [])}
    extra = []
    for volume in others:
        for h in volume.headers:
            if h.SOPInstanceUID not in seen:
                seen.add(h.SOPInstanceUID)
                extra.append(source_image_item(h))
    if extra:
        pm.SourceImageSequence = DicomSequence([*pm.get("SourceImageSequence", []), *extra])
    copy_study_and_deidentification(pm, fixed.headers[0])
    clipped = clip_copied_strings(pm)
    if clipped:
        event(log, "source_values_clipped", logging.DEBUG, keywords=",".join(clipped))


def _source_images(headers: list[Dataset]) -> list[Dataset]:
    """The fixed slices as highdicom wants them: single-frame headers, or one multi-frame header.

    Frames of one multi-frame object arrive as per-frame headers sharing a SOPInstanceUID; they are
    folded back into one pixel-less multi-frame dataset with functional groups for the geometry.
    """
    if len({h.SOPInstanceUID for h in headers}) == len(headers):
        return headers
    if len({h.SOPInstanceUID for h in headers}) != 1:
        raise EncodingError("fixed slices mix frames of several multi-frame objects")
    source = Dataset()
    source.update(headers[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ReferencedFrameNumber",
                    "SliceLocation"):
        if keyword in source:
            delattr(source, keyword)
    source.NumberOfFrames = len(headers)
    shared = Dataset()
    shared.PixelMeasuresSequence = PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in headers[0].PixelSpacing],
        slice_thickness=float(headers[0].get("SliceThickness") or 1.0))
    shared.PlaneOrientationSequence = PlaneOrientationSequence(
        "PATIENT", [float(v) for v in headers[0].ImageOrientationPatient])
    source.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for h in sorted(headers, key=lambda h: int(h.get("ReferencedFrameNumber", 0))):
        frame = Dataset()
        frame.PlanePositionSequence = PlanePositionSequence("PATIENT", [float(v) for v in h.ImagePositionPatient])
        per_frame.append(frame)
    source.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    return [source]


def _private_schemes(*codes: Code) -> list[CodingSchemeIdentificationItem] | None:
    """Identify our private coding scheme in the object when one of its codes is used."""
    if any(c.scheme_designator == PRIVATE_SCHEME for c in codes):
        return [CodingSchemeIdentificationItem(PRIVATE_SCHEME, name="dicomnode private concepts",
                                               responsible_organization="dicomnode")]
    return None


def _display_window(stored: np.ndarray) -> VOILUTTransformation:
    """A window over the stored values actually used, so a viewer shows the map with full contrast."""
    lo, hi = int(stored.min()), int(stored.max())
    width = max(hi - lo, 1) + 1
    return VOILUTTransformation(window_center=lo + (width - 1) / 2, window_width=width)


def decode_parametric_map(pm: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Real-world values (frames, rows, columns) float64 and each frame's ImagePositionPatient (frames, 3).

    Frames stay in stored order; the first Real World Value Mapping of the shared groups is applied.
    """
    (mapping, *_) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    stored = pm.pixel_array.reshape(int(pm.NumberOfFrames), int(pm.Rows), int(pm.Columns)).astype(np.float64)
    values = stored * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
    positions = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                          for f in pm.PerFrameFunctionalGroupsSequence])
    return values, positions
