"""Intensity preparation per modality."""

import numpy as np
import pytest

from dicomnode.config import FusionConfig
from dicomnode.fusion.prepare import UnsupportedModality, intensity_range, prepare_intensities, series_percentiles


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


def _suv_series(top: float) -> tuple[np.ndarray, np.ndarray]:
    """SUV 0..top inside a field of view, 0 outside it (as resampled onto a larger fixed grid)."""
    suv = np.random.default_rng(3).uniform(0.0, top, (6, 40, 40)).astype(np.float32)
    inside = np.zeros(suv.shape, bool)
    inside[:, 5:35, 10:30] = True
    suv[~inside] = 0.0
    return suv, inside


def test_pet_suv_range_is_the_series_percentile_inside_its_field_of_view():
    suv, inside = _suv_series(20.0)
    window = intensity_range(suv, "PT", "GML", FusionConfig(), inside=inside)
    expected = float(np.percentile(suv[inside], 99.9))
    assert (window.low, window.unit) == (0.0, "SUV") and window.high == pytest.approx(expected, rel=1e-6)
    # The zeros outside the field of view would have lowered it.
    assert window.high > float(np.percentile(suv, 99.9)) + 0.01
    assert "p99.9 of the series in its field of view, at least 5" == window.rule
    assert window.describe() == f"SUV 0-{round(expected, 1):g}"


class _Slabs:
    """A series read ``step`` slices at a time, as ``OnFixedGrid`` reads the resampled moving image."""

    def __init__(self, values: np.ndarray, step: int):
        self.values, self.step, self.shape = values, step, values.shape

    def slabs(self):
        for z in range(0, self.shape[0], self.step):
            yield self.values[z:z + self.step]


@pytest.mark.parametrize("q", [0.0, 0.5, 37.3, 99.5, 99.9, 100.0])
def test_the_series_percentile_read_in_slabs_is_numpys_on_the_whole_series(q):
    rng = np.random.default_rng(5)
    heavy = (rng.exponential(1.0, (9, 17, 13)) ** 3).astype(np.float32)  # PET-like: a long hot tail
    ties = rng.integers(0, 4, (9, 17, 13)).astype(np.float32)
    for values in (heavy, ties):
        values[0, 0, 0] = np.nan  # not a value: left out, as a viewer leaves it
        inside = rng.random(values.shape) > 0.3
        kept = values[inside & np.isfinite(values)]
        for step in (1, 4, 16):
            read = series_percentiles(_Slabs(values, step), [q, 100.0 - q], _Slabs(inside, step))
            assert read == [float(np.percentile(kept, q)), float(np.percentile(kept, 100.0 - q))]
            # Background zeros left out (MR/NM), unless almost nothing else is there.
            nonzero = values[np.isfinite(values) & (values != 0)]
            assert series_percentiles(_Slabs(values, step), [q], foreground=True) == [float(np.percentile(nonzero, q))]


def test_the_series_percentile_keeps_only_the_tails_it_needs():
    from dicomnode.fusion.prepare import _Tails

    tails = _Tails([0.5, 99.9], capacity=200_000)
    rng = np.random.default_rng(7)
    for _ in range(20):
        tails.add(rng.normal(size=10_000).astype(np.float32))
    assert tails.top[0].size <= 2 * tails.keep < 2_100 and tails.bottom[0].size <= 2 * tails.keep


def test_pet_suv_range_is_at_least_the_floor():
    suv, inside = _suv_series(3.0)
    cfg = FusionConfig()
    assert intensity_range(suv, "PT", "GML", cfg, inside=inside).high == cfg.pet_suv_max_floor == 5.0
    no_floor = cfg.model_copy(update={"pet_suv_max_floor": 0.0})
    assert intensity_range(suv, "PT", "GML", no_floor, inside=inside).high == pytest.approx(
        float(np.percentile(suv[inside], 99.9)), rel=1e-6)


def test_pet_fixed_suv_bound_and_other_units():
    suv = np.array([0.0, 5.0, 10.0, 20.0])
    fixed = FusionConfig(pet_suv_max=10.0)
    assert prepare_intensities(suv, "PT", "GML", fixed).tolist() == pytest.approx([0, 0.5, 1, 1])
    assert intensity_range(suv, "PT", "GML", fixed).describe() == "SUV 0-10"
    # Bq/ml and counts: the percentile alone, no SUV floor, also with a fixed SUV bound configured.
    counts = np.linspace(0, 1000, 1001)
    for cfg in (FusionConfig(), fixed):
        window = intensity_range(counts, "PT", "BQML", cfg)
        assert window.unit == "BQML" and window.high == pytest.approx(np.percentile(counts, 99.9))
    assert intensity_range(counts / 1000, "PT", "BQML", FusionConfig()).high < 1.0


def test_nm_percentiles_and_unsupported_modality():
    nm = np.linspace(0, 100, 101)
    assert prepare_intensities(nm, "NM", None, FusionConfig()).max() == 1
    with pytest.raises(UnsupportedModality, match="US"):
        prepare_intensities(nm, "US", None, FusionConfig())
