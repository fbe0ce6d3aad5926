"""DICOM series -> a 3-D volume in LPS patient space (SimpleITK image, float32).

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on
row x column direction), never by InstanceNumber. Multi-frame (Enhanced) objects contribute one
slice per frame, with geometry from the per-frame / shared functional groups; classic NM
reconstructions (SPECT) one slice per frame, with geometry from the NM Detector and
Reconstruction modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicomnode.identity import Identity, identity_differences
from dicomnode.imaging.suv import volume_units
from dicomnode.log import event

log = logging.getLogger(__name__)

# Relative and absolute tolerance on slice spacing: scanners write positions with rounding.
_SPACING_RTOL = 0.01
_SPACING_ATOL = 1e-3
# Values larger than this are read from the file when used (``dcmread``'s defer_size): pixel data.
_DEFER_BYTES = 64 * 1024
# Functional-group sequences that are replaced by plain attributes in synthesised frame headers.
_FRAME_GROUPS = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "PixelData",
                 "NumberOfFrames", "FloatPixelData", "DoubleFloatPixelData")


class VolumeError(Exception):
    """A series cannot be made into a volume (gaps, uneven spacing, mixed geometry, ...)."""


@dataclass
class Volume:
    """A series as one image in patient space.

    ``image``: float32, origin/spacing/direction in LPS mm, index order (x=column, y=row,
    z=slice along the slice normal, increasing). ``headers``: one pixel-less dataset per z slice
    (in z order) for output builders that need per-slice references and geometry. For a
    multi-frame source a header is synthesised per frame: the object's top-level attributes plus
    ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness and
    RescaleSlope/Intercept from its functional groups (NM: from DetectorInformationSequence and
    SpacingBetweenSlices); its SOPInstanceUID stays that of the
    multi-frame object and ReferencedFrameNumber (0008,1160) holds the 1-based frame number.

    ``units``: "HU" (CT), "SUVbw" (PET converted, or stored as GML = SUV body weight),
    "BQML" (PET kept in Bq/ml, reason in ``units_note``), the DICOM Units value for other PET/NM
    units, "" for MR and unknown.
    """

    image: sitk.Image
    modality: str
    units: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    headers: list[Dataset] = field(default_factory=list)
    units_note: str = ""  # why PET stayed in Bq/ml, or how SUV was obtained
    suv_factor: float | None = None  # SUVbw = stored Bq/ml value * suv_factor (g/Bq)

    @property
    def array(self) -> np.ndarray:
        """Voxel values as a float32 array, index order (z, y, x)."""
        return sitk.GetArrayViewFromImage(self.image)


@dataclass
class _Slice:
    header: Dataset
    pixels: np.ndarray | None  # (rows, cols), rescaled, float32; None: decoded from ``header`` when stacked
    position: np.ndarray  # ImagePositionPatient, mm
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm
    shape: tuple[int, int] = (0, 0)  # (rows, cols)

    def take_pixels(self) -> np.ndarray:
        """The rescaled float32 pixels, let go here: a single-frame instance is decoded now, its pixel data dropped."""
        pixels, self.pixels = self.pixels, None
        if pixels is None:
            ds = self.header
            pixels = _rescaled(_pixel_array(ds), ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
            if pixels.shape != self.shape:
                raise VolumeError(f"instance {ds.get('InstanceNumber', '?')} has pixel data of shape {pixels.shape}; "
                                  f"{self.shape[0]} x {self.shape[1]} grey pixels expected (colour images are not volumes)")
            del ds.PixelData  # the dataset becomes the slice's pixel-less header
        return pixels


def load_series(paths: Sequence[Path], expect: Identity | None = None) -> Volume:
    """Read the instances of one series and build its volume (see Volume).

    ``expect``: the series' patient and study identity as audited at receive; a file that
    disagrees raises VolumeError naming the file and the attributes (a check on read, so a
    spool file that changed or a database row that lies can never mix patients in a volume).

    ``paths`` may name files or folders (searched recursively); non-image objects (RTSTRUCT,
    presentation states) are ignored, and so are non-DICOM files found in a folder (exports carry
    README or thumbnail files). A missing path, an unreadable file, or a named file that is not
    DICOM raises VolumeError naming it, as does any other problem, in words for an administrator.
    """
    files: list[tuple[Path, bool]] = []  # (file, named explicitly)
    for p in map(Path, paths):
        if p.is_dir():
            files.extend((f, False) for f in sorted(p.rglob("*")) if f.is_file())
        elif p.exists():
            files.append((p, True))
        else:
            raise VolumeError(f"series file or folder {p} does not exist")
    datasets, not_dicom = [], []
    for f, named in files:
        try:
            # Large values (pixel data) stay on disk until their slice is stacked: a whole-body
            # series is never held as encoded bytes beside its volume.
            ds = pydicom.dcmread(f, defer_size=_DEFER_BYTES)
        except pydicom.errors.InvalidDicomError as exc:
            if named:
                raise VolumeError(f"{f} is not a DICOM file") from exc
            not_dicom.append(f.name)
            event(log, "skip_file", logging.DEBUG, file=f, reason="not_dicom")
            continue
        except OSError as exc:
            raise VolumeError(f"cannot read {f}: {exc.strerror or exc}") from exc
        except Exception as exc:  # truncated or corrupt files fail in many ways inside the parser
            raise VolumeError(f"{f} is not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        if expect is not None:
            differ = identity_differences(expect, Identity.of_dataset(ds))
            if differ:
                raise VolumeError(f"{f}: {', '.join(differ)} differ from the job's series; refusing to mix "
                                  "patients or studies in one volume")
        if "PixelData" in ds:
            datasets.append(ds)
        elif "Rows" in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise VolumeError(f"{f} has image attributes but no pixel data (truncated file?)")
    if not datasets:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        skipped = f"; {len(not_dicom)} non-DICOM file(s) skipped, e.g. {not_dicom[0]}" if not_dicom else ""
        raise VolumeError(f"no DICOM image instances in {where} ({len(files)} file(s) found{skipped})")
    return volume_from_datasets(datasets)


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    """Build a volume from image datasets of one series (pixel data is dropped from them)."""
    if not datasets:
        raise VolumeError("no image instances in the series")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise VolumeError(f"instances of {len(series)} different series were given as one series")
    slices: list[_Slice] = []
    for ds in datasets:
        if "PerFrameFunctionalGroupsSequence" not in ds and _nm_detector_geometry(ds) is not None:
            slices.extend(_nm_frames(ds))
        elif int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            slices.extend(_frames(ds))
        else:
            slices.append(_single(ds))
    image, ordered = _stack(slices)
    first = datasets[0]
    modality = str(first.get("Modality", ""))
    units, note, factor = volume_units(first, modality)
    if factor is not None:
        image = image * factor
    vol = Volume(
        image=image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32),
        modality=modality,
        units=units,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        headers=[s.header for s in ordered],
        units_note=note,
        suv_factor=factor,
    )
    event(log, "volume_loaded", modality=modality, size="x".join(map(str, image.GetSize())),
          spacing_mm=",".join(f"{v:.3g}" for v in image.GetSpacing()), units=units)
    return vol


def load_image_file(path: Path) -> Volume:
    """A NIfTI/MHA/NRRD file as a Volume (SimpleITK converts to LPS); no DICOM headers."""
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise VolumeError(f"cannot read image file {path.name}: {exc}") from exc
    if image.GetDimension() != 3:
        raise VolumeError(f"{path.name} is {image.GetDimension()}-D; a 3-D volume is needed")
    return Volume(image=image, modality="", units="", study_uid="", series_uid="", frame_of_reference_uid="")


def load_volume(path: Path) -> Volume:
    """A DICOM series folder / file, or a NIfTI/MHA file (by extension)."""
    path = Path(path)
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")):
        return load_image_file(path)
    return load_series([path])


def _rescaled(pixels: np.ndarray, slope, intercept) -> np.ndarray:
    out = pixels.astype(np.float32)
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
    return out


def _pixel_array(ds: Dataset) -> np.ndarray:
    """Decoded pixels; a codec problem becomes a VolumeError naming the file."""
    try:
        return ds.pixel_array
    except Exception as exc:  # missing codec plugins, corrupt fragments: many exception types
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        name = Path(str(getattr(ds, "filename", "") or "instance")).name
        raise VolumeError(f"cannot decode the pixel data of {name} (transfer syntax {syntax}): {exc}") from exc


def _single(ds: Dataset) -> _Slice:
    """A single-frame instance; its pixels are decoded when the slice is stacked (``_Slice.take_pixels``)."""
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if key not in ds:
            raise VolumeError(f"instance {ds.get('InstanceNumber', '?')} has no {key}")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"instance has {ds.SamplesPerPixel} samples per pixel; colour images are not volumes")
    return _Slice(ds, None, np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float),
                  (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), (int(ds.Rows), int(ds.Columns)))


def _group(ds: Dataset, frame: Dataset | None, seq: str) -> Dataset | None:
    """A functional group item, per-frame first, then shared."""
    for source in (frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if source is not None and seq in source and len(source[seq].value):
            return source[seq].value[0]
    return None


def _frame_pixels(ds: Dataset) -> tuple[int, np.ndarray]:
    """(number of frames, pixels as (frames, rows, columns))."""
    pixels = _pixel_array(ds)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim < 2 or pixels.size != n * int(ds.Rows) * int(ds.Columns):
        raise VolumeError(f"multi-frame object has pixel data of shape {pixels.shape} for {n} frame(s) of "
                          f"{ds.Rows} x {ds.Columns}; colour images are not volumes")
    return n, pixels.reshape((n,) + pixels.shape[-2:])


def _frame_header(ds: Dataset, frame_number: int, position, orientation, spacing, thickness,
                  slope, intercept) -> Dataset:
    """A pixel-less single-frame header for one frame (see Volume.headers)."""
    header = Dataset()
    for elem in ds:
        if elem.keyword not in _FRAME_GROUPS:
            header.add(elem)
    header.file_meta = getattr(ds, "file_meta", Dataset())
    header.ImagePositionPatient = [float(v) for v in position]
    header.ImageOrientationPatient = list(orientation)
    header.PixelSpacing = list(spacing)
    if thickness is not None:
        header.SliceThickness = thickness
    if slope is not None:
        header.RescaleSlope, header.RescaleIntercept = slope, intercept if intercept is not None else 0
    header.ReferencedFrameNumber = frame_number
    return header


def _frames(ds: Dataset) -> list[_Slice]:
    n, pixels = _frame_pixels(ds)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [None] * n)
    out = []
    for i in range(n):
        frame = per_frame[i] if i < len(per_frame) else None
        pos = _group(ds, frame, "PlanePositionSequence")
        ori = _group(ds, frame, "PlaneOrientationSequence")
        meas = _group(ds, frame, "PixelMeasuresSequence")
        rescale = _group(ds, frame, "PixelValueTransformationSequence")
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise VolumeError(f"frame {i + 1} of a multi-frame object has no plane position, orientation or "
                              "pixel spacing in its functional groups")
        slope = rescale.get("RescaleSlope") if rescale is not None else ds.get("RescaleSlope")
        intercept = rescale.get("RescaleIntercept") if rescale is not None else ds.get("RescaleIntercept")
        header = _frame_header(ds, i + 1, pos.ImagePositionPatient, ori.ImageOrientationPatient, meas.PixelSpacing,
                               meas.get("SliceThickness"), slope, intercept)
        out.append(_Slice(header, _rescaled(pixels[i], slope, intercept), np.array(header.ImagePositionPatient, float),
                          np.array(header.ImageOrientationPatient, float),
                          (float(meas.PixelSpacing[0]), float(meas.PixelSpacing[1])), pixels.shape[-2:]))
    return out


def _nm_detector_geometry(ds: Dataset) -> Dataset | None:
    """The NM Detector module item holding the plane of a reconstruction, or None."""
    items = ds.get("DetectorInformationSequence") or []
    if not items or "ImagePositionPatient" not in items[0] or "ImageOrientationPatient" not in items[0]:
        return None
    return items[0]


def _nm_frames(ds: Dataset) -> list[_Slice]:
    """Frames of an NM reconstruction (RECON TOMO): plane of the first slice from the detector item.

    Slice j (1-based, from SliceVector when present, else the frame number) lies at
    ImagePositionPatient + (j - 1) * SpacingBetweenSlices * (row x column): PS3.3 NM Reconstruction
    module, where a positive spacing stacks slices behind the first, along the normal.
    """
    detector = _nm_detector_geometry(ds)
    assert detector is not None
    if "PixelSpacing" not in ds:
        raise VolumeError("NM reconstruction has no PixelSpacing")
    n, pixels = _frame_pixels(ds)
    orientation = np.array(detector.ImageOrientationPatient, float)
    first = np.array(detector.ImagePositionPatient, float)
    spacing_between = ds.get("SpacingBetweenSlices")
    if spacing_between in (None, ""):
        if n > 1:
            # Contiguous SPECT slices are the norm; thickness is the only other hint of the step.
            spacing_between = ds.get("SliceThickness")
            if spacing_between in (None, ""):
                raise VolumeError("NM reconstruction has neither SpacingBetweenSlices nor SliceThickness: "
                                  "its slice positions are unknown")
            event(log, "nm_spacing_from_thickness", spacing_mm=spacing_between)
        else:
            spacing_between = 0.0
    step = float(spacing_between)
    slice_numbers = [int(v) for v in (ds.get("SliceVector") or [])]
    if len(slice_numbers) != n:
        slice_numbers = list(range(1, n + 1))
    normal = np.cross(orientation[:3], orientation[3:])
    thickness = ds.get("SliceThickness")
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    out = []
    for i in range(n):
        position = first + (slice_numbers[i] - 1) * step * normal
        header = _frame_header(ds, i + 1, position.round(6), detector.ImageOrientationPatient, ds.PixelSpacing,
                               thickness, slope, intercept)
        out.append(_Slice(header, _rescaled(pixels[i], slope, intercept), position, orientation,
                          (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), pixels.shape[-2:]))
    return out


def _stack(slices: list[_Slice]) -> tuple[sitk.Image, list[_Slice]]:
    """Sort slices along the normal, check geometry, and stack them into an LPS image."""
    ref = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, ref.orientation, atol=1e-4):
            raise VolumeError("slices have different ImageOrientationPatient (mixed or localizer images)")
        if s.shape != ref.shape:
            raise VolumeError(f"slices have different sizes {s.shape} and {ref.shape}")
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=1e-4):
            raise VolumeError("slices have different PixelSpacing")
    row, col = ref.orientation[:3], ref.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise VolumeError("ImageOrientationPatient is not two orthogonal unit vectors")
    normal = np.cross(row, col)
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in ordered])
    if len(ordered) > 1:
        # Positions must lie on one line along the normal (no gantry tilt / shear).
        in_plane = np.array([s.position - d * normal for s, d in zip(ordered, depth)])
        if np.abs(in_plane - in_plane[0]).max() > 0.05 * min(ref.pixel_spacing) + 0.01:
            raise VolumeError("slice positions do not line up along the slice normal (gantry tilt or sheared stack)")
        steps = np.diff(depth)
        if steps.min() <= _SPACING_ATOL:
            raise VolumeError(f"two slices share the position {depth[int(np.argmin(steps))]:.2f} mm along the normal "
                              "(duplicate instances or several stacks in one series)")
        dz = float(np.median(steps))
        bad = np.abs(steps - dz) > _SPACING_RTOL * dz + _SPACING_ATOL
        if bad.any():
            i = int(np.argmax(bad))
            kind = "a gap (missing slice?)" if steps[i] > 1.5 * dz else "uneven slice spacing"
            raise VolumeError(f"{kind}: {steps[i]:.3f} mm between slices at {depth[i]:.2f} and {depth[i + 1]:.2f} mm "
                              f"along the normal, where {dz:.3f} mm is the usual spacing")
    else:
        h = ref.header
        dz = float(h.get("SpacingBetweenSlices") or h.get("SliceThickness") or 1.0)
    if not all(np.isfinite(v) and v > 0 for v in (*ref.pixel_spacing, dz)):
        raise VolumeError(f"degenerate voxel spacing {ref.pixel_spacing} x {dz}")
    # Pasted slice by slice into the image, each slice decoded just before and let go just after:
    # a whole-body series is held once, as the volume, never beside its slices or a second stack.
    image = sitk.Image(ref.shape[1], ref.shape[0], len(ordered), sitk.sitkFloat32)
    for k, s in enumerate(ordered):
        image[:, :, k : k + 1] = sitk.GetImageFromArray(s.take_pixels()[None])
    image.SetSpacing((ref.pixel_spacing[1], ref.pixel_spacing[0], dz))  # PixelSpacing is (row, column)
    image.SetOrigin(tuple(ordered[0].position))
    image.SetDirection(tuple(np.column_stack([row, col, normal]).ravel()))
    return image, ordered
