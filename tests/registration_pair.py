"""A CT + MR pair that needs registration, written as DICOM series, with its true mapping.

The pair is a ``dicomnode.testing.deform`` case on the MNI152 head (cropped to the head, so small
volumes keep ~2.5-3 mm voxels): fixed CT = the CT-like image warped by a known rigid + affine +
smooth displacement G, moving MR = the T1 image unwarped. Each volume becomes a DICOM series
(CT Image / MR Image Storage headers from ``dicomnode.testing.study``) of one study and patient,
in two different frames of reference, so the node must register them. The series reproduce the
case's voxel grids exactly, so the case's truth scores the transform the node estimates.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.config import RegistrationConfig
from dicomnode.imaging.volume import Volume
from dicomnode.testing.deform import RegistrationCase, Sources, make_case, mni_sources
from dicomnode.testing.study import synthetic_datasets

PATIENT_ID = "DN-REG-001"
# Small volumes, few samples: registration ~25 s on two busy cores, mean TRE ~1.6 mm. The deformable stage
# runs on these ~3 mm voxels only because its gate is opened to 3 mm here.
FAST_REGISTRATION = dict(deformable_levels_mm=[2.5], deformable_max_level_mm=3.0, samples_per_level=10000,
                         deformable_samples_per_level=8000, heldout_samples=15000, deformable_iterations=12)
assert set(FAST_REGISTRATION) <= set(RegistrationConfig.model_fields)


def cropped_mni(nifti_dir: Path) -> Sources:
    """MNI152 head sources without most of the empty border around the head."""
    src = mni_sources(nifti_dir)
    size = src.t1.GetSize()
    lo, hi = (20, 20, 30), (size[0] - 20, size[1] - 25, size[2] - 10)

    def crop(img: sitk.Image) -> sitk.Image:
        return sitk.RegionOfInterest(img, [h - l for l, h in zip(lo, hi)], list(lo))

    return Sources(*(crop(getattr(src, k)) for k in ("t1", "ct", "pet", "body", "structure")))


def ct_mr_case(sources: Sources) -> RegistrationCase:
    return make_case(sources, "MR", fixed_size=(64, 64, 48), seed=1, deformation_mm=3.0, fixed_modality="CT")


def _templates() -> dict[str, Dataset]:
    sets = synthetic_datasets(modalities=("CT", "MR"), shape=(2, 8, 8), patient_id=PATIENT_ID,
                              patient_name="Registration^Case")
    return {m: sets[m][0] for m in ("CT", "MR")}


def write_series(vol: Volume, folder: Path, template: Dataset, *, study_uid: str, series_number: int,
                 description: str) -> list[Path]:
    """``vol`` as one slice per file, in its own series and frame of reference; returns the files."""
    image = vol.image
    arr = sitk.GetArrayFromImage(image)  # (z, y, x)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    if vol.modality == "CT":  # HU, as the template: stored = HU + 1024
        stored = np.clip(np.round(arr + 1024.0), 0, 4095).astype(np.int16)
    else:  # MR signal has no unit: scaled to the template's 12 bits, no rescale (MR Image has none)
        stored = np.clip(np.round(arr * 3000.0 / float(np.percentile(arr, 99.5))), 0, 4095).astype(np.uint16)
    series_uid, frame_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(arr.shape[0]):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, description, k + 1
        ds.BodyPartExamined = "HEAD"
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [round(float(v), 4) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelSpacing = [round(sy, 6), round(sx, 6)]
        ds.SliceThickness = round(sz, 6)
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_case(case: RegistrationCase, out_dir: Path) -> dict[str, list[Path]]:
    """The case's fixed CT and moving MR as DICOM series of one study: {"CT": files, "MR": files}."""
    templates, study_uid = _templates(), generate_uid()
    return {
        "CT": write_series(case.fixed, out_dir / "CT", templates["CT"], study_uid=study_uid, series_number=2,
                           description="REGISTRATION CASE CT"),
        "MR": write_series(case.moving, out_dir / "MR", templates["MR"], study_uid=study_uid, series_number=5,
                           description="REGISTRATION CASE MR T1"),
    }


@pytest.fixture
def registrations(monkeypatch) -> list:
    """Every ``Registration`` the pipeline computes (the real function runs; its result is kept)."""
    import dicomnode.imaging.register as register

    seen: list = []
    real = register.register_volumes

    def recording(fixed, moving, config):
        result = real(fixed, moving, config)
        seen.append(result)
        return result

    monkeypatch.setattr(register, "register_volumes", recording)
    return seen
