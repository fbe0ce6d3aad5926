"""The fused RGB Secondary Capture series: geometry, references, labels, IOD conformance, rendering."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode import __version__
from dicomnode.dicomio.derived import NOT_FOR_DIAGNOSIS, EncodingError, display_order
from dicomnode.dicomio.secondary_capture import build_fused_series
from dicomnode.dicomio.validate import validate_dataset, validate_file
from tests.conftest import require_tool


def _in_display_order(headers):
    return [headers[k] for k in display_order(headers)]


def _rgb(volume, seed: int = 0) -> np.ndarray:
    n = len(volume.headers)
    rows, cols = int(volume.headers[0].Rows), int(volume.headers[0].Columns)
    return np.random.default_rng(seed).integers(0, 256, (n, rows, cols, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fused(synthetic_volumes):
    ct, pt = synthetic_volumes["CT"], synthetic_volumes["PT"]
    rgb = _rgb(ct)
    series = build_fused_series(ct, pt, rgb, method="alpha", derivation="PT resampled to CT, alpha blend",
                                series_number=9001)
    return ct, pt, rgb, series


def test_one_instance_per_fixed_slice_in_the_fixed_study(fused):
    ct, _, _, series = fused
    assert len(series) == len(ct.headers)
    assert {ds.StudyInstanceUID for ds in series} == {ct.study_uid}
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert series[0].SeriesInstanceUID not in (ct.series_uid,)
    assert len({ds.SOPInstanceUID for ds in series}) == len(series)
    assert [int(ds.InstanceNumber) for ds in series] == list(range(1, len(series) + 1))
    assert all(int(ds.SeriesNumber) == 9001 for ds in series)
    h = ct.headers[0]
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "BodyPartExamined"):
        assert str(series[0][keyword].value) == str(h[keyword].value), keyword


def test_geometry_matches_the_fixed_slices(fused):
    ct, _, _, series = fused
    for ds, h in zip(series, _in_display_order(ct.headers), strict=True):
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([float(v) for v in h.ImagePositionPatient])
        assert [float(v) for v in ds.ImageOrientationPatient] == pytest.approx(
            [float(v) for v in h.ImageOrientationPatient])
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([float(v) for v in h.PixelSpacing])
        assert ds.FrameOfReferenceUID == ct.frame_of_reference_uid
        assert (ds.Rows, ds.Columns) == (h.Rows, h.Columns)
        assert list(ds.PatientOrientation) == ["L", "P"]


def test_pixels_round_trip_exactly(fused):
    _, _, rgb, series = fused
    for k, ds in zip(display_order(fused[0].headers), series, strict=True):
        again = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))
        assert again.PhotometricInterpretation == "RGB"
        np.testing.assert_array_equal(again.pixel_array, rgb[k])


def _bytes(ds) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_references_name_the_fixed_slice_and_both_series(fused):
    ct, pt, _, series = fused
    pt_instances = {h.SOPInstanceUID for h in pt.headers}
    pt_z = {h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in pt.headers}
    pt_step = float(pt.image.GetSpacing()[2])
    for ds, h in zip(series, _in_display_order(ct.headers), strict=True):
        src, *moving = ds.SourceImageSequence
        assert (src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID) == (h.SOPClassUID, h.SOPInstanceUID)
        assert src.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        # The moving slices whose slab overlaps this slice, and only those.
        assert moving, "every source series is a source image"
        for item in moving:
            assert abs(pt_z[item.ReferencedSOPInstanceUID] - float(h.ImagePositionPatient[2])) < pt_step
        refs = {item.SeriesInstanceUID: item for item in ds.ReferencedSeriesSequence}
        assert set(refs) == {ct.series_uid, pt.series_uid}
        assert [r.ReferencedSOPInstanceUID for r in refs[ct.series_uid].ReferencedInstanceSequence] == [
            h.SOPInstanceUID]
        # Only the overlapping moving instances, never all of them on every instance (N x M).
        assert {r.ReferencedSOPInstanceUID for r in refs[pt.series_uid].ReferencedInstanceSequence} == {
            item.ReferencedSOPInstanceUID for item in moving} < pt_instances


def test_labels_say_derived_and_not_for_diagnosis(fused):
    *_, series = fused
    ds = series[0]
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO"
    assert ds.SeriesDescription == f"FUSED PT->CT alpha - {NOT_FOR_DIAGNOSIS}"
    assert "method=alpha" in ds.DerivationDescription
    assert f"dicomnode {__version__}" in ds.DerivationDescription
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage


def test_long_descriptions_keep_the_warning(synthetic_volumes):
    ct, pt = synthetic_volumes["CT"], synthetic_volumes["PT"]
    series = build_fused_series(ct, pt, _rgb(ct), method="x" * 80, derivation="d",
                                series_description="A VERY LONG DESCRIPTION " * 4)
    assert len(series[0].SeriesDescription) <= 64
    assert series[0].SeriesDescription.endswith(NOT_FOR_DIAGNOSIS)


@pytest.mark.parametrize("bad", ["wrong_count", "wrong_size", "float", "grey"])
def test_bad_stacks_are_refused(synthetic_volumes, bad):
    ct, pt = synthetic_volumes["CT"], synthetic_volumes["PT"]
    rgb = _rgb(ct)
    rgb = {"wrong_count": rgb[1:], "wrong_size": rgb[:, 1:], "float": rgb.astype(np.float32),
           "grey": rgb[..., 0]}[bad]
    with pytest.raises(EncodingError):
        build_fused_series(ct, pt, rgb, method="alpha", derivation="d")


def test_dciodvfy_reports_no_errors(fused):
    require_tool("dciodvfy")
    *_, series = fused
    report = validate_dataset(series[len(series) // 2])
    assert report.iod == "SCImage"
    assert report.errors == []
    # The plane attributes are deliberate additions outside the SC IOD: only warnings.
    assert any("ImagePositionPatient" in w for w in report.warnings)


def test_dcm2pnm_renders_a_fused_slice(fused, tmp_path: Path):
    exe = require_tool("dcm2pnm")
    *_, series = fused
    src, out = tmp_path / "sc.dcm", tmp_path / "sc.png"
    series[0].save_as(src, enforce_file_format=True)
    proc = subprocess.run([exe, "--write-png", str(src), str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 100


def test_real_ct_headers(sts_dir: Path, tmp_path: Path):
    """The real STS_002 CT as the fixed series and its PET as the moving one."""
    from tests.dicomio.conftest import volume_from_files

    ct = volume_from_files(sorted((sts_dir / "CT" / "dicom" / "image").glob("*.dcm")), "HU")
    pt = volume_from_files(sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm")), "BQML")
    series = build_fused_series(ct, pt, _rgb(ct, 1), method="alpha", derivation="identity resample, alpha blend")
    assert len(series) == len(ct.headers)
    for ds, h in zip(series, _in_display_order(ct.headers), strict=True):
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == h.SOPInstanceUID
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([float(v) for v in h.ImagePositionPatient])
        assert ds.FrameOfReferenceUID == h.FrameOfReferenceUID
        assert ds.StudyInstanceUID == h.StudyInstanceUID
    assert series[0].BodyPartExamined == ct.headers[0].BodyPartExamined
    require_tool("dciodvfy")
    # Study attributes are copied as received: the only errors allowed are the source's own
    # (STS_002's StudyID is 17 characters, one more than SH allows).
    source_errors = set(validate_file(sorted((sts_dir / "CT" / "dicom" / "image").glob("*.dcm"))[0]).errors)
    assert set(validate_dataset(series[0]).errors) <= source_errors
    assert series[0].StudyID == ct.headers[0].StudyID


def test_multiframe_fixed_references_frames(synthetic_volumes):
    from tests.dicomio.conftest import as_multiframe

    ct, pt = as_multiframe(synthetic_volumes["CT"]), synthetic_volumes["PT"]
    series = build_fused_series(ct, pt, _rgb(ct), method="alpha", derivation="d")
    for ds, h in zip(series, _in_display_order(ct.headers), strict=True):
        src = ds.SourceImageSequence[0]
        assert (src.ReferencedSOPInstanceUID, int(src.ReferencedFrameNumber)) == (
            h.SOPInstanceUID, int(h.ReferencedFrameNumber))
    refs = {item.SeriesInstanceUID: item for item in series[0].ReferencedSeriesSequence}
    assert len(refs[ct.series_uid].ReferencedInstanceSequence) == 1


def test_moving_from_another_study_is_referenced_there(synthetic_volumes):
    """Pairing by PatientID across studies: the moving series is named under its own study."""
    import dataclasses

    ct = synthetic_volumes["CT"]
    pt = dataclasses.replace(synthetic_volumes["PT"], study_uid=pydicom.uid.generate_uid())
    series = build_fused_series(ct, pt, _rgb(ct), method="alpha", derivation="d")
    ds = series[0]
    assert [item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence] == [ct.series_uid]
    (other,) = ds.StudiesContainingOtherReferencedInstancesSequence
    assert other.StudyInstanceUID == pt.study_uid
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == pt.series_uid
    require_tool("dciodvfy")
    assert validate_dataset(ds).errors == []
