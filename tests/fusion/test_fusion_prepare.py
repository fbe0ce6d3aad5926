"""Intensity preparation per modality."""

import numpy as np
import pytest

from dicomnode.config import FusionConfig
from dicomnode.fusion.prepare import UnsupportedModality, prepare_intensities


def test_ct_soft_tissue_and_brain_windows():
    cfg = FusionConfig()
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    soft = prepare_intensities(hu, "CT", None, cfg)
    assert soft.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    brain = prepare_intensities(np.array([0.0, 40.0, 80.0]), "CT", None, cfg, body_part="HEAD")
    assert brain.tolist() == pytest.approx([0.0, 0.5, 1.0])
    custom = prepare_intensities(np.array([0.0]), "CT", None, cfg.model_copy(update={"ct_window": (0.0, 100.0)}))
    assert custom.tolist() == pytest.approx([0.5])


def test_mr_percentiles_ignore_background_and_outliers():
    rng = np.random.default_rng(1)
    mr = np.zeros((64, 64), np.float32)
    mr[16:48, 16:48] = rng.uniform(100, 200, (32, 32))
    mr[20, 20] = 1e6  # a single hot voxel must not squash the range
    out = prepare_intensities(mr, "MR", None, FusionConfig())
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert 0.3 < float(np.median(out[16:48, 16:48])) < 0.7


def test_pet_suv_fixed_bound_and_percentile_fallback():
    cfg = FusionConfig()
    suv = np.array([0.0, 5.0, 10.0, 20.0])
    assert prepare_intensities(suv, "PT", "GML", cfg).tolist() == pytest.approx([0, 0.5, 1, 1])
    counts = np.linspace(0, 1000, 1001)
    out = prepare_intensities(counts, "PT", "BQML", cfg)
    assert out.max() == 1 and out[500] == pytest.approx(500 / np.percentile(counts[1:], 99.5), rel=1e-3)
    by_pct = prepare_intensities(suv, "PT", "GML", cfg.model_copy(update={"pet_suv_max": 0.0}))
    assert by_pct[-1] == 1 and by_pct[1] > 0.25


def test_nm_percentiles_and_unsupported_modality():
    nm = np.linspace(0, 100, 101)
    assert prepare_intensities(nm, "NM", None, FusionConfig()).max() == 1
    with pytest.raises(UnsupportedModality, match="US"):
        prepare_intensities(nm, "US", None, FusionConfig())
