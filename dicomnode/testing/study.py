"""A small synthetic PET/CT (optionally MR, SPECT) study of a torso phantom with a hot lesion.

The phantom is defined in patient space (LPS, mm) and sampled on each series' own grid, as a
real scanner would: CT fine (64 x 64 at 3.125 mm), PET and SPECT coarser (32 x 32 at 6.25 mm,
half as many slices, centred between CT slices), all in one study and one frame of reference.
CT is stored in HU (int16, RescaleSlope/Intercept), PET in Bq/ml (BQML, per-slice rescale
slope, decay corrected to series start) with everything SUV-bw needs, so the expected SUV of
every region is known from ``PhantomSpec``. Pixels are deterministic in ``seed``; UIDs are new
on every call unless ``stable_uids`` is set.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from scipy.ndimage import gaussian_filter

from dicomnode import __version__

SUPPORTED_MODALITIES = ("CT", "PT", "MR", "NM")
F18_HALF_LIFE_S = 6586.2
TC99M_HALF_LIFE_S = 21624.12


@dataclass(frozen=True)
class PhantomSpec:
    """Ground truth of the phantom: positions in mm relative to the FOV centre (LPS), values per modality."""

    body_semi_axes_mm: tuple[float, float] = (85.0, 65.0)
    lesion_center_mm: tuple[float, float, float] = (-12.0, -28.0, 9.0)
    lesion_radius_mm: float = 12.0
    lesion_suv: float = 8.0
    background_suv: float = 1.0
    liver_suv: float = 2.0
    lung_suv: float = 0.3
    patient_weight_kg: float = 75.0
    injected_dose_bq: float = 370e6
    uptake_delay_s: float = 3900.0  # injection to PET series start
    pet_noise: float = 0.05  # relative, multiplicative
    # White noise SD (HU) of a real PET/CT's CT at the fidelity benchmark's grid (1.5625 mm pixels,
    # 3 mm slices): STS_002's CT has 40 HU (SD in 5 x 5 px over soft tissue) at 0.977 mm and 3.27 mm;
    # noise falls ~ 1 / pixel size, so 40 x 0.977 / 1.5625 = 25 HU (the thinner slices, noise ~ 1 / sqrt(slice
    # thickness), would add 4 %: within what that SD owes to texture). Not rescaled on other grids.
    ct_noise_hu: float = 25.0


@dataclass(frozen=True)
class _Grid:
    """Axial grid: ``shape`` (z, y, x); ``spacing`` (x, y, z) mm; ``origin`` = centre of voxel (0,0,0)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel centres (z, y, x broadcastable) in LPS mm."""
        nz, ny, nx = self.shape
        x = self.origin[0] + self.spacing[0] * np.arange(nx)
        y = self.origin[1] + self.spacing[1] * np.arange(ny)
        z = self.origin[2] + self.spacing[2] * np.arange(nz)
        return z[:, None, None], y[None, :, None], x[None, None, :]


def _grids(shape: tuple[int, int, int]) -> tuple[_Grid, _Grid]:
    """The fine (CT/MR) grid and the coarse (PET/NM) grid covering the same field of view."""
    nz, ny, nx = shape
    px, dz = 200.0 / nx, 3.0
    fine = _Grid(shape, (px, px, dz), (-100.0 + px / 2, -100.0 * ny / nx + px / 2, -dz * (nz - 1) / 2))
    coarse_shape = (max(nz // 2, 1), max(ny // 2, 1), max(nx // 2, 1))
    cpx = 2 * px
    coarse = _Grid(
        coarse_shape,
        (cpx, cpx, 2 * dz),
        (-100.0 + cpx / 2, -100.0 * ny / nx + cpx / 2, fine.origin[2] + dz / 2),
    )
    return fine, coarse


def _labels(grid: _Grid, spec: PhantomSpec, z_half_extent: float) -> dict[str, np.ndarray]:
    """Boolean masks of the phantom's regions sampled at the grid's voxel centres."""
    z, y, x = grid.centres()
    a, b = spec.body_semi_axes_mm
    c = 1.15 * z_half_extent
    body = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1.0
    inner = (x / (0.9 * a)) ** 2 + (y / (0.9 * b)) ** 2 + (z / c) ** 2 <= 1.0
    lungs = np.zeros_like(body)
    for cx in (-38.0, 38.0):
        lungs |= ((x - cx) / 24.0) ** 2 + ((y + 2.0) / 32.0) ** 2 + ((z - 0.25 * c) / (0.45 * c)) ** 2 <= 1.0
    liver = ((x + 30.0) / 32.0) ** 2 + ((y + 8.0) / 28.0) ** 2 + ((z + 0.55 * c) / (0.3 * c)) ** 2 <= 1.0
    spine = ((x / 10.0) ** 2 + ((y - 45.0) / 10.0) ** 2 <= 1.0) & body
    lx, ly, lz = spec.lesion_center_mm
    lesion = (x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2 <= spec.lesion_radius_mm**2
    shape = grid.shape
    return {k: np.broadcast_to(v, shape) for k, v in {
        "body": body, "inner": inner & body, "lungs": lungs & body, "liver": liver & body & ~lungs,
        "spine": spine, "lesion": lesion & body,
    }.items()}


# The phantom's tissues in the order the CT paints them (a later one over an earlier one), and their HU.
TISSUES = ("air", "body", "inner", "lungs", "liver", "spine", "lesion")
TISSUE_HU = {"air": -1000.0, "body": -100.0, "inner": 40.0, "lungs": -800.0, "liver": 60.0, "spine": 700.0,
             "lesion": 70.0}


def tissue_labels(shape: tuple[int, int, int] = (48, 64, 64), spec: PhantomSpec = PhantomSpec()) -> np.ndarray:
    """The tissue of every CT/MR voxel (z, y, x) as an index into ``TISSUES``: the phantom's ground truth."""
    fine, _ = _grids(shape)
    masks = _labels(fine, spec, fine.spacing[2] * fine.shape[0] / 2)
    out = np.zeros(shape, dtype=np.int64)
    for index, name in enumerate(TISSUES[1:], start=1):
        out[masks[name]] = index
    return out


def _paint(masks: dict[str, np.ndarray], values: dict[str, float], outside: float) -> np.ndarray:
    """Later keys paint over earlier ones."""
    out = np.full(masks["body"].shape, outside, dtype=np.float64)
    for name, value in values.items():
        out[masks[name]] = value
    return out


@dataclass(frozen=True)
class _StudyContext:
    study_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    accession: str
    uid_entropy: tuple[str, ...] | None

    def uid(self, *parts: object) -> str:
        if self.uid_entropy is None:
            return generate_uid()
        return generate_uid(entropy_srcs=[*self.uid_entropy, *map(str, parts)])


def _base(ctx: _StudyContext, sop_class: str, modality: str, series_uid: str, series_number: int,
          description: str, series_time: str) -> Dataset:
    """Patient, study, series, equipment and frame-of-reference attributes shared by all instances."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ctx.study_date
    ds.StudyTime = ctx.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time
    ds.AccessionNumber = ctx.accession
    ds.Modality = modality
    ds.Manufacturer = "dicomnode synthetic"
    ds.ManufacturerModelName = "phantom"
    ds.SoftwareVersions = __version__
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC PHANTOM"
    ds.SeriesDescription = description
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.PatientWeight = "75"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _plane(ds: Dataset, grid: _Grid, k: int) -> None:
    """Image plane attributes of slice k (z index, increasing z)."""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [round(grid.origin[0], 4), round(grid.origin[1], 4),
                               round(grid.origin[2] + k * grid.spacing[2], 4)]
    ds.SliceLocation = ds.ImagePositionPatient[2]
    ds.PixelSpacing = [round(grid.spacing[1], 6), round(grid.spacing[0], 6)]
    ds.SliceThickness = round(grid.spacing[2], 6)


def _pixels(ds: Dataset, arr: np.ndarray, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype("<i2" if signed else "<u2").tobytes()


def _finish(ds: Dataset, ctx: _StudyContext, instance_key: tuple[object, ...]) -> Dataset:
    ds.SOPInstanceUID = ctx.uid("sop", *instance_key)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _radiopharmaceutical(code: tuple[str, str], nuclide: tuple[str, str], half_life: float,
                         dose: float, start: str) -> Dataset:
    item = Dataset()
    drug = Dataset()
    drug.CodeValue, drug.CodingSchemeDesignator, drug.CodeMeaning = code[0], "SCT", code[1]
    item.RadiopharmaceuticalCodeSequence = DicomSequence([drug])
    isotope = Dataset()
    isotope.CodeValue, isotope.CodingSchemeDesignator, isotope.CodeMeaning = nuclide[0], "SCT", nuclide[1]
    item.RadionuclideCodeSequence = DicomSequence([isotope])
    item.RadiopharmaceuticalStartTime = start
    item.RadionuclideTotalDose = f"{dose:.6g}"
    item.RadionuclideHalfLife = f"{half_life:.6g}"
    return item


def _orientation_codes(ds: Dataset) -> None:
    """NM/PET Patient Orientation module: supine, head first."""
    orient = Dataset()
    orient.CodeValue, orient.CodingSchemeDesignator, orient.CodeMeaning = "40199007", "SCT", "supine"
    orient.PatientOrientationModifierCodeSequence = DicomSequence()
    ds.PatientOrientationCodeSequence = DicomSequence([orient])
    # The coded orientation replaces PatientPosition in NM/PET objects.
    del ds.PatientPosition
    gantry = Dataset()
    gantry.CodeValue, gantry.CodingSchemeDesignator, gantry.CodeMeaning = "102540008", "SCT", "headfirst"
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([gantry])


def _clock(hhmmss: str, seconds: float) -> str:
    t = datetime.datetime.strptime(hhmmss, "%H%M%S") + datetime.timedelta(seconds=seconds)
    return t.strftime("%H%M%S")


def _ct_series(ctx: _StudyContext, grid: _Grid, masks: dict[str, np.ndarray], spec: PhantomSpec,
               rng: np.random.Generator) -> list[Dataset]:
    hu = _paint(masks, {name: TISSUE_HU[name] for name in TISSUES[1:]}, outside=TISSUE_HU["air"])
    hu += rng.normal(0.0, spec.ct_noise_hu, hu.shape)
    stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.int16)
    series_uid = ctx.uid("series", "CT")
    out = []
    for k in range(grid.shape[0]):
        ds = _base(ctx, CTImageStorage, "CT", series_uid, 2, "SYNTHETIC CT", _clock(ctx.study_time, 120))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        _plane(ds, grid, k)
        # Instances numbered head to feet, as scanners do, so loaders must sort by position.
        ds.InstanceNumber = grid.shape[0] - k
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        _pixels(ds, stored[k], signed=True)
        ds.BitsStored, ds.HighBit = 12, 11
        out.append(_finish(ds, ctx, ("CT", k)))
    return out


def _mr_series(ctx: _StudyContext, grid: _Grid, masks: dict[str, np.ndarray],
               rng: np.random.Generator) -> list[Dataset]:
    signal = _paint(masks, {"body": 800.0, "inner": 400.0, "lungs": 30.0, "liver": 480.0,
                            "spine": 150.0, "lesion": 260.0}, outside=0.0)
    signal = np.clip(signal + np.abs(rng.normal(0.0, 12.0, signal.shape)), 0, 4095)
    series_uid = ctx.uid("series", "MR")
    out = []
    for k in range(grid.shape[0]):
        ds = _base(ctx, MRImageStorage, "MR", series_uid, 5, "SYNTHETIC MR T1", _clock(ctx.study_time, 300))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", "1"
        ds.MagneticFieldStrength = "1.5"
        ds.AcquisitionNumber = 1
        _plane(ds, grid, k)
        ds.InstanceNumber = k + 1
        _pixels(ds, np.round(signal[k]).astype(np.uint16), signed=False)
        ds.BitsStored, ds.HighBit = 12, 11
        out.append(_finish(ds, ctx, ("MR", k)))
    return out


def _suv_map(grid: _Grid, masks: dict[str, np.ndarray], spec: PhantomSpec, rng: np.random.Generator) -> np.ndarray:
    suv = _paint(masks, {"body": spec.background_suv, "lungs": spec.lung_suv, "liver": spec.liver_suv,
                         "lesion": spec.lesion_suv}, outside=0.0)
    # Scanner resolution (~7 mm FWHM) and noise, both in voxel units of this grid.
    sigma_mm = 7.0 / 2.355
    suv = gaussian_filter(suv, sigma=(sigma_mm / grid.spacing[2], sigma_mm / grid.spacing[1], sigma_mm / grid.spacing[0]))
    return np.clip(suv * (1.0 + rng.normal(0.0, spec.pet_noise, suv.shape)), 0.0, None)


def _pet_series(ctx: _StudyContext, grid: _Grid, masks: dict[str, np.ndarray], spec: PhantomSpec,
                rng: np.random.Generator) -> list[Dataset]:
    suv = _suv_map(grid, masks, spec, rng)
    decayed_dose = spec.injected_dose_bq * 2.0 ** (-spec.uptake_delay_s / F18_HALF_LIFE_S)
    bqml = suv * decayed_dose / (spec.patient_weight_kg * 1000.0)
    series_uid = ctx.uid("series", "PT")
    injection = _clock(ctx.study_time, -600)
    series_time = _clock(injection, spec.uptake_delay_s)
    nz = grid.shape[0]
    out = []
    for k in range(nz):
        ds = _base(ctx, PositronEmissionTomographyImageStorage, "PT", series_uid, 3,
                   "SYNTHETIC PET AC", series_time)
        ds.PatientWeight = f"{spec.patient_weight_kg:g}"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.Units, ds.CountsSource, ds.SeriesType = "BQML", "EMISSION", ["STATIC", "IMAGE"]
        ds.DecayCorrection, ds.CorrectedImage = "START", ["DECY", "ATTN", "SCAT", "RAN"]
        ds.RandomsCorrectionMethod = "DLYD"
        ds.CollimatorType = "NONE"
        ds.AttenuationCorrectionMethod = "CT"
        ds.ReconstructionMethod = "OSEM"
        ds.NumberOfSlices = nz
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([_radiopharmaceutical(
            ("35321007", "Fluorodeoxyglucose F^18^"), ("77004003", "^18^Fluorine"),
            F18_HALF_LIFE_S, spec.injected_dose_bq, injection)])
        _orientation_codes(ds)
        _plane(ds, grid, k)
        ds.InstanceNumber = nz - k
        ds.ImageIndex = nz - k
        ds.FrameReferenceTime = "0"
        ds.ActualFrameDuration = 180000
        ds.DecayFactor = "1"
        ds.AcquisitionNumber = 1
        # Per-slice rescale slope, as PET scanners write it: loaders must apply it per slice.
        slope = max(float(bqml[k].max()), 1.0) / 32767.0
        ds.RescaleIntercept, ds.RescaleSlope = "0", f"{slope:.8g}"
        stored = np.round(bqml[k] / float(ds.RescaleSlope)).clip(0, 32767)
        _pixels(ds, stored.astype(np.int16), signed=True)
        out.append(_finish(ds, ctx, ("PT", k)))
    return out


def _nm_series(ctx: _StudyContext, grid: _Grid, masks: dict[str, np.ndarray], spec: PhantomSpec,
               rng: np.random.Generator) -> list[Dataset]:
    """SPECT reconstruction as one multi-frame NM Image (RECON TOMO), frames in increasing z."""
    counts = _suv_map(grid, masks, spec, rng) * 250.0
    counts = np.round(counts).clip(0, 65535).astype(np.uint16)
    nz = grid.shape[0]
    ds = _base(ctx, NuclearMedicineImageStorage, "NM", ctx.uid("series", "NM"), 4,
               "SYNTHETIC SPECT RECON", _clock(ctx.study_time, 1800))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.InstanceNumber = 1
    ds.ImageID = "RECON"
    ds.AcquisitionNumber = 1
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = [0x00540080]  # SliceVector
    ds.SliceVector = list(range(1, nz + 1))
    ds.NumberOfSlices = nz
    _plane(ds, grid, 0)
    ds.SpacingBetweenSlices = ds.SliceThickness
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.SliceLocation
    detector = Dataset()
    _plane(detector, grid, 0)
    del detector.PixelSpacing, detector.SliceThickness, detector.SliceLocation
    detector.CollimatorType = "PARA"
    ds.DetectorInformationSequence = DicomSequence([detector])
    window = Dataset()
    window.EnergyWindowName = "TC99M"
    ds.EnergyWindowInformationSequence = DicomSequence([window])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([_radiopharmaceutical(
        ("404707004", "Technetium Tc^99m^ medronate"), ("44588005", "^99m^Technetium"),
        TC99M_HALF_LIFE_S, 740e6, _clock(ctx.study_time, -7200))])
    _orientation_codes(ds)
    rotation = Dataset()
    rotation.StartAngle, rotation.AngularStep, rotation.RotationDirection = "0", "3", "CW"
    rotation.ScanArc, rotation.ActualFrameDuration, rotation.NumberOfFramesInRotation = "360", 20000, 120
    ds.RotationInformationSequence = DicomSequence([rotation])
    ds.TypeOfDetectorMotion = "STEP AND SHOOT"
    ds.NumberOfEnergyWindows = ds.NumberOfDetectors = ds.NumberOfRotations = 1
    ds.CountsAccumulated = min(int(counts.sum(dtype=np.int64)), 2**31 - 1)
    del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife
    _pixels(ds, counts, signed=False)
    return [_finish(ds, ctx, ("NM", 0))]


def synthetic_datasets(
    *,
    patient_id: str = "DN-SYN-001",
    patient_name: str = "Synthetic^Phantom",
    modalities: Sequence[str] = ("CT", "PT"),
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 64, 64),
    spec: PhantomSpec = PhantomSpec(),
    stable_uids: bool = False,
) -> dict[str, list[Dataset]]:
    """The study as datasets per modality, each list in increasing z (NM: one multi-frame instance).

    ``shape`` is the CT/MR grid (z, y, x); PET and NM get (z/2, y/2, x/2) at twice the spacing.
    """
    unknown = sorted(set(modalities) - set(SUPPORTED_MODALITIES))
    if unknown:
        raise ValueError(f"unsupported synthetic modalities {unknown}; choose from {SUPPORTED_MODALITIES}")
    rng = np.random.default_rng(seed)
    entropy = (str(seed), patient_id, str(shape)) if stable_uids else None
    ctx = _StudyContext(
        study_uid="", frame_of_reference_uid="", patient_id=patient_id, patient_name=patient_name,
        study_date="20240115", study_time="093000", accession=f"SYN{seed:06d}", uid_entropy=entropy,
    )
    ctx = dataclasses.replace(ctx, study_uid=ctx.uid("study"), frame_of_reference_uid=ctx.uid("for"))
    fine, coarse = _grids(shape)
    z_half = fine.spacing[2] * fine.shape[0] / 2
    fine_masks, coarse_masks = _labels(fine, spec, z_half), _labels(coarse, spec, z_half)
    out: dict[str, list[Dataset]] = {}
    # Each modality draws from its own stream so adding MR does not change the CT's noise.
    streams = dict(zip(SUPPORTED_MODALITIES, rng.spawn(len(SUPPORTED_MODALITIES)), strict=True))
    for modality in modalities:
        r = streams[modality]
        if modality == "CT":
            out["CT"] = _ct_series(ctx, fine, fine_masks, spec, r)
        elif modality == "PT":
            out["PT"] = _pet_series(ctx, coarse, coarse_masks, spec, r)
        elif modality == "MR":
            out["MR"] = _mr_series(ctx, fine, fine_masks, r)
        else:
            out["NM"] = _nm_series(ctx, coarse, coarse_masks, spec, r)
    return out


def write_synthetic_study(
    out_dir: Path,
    *,
    patient_id: str = "DN-SYN-001",
    patient_name: str = "Synthetic^Phantom",
    modalities: Sequence[str] = ("CT", "PT"),
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 64, 64),
    spec: PhantomSpec = PhantomSpec(),
    stable_uids: bool = False,
) -> dict[str, list[Path]]:
    """Write the study as DICOM Part 10 files under ``out_dir/<modality>/``; returns the paths per modality."""
    datasets = synthetic_datasets(patient_id=patient_id, patient_name=patient_name, modalities=modalities,
                                  seed=seed, shape=shape, spec=spec, stable_uids=stable_uids)
    paths: dict[str, list[Path]] = {}
    for modality, items in datasets.items():
        folder = Path(out_dir) / modality
        folder.mkdir(parents=True, exist_ok=True)
        paths[modality] = []
        for ds in items:
            path = folder / f"{int(ds.InstanceNumber):04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths[modality].append(path)
    return paths

