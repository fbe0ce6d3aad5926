"""What the node accepts: storage SOP classes, transfer syntaxes, and the check of one instance.

``check_instance`` turns a received dataset into ``InstanceInfo`` or raises ``RejectedInstance``
with the DIMSE failure status to answer (PS3.4 B.2.3; never a warning status):

- 0xA900 Error: Data Set does not match SOP Class (missing or malformed UIDs, no pixel data, wrong
  modality, impossible image attributes, a deflated data set that inflates beyond what it declares)
- 0xC000 Error: Cannot understand (the data set cannot be parsed)
- 0xC001 Error: Cannot understand (pixel data cannot be decoded or is shorter than declared)
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pydicom import uid as U
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pynetdicom.presentation import AllStoragePresentationContexts

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DB_UNAVAILABLE = 0xA701
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_UNDECODABLE_PIXELS = 0xC001

# The image SOP classes the node fuses: SOP class -> the Modality its IOD requires (None: any
# modality, e.g. Secondary Capture). Their instances must carry pixel data.
STORAGE_SOP_CLASSES: dict[str, str | None] = {
    U.CTImageStorage: "CT",
    U.EnhancedCTImageStorage: "CT",
    U.LegacyConvertedEnhancedCTImageStorage: "CT",
    U.MRImageStorage: "MR",
    U.EnhancedMRImageStorage: "MR",
    U.EnhancedMRColorImageStorage: "MR",
    U.LegacyConvertedEnhancedMRImageStorage: "MR",
    U.PositronEmissionTomographyImageStorage: "PT",
    U.EnhancedPETImageStorage: "PT",
    U.LegacyConvertedEnhancedPETImageStorage: "PT",
    U.NuclearMedicineImageStorage: "NM",
    U.SecondaryCaptureImageStorage: None,
    U.MultiFrameSingleBitSecondaryCaptureImageStorage: None,
    U.MultiFrameGrayscaleByteSecondaryCaptureImageStorage: None,
    U.MultiFrameGrayscaleWordSecondaryCaptureImageStorage: None,
    U.MultiFrameTrueColorSecondaryCaptureImageStorage: None,
}

# Every Storage SOP class (PS3.4 Annex B): the node stores and audits them all (RT Structure Set,
# SR, Key Object Selection, presentation states, ...); only STORAGE_SOP_CLASSES are ever paired.
ALL_STORAGE_SOP_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts) | set(STORAGE_SOP_CLASSES)

UNCOMPRESSED_SYNTAXES = (
    U.ExplicitVRLittleEndian,
    U.ImplicitVRLittleEndian,
    U.DeflatedExplicitVRLittleEndian,
    U.ExplicitVRBigEndian,
)
COMPRESSED_SYNTAXES = (
    U.JPEGBaseline8Bit,
    U.JPEGExtended12Bit,
    U.JPEGLossless,
    U.JPEGLosslessSV1,
    U.JPEGLSLossless,
    U.JPEGLSNearLossless,
    U.JPEG2000Lossless,
    U.JPEG2000,
    U.HTJ2KLossless,
    U.HTJ2KLosslessRPCL,
    U.HTJ2K,
    U.RLELossless,
)
# Syntaxes whose header the node reads without decoding the pixel data -> implicit VR?
HEADER_READ_SYNTAXES = {U.ExplicitVRLittleEndian: False, U.ImplicitVRLittleEndian: True}
# Explicit VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_PIXEL_TAGS = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData", 0x7FE00010: "PixelData"}
_UNDEFINED_LENGTH = 0xFFFFFFFF
REQUIRED_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def decodable(syntax: str) -> bool:
    """True when an installed pydicom decoder plugin can decode pixel data in ``syntax``."""
    try:
        return get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        return False


def accepted_transfer_syntaxes(deflated: bool = True) -> list[str]:
    """Uncompressed syntaxes (Deflated only when ``deflated``); a compressed one only when its decoder is installed."""
    plain = [s for s in UNCOMPRESSED_SYNTAXES if deflated or s != U.DeflatedExplicitVRLittleEndian]
    return plain + [s for s in COMPRESSED_SYNTAXES if decodable(s)]


class RejectedInstance(Exception):
    """An instance the node refuses; ``status`` is the DIMSE failure status answered to the sender."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(f"0x{status:04X} {reason}")


@dataclass(frozen=True)
class InstanceInfo:
    """The attributes of a received instance the node records (no pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    modality: str
    transfer_syntax_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    study_date: str
    frame_of_reference_uid: str
    expected_count: int | None


@dataclass(frozen=True)
class PixelExtent:
    """Where a data set's top-level pixel data element sits in the received bytes (not its value).

    ``declared``: the element's length field in bytes; ``available``: bytes present after the
    element header (less than ``declared`` when the stream was cut short).
    """

    keyword: str
    declared: int
    available: int


def _at_pixel_data(tag: int, _vr: str | None, _length: int) -> bool:
    return tag >= 0x7FE00008


def read_header(stream: bytes, syntax: str) -> tuple[Dataset, PixelExtent | None] | None:
    """The data set without its pixel data, and where the pixel data is; None for other syntaxes.

    Only for little endian uncompressed syntaxes (``HEADER_READ_SYNTAXES``): parsing stops at the
    first top-level element from (7FE0,0008) on, whose header is read by hand, so a 512x512 image
    is never copied into a data element. Raises whatever pydicom raises on a broken stream.
    """
    implicit = HEADER_READ_SYNTAXES.get(syntax)
    if implicit is None:
        return None
    fp = BytesIO(stream)
    ds = read_dataset(fp, implicit, True, stop_when=_at_pixel_data)
    implicit = bool(ds.original_encoding[0])  # pydicom corrects a sender that mislabels the VR mode
    start = fp.tell()
    if len(stream) - start < 8:
        return ds, None
    group, element = struct.unpack_from("<HH", stream, start)
    keyword = _PIXEL_TAGS.get(group << 16 | element)
    if keyword is None:
        return ds, None  # e.g. trailing padding (FFFC,FFFC) without any pixel data before it
    if implicit:
        (declared,), value_at = struct.unpack_from("<L", stream, start + 4), start + 8
    elif stream[start + 4 : start + 6] in _LONG_VRS:
        (declared,), value_at = struct.unpack_from("<L", stream, start + 8), start + 12
    else:
        (declared,), value_at = struct.unpack_from("<H", stream, start + 6), start + 8
    return ds, PixelExtent(keyword, declared, max(0, len(stream) - value_at))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def expected_instance_count(ds: Dataset, modality: str) -> int | None:
    """Instances the series should hold, when the header says so (PET and NM only).

    PET: NumberOfSlices (x NumberOfTimeSlices for dynamic series), one slice per instance.
    NM: NumberOfSlices frames spread over instances of NumberOfFrames each (usually one).
    """
    slices = _int(ds, "NumberOfSlices")
    if not slices or slices < 1:
        return None
    if modality == "PT":
        return slices * max(1, _int(ds, "NumberOfTimeSlices") or 1)
    if modality == "NM":
        frames = max(1, _int(ds, "NumberOfFrames") or 1)
        return max(1, -(-slices // frames))
    return None


def _check_pixels(ds: Dataset, syntax: str, extent: PixelExtent | None, header_only: bool, required: bool = True) -> None:
    if header_only:
        keyword = extent.keyword if extent is not None else None
    else:
        keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        if not required:
            return  # a non-image object (RT Structure Set, SR, ...)
        raise RejectedInstance(STATUS_DATASET_MISMATCH, "no pixel data")
    if keyword != "PixelData":
        return
    needed = pixel_data_bytes(ds)
    if syntax in COMPRESSED_SYNTAXES:
        try:
            ds.pixel_array  # decode once so we never store what we cannot read later
        except Exception as exc:
            raise RejectedInstance(STATUS_UNDECODABLE_PIXELS, f"pixel data cannot be decoded: {exc}") from exc
        return
    if extent is None:
        length = len(ds.PixelData or b"")
    elif extent.declared == _UNDEFINED_LENGTH:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, "encapsulated pixel data in an uncompressed transfer syntax")
    else:
        length = min(extent.declared, extent.available)
    if length < needed:
        raise RejectedInstance(STATUS_UNDECODABLE_PIXELS, f"pixel data has {length} bytes, header needs {needed}")


# PS3.5 9.1: components of digits without leading zeros (except "0"), separated by dots.
_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_KEYWORDS = (*REQUIRED_UIDS, "SOPClassUID", "FrameOfReferenceUID")
_BITS_ALLOCATED = (1, 8, 16, 32, 64)


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a valid UID (PS3.5 9.1), or None when it is."""
    if len(value) > 64:
        return "longer than 64 characters"
    if not _UID_SYNTAX.fullmatch(value):
        return "not digits and dots without leading zeros"
    return None


def check_uids(ds: Dataset, request_sop_class: str, request_sop_instance: str) -> None:
    """Refuse (0xA900) malformed UIDs in the data set or the C-STORE request.

    Spool paths are built from them, so one malformed UID (``1.2/3``) must never reach the spool,
    and a NUL must never reach a database (PostgreSQL refuses it as a driver error).
    """
    values = [("Affected SOP Class UID", request_sop_class), ("Affected SOP Instance UID", request_sop_instance)]
    values += [(k, _text(ds, k)) for k in UID_KEYWORDS if _text(ds, k)]  # FrameOfReferenceUID is optional
    problems = [(k, p) for k, p in ((k, uid_problem(v)) for k, v in values) if p]
    if not problems:
        return
    if all(p == "longer than 64 characters" for _, p in problems):
        raise RejectedInstance(STATUS_DATASET_MISMATCH, "UIDs longer than 64 characters: " + ",".join(k for k, _ in problems))
    raise RejectedInstance(STATUS_DATASET_MISMATCH, "invalid UIDs (PS3.5 9.1): " + ", ".join(f"{k} {p}" for k, p in problems))


def pixel_data_bytes(ds: Dataset) -> int:
    """Bytes of uncompressed pixel data the image attributes declare; 0xA900 when they are impossible.

    Rows, Columns, Samples per Pixel and Number of Frames must be at least 1 and Bits Allocated
    one of 1, 8, 16, 32, 64: anything else is accepted today and fails later, in a job.
    """
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) if ds.get("SamplesPerPixel") not in (None, "") else 1)
        frames = int(ds.get("NumberOfFrames") if ds.get("NumberOfFrames") not in (None, "") else 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, f"image pixel attributes missing or invalid: {exc}") from exc
    bad = [f"{k}={v}" for k, v in (("Rows", rows), ("Columns", cols), ("SamplesPerPixel", samples), ("NumberOfFrames", frames)) if v < 1]
    if bits not in _BITS_ALLOCATED:
        bad.append(f"BitsAllocated={bits}")
    if bad:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, "impossible image pixel attributes: " + ",".join(bad))
    return (rows * cols * samples * frames * bits + 7) // 8


def read_deflated_header(body: bytes, margin: int, ceiling: int) -> tuple[Dataset, PixelExtent | None]:
    """``read_header`` for Deflated Explicit VR Little Endian, inflating no more than the data set declares.

    pydicom inflates a deflated data set without a bound (a 2 MB C-STORE became 4 GB of memory).
    Here the first ``margin`` inflated bytes must hold everything before the pixel data; the whole
    data set may then inflate to that header, the pixel data its image attributes declare and
    ``margin`` more, never beyond ``ceiling``. Larger is refused with 0xA900: the data set does not
    match what it declares, and sending it again would not help.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, no zlib header
    try:
        out = bytearray(inflater.decompress(body, margin))
    except zlib.error as exc:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {exc}") from exc
    complete = not inflater.unconsumed_tail and len(out) < margin
    try:
        ds, extent = read_header(bytes(out), U.ExplicitVRLittleEndian)
    except Exception:
        if complete:
            raise
        ds, extent = Dataset(), None  # cut inside an element: the header does not fit in margin
    if extent is None:
        if not complete:
            raise RejectedInstance(STATUS_DATASET_MISMATCH, f"deflated data set header inflates beyond {margin} bytes")
        return ds, None
    header_end = len(out) - extent.available
    limit = min(ceiling, header_end + pixel_data_bytes(ds) + margin)
    if len(out) < limit and not complete:
        try:
            out += inflater.decompress(inflater.unconsumed_tail, limit + 1 - len(out))
        except zlib.error as exc:
            raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {exc}") from exc
    if len(out) > limit:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, f"deflated data set inflates beyond {limit} bytes (its header declares less)")
    return read_header(bytes(out), U.ExplicitVRLittleEndian)


def check_instance(
    ds: Dataset,
    sop_class_uid: str,
    sop_instance_uid: str,
    syntax: str,
    *,
    header_only: bool = False,
    pixels: PixelExtent | None = None,
) -> InstanceInfo:
    """Validate one received dataset against its C-STORE request; raise ``RejectedInstance``.

    ``sop_class_uid``/``sop_instance_uid``: Affected SOP Class/Instance UID of the request.
    ``header_only``: ``ds`` came from ``read_header`` and ``pixels`` says where its pixel data is.
    """
    try:
        missing = [k for k in (*REQUIRED_UIDS, "SOPClassUID", "Modality") if not _text(ds, k)]
    except Exception as exc:  # pydicom parses lazily: a broken stream fails on first access
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from exc
    if "SOPClassUID" in missing and "SOPInstanceUID" in missing:
        # Nothing that identifies an instance: the bytes are not a DICOM data set at all.
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, "not a DICOM data set: no SOP Class or SOP Instance UID found")
    if missing:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, f"missing required attributes: {','.join(missing)}")
    check_uids(ds, sop_class_uid, sop_instance_uid)
    if _text(ds, "SOPClassUID") != sop_class_uid:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, f"SOPClassUID {_text(ds, 'SOPClassUID')} differs from the request's {sop_class_uid}")
    if _text(ds, "SOPInstanceUID") != sop_instance_uid:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, "SOPInstanceUID differs from the request's Affected SOP Instance UID")
    if sop_class_uid not in ALL_STORAGE_SOP_CLASSES:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, f"SOP class {sop_class_uid} is not supported")
    modality = _text(ds, "Modality")
    required = STORAGE_SOP_CLASSES.get(sop_class_uid)
    if required is not None and modality != required:
        raise RejectedInstance(STATUS_DATASET_MISMATCH, f"Modality {modality} does not match the SOP class (needs {required})")
    try:
        _check_pixels(ds, syntax, pixels, header_only, required=sop_class_uid in STORAGE_SOP_CLASSES)
        return InstanceInfo(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            series_uid=_text(ds, "SeriesInstanceUID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            modality=modality[:16],
            transfer_syntax_uid=syntax,
            patient_id=_text(ds, "PatientID")[:64],
            patient_name=_text(ds, "PatientName")[:324],
            birth_date=_text(ds, "PatientBirthDate")[:8],
            study_date=_text(ds, "StudyDate")[:8],
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
            expected_count=expected_instance_count(ds, modality),
        )
    except RejectedInstance:
        raise
    except Exception as exc:
        raise RejectedInstance(STATUS_CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from exc
