"""Intensity preparation per modality: stored values -> [0, 1] before fusion.

CT: a fixed window in HU (soft tissue, or brain for head body parts; configurable).
MR: robust percentiles (low, high) of the non-zero voxels.
PT: 0 up to a percentile of the series inside its field of view (in SUV at least a floor: the reader's
viewer range), or a fixed SUV bound.
NM: percentiles of the non-zero voxels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from dicomnode.log import event

log = logging.getLogger(__name__)

# Body parts (DICOM BodyPartExamined, upper case) that get the brain window for CT.
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "HEADNECK"})


class UnsupportedModality(ValueError):
    """A modality the fusion engine cannot prepare (only CT, MR, PT, NM are supported)."""


def _window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    low = center - width / 2
    return np.clip((array - low) / max(width, 1e-6), 0.0, 1.0)


def _percentile_range(array: np.ndarray, low_pct: float, high_pct: float) -> tuple[float, float]:
    # Background (exact zeros, typical of MR/NM outside the body) would drag the low percentile.
    values = array[np.isfinite(array)]
    foreground = values[values != 0]
    if foreground.size >= 16:
        values = foreground
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [low_pct, high_pct])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def _scale(array: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((array - low) / (high - low), 0.0, 1.0)


@dataclass(frozen=True)
class DisplayRange:
    """The stored values mapped to 0 and 1 for fusion, and what they are: ``unit`` (e.g. "SUV", "HU")."""

    low: float
    high: float
    unit: str
    kind: str  # "window" (CT), "fixed" (PET SUV bound), "percentile"
    rule: str = ""  # how a range taken from the series was chosen, for DerivationDescription

    def describe(self) -> str:
        """e.g. "SUV 0-16.7", "HU -160-240", "0-1198" (values, in the unit when it has one)."""
        # Three significant digits of the span: an MR p0.5 of 0.000717 below 1038 reads 0.
        decimals = max(0, 2 - math.floor(math.log10(max(self.high - self.low, 1e-12))))
        text = f"{round(self.low, decimals):g}-{round(self.high, decimals):g}"
        return f"{self.unit} {text}" if self.unit else text


def intensity_range(array: np.ndarray, modality: str, units: str | None, fusion_config,
                    body_part: str | None = None, inside: np.ndarray | None = None) -> DisplayRange:
    """The series-wide range ``prepare_intensities`` maps to [0, 1] (one scale for every slice).

    ``inside``: boolean like ``array``, where the moving image has data (its field of view on the
    fixed grid); PET's percentile is taken there, zeros included, as a viewer takes it on the PET.
    """
    modality = modality.upper()
    cfg = fusion_config
    if modality == "CT":
        head = (body_part or "").upper().replace(" ", "") in HEAD_BODY_PARTS
        center, width = cfg.ct_brain_window if head else cfg.ct_window
        event(log, "prepare", logging.DEBUG, modality="CT", center=center, width=width)
        return DisplayRange(center - width / 2, center + width / 2, "HU", "window")
    if modality == "MR":
        return DisplayRange(*_percentile_range(array, *cfg.mr_percentiles), "", "percentile")
    if modality == "PT":
        is_suv = (units or "").upper() in {"GML", "SUV", "SUVBW", "G/ML"}
        event(log, "prepare", logging.DEBUG, modality="PT", units=units, suv=is_suv)
        if is_suv and cfg.pet_suv_max > 0:
            return DisplayRange(0.0, float(cfg.pet_suv_max), "SUV", "fixed")
        return _pet_range(array, inside, cfg, is_suv, units)
    if modality == "NM":
        return DisplayRange(*_percentile_range(array, *cfg.nm_percentiles), "counts", "percentile")
    raise UnsupportedModality(f"cannot prepare modality {modality!r} for fusion (supported: CT, MR, PT, NM)")


def _pet_range(array: np.ndarray, inside: np.ndarray | None, cfg, is_suv: bool, units: str | None) -> DisplayRange:
    """0 .. the series' pet_percentile inside its field of view; in SUV at least pet_suv_max_floor."""
    high = series_percentile(array, cfg.pet_percentile, inside)
    rule = f"p{cfg.pet_percentile:g} of the series" + (" in its field of view" if inside is not None else "")
    if is_suv:
        high, rule = max(high, cfg.pet_suv_max_floor), f"{rule}, at least {cfg.pet_suv_max_floor:g}"
    return DisplayRange(0.0, high if high > 0 else 1.0, "SUV" if is_suv else (units or "counts").upper(),
                        "percentile", rule)


def series_percentile(array: np.ndarray, q: float, inside: np.ndarray | None = None, slices: int = 16,
                      bins: int = 1024) -> float:
    """``np.percentile(array[inside], q)`` of the finite values (0 if none), read ``slices`` slices at a time.

    No copy of the series: a count per value bin finds the bin that holds the rank, then only the
    values from that bin up are sorted (for p99.9 a few per thousand). ``array`` (z, y, x).
    """
    def parts():
        for z in range(0, array.shape[0], slices):
            part = np.asarray(array[z:z + slices])
            keep = np.isfinite(part) if inside is None else np.isfinite(part) & inside[z:z + slices]
            yield part[keep]

    n, low, high = 0, np.inf, -np.inf
    for values in parts():
        if values.size:
            n, low, high = n + values.size, min(low, float(values.min())), max(high, float(values.max()))
    if n == 0:
        return 0.0
    scale = bins / (high - low) if high > low else 0.0

    def bin_of(values: np.ndarray) -> np.ndarray:  # one rule for counting and for gathering
        return np.minimum(((values - low) * scale).astype(np.int64), bins - 1)

    counts = np.zeros(bins, np.int64)
    for values in parts():
        counts += np.bincount(bin_of(values), minlength=bins)
    position = q / 100.0 * (n - 1)  # numpy's "linear" method: between ranks k and k + 1 (from 0)
    k = int(np.floor(position))
    first = int(np.searchsorted(np.cumsum(counts), k + 1))  # the bin holding rank k
    below = int(counts[:first].sum())
    top = np.sort(np.concatenate([values[bin_of(values) >= first] for values in parts()]))
    a, b, t = top[k - below], top[min(k + 1, n - 1) - below], position - k
    return float(a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t))  # as numpy interpolates, in their dtype


def prepare_intensities(array: np.ndarray, modality: str, units: str | None, fusion_config, body_part: str | None = None) -> np.ndarray:
    """Map stored intensities (any shape, e.g. (z, y, x)) to float32 in [0, 1] for fusion.

    ``units``: PET Units (``BQML``, ``CNTS``, ``GML`` for SUV body weight...); values are
    taken as SUV when units is ``GML`` or ``SUV``. ``fusion_config`` is a ``FusionConfig``.
    CT is windowed (values outside clip); the other modalities are scaled by ``intensity_range``.
    """
    array = np.asarray(array, dtype=np.float32)
    return apply_range(array, intensity_range(array, modality, units, fusion_config, body_part))


def apply_range(array: np.ndarray, window: DisplayRange) -> np.ndarray:
    """``array`` mapped to float32 [0, 1] by a series-wide ``window`` (any slab of the series alike)."""
    array = np.asarray(array, dtype=np.float32)
    if window.kind == "window":
        return _window(array, (window.low + window.high) / 2, window.high - window.low).astype(np.float32)
    return _scale(array, window.low, window.high).astype(np.float32)

