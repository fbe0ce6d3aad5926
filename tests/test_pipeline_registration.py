"""``pipeline.process_job`` on written DICOM series: an MR -> CT pair that must be registered, an NM -> MR pair.

The MR -> CT pair has two frames of reference and a known rigid + affine + smooth misalignment
(tests/registration_pair.py): registration runs all three stages, the estimated mapping lands
within 2 mm of the truth, and the displacement map series is written. Every output object
passes dciodvfy.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.config import PairingRule, load_config
from dicomnode.dicomio.parametric_map import decode_parametric_map
from dicomnode.dicomio.validate import find_dciodvfy, validate_file
from dicomnode.imaging.volume import load_series
from dicomnode.domain import series_number
from dicomnode.pipeline import JobInputs, process_job
from dicomnode.routing import SeriesRef
from dicomnode.store.spool import Spool
from dicomnode.testing.deform import score
from tests.conftest import require
from tests.registration_pair import FAST_REGISTRATION, cropped_mni, ct_mr_case, registrations, write_case  # noqa: F401


@pytest.fixture(scope="module")
def case(shared_data):
    return ct_mr_case(cropped_mni(shared_data / "nifti" / "mni152_icbm2009a_nilearn"))


def _ref(files, calling_ae: str = "MODALITY") -> SeriesRef:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SeriesRef(series_uid=ds.SeriesInstanceUID, study_uid=ds.StudyInstanceUID, modality=ds.Modality,
                     patient_id=ds.PatientID, patient_name=str(ds.PatientName), birth_date=ds.PatientBirthDate,
                     study_date=ds.StudyDate, frame_of_reference_uid=ds.FrameOfReferenceUID, calling_ae=calling_ae)


def job_inputs(tmp_path, fixed_files, moving_files, rule: PairingRule, method: str, overrides: dict) -> JobInputs:
    config = load_config(overrides={"processing": {"device": "cpu"}, **overrides})
    return JobInputs(job_id=7, rule=rule, method=method, fixed=_ref(fixed_files), moving=_ref(moving_files),
                     fixed_files=list(fixed_files), moving_files=list(moving_files), config=config,
                     spool=Spool(tmp_path / "spool"))


def check_outputs_conform(out) -> None:
    require(find_dciodvfy() is not None, "dciodvfy is not installed (dicom3tools)")
    for series in out.series:
        for path in series.files[:1] if series.kind == "fused" else series.files:
            report = validate_file(path)
            assert report.ok, f"{series.kind}: {report.errors}"


def check_on_fixed_grid(out, fixed_files) -> None:
    """The fused series has one instance per fixed slice, at the fixed slice's position and frame of reference."""
    fixed = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in fixed_files),
                   key=lambda ds: float(ds.ImagePositionPatient[2]))
    (fused,) = [s for s in out.series if s.kind == "fused"]
    outputs = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in fused.files),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert len(outputs) == len(fixed)
    for src, made in zip(fixed, outputs):
        assert np.allclose([float(v) for v in made.ImagePositionPatient], [float(v) for v in src.ImagePositionPatient],
                           atol=1e-3)
        assert made.FrameOfReferenceUID == src.FrameOfReferenceUID and made.SeriesNumber == series_number(7, "fused", 9000)


def test_mr_onto_ct_registers_within_2_mm_and_writes_the_displacement_map(tmp_path, case, registrations):
    files = write_case(case, tmp_path / "study")
    rule = PairingRule(fixed="CT", moving="MR")
    inputs = job_inputs(tmp_path, files["CT"], files["MR"], rule, "network",
                        {"registration": FAST_REGISTRATION, "pairing": [{"fixed": "CT", "moving": "MR"}]})
    assert inputs.fixed.frame_of_reference_uid != inputs.moving.frame_of_reference_uid
    out = process_job(inputs)

    # Registration ran, every stage was kept, and the mapping is within 2 mm of the truth.
    assert out.registration["skipped_reason"] is None and out.registration["deformable"] is True
    assert [(s["name"], s["kept"]) for s in out.registration["stages"]] == [
        ("rigid", True), ("affine", True), ("deformable", True)]
    (reg,) = registrations
    before, after = score(case, sitk.Transform(3, sitk.sitkIdentity)), score(case, reg.transform)
    assert before.mean_mm > 5.0  # the pair really starts misaligned
    assert after.mean_mm < 2.0 and after.p95_mm < 4.5 and after.dice > before.dice, (before, after)

    kinds = [s.kind for s in out.series]
    # The registration itself goes out too: the matrix, and the deformation grid of the kept B-spline.
    assert kinds == ["fused", "heatmap", "saliency", "displacement", "registration", "deformable_registration"]
    check_on_fixed_grid(out, files["CT"])
    # The displacement map holds the deformable stage's |displacement| in mm on the fixed slices.
    (displacement,) = [s for s in out.series if s.kind == "displacement"]
    pm = pydicom.dcmread(displacement.files[0])
    assert pm.ContentLabel == "DISPLACEMENT" and pm.SeriesNumber == series_number(7, "displacement", 9000)
    values, positions = decode_parametric_map(pm)
    expected = sitk.GetArrayFromImage(reg.displacement_mm)
    order = np.argsort(positions[:, 2])
    assert values.shape == expected.shape == (48, 64, 64)
    assert np.max(np.abs(values[order] - expected)) <= (expected.max() - expected.min()) / 65535 + 1e-6
    assert 0.3 < float(np.percentile(expected, 95)) < 3 * case.deformation_mm  # truth: 3 mm (95th percentile)
    check_outputs_conform(out)


def test_nm_onto_mr_resamples_colours_and_scores(tmp_path):
    from dicomnode.testing.study import write_synthetic_study

    study = write_synthetic_study(tmp_path / "study", modalities=("MR", "NM"), shape=(16, 32, 32), seed=3)
    rule = PairingRule(fixed="MR", moving="NM")
    out = process_job(job_inputs(tmp_path, study["MR"], study["NM"], rule, "alpha", {}))
    # One frame of reference: resampling only, no displacement map.
    assert out.registration["skipped_reason"] == "same FrameOfReferenceUID" and out.registration["stages"] == []
    assert [s.kind for s in out.series] == ["fused", "heatmap"]
    check_on_fixed_grid(out, study["MR"])
    nm = load_series(study["NM"])
    assert nm.modality == "NM" and nm.image.GetSize() == (16, 16, 8)
    # The NM uptake shows in colour (hot map) over the grey MR.
    fused = np.stack([pydicom.dcmread(f).pixel_array for f in out.series[0].files]).astype(int)
    chroma = fused.max(axis=-1) - fused.min(axis=-1)
    assert fused.shape == (16, 32, 32, 3) and int(chroma.max()) > 100
    assert set(out.summary) == {"EN", "MI", "SSIM", "Qabf", "VIF"} and all(np.isfinite(v) for v in out.summary.values())
    check_outputs_conform(out)
