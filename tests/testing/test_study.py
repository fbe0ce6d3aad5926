"""The synthetic study: valid IODs, one study and frame of reference, known SUV, deterministic pixels."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.dicomio.validate import validate_dataset
from dicomnode.testing.study import (
    TISSUE_HU,
    TISSUES,
    PhantomSpec,
    synthetic_datasets,
    tissue_labels,
    write_synthetic_study,
)
from tests.conftest import require_tool

SMALL = (12, 32, 32)


@pytest.fixture(scope="module")
def study() -> dict[str, list[pydicom.Dataset]]:
    return synthetic_datasets(modalities=("CT", "PT", "MR", "NM"), shape=SMALL, seed=1)


def _suv_bw(ds: pydicom.Dataset) -> np.ndarray:
    """SUV body weight from the header alone, the way a reader of the study would compute it."""
    assert ds.Units == "BQML" and ds.DecayCorrection == "START"
    drug = ds.RadiopharmaceuticalInformationSequence[0]
    elapsed = (datetime.strptime(ds.SeriesTime, "%H%M%S")
               - datetime.strptime(drug.RadiopharmaceuticalStartTime, "%H%M%S")).total_seconds()
    dose = float(drug.RadionuclideTotalDose) * 2.0 ** (-elapsed / float(drug.RadionuclideHalfLife))
    bqml = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return bqml * float(ds.PatientWeight) * 1000.0 / dose


def test_every_modality_passes_dciodvfy(study):
    require_tool("dciodvfy")
    expected_iod = {"CT": "CTImage", "PT": "PETImage", "MR": "MRImage", "NM": "NMImage"}
    for modality, datasets in study.items():
        report = validate_dataset(datasets[len(datasets) // 2])
        assert report.iod == expected_iod[modality]
        assert report.errors == [], (modality, report.errors)


def test_one_study_one_frame_of_reference_distinct_series(study):
    all_ds = [ds for items in study.values() for ds in items]
    assert len({ds.StudyInstanceUID for ds in all_ds}) == 1
    assert len({ds.FrameOfReferenceUID for ds in all_ds}) == 1
    assert len({ds.PatientID for ds in all_ds}) == 1
    assert len({ds.SeriesInstanceUID for ds in all_ds}) == 4
    assert len({ds.SOPInstanceUID for ds in all_ds}) == len(all_ds)


def test_grids_differ_like_a_real_pet_ct(study):
    ct, pt, nm = study["CT"], study["PT"], study["NM"][0]
    assert (ct[0].Rows, len(ct)) == (SMALL[1], SMALL[0])
    assert (pt[0].Rows, len(pt)) == (SMALL[1] // 2, SMALL[0] // 2)
    assert float(pt[0].PixelSpacing[0]) == pytest.approx(2 * float(ct[0].PixelSpacing[0]))
    assert all(int(ds.NumberOfSlices) == len(pt) for ds in pt)
    assert int(nm.NumberOfFrames) == int(nm.NumberOfSlices) == len(pt)
    # Both grids cover the same field of view: first pixel edges coincide.
    ct_edge = float(ct[0].ImagePositionPatient[0]) - float(ct[0].PixelSpacing[1]) / 2
    pt_edge = float(pt[0].ImagePositionPatient[0]) - float(pt[0].PixelSpacing[1]) / 2
    assert ct_edge == pytest.approx(pt_edge)
    # Instances are numbered head to feet: position, not InstanceNumber, gives z order.
    z = [float(ds.ImagePositionPatient[2]) for ds in ct]
    assert z == sorted(z) and int(ct[0].InstanceNumber) == len(ct)


def test_pet_suv_matches_the_phantom(study):
    spec = PhantomSpec()
    suv = np.stack([_suv_bw(ds) for ds in study["PT"]])
    assert float(suv.max()) == pytest.approx(spec.lesion_suv, rel=0.2)
    body = suv[suv > 0.5]
    assert float(np.median(body)) == pytest.approx(spec.background_suv, rel=0.15)
    # The hottest voxel lies within the lesion sphere.
    k, r, c = np.unravel_index(int(np.argmax(suv)), suv.shape)
    ds = study["PT"][k]
    pos = np.array([float(v) for v in ds.ImagePositionPatient])
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    hot = pos + np.array([c * col_sp, r * row_sp, 0.0])
    z_centre = (float(study["PT"][0].ImagePositionPatient[2]) + float(study["PT"][-1].ImagePositionPatient[2])) / 2
    z_centre_ct = (float(study["CT"][0].ImagePositionPatient[2]) + float(study["CT"][-1].ImagePositionPatient[2])) / 2
    assert z_centre == pytest.approx(z_centre_ct)
    lesion = np.array(spec.lesion_center_mm)
    assert np.linalg.norm(hot - lesion) <= spec.lesion_radius_mm + 6.25


def test_ct_is_in_hounsfield_units(study):
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in study["CT"]])
    assert study["CT"][0].RescaleType == "HU"
    assert float(hu.min()) == pytest.approx(-1000, abs=40)
    assert float(np.median(hu[(hu > -200) & (hu < 200)])) == pytest.approx(40, abs=25)
    assert (hu > 500).any(), "the spine is bone"


def test_tissue_labels_are_the_ct_s_tissues():
    ct = synthetic_datasets(modalities=("CT",), shape=SMALL, seed=1, spec=PhantomSpec(ct_noise_hu=0.0))["CT"]
    hu = np.stack([ds.pixel_array.astype(float) + float(ds.RescaleIntercept) for ds in ct])
    labels = tissue_labels(SMALL)
    for index, name in enumerate(TISSUES):
        if (labels == index).any():
            assert set(np.unique(hu[labels == index])) == {TISSUE_HU[name]}, name
    assert len(np.unique(labels)) >= 6


@pytest.mark.parametrize("noise_hu", [PhantomSpec().ct_noise_hu, 8.0])
def test_ct_noise_is_the_spec_s(noise_hu):
    ct = synthetic_datasets(modalities=("CT",), shape=SMALL, seed=2, spec=PhantomSpec(ct_noise_hu=noise_hu))["CT"]
    hu = np.stack([ds.pixel_array.astype(float) + float(ds.RescaleIntercept) for ds in ct])
    labels = tissue_labels(SMALL)
    painted = np.array([TISSUE_HU[name] for name in TISSUES])[labels]
    residual = (hu - painted)[labels > 0]  # in the body: air's noise is clipped at the stored minimum
    assert residual.size > 3000
    assert abs(float(residual.mean())) < 1.0
    assert float(residual.std()) == pytest.approx(noise_hu, rel=0.05)


def test_pixels_follow_the_seed_and_uids_are_fresh():
    a = synthetic_datasets(shape=(4, 16, 16), seed=7)
    b = synthetic_datasets(shape=(4, 16, 16), seed=7)
    c = synthetic_datasets(shape=(4, 16, 16), seed=8)
    assert a["PT"][1].PixelData == b["PT"][1].PixelData
    assert a["CT"][1].PixelData == b["CT"][1].PixelData
    assert a["PT"][1].PixelData != c["PT"][1].PixelData
    assert a["CT"][0].StudyInstanceUID != b["CT"][0].StudyInstanceUID
    assert a["CT"][0].SOPInstanceUID != b["CT"][0].SOPInstanceUID


def test_stable_uids_on_request():
    a = synthetic_datasets(shape=(4, 16, 16), seed=7, stable_uids=True)
    b = synthetic_datasets(shape=(4, 16, 16), seed=7, stable_uids=True)
    c = synthetic_datasets(shape=(4, 16, 16), seed=8, stable_uids=True)
    assert [d.SOPInstanceUID for d in a["PT"]] == [d.SOPInstanceUID for d in b["PT"]]
    assert a["CT"][0].StudyInstanceUID == b["CT"][0].StudyInstanceUID != c["CT"][0].StudyInstanceUID


def test_adding_a_modality_keeps_the_others_pixels():
    a = synthetic_datasets(shape=(4, 16, 16), seed=3)
    b = synthetic_datasets(shape=(4, 16, 16), seed=3, modalities=("MR", "PT", "CT"))
    assert a["PT"][1].PixelData == b["PT"][1].PixelData


def test_write_synthetic_study(tmp_path: Path):
    paths = write_synthetic_study(tmp_path, modalities=("CT", "PT", "NM"), shape=(6, 16, 16),
                                  patient_id="P-42", patient_name="Doe^Jane")
    assert {m: len(p) for m, p in paths.items()} == {"CT": 6, "PT": 3, "NM": 1}
    for modality, files in paths.items():
        for path in files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.PatientID == "P-42" and str(ds.PatientName) == "Doe^Jane"
            assert ds.Modality == modality
            assert ds.pixel_array.size > 0


def test_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="US"):
        synthetic_datasets(modalities=("CT", "US"))
