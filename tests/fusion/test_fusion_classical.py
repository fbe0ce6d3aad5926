"""Classical methods and the fusion interface: identity, batch-size invariance, colour handling."""

import pytest
import torch

from dicomnode.config import FusionConfig
from dicomnode.fusion import FusionEngine, UnknownMethod, available_methods, fuse
from dicomnode.fusion.color import rgb_to_ycbcr

CLASSICAL = ["average", "maxabs", "pca", "laplacian", "dwt", "gff", "alpha"]


def test_registry_lists_every_method():
    assert set(CLASSICAL) | {"network"} <= set(available_methods())
    with pytest.raises(UnknownMethod, match="available"):
        fuse(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), "nope", "cpu")


@pytest.mark.parametrize("method", CLASSICAL)
def test_fusing_an_image_with_itself_gives_it_back(method, grey_batch):
    fixed, _ = grey_batch
    result = fuse(fixed, fixed, method, "cpu")
    assert result.fused.shape == fixed.shape
    assert float((result.fused - fixed).abs().max()) < 2e-3
    assert result.contribution.shape == (fixed.shape[0], *fixed.shape[-2:])
    assert float(result.contribution.min()) >= 0 and float(result.contribution.max()) <= 1


@pytest.mark.parametrize("method", CLASSICAL)
def test_result_does_not_depend_on_batch_size(method, grey_batch):
    fixed, moving = grey_batch
    one = FusionEngine(method, FusionConfig(batch_size=1), "cpu").fuse(fixed, moving)
    many = FusionEngine(method, FusionConfig(batch_size=4), "cpu").fuse(fixed, moving)
    assert torch.allclose(one.fused, many.fused, atol=1e-5)
    assert torch.allclose(one.contribution, many.contribution, atol=1e-5)


def test_methods_differ_and_keep_range(grey_batch):
    fixed, moving = grey_batch
    outs = {m: fuse(fixed, moving, m, "cpu").fused for m in ("average", "maxabs", "gff")}
    for out in outs.values():
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(outs["maxabs"], torch.maximum(fixed, moving))
    assert torch.allclose(outs["average"], (fixed + moving) / 2)
    assert float((outs["gff"] - outs["average"]).abs().mean()) > 1e-3


@pytest.mark.parametrize("method", ["average", "gff", "dwt"])
def test_rgb_functional_is_fused_on_luminance_and_keeps_chroma(method, pet_pair):
    mri, pet = pet_pair
    result = fuse(mri, pet, method, "cpu")
    assert result.fused.shape == pet.shape
    fused_ycc, pet_ycc = rgb_to_ycbcr(result.fused), rgb_to_ycbcr(pet)
    # Chroma is the PET's wherever the recombined colour did not need clipping to [0, 1].
    unclipped = ((result.fused > 0.002) & (result.fused < 0.998)).all(dim=1, keepdim=True).expand(-1, 2, -1, -1)
    assert unclipped.float().mean() > 0.3
    diff = (fused_ycc[:, 1:] - pet_ycc[:, 1:]).abs()[unclipped]
    assert float(diff.max()) < 1e-4
    # The luminance carries the MRI's structure: fused Y differs from the PET's Y.
    assert float((fused_ycc[:, 0] - pet_ycc[:, 0]).abs().mean()) > 0.02


def test_grey_stored_as_rgb_is_grey(grey_batch):
    fixed, moving = grey_batch
    as_rgb = moving.expand(-1, 3, -1, -1)
    grey = fuse(fixed, moving, "gff", "cpu")
    from_rgb = fuse(fixed, as_rgb, "gff", "cpu")
    assert from_rgb.fused.shape[1] == 1
    assert torch.allclose(grey.fused, from_rgb.fused, atol=1e-5)


def test_alpha_overlays_colour_mapped_moving_where_it_has_signal(grey_batch):
    fixed, moving = grey_batch
    moving = moving.clone()
    moving[:, :, :, :64] = 0
    result = fuse(fixed, moving, "alpha", "cpu", colormap="hot")
    assert result.fused.shape == (fixed.shape[0], 3, *fixed.shape[-2:])
    no_signal = result.fused[:, :, :, :64]
    assert torch.allclose(no_signal, fixed[:, :, :, :64].expand(-1, 3, -1, -1), atol=1e-6)
    assert float(result.contribution[:, :, :64].max()) < 1e-6  # float rounding of the luma
    # The luminance share of a linear blend is its weight where the sources differ clearly.
    assert float(result.contribution.max()) == pytest.approx(FusionConfig().alpha, abs=0.02)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="does not match"):
        fuse(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9), "average", "cpu")


def test_sobel_magnitude_matches_scipy():
    import math

    import numpy as np
    from scipy import ndimage

    from dicomnode.fusion.classical import sobel_magnitude

    img = np.random.default_rng(3).random((37, 52)).astype(np.float64)
    ref = np.hypot(ndimage.sobel(img, axis=0, mode="nearest"), ndimage.sobel(img, axis=1, mode="nearest"))
    ours = sobel_magnitude(torch.from_numpy(img)[None, None])[0, 0].numpy()
    assert np.allclose(ours, ref / (4 * math.sqrt(2)), atol=1e-6)
