"""Colour conversion and colour maps."""

import numpy as np
import pytest
import torch

from dicomnode.fusion.color import UnknownColormap, colorize, colormap_names, is_grey, rgb_to_ycbcr, ycbcr_to_rgb


def test_ycbcr_round_trip_is_exact_within_rounding():
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, size=(4, 3, 64, 64), dtype=np.uint8)
    rgb = torch.from_numpy(rgb8).float() / 255
    back = ycbcr_to_rgb(rgb_to_ycbcr(rgb))
    back8 = torch.floor(back * 255 + 0.5).to(torch.uint8).numpy()
    assert np.array_equal(back8, rgb8)
    assert float((back - rgb).abs().max()) < 1e-5


def test_ycbcr_of_grey_has_neutral_chroma_and_equal_luma():
    grey = torch.rand(2, 1, 16, 16).expand(-1, 3, -1, -1)
    ycc = rgb_to_ycbcr(grey)
    assert torch.allclose(ycc[:, 0], grey[:, 0], atol=1e-6)
    assert torch.allclose(ycc[:, 1:], torch.full_like(ycc[:, 1:], 0.5), atol=1e-6)


def test_bt601_luma_weights():
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1
    assert float(rgb_to_ycbcr(red)[0, 0]) == pytest.approx(0.299, abs=1e-6)


@pytest.mark.parametrize("name", ["hot", "jet", "pet", "gray"])
def test_colorize_shape_range_and_ends(name):
    ramp = torch.linspace(0, 1, 256).view(1, 1, 256).expand(2, 4, 256)
    rgb = colorize(ramp, name)
    assert rgb.shape == (2, 3, 4, 256)
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    assert not is_grey(rgb) or name == "gray"


def test_hot_is_black_to_white_with_monotonic_luma():
    ramp = torch.linspace(0, 1, 101).view(1, 1, 101)
    rgb = colorize(ramp, "hot")
    assert torch.allclose(rgb[0, :, 0, 0], torch.zeros(3)) and torch.allclose(rgb[0, :, 0, -1], torch.ones(3))
    luma = rgb_to_ycbcr(rgb)[0, 0, 0]
    assert bool((luma[1:] >= luma[:-1] - 1e-6).all())


def test_unknown_colormap_is_a_clear_error():
    with pytest.raises(UnknownColormap, match="available"):
        colorize(torch.zeros(1, 2, 2), "viridis-nope")
    assert "hot" in colormap_names()
