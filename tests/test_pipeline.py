"""One job's processing on a synthetic study: the maps, their frame order and the output headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.config import Config, PairingRule
from dicomnode.dicomio.parametric_map import decode_parametric_map
from dicomnode.dicomio.validate import validate_file
from dicomnode.imaging.body import body_mask
from dicomnode.imaging.volume import load_series
from dicomnode.pipeline import JobInputs, process_job
from dicomnode.routing import SeriesRef
from dicomnode.store.spool import Spool
from dicomnode.testing.study import write_synthetic_study
from tests.conftest import require_tool


def _ref(files: list[Path]) -> SeriesRef:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SeriesRef(series_uid=ds.SeriesInstanceUID, study_uid=ds.StudyInstanceUID, modality=ds.Modality,
                     patient_id=ds.PatientID, patient_name=str(ds.PatientName), birth_date=ds.PatientBirthDate,
                     study_date=ds.StudyDate, frame_of_reference_uid=ds.FrameOfReferenceUID, calling_ae="PEER")


def run_job(tmp: Path, paths: dict[str, list[Path]], job_id: int, moving: str, method: str, **sections):
    config = Config(registration={"mode": "never"}, **sections)
    inputs = JobInputs(job_id=job_id, rule=PairingRule(fixed="CT", moving=moving), method=method,
                       fixed=_ref(paths["CT"]), moving=_ref(paths[moving]), fixed_files=paths["CT"],
                       moving_files=paths[moving], config=config, spool=Spool(tmp / "spool"))
    return process_job(inputs)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    paths = write_synthetic_study(tmp / "in", modalities=("CT", "PT", "MR"), shape=(12, 48, 48), seed=5)
    return tmp, paths


@pytest.fixture(scope="module")
def pet_job(study):
    tmp, paths = study
    return run_job(tmp, paths, 1, "PT", "network")


def _outputs(output, kind: str) -> list[pydicom.Dataset]:
    (series,) = [s for s in output.series if s.kind == kind]
    return [pydicom.dcmread(f) for f in series.files]


def _fixed_body(paths) -> tuple[np.ndarray, np.ndarray]:
    """Body mask of the fixed CT (z increasing) and the z of each of its slices."""
    fixed = load_series(paths["CT"])
    hu = sitk.GetArrayFromImage(fixed.image)
    z = np.array([float(h.ImagePositionPatient[2]) for h in fixed.headers])
    return body_mask(hu, "CT"), z


@pytest.mark.parametrize("kind", ["heatmap", "saliency"])
def test_maps_are_zero_outside_the_body(study, pet_job, kind):
    _, paths = study
    body, z = _fixed_body(paths)
    (pm,) = _outputs(pet_job, kind)
    values, positions = decode_parametric_map(pm)
    order = [int(np.argmin(np.abs(z - p[2]))) for p in positions]
    outside = ~body[order]
    assert outside.sum() > 0.2 * outside.size  # the phantom leaves air around it
    assert float(np.abs(values[outside]).max()) == 0.0
    assert float(values[~outside].max()) > 0.1  # and something inside


def test_contribution_is_a_graded_share_for_the_selection_network(pet_job):
    (pm,) = _outputs(pet_job, "heatmap")
    values, _ = decode_parametric_map(pm)
    taken = values[values > 0]
    graded = taken[(taken > 0.05) & (taken < 0.95)]
    # The network selects 0 or 1 per pixel; its share is graded where the sources differ by ~tau.
    assert taken.size >= 20, "the network took the PET nowhere"
    assert graded.size >= 3 and np.unique(np.round(graded, 3)).size >= 3, "contribution should be continuous, not 0/1"


def test_saliency_has_one_scale_for_the_series(pet_job):
    (pm,) = _outputs(pet_job, "saliency")
    values, _ = decode_parametric_map(pm)
    peaks = values.reshape(values.shape[0], -1).max(axis=1)
    assert peaks.max() == pytest.approx(1.0, abs=1e-4)
    # A per-slice rescale would put every slice's maximum at 1.
    assert (peaks < 0.9).sum() >= 1


def test_map_frames_run_in_the_order_of_the_fused_instances(pet_job):
    fused = sorted(_outputs(pet_job, "fused"), key=lambda ds: int(ds.InstanceNumber))
    fused_z = [float(ds.ImagePositionPatient[2]) for ds in fused]
    for kind in ("heatmap", "saliency"):
        (pm,) = _outputs(pet_job, kind)
        _, positions = decode_parametric_map(pm)
        assert list(positions[:, 2]) == pytest.approx(fused_z), kind
    assert fused_z != sorted(fused_z) or fused_z == sorted(fused_z, reverse=True)


@pytest.fixture(scope="module")
def mr_job(study):
    tmp, paths = study
    return run_job(tmp, paths, 2, "MR", "average")


def test_two_jobs_of_one_study_get_distinct_series_numbers(pet_job, mr_job):
    numbers = []
    for output in (pet_job, mr_job):
        for series in output.series:
            numbers.append(int(pydicom.dcmread(series.files[0], stop_before_pixels=True).SeriesNumber))
    assert len(numbers) == len(set(numbers)), numbers


def test_series_numbers_start_at_the_configured_base(study):
    # output.series_number_base (default 9000): base + 10 x job id + the kind's offset.
    tmp, paths = study
    out = run_job(tmp, paths, 3, "MR", "average", output={"series_number_base": 500})
    numbers = {s.kind: int(pydicom.dcmread(s.files[0], stop_before_pixels=True).SeriesNumber) for s in out.series}
    assert numbers == {"fused": 531, "heatmap": 532}


def test_every_source_series_is_referenced_with_its_equipment(study, pet_job):
    _, paths = study
    ct_uid, pt_uid = (pydicom.dcmread(paths[m][0], stop_before_pixels=True).SeriesInstanceUID for m in ("CT", "PT"))
    sop_series = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: m
                  for m in ("CT", "PT") for p in paths[m]}
    for kind in ("fused", "heatmap", "saliency"):
        for ds in _outputs(pet_job, kind):
            referenced = {sop_series.get(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
            assert referenced == {"CT", "PT"}, kind
            acquisition = [item for item in ds.ContributingEquipmentSequence
                           if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]
            assert len(acquisition) == 2, kind
            series_refs = {item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence}
            assert series_refs == {ct_uid, pt_uid}


@pytest.fixture(scope="module")
def deidentified_study(tmp_path_factory):
    """A study whose sources carry de-identification attributes and an over-long StudyID, as TCIA's do."""
    tmp = tmp_path_factory.mktemp("deid")
    paths = write_synthetic_study(tmp / "in", modalities=("CT", "PT"), shape=(8, 32, 32), seed=6)
    for files in paths.values():
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyID = "IBSI_1_STS_002_CT"  # 17 characters: longer than SH allows, kept as received
            ds.AccessionNumber = "3912173256621705"
            ds.ReferringPhysicianName = "Referrer^Some"
            ds.PatientIdentityRemoved = "YES"
            ds.DeidentificationMethod = "Per DICOM PS 3.15 AnnexE"
            code = pydicom.Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113100", "DCM", "Basic Application Confidentiality Profile"
            ds.DeidentificationMethodCodeSequence = [code]
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
            ds.save_as(path, enforce_file_format=True)
    return tmp, paths


def test_study_and_deidentification_attributes_are_copied_exactly(deidentified_study):
    tmp, paths = deidentified_study
    output = run_job(tmp, paths, 3, "PT", "alpha")
    source = pydicom.dcmread(paths["CT"][0], stop_before_pixels=True)
    keywords = ("StudyInstanceUID", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
                "StudyDate", "StudyTime", "PatientID", "PatientName", "PatientIdentityRemoved",
                "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                "LongitudinalTemporalInformationModified")
    for series in output.series:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        for keyword in keywords:
            assert keyword in ds, (series.kind, keyword)
            assert ds[keyword].value == source[keyword].value, (series.kind, keyword)


def test_every_output_is_dciodvfy_clean(pet_job, mr_job, chroma_job):
    require_tool("dciodvfy")
    for output in (pet_job, mr_job, chroma_job):  # chroma: the default, with its colour bar burned in
        for series in output.series:
            for path in series.files[:2]:
                report = validate_file(path)
                assert report.errors == [], (series.kind, report.errors)


@pytest.fixture(scope="module")
def big_study(tmp_path_factory):
    """Slices large enough for labelled ticks (128 x 128 at 1.6 mm)."""
    tmp = tmp_path_factory.mktemp("big")
    return tmp, write_synthetic_study(tmp / "in", modalities=("CT", "PT"), shape=(8, 128, 128), seed=7)


@pytest.fixture(scope="module")
def chroma_job(big_study):
    tmp, paths = big_study
    return run_job(tmp, paths, 4, "PT", "chroma")


def test_colour_bar_lies_outside_the_body_and_is_in_every_slice(big_study, chroma_job):
    from dicomnode.config import FusionConfig
    from dicomnode.fusion.colorbar import bar_colours, render_bar

    _, paths = big_study
    body, _ = _fixed_body(paths)
    footprint = body.any(axis=0)
    high = _described_suv_bound(_outputs(chroma_job, "fused")[0])  # the bar shows the range the description says
    bar = render_bar(footprint.shape, footprint, bar_colours("chroma", True, FusionConfig(), "PT"), 0.0, high, "SUV")
    assert bar is not None
    layer, mask, placement = bar
    mask = mask.astype(bool)
    assert mask.sum() > 50 and placement.labelled
    assert not (mask & footprint).any(), "colour bar over the body"
    for ds in _outputs(chroma_job, "fused"):
        assert np.array_equal(ds.pixel_array[mask], layer[mask])


def test_the_default_methods_contribution_map_is_zero_outside_the_body(big_study, chroma_job):
    _, paths = big_study
    body, z = _fixed_body(paths)
    (pm,) = _outputs(chroma_job, "heatmap")
    values, positions = decode_parametric_map(pm)
    inside = body[[int(np.argmin(np.abs(z - p[2]))) for p in positions]]
    assert (~inside).sum() > 0.2 * inside.size
    assert float(np.abs(values[~inside]).max()) == 0.0
    assert float(values[inside].max()) > 0.1


def _described_suv_bound(ds) -> float:
    """The upper SUV bound a fused series' SeriesDescription states ("PET on CT fusion, SUV 0-7.19")."""
    prefix = "PET on CT fusion, SUV 0-"
    assert ds.SeriesDescription.startswith(prefix), ds.SeriesDescription
    return float(ds.SeriesDescription[len(prefix):].split(" ")[0])


def test_descriptions_say_what_the_colours_mean(big_study, chroma_job):
    from dicomnode.imaging.resample import field_of_view, resample_onto

    _, paths = big_study
    ct, pet = load_series(paths["CT"]), load_series(paths["PT"])
    # The reader's viewer range, over the whole series: SUV 0..max(p99.9 inside the PET's field of view, 5).
    viewer = max(float(np.percentile(resample_onto(ct, pet)[np.array(field_of_view(ct, pet))], 99.9)), 5.0)
    ds = _outputs(chroma_job, "fused")[0]
    assert viewer > 5.0 and _described_suv_bound(ds) == pytest.approx(viewer, abs=0.005)
    text = ds.DerivationDescription
    shown = ds.SeriesDescription.split("SUV ")[1].split(" ")[0]
    for part in ("colour map fusion", f"PT SUV {shown} (p99.9 of the series in its field of view, at least 5)",
                 "CT window HU -160-240", "colour bar in the"):
        assert part in text, (part, text)


def test_a_fixed_suv_bound_is_kept_when_configured(study):
    tmp, paths = study
    out = run_job(tmp, paths, 6, "PT", "chroma", fusion={"pet_suv_max": 10.0})
    ds = _outputs(out, "fused")[0]
    assert ds.SeriesDescription.startswith("PET on CT fusion, SUV 0-10 ")
    assert "PT SUV 0-10; CT window" in ds.DerivationDescription


def test_chroma_keeps_the_ct_luminance_and_its_map_is_graded(big_study, chroma_job):
    _, paths = big_study
    body, z = _fixed_body(paths)
    fixed = load_series(paths["CT"])
    ct = np.clip((sitk.GetArrayFromImage(fixed.image) + 160.0) / 400.0, 0, 1)
    fused = sorted(_outputs(chroma_job, "fused"), key=lambda ds: -float(ds.ImagePositionPatient[2]))
    rgb = np.stack([ds.pixel_array for ds in fused])[::-1].astype(np.float64) / 255.0  # back to z increasing
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert float(np.abs(luma - ct)[body].mean()) < 0.01
    (pm,) = _outputs(chroma_job, "heatmap")
    values, _ = decode_parametric_map(pm)
    assert float(values.max()) > 0.5 and float(values[values > 0].min()) < 0.5


def test_a_stage_inside_another_is_charged_to_itself_alone(monkeypatch):
    """Resampling read inside fusion counts as resampling, and fusion keeps only its own time."""
    from dicomnode import pipeline

    clock = [0.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(pipeline.time, "process_time", lambda: 2 * clock[0])
    watch = pipeline.Stopwatch()
    with watch.stage("fuse"):
        clock[0] += 1.0
        for _ in range(3):
            with watch.stage("resample"):
                clock[0] += 0.5
        clock[0] += 1.0
    with watch.stage("resample"):
        clock[0] += 0.25
    assert watch.seconds == {"fuse": 2.0, "resample": 1.75}
    assert watch.cpu_seconds == {"fuse": 4.0, "resample": 3.5}
    assert list(watch.seconds) == ["fuse", "resample"]
