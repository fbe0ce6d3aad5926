"""What every derived series the node writes has in common: labels, references, geometry checks.

References to the input images are built here, once, for both the Secondary Capture and the
Parametric Map builders.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import highdicom
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnode import __version__
from dicomnode.imaging.volume import Volume

NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"
MANUFACTURER = "dicomnode"
_LO_MAX = 64
_ST_MAX = 1024


# Body parts dciodvfy treats as paired: Laterality (Type 2C) must then be present, empty when
# unknown, and must be absent for unpaired parts. Absent BodyPartExamined also requires it.
PAIRED_BODY_PARTS = frozenset(
    "ACJOINT ADRENAL ANKLE ARM AXILLA BILEDUCT BREAST BRONCHUS BUTTOCK CALF CAROTID CLAVICLE EAR ELBOW "
    "EXTREMITY EYE EYELID FEMUR FIBULA FINGER FOOT FOREARM HAND HEEL HIP HUMERUS IAC KIDNEY KNEE LEG LUNG "
    "ORBIT OVARY PAROTID PATELLA RADIUS RIB SCAPULA SCJOINT SCLERA SCROTUM SHOULDER SIJOINT SUBMANDIBULAR "
    "TESTIS THIGH THUMB TIBIA TMJ TOE ULNA UPRGITRACT WRIST ZYGOMA".split()
)
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64}
# PatientSex (CS, Type 2) allows M, F, O or empty; highdicom refuses anything else with a ValueError.
_PATIENT_SEX = {"M": "M", "MALE": "M", "MAN": "M", "F": "F", "FEMALE": "F", "WOMAN": "F", "O": "O", "OTHER": "O"}

# Copied exactly as received into every output, never clipped: a derived series must file under
# the same study and patient as its sources, even where a source's value breaks its VR's length.
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyDescription", "PhysiciansOfRecord",
                  "ProcedureCodeSequence", "PatientAge", "PatientSize", "PatientWeight")
PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
# De-identification (Patient module, SOP Common): a de-identified input stays labelled so.
DEIDENTIFICATION_KEYWORDS = ("PatientIdentityRemoved", "DeidentificationMethod",
                             "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified")
_EXACT = frozenset(STUDY_KEYWORDS + PATIENT_KEYWORDS + DEIDENTIFICATION_KEYWORDS)


class EncodingError(ValueError):
    """Inputs cannot be encoded as a derived DICOM series (shape, geometry or reference mismatch)."""


def software_versions() -> list[str]:
    return [f"dicomnode {__version__}", f"highdicom {highdicom.__version__}"]


def derived_series_description(text: str) -> str:
    """A SeriesDescription (LO, 64 chars) that always ends in the not-for-diagnosis warning."""
    text = " ".join(text.replace("\\", "/").split())
    if NOT_FOR_DIAGNOSIS in text.upper():
        return text[:_LO_MAX]
    suffix = f" - {NOT_FOR_DIAGNOSIS}"
    return text[: _LO_MAX - len(suffix)].rstrip() + suffix


def derivation_description(method: str, derivation: str) -> str:
    """DerivationDescription (ST): what was done, with which method and software versions."""
    parts = [derivation.strip(), f"method={method}" if method else "", *software_versions(),
             NOT_FOR_DIAGNOSIS.lower()]
    return "; ".join(p for p in parts if p)[:_ST_MAX]


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def purpose_source_image() -> Dataset:
    return code_item("121322", "DCM", "Source image for image processing operation")


def spatial_resampling() -> Dataset:
    return code_item("113085", "DCM", "Spatial resampling")


def source_image_item(header: Dataset) -> Dataset:
    """One SourceImageSequence item naming ``header``'s instance as a processing source."""
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if "ReferencedFrameNumber" in header:  # a frame of a multi-frame source
        item.ReferencedFrameNumber = header.ReferencedFrameNumber
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose_source_image()])
    return item


def _instances(headers: Iterable[Dataset]) -> list[Dataset]:
    seen, items = set(), []
    for h in headers:
        if h.SOPInstanceUID in seen:  # one multi-frame NM instance may stand for many slices
            continue
        seen.add(h.SOPInstanceUID)
        ref = Dataset()
        ref.ReferencedSOPClassUID = h.SOPClassUID
        ref.ReferencedSOPInstanceUID = h.SOPInstanceUID
        items.append(ref)
    return items


def _series_item(series_uid: str, headers: Iterable[Dataset]) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = series_uid
    item.ReferencedInstanceSequence = DicomSequence(_instances(headers))
    return item


def common_instance_references(study_uid: str, inputs: Sequence[tuple[Volume, Sequence[Dataset]]]) -> Dataset:
    """Common Instance Reference module: the given headers of each input volume, grouped by series.

    Inputs from another study (pairing by PatientID across studies) go under
    StudiesContainingOtherReferencedInstancesSequence, as the module requires.
    """
    same: list[Dataset] = []
    other: dict[str, list[Dataset]] = {}
    for volume, headers in inputs:
        item = _series_item(volume.series_uid, headers)
        if volume.study_uid == study_uid:
            same.append(item)
        else:
            other.setdefault(volume.study_uid, []).append(item)
    module = Dataset()
    module.ReferencedSeriesSequence = DicomSequence(same)
    if other:
        studies = []
        for uid, items in other.items():
            study = Dataset()
            study.StudyInstanceUID = uid
            study.ReferencedSeriesSequence = DicomSequence(items)
            studies.append(study)
        module.StudiesContainingOtherReferencedInstancesSequence = DicomSequence(studies)
    return module


def display_order(headers: Sequence[Dataset]) -> list[int]:
    """Indices of ``headers`` in the order highdicom stores Parametric Map frames (its volume
    convention: along the negated slice normal, i.e. head to feet for axial slices).

    The fused instances are numbered in this order too, so the fused series and its maps scroll
    the same way in a viewer.
    """
    from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector

    normal = get_normal_vector([float(v) for v in headers[0].ImageOrientationPatient],
                               index_convention=VOLUME_INDEX_CONVENTION)
    distances = [float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for h in headers]
    return [int(i) for i in np.argsort(distances, kind="stable")]


def check_fixed_geometry(fixed: Volume) -> tuple[int, int]:
    """The fixed volume's (rows, columns); raises EncodingError when headers cannot place the slices."""
    if not fixed.headers:
        raise EncodingError(f"fixed series {fixed.series_uid} has no slice headers to derive from")
    rows_cols = set()
    for i, h in enumerate(fixed.headers):
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                               "Columns", "SOPInstanceUID", "SOPClassUID") if k not in h]
        if missing:
            raise EncodingError(f"fixed slice {i} of series {fixed.series_uid} lacks {', '.join(missing)}")
        rows_cols.add((int(h.Rows), int(h.Columns)))
    if len(rows_cols) != 1:
        raise EncodingError(f"fixed series {fixed.series_uid} mixes image sizes {sorted(rows_cols)}")
    size = fixed.image.GetSize()
    (rows, cols), = rows_cols
    if (size[0], size[1], size[2]) != (cols, rows, len(fixed.headers)):
        raise EncodingError(
            f"fixed image size {size} (x, y, z) disagrees with {len(fixed.headers)} headers of {rows}x{cols}"
        )
    return rows, cols


def check_frame_of_reference(fixed: Volume) -> None:
    """Every fixed slice names its FrameOfReferenceUID: derived series are linked to the anatomy through it."""
    missing = [i for i, h in enumerate(fixed.headers) if not str(h.get("FrameOfReferenceUID") or "")]
    if missing:
        raise EncodingError(f"fixed series {fixed.series_uid} has no FrameOfReferenceUID on slice(s) "
                            f"{', '.join(str(i) for i in missing[:5])}{' ...' if len(missing) > 5 else ''} "
                            "to link the derived series")


def check_sources(volumes: Iterable[Volume]) -> None:
    """Every source slice can be referenced (SOP Class and Instance UIDs) and placed (ImagePositionPatient)."""
    for volume in volumes:
        if not volume.headers:
            raise EncodingError(f"source series {volume.series_uid} has no slice headers to reference")
        for i, h in enumerate(volume.headers):
            missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "ImagePositionPatient") if not h.get(k)]
            if missing:
                raise EncodingError(f"slice {i} of source series {volume.series_uid} lacks {', '.join(missing)}")


def check_series_number(number: int) -> int:
    """A SeriesNumber (IS) the node may write: 1 .. 2**31 - 1."""
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or not 1 <= int(number) <= 2**31 - 1:
        raise EncodingError(f"series number {number!r} is not an integer in 1..2147483647 (IS)")
    return int(number)


def check_text(value: object, what: str) -> str:
    """A free-text input (method, derivation, description) as a string; only the layout controls of ST
    (tab, line and form feed, carriage return) may appear, never NUL and the like."""
    if not isinstance(value, str):
        raise EncodingError(f"{what} must be text, got {type(value).__name__}")
    if any(not c.isprintable() and c not in "\t\n\f\r" for c in value):
        raise EncodingError(f"{what} {value[:40]!r} holds control characters")
    return value


def check_stack(array: np.ndarray, fixed: Volume, rows: int, cols: int, what: str, channels: int | None) -> None:
    """An (N, rows, cols[, channels]) stack with one plane per fixed slice."""
    expected = (len(fixed.headers), rows, cols) + ((channels,) if channels else ())
    if array.shape != expected:
        raise EncodingError(f"{what} has shape {array.shape}, expected {expected} (slices, rows, columns"
                            f"{', channels' if channels else ''}) of the fixed grid")


def copy_anatomy(target: Dataset, header: Dataset) -> None:
    """BodyPartExamined and Laterality from the source, Laterality left empty where it is required but unknown."""
    body_part = str(header.get("BodyPartExamined") or "").strip().upper()
    laterality = str(header.get("Laterality") or "").strip()
    if body_part:
        target.BodyPartExamined = body_part
    elif "BodyPartExamined" in target:
        del target.BodyPartExamined
    if laterality:
        target.Laterality = laterality
    elif not body_part or body_part in PAIRED_BODY_PARTS:
        target.Laterality = ""
    elif "Laterality" in target:
        del target.Laterality


def normalise_patient_sex(headers: Iterable[Dataset]) -> list[str]:
    """Make PatientSex of source headers legal in place: spelled-out values become their code,
    anything else ("U", "unknown") becomes empty (Type 2). Returns each change as ``'Male' -> 'M'``
    for the audit record (the values are not logged).
    """
    changes: dict[str, str] = {}
    for header in headers:
        if "PatientSex" not in header:
            continue
        value = str(header.PatientSex or "")
        legal = _PATIENT_SEX.get(value.strip().upper(), "")
        if value != legal:
            header.PatientSex = legal
            changes[value] = legal
    return [f"PatientSex {old!r} -> {new!r}" for old, new in changes.items()]


def copy_study_and_deidentification(target: Dataset, header: Dataset) -> None:
    """Study, patient and de-identification attributes of ``header`` into ``target``, exactly."""
    for keyword in _EXACT:
        if keyword in header:
            target[keyword] = copy.deepcopy(header[keyword])


def source_equipment(volumes: Sequence[Volume]) -> list:
    """One highdicom ContributingEquipment (acquisition) per source series, from its first header."""
    from highdicom import ContributingEquipment

    items = []
    for volume in volumes:
        if volume.headers and volume.headers[0].get("Manufacturer"):
            items.append(ContributingEquipment.for_image_acquisition(volume.headers[0]))
    return items


def overlapping_slices(fixed: Volume, moving: Volume) -> list[list[Dataset]]:
    """Per fixed slice, the moving slice headers whose slab overlaps it along the fixed slice normal.

    Slabs are each series' slice spacing wide (mm, patient space); a multi-frame moving instance
    appears once per overlapping frame. Empty where the moving field of view does not reach.
    """
    iop = np.array([float(v) for v in fixed.headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    fixed_d = np.array([np.dot(normal, [float(v) for v in h.ImagePositionPatient]) for h in fixed.headers])
    moving_d = np.array([np.dot(normal, [float(v) for v in h.ImagePositionPatient]) for h in moving.headers])
    reach = (abs(fixed.image.GetSpacing()[2]) + abs(moving.image.GetSpacing()[2])) / 2
    return [[moving.headers[i] for i in np.flatnonzero(np.abs(moving_d - d) < reach)] for d in fixed_d]


def clip_copied_strings(ds: Dataset) -> list[str]:
    """Truncate top-level short strings that exceed their VR's length (sources are not always valid).

    Study, patient and de-identification attributes are left exactly as received. Returns the
    keywords changed, so the caller can log them (values may identify the patient).
    """
    changed = []
    for elem in ds:
        if elem.keyword in _EXACT:
            continue
        limit = _MAX_LENGTH.get(elem.VR)
        if limit is None or elem.value is None or elem.VM == 0:
            continue
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        clipped = [str(v)[:limit] for v in values]
        if clipped != [str(v) for v in values]:
            elem.value = clipped if elem.VM > 1 else clipped[0]
            changed.append(elem.keyword)
    return changed


def patient_orientation(iop: Sequence[float]) -> tuple[str, str]:
    """PatientOrientation letters (dominant axis) of the row and column directions; LPS."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(vec: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vec)))
        return letters[axis][int(vec[axis] > 0)]

    v = np.asarray([float(x) for x in iop])
    return letter(v[:3]), letter(v[3:])
