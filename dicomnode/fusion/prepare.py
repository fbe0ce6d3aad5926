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
from collections.abc import Iterator
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


def _parts(array, inside=None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(values, inside) slab by slab: ``array`` read on demand when it can (``slabs()``, e.g. ``OnFixedGrid``)."""
    if hasattr(array, "slabs"):
        masks = inside.slabs() if inside is not None and hasattr(inside, "slabs") else None
        start = 0
        for part in array.slabs():
            stop = start + part.shape[0]
            yield part, (next(masks) if masks is not None else None if inside is None else inside[start:stop])
            start = stop
    else:
        yield np.asarray(array), None if inside is None else np.asarray(inside)


class _Tails:
    """``np.percentile(values, qs)`` (numpy's linear method) of values seen part by part, in bounded memory.

    Only what each q can need is kept: for q >= 50 the largest values, else the smallest, as many as
    (1 - q/100) or q/100 of ``capacity`` (an upper bound on how many values there will be) plus two.
    For extreme percentiles of a whole-body grid (p99.9, p0.5) that is a few per thousand voxels.
    """

    def __init__(self, qs, capacity: int):
        self.qs = [float(q) for q in qs]
        self.count = 0
        share = max(min(q, 100.0 - q) for q in self.qs) / 100.0
        self.keep = int(math.ceil(share * max(int(capacity), 1))) + 2
        self.top: list[np.ndarray] = []
        self.bottom: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        values = values.ravel()
        self.count += values.size
        self.top = [self._trim(self.top + [values], largest=True)]
        self.bottom = [self._trim(self.bottom + [values], largest=False)]

    def _trim(self, parts: list[np.ndarray], largest: bool) -> np.ndarray:
        joined = np.concatenate(parts)
        if joined.size <= 2 * self.keep:
            return joined
        if largest:
            return np.partition(joined, joined.size - self.keep)[joined.size - self.keep:]
        return np.partition(joined, self.keep - 1)[:self.keep]

    def values(self) -> list[float] | None:
        """The percentiles, or None when no value was seen."""
        if not self.count:
            return None
        top, bottom = np.sort(self.top[0]), np.sort(self.bottom[0])
        out = []
        for q in self.qs:
            position = q / 100.0 * (self.count - 1)  # between ranks k and k + 1 (from 0)
            k = int(math.floor(position))
            k1 = min(k + 1, self.count - 1)
            if q >= 50:  # ranks counted from the top of the sorted tail
                a, b = top[top.size - self.count + k], top[top.size - self.count + k1]
            else:
                a, b = bottom[k], bottom[k1]
            t = position - k
            out.append(float(a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)))  # as numpy interpolates
        return out


def series_percentiles(array, qs, inside=None, *, foreground: bool = False) -> list[float] | None:
    """Percentiles ``qs`` of the finite values of a series (z, y, x), read slab by slab, in one pass.

    ``inside``: where to take them (boolean like ``array``, or read on demand likewise).
    ``foreground``: of the non-zero values only, unless fewer than 16 are non-zero (background zeros,
    typical of MR/NM outside the body, would drag the low percentile). None when nothing is left.
    """
    capacity = int(np.prod(array.shape))
    every, nonzero = _Tails(qs, capacity), _Tails(qs, capacity)
    for part, keep in _parts(array, inside):
        keep = np.isfinite(part) if keep is None else np.isfinite(part) & keep
        values = part[keep]
        every.add(values)
        if foreground:
            nonzero.add(values[values != 0])
    return nonzero.values() if foreground and nonzero.count >= 16 else every.values()


def _percentile_range(array, low_pct: float, high_pct: float) -> tuple[float, float]:
    found = series_percentiles(array, (low_pct, high_pct), foreground=True)
    if found is None:
        return 0.0, 1.0
    low, high = found
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


def intensity_range(array, modality: str, units: str | None, fusion_config,
                    body_part: str | None = None, inside=None) -> DisplayRange:
    """The series-wide range ``prepare_intensities`` maps to [0, 1] (one scale for every slice).

    ``array``: the series' values (z, y, x), or an object that yields them slab by slab (``slabs()``).
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


def _pet_range(array, inside, cfg, is_suv: bool, units: str | None) -> DisplayRange:
    """0 .. the series' pet_percentile inside its field of view; in SUV at least pet_suv_max_floor."""
    high = (series_percentiles(array, (cfg.pet_percentile,), inside) or [0.0])[0]
    rule = f"p{cfg.pet_percentile:g} of the series" + (" in its field of view" if inside is not None else "")
    if is_suv:
        high, rule = max(high, cfg.pet_suv_max_floor), f"{rule}, at least {cfg.pet_suv_max_floor:g}"
    return DisplayRange(0.0, high if high > 0 else 1.0, "SUV" if is_suv else (units or "counts").upper(),
                        "percentile", rule)


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

