"""Heat-map Parametric Maps: uint16 + Real World Value Mapping, geometry, references, IOD, rendering."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from dicomnode.dicomio.derived import NOT_FOR_DIAGNOSIS, EncodingError
from dicomnode.dicomio.parametric_map import (
    STORED_MAX,
    HeatmapKind,
    build_parametric_map,
    decode_parametric_map,
    heatmap_coding,
    quantise,
    valid_content_label,
)
from dicomnode.dicomio.validate import validate_dataset, validate_file
from tests.conftest import require_tool


def _reread(ds) -> pydicom.Dataset:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(DicomBytesIO(buf.getvalue()))


def _real_values(pm, fixed) -> np.ndarray:
    """Decoded values put back in the fixed volume's slice order, matched by frame position."""
    values, positions = decode_parametric_map(pm)
    order = {tuple(np.round(p, 3)): k for k, p in enumerate(positions)}
    index = [order[tuple(np.round([float(v) for v in h.ImagePositionPatient], 3))] for h in fixed.headers]
    return values[index]


def _shape(volume) -> tuple[int, int, int]:
    return len(volume.headers), int(volume.headers[0].Rows), int(volume.headers[0].Columns)


@pytest.fixture(scope="module")
def contribution(synthetic_volumes):
    ct, pt = synthetic_volumes["CT"], synthetic_volumes["PT"]
    values = np.random.default_rng(5).random(_shape(ct))
    pm = build_parametric_map(ct, values, quantity="contribution", series_number=9002,
                              series_description="PT CONTRIBUTION alpha", sources=[ct, pt],
                              derivation="share of the fused value from PT", method="alpha")
    return ct, pt, values, pm


def test_stored_as_uint16_with_a_linear_mapping(contribution):
    *_, pm = contribution
    pm = _reread(pm)
    assert (pm.BitsAllocated, pm.PixelRepresentation) == (16, 0)
    assert "FloatPixelData" not in pm and "DoubleFloatPixelData" not in pm
    assert pm.pixel_array.dtype == np.uint16
    (mapping,) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (0, STORED_MAX)
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "MODCONTRIB"


def test_values_round_trip_within_quantisation(contribution):
    ct, _, values, pm = contribution
    pm = _reread(pm)
    back = _real_values(pm, ct)
    step = 1.0 / STORED_MAX  # contribution is mapped on its fixed range 0..1
    assert np.max(np.abs(back - values)) <= step / 2 + 1e-12


def test_frames_sit_on_the_fixed_slices(contribution):
    ct, _, _, pm = contribution
    assert int(pm.NumberOfFrames) == len(ct.headers)
    assert pm.FrameOfReferenceUID == ct.frame_of_reference_uid
    assert pm.StudyInstanceUID == ct.study_uid
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in ct.headers[0].PixelSpacing])
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in ct.headers[0].ImageOrientationPatient])
    # Frames come in highdicom's spatial order; each must sit on, and derive from, one fixed slice.
    by_uid = {h.SOPInstanceUID: h for h in ct.headers}
    seen = set()
    for frame in pm.PerFrameFunctionalGroupsSequence:
        (src,) = frame.DerivationImageSequence[0].SourceImageSequence
        h = by_uid[src.ReferencedSOPInstanceUID]
        seen.add(h.SOPInstanceUID)
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in h.ImagePositionPatient])
    assert seen == set(by_uid)


def test_references_and_labels(contribution):
    ct, pt, _, pm = contribution
    assert pm.ContentLabel == "HEATMAP"
    assert pm.SeriesDescription == f"PT CONTRIBUTION alpha - {NOT_FOR_DIAGNOSIS}"
    assert "method=alpha" in pm.DerivationDescription
    # The fixed slices, then every moving instance: each source series is a source image.
    assert [s.ReferencedSOPInstanceUID for s in pm.SourceImageSequence] == [
        h.SOPInstanceUID for h in (*ct.headers, *pt.headers)]
    refs = {item.SeriesInstanceUID: item for item in pm.ReferencedSeriesSequence}
    assert set(refs) == {ct.series_uid, pt.series_uid}
    assert len(refs[pt.series_uid].ReferencedInstanceSequence) == len(pt.headers)
    assert pm.BodyPartExamined == ct.headers[0].BodyPartExamined
    assert int(pm.SeriesNumber) == 9002


def test_displacement_in_mm_uses_the_data_range(synthetic_volumes):
    ct = synthetic_volumes["CT"]
    values = np.random.default_rng(2).uniform(0.0, 7.5, _shape(ct))
    pm = _reread(build_parametric_map(ct, values, content_label="displacement mm", quantity="displacement",
                                      series_number=9004, series_description="REG DISPLACEMENT", sources=[ct]))
    (mapping,) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    assert pm.ContentLabel == "DISPLACEMENT_MM"
    slope = float(mapping.RealWorldValueSlope)
    assert slope == pytest.approx((values.max() - values.min()) / STORED_MAX)
    assert np.max(np.abs(_real_values(pm, ct) - values)) <= slope / 2 + 1e-9


def test_heatmap_codings_are_standard_where_possible():
    assert heatmap_coding("saliency").quantity.value == "130403"
    assert heatmap_coding(HeatmapKind.DISPLACEMENT).unit.value == "mm"
    assert heatmap_coding("contribution").quantity.scheme_designator.startswith("99")
    with pytest.raises(EncodingError):
        heatmap_coding("entropy")


def test_quantise_clips_and_handles_nan_and_constants():
    q = quantise(np.array([-1.0, 0.5, 2.0, np.nan]), (0.0, 1.0))
    assert q.stored.tolist() == [0, round(0.5 * STORED_MAX), STORED_MAX, 0]
    const = quantise(np.full((2, 2), 3.0))
    assert const.slope > 0 and np.all(const.stored * const.slope + const.intercept == 3.0)
    with pytest.raises(EncodingError):
        quantise(np.array([np.nan]))


def test_content_label_follows_cs_rules():
    assert valid_content_label("heat-map #1") == "HEAT_MAP__1"
    assert valid_content_label("HEATMAP") == "HEATMAP"
    assert len(valid_content_label("x" * 40)) == 16
    with pytest.raises(EncodingError):
        valid_content_label("  ")


def test_wrong_shape_is_refused(synthetic_volumes):
    ct = synthetic_volumes["CT"]
    n, r, c = _shape(ct)
    with pytest.raises(EncodingError):
        build_parametric_map(ct, np.zeros((n, r, c + 1)), quantity="saliency", series_number=1,
                             series_description="x", sources=[ct])


def test_dciodvfy_reports_no_errors(contribution):
    require_tool("dciodvfy")
    *_, pm = contribution
    report = validate_dataset(pm)
    assert report.iod == "ParametricMap"
    assert report.errors == []


def test_dcm2pnm_renders_the_first_frame(contribution, tmp_path: Path):
    exe = require_tool("dcm2pnm")
    *_, pm = contribution
    src, out = tmp_path / "pm.dcm", tmp_path / "pm.png"
    pm.save_as(src, enforce_file_format=True)
    proc = subprocess.run([exe, "--frame", "1", "--write-png", str(src), str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 100


def test_real_ct_as_fixed(sts_dir: Path):
    from tests.dicomio.conftest import volume_from_files

    ct_files = sorted((sts_dir / "CT" / "dicom" / "image").glob("*.dcm"))
    ct_file = ct_files[0]
    ct = volume_from_files(ct_files, "HU")
    pt = volume_from_files(sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm")), "BQML")
    values = np.random.default_rng(9).random(_shape(ct))
    pm = build_parametric_map(ct, values, quantity="saliency", series_number=9003,
                              series_description="SALIENCY", sources=[ct, pt])
    assert int(pm.NumberOfFrames) == len(ct.headers)
    assert pm.StudyInstanceUID == ct.study_uid
    require_tool("dciodvfy")
    # Study attributes are copied as received, so the only errors allowed are the source's own
    # (STS_002's StudyID is 17 characters, one more than SH allows).
    assert set(validate_dataset(pm).errors) <= set(validate_file(ct_file).errors)


def test_multiframe_fixed_frames_reference_their_source_frame(synthetic_volumes):
    from tests.dicomio.conftest import as_multiframe

    ct = as_multiframe(synthetic_volumes["CT"])
    pm = build_parametric_map(ct, np.random.default_rng(1).random(_shape(ct)), quantity="saliency",
                              series_number=9003, series_description="SALIENCY", sources=[ct])
    z_of_frame = {int(h.ReferencedFrameNumber): float(h.ImagePositionPatient[2]) for h in ct.headers}
    for frame in pm.PerFrameFunctionalGroupsSequence:
        (src,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert src.ReferencedSOPInstanceUID == ct.headers[0].SOPInstanceUID
        assert z_of_frame[int(src.ReferencedFrameNumber)] == pytest.approx(
            float(frame.PlanePositionSequence[0].ImagePositionPatient[2]))
    require_tool("dciodvfy")
    assert validate_dataset(pm).errors == []
