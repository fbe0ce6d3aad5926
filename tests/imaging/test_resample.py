"""Resampling onto the fixed grid slab by slab equals resampling onto the whole grid, voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dicomnode.config import FusionConfig
from dicomnode.fusion.prepare import intensity_range
from dicomnode.imaging.resample import OnFixedGrid, field_of_view, moving_on_fixed, resample_image, resample_onto
from dicomnode.imaging.volume import Volume


def _volume(shape, spacing, origin, modality="MR", seed=0, direction=None) -> Volume:
    rng = np.random.default_rng(seed)
    values = rng.gamma(2.0, 100.0, size=shape).astype(np.float32)
    values[:, :3] = 0.0  # background rows, as MR has
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return Volume(image=image, modality=modality, units="", study_uid="1", series_uid=f"2.{seed}",
                  frame_of_reference_uid="3")


@pytest.fixture(scope="module")
def pair():
    # A tilted fixed grid, a coarser moving one that does not cover it all: every voxel kind.
    tilt = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.1).GetMatrix()
    fixed = _volume((23, 40, 36), (0.9, 0.8, 2.5), (-14.0, -16.0, -25.0), "CT", seed=1, direction=tilt)
    moving = _volume((9, 20, 20), (1.7, 1.6, 5.0), (-15.0, -12.0, -20.0), "MR", seed=2)
    return fixed, moving


def _transforms(fixed: Volume):
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.03, 0.0, -0.02, 0.98, 0.04, 0.0, 0.02, 1.01))
    affine.SetTranslation((1.3, -2.1, 0.7))
    bspline = sitk.BSplineTransformInitializer(fixed.image, (3, 3, 3))
    params = np.random.default_rng(3).normal(scale=1.5, size=len(bspline.GetParameters()))
    bspline.SetParameters(tuple(params))
    return {"identity": None, "affine": affine, "deformable": sitk.CompositeTransform([affine, bspline])}


@pytest.mark.parametrize("kind", ["identity", "affine", "deformable"])
def test_slabs_and_slices_equal_the_whole_grid(pair, kind):
    fixed, moving = pair
    transform = _transforms(fixed)[kind]
    whole = np.asarray(resample_onto(fixed, moving, transform))
    lazy = moving_on_fixed(fixed, moving, transform)
    assert lazy.shape == whole.shape and lazy.dtype == whole.dtype
    for step in (1, 4, 23, 100):
        slabs = np.concatenate([lazy[lo:lo + step] for lo in range(0, whole.shape[0], step)])
        assert np.array_equal(slabs, whole), step
    picked = [17, 0, 5, 5, -1]
    assert np.array_equal(lazy[picked], whole[picked])
    assert np.array_equal(np.concatenate(list(lazy.slabs(7))), whole)
    assert lazy[5:5].shape == (0, *whole.shape[1:]) and lazy[[]].shape == (0, *whole.shape[1:])


def test_field_of_view_is_where_the_moving_image_has_data(pair):
    fixed, moving = pair
    transform = _transforms(fixed)["affine"]
    ones = sitk.Image(moving.image.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving.image)
    expected = sitk.GetArrayFromImage(resample_image(fixed.image, ones, transform, 0.0)) > 0.5
    fov = field_of_view(fixed, moving, transform)
    read = np.concatenate([fov[lo:lo + 3] for lo in range(0, fov.shape[0], 3)])
    assert read.dtype == bool and np.array_equal(read, expected)
    assert expected.any() and not expected.all()  # an edge inside the grid: the test can fail


def test_percentile_range_read_slab_by_slab_equals_the_whole_volume(pair):
    fixed, moving = pair
    config = FusionConfig()
    whole = intensity_range(np.asarray(resample_onto(fixed, moving)), "MR", "", config)
    assert intensity_range(moving_on_fixed(fixed, moving), "MR", "", config) == whole
    assert whole.kind == "percentile" and whole.high > whole.low > 0


class CountingStage:
    """A stage factory that counts the reads run in it."""

    def __init__(self):
        self.entered = 0

    def __call__(self):
        return self

    def __enter__(self):
        self.entered += 1

    def __exit__(self, *exc):
        return False


def test_each_read_runs_in_the_given_stage(pair):
    fixed, moving = pair
    stage = CountingStage()
    grid = OnFixedGrid(fixed.image, moving.image, stage=stage)
    grid[0:4]
    grid[[1, 2]]
    assert stage.entered == 3


def test_a_grid_read_as_one_array_is_the_whole_resample_in_one_read(pair):
    fixed, moving = pair
    stage = CountingStage()
    whole = np.asarray(moving_on_fixed(fixed, moving, stage=stage))
    assert np.array_equal(whole, resample_onto(fixed, moving)) and stage.entered == 1
    fov = np.asarray(field_of_view(fixed, moving))
    assert fov.dtype == bool and fov.shape == whole.shape
