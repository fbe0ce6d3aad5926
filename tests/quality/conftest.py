"""Images shared by the quality tests: one real AANLIB CT-MRI pair and small synthetic textures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def ct_mri(aanlib_dir):
    """(A = CT, B = MRI, F = their average rounded half up) as float 0..255, 256 x 256."""
    folder = aanlib_dir / "CT-MRI"
    a = np.asarray(Image.open(folder / "2010_CT.png"), dtype=np.float64)
    b = np.asarray(Image.open(folder / "2010_MRI.png"), dtype=np.float64)
    return a, b, np.floor((a + b) / 2 + 0.5)


@pytest.fixture
def texture():
    """A smooth random texture on 0..255 (64 x 64) and a second independent one."""
    rng = np.random.default_rng(5)
    from scipy import ndimage

    def make():
        x = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 2.0)
        x = (x - x.min()) / (x.max() - x.min())
        return np.floor(x * 255 + 0.5)

    return make(), make()
