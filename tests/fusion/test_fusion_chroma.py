"""Colour on luminance (fusion.chroma) as the node configures it by default."""

import pytest
import torch

from dicomnode.config import FusionConfig
from dicomnode.fusion.api import FusionEngine
from dicomnode.fusion.chroma import colour_strength


@pytest.mark.parametrize("modality", ["MR", "NM"])
def test_black_and_white_ct_carry_the_moving_colour_under_the_lift(modality):
    fixed = torch.tensor([[[[0.0, 0.5, 1.0]]]])  # black, mid-grey and white CT
    moving = torch.ones_like(fixed)  # the top of the moving range
    fused = FusionEngine("chroma", FusionConfig(), "cpu").fuse(fixed, moving, modality=modality).fused
    assert float(colour_strength(fused).min()) > 0.05
    # PET has no lift: black and white CT stay grey, as the gamut leaves them no colour.
    pet = FusionEngine("chroma", FusionConfig(), "cpu").fuse(fixed, moving, modality="PT").fused
    strength = colour_strength(pet)[0, 0]
    assert float(strength[0]) == float(strength[2]) == 0.0 and float(strength[1]) > 0.1
