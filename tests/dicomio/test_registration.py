"""Spatial Registration and Deformable Spatial Registration objects: direction, round trip, dciodvfy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicomnode.dicomio.derived import EncodingError
from dicomnode.dicomio.registration import (
    DEFORMABLE_SPATIAL_REGISTRATION,
    SPATIAL_REGISTRATION,
    SpatialRegistration,
    read_deformable_registration,
    read_spatial_registration,
    registration_objects,
)
from dicomnode.dicomio.validate import validate_dataset
from dicomnode.imaging.register import Registration, displacement_magnitude
from dicomnode.imaging.resample import resample_image
from tests.conftest import require_tool

NUMBERS = {"registration": 9005, "deformable_registration": 9006}


@pytest.fixture(scope="module")
def pair(synthetic_volumes):
    """The synthetic CT (fixed) and a PET in another frame of reference (moving)."""
    moving = dataclasses.replace(synthetic_volumes["PT"], frame_of_reference_uid=generate_uid())
    return synthetic_volumes["CT"], moving


def _registration(fixed, deformable: bool) -> Registration:
    """A transform like the node's: CompositeTransform([affine, B-spline]) mapping fixed to moving points."""
    img = fixed.image
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
    euler = sitk.Euler3DTransform(centre, 0.03, -0.05, 0.08, (4.0, -3.0, 2.0))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    affine.SetMatrix((np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag([1.04, 0.97, 1.02])).ravel().tolist())
    affine.SetTranslation(euler.GetTranslation())
    parts: list[sitk.Transform] = [affine]
    displacement = None
    if deformable:
        bspline = sitk.BSplineTransformInitializer(img, [3, 3, 2], 3)
        rng = np.random.default_rng(4)
        bspline.SetParameters(rng.uniform(-3.0, 3.0, bspline.GetNumberOfParameters()).tolist())
        parts.append(bspline)
        displacement = displacement_magnitude(bspline, img)
    return Registration(sitk.CompositeTransform(parts), displacement_mm=displacement)


def _voxel_centres(image: sitk.Image) -> list[tuple[float, ...]]:
    nx, ny, nz = image.GetSize()
    return [image.TransformIndexToPhysicalPoint((i, j, k)) for k in range(nz) for j in range(ny) for i in range(nx)]


def _reread(ds, tmp_path, name):
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _max_distance(a: sitk.Transform, b: sitk.Transform, points) -> float:
    return max(float(np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p)))) for p in points)


def test_objects_reproduce_the_nodes_resampling(pair, tmp_path):
    fixed, moving = pair
    reg = _registration(fixed, deformable=True)
    objects = dict(registration_objects(fixed, moving, reg, series_numbers=NUMBERS, grid_mm=2.0))
    assert set(objects) == {"registration", "deformable_registration"}
    rigid = _reread(objects["registration"], tmp_path, "reg")
    deformable = _reread(objects["deformable_registration"], tmp_path, "dreg")
    assert rigid.SOPClassUID == SPATIAL_REGISTRATION and deformable.SOPClassUID == DEFORMABLE_SPATIAL_REGISTRATION
    points = _voxel_centres(fixed.image)
    node = reg.transform
    # The deformable object alone reproduces the node's whole mapping; the rigid object its linear part.
    assert _max_distance(read_deformable_registration(deformable), node, points) < 0.1
    assert _max_distance(read_spatial_registration(rigid), node.GetNthTransform(0), points) < 1e-3
    ours = sitk.GetArrayFromImage(resample_image(fixed.image, moving.image, node))
    theirs = sitk.GetArrayFromImage(resample_image(fixed.image, moving.image, read_deformable_registration(deformable)))
    assert np.abs(ours - theirs).max() <= 0.02 * float(np.abs(ours).max())


def test_matrix_maps_moving_coordinates_to_fixed(pair):
    # SimpleITK's transform maps fixed points to moving ones; PS3.3 C.20.2.1.1 the other way round.
    fixed, moving = pair
    shift = sitk.TranslationTransform(3, (5.0, 0.0, -2.0))  # moving point = fixed point + (5, 0, -2)
    ds = SpatialRegistration(fixed, moving, shift, series_number=1).build()
    matrix = np.array(ds.RegistrationSequence[1].MatrixRegistrationSequence[0].MatrixSequence[0]
                      .FrameOfReferenceTransformationMatrix, dtype=float).reshape(4, 4)
    assert matrix[:3, 3] == pytest.approx([-5.0, 0.0, 2.0]) and np.allclose(matrix[:3, :3], np.eye(3))
    assert ds.RegistrationSequence[1].MatrixRegistrationSequence[0].MatrixSequence[0] \
        .FrameOfReferenceTransformationMatrixType == "RIGID"
    assert read_spatial_registration(ds).TransformPoint((1.0, 2.0, 3.0)) == pytest.approx((6.0, 2.0, 1.0))


def test_references_and_frames_of_reference(pair):
    fixed, moving = pair
    objects = dict(registration_objects(fixed, moving, _registration(fixed, True), series_numbers=NUMBERS,
                                        grid_mm=2.0))
    for kind, ds in objects.items():
        assert ds.Modality == "REG" and ds.FrameOfReferenceUID == fixed.frame_of_reference_uid
        assert ds.StudyInstanceUID == fixed.study_uid and ds.PatientID == fixed.headers[0].PatientID
        assert ds.SeriesNumber == NUMBERS[kind]
        cited = {s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence}
        assert cited == {fixed.series_uid, moving.series_uid}
    items = objects["registration"].RegistrationSequence
    assert [i.FrameOfReferenceUID for i in items] == [fixed.frame_of_reference_uid, moving.frame_of_reference_uid]
    assert {r.ReferencedSOPInstanceUID for r in items[1].ReferencedImageSequence} == \
        {h.SOPInstanceUID for h in moving.headers}
    deformable = objects["deformable_registration"].DeformableRegistrationSequence
    assert deformable[1].SourceFrameOfReferenceUID == moving.frame_of_reference_uid
    assert deformable[1].PreDeformationMatrixRegistrationSequence[0].FrameOfReferenceTransformationMatrixType == "AFFINE"


def test_no_objects_without_registration_and_no_deformable_without_its_stage(pair):
    fixed, moving = pair
    skipped = Registration(sitk.Transform(3, sitk.sitkIdentity), skipped_reason="same FrameOfReferenceUID")
    assert registration_objects(fixed, moving, skipped, series_numbers=NUMBERS, grid_mm=2.0) == []
    linear = registration_objects(fixed, moving, _registration(fixed, False), series_numbers=NUMBERS, grid_mm=2.0)
    assert [kind for kind, _ in linear] == ["registration"]


def test_builders_refuse_what_they_cannot_encode(pair):
    fixed, moving = pair
    flat = sitk.AffineTransform(3)
    flat.SetMatrix([0.0] * 9)
    with pytest.raises(EncodingError, match="degenerate"):
        SpatialRegistration(fixed, moving, flat, series_number=1)
    with pytest.raises(EncodingError, match="no headers"):
        SpatialRegistration(dataclasses.replace(fixed, headers=[]), moving, sitk.Euler3DTransform(), series_number=1)
    with pytest.raises(EncodingError, match="not a rigid or affine"):
        SpatialRegistration(fixed, moving, sitk.BSplineTransform(3), series_number=1)


def test_dciodvfy_reports_no_errors(pair):
    require_tool("dciodvfy")
    fixed, moving = pair
    iods = {"registration": "SpatialRegistration", "deformable_registration": "DeformableSpatialRegistration"}
    for kind, ds in registration_objects(fixed, moving, _registration(fixed, True), series_numbers=NUMBERS,
                                         grid_mm=2.0):
        report = validate_dataset(ds)
        assert report.iod == iods[kind] and report.errors == [], (kind, report.iod, report.errors)
