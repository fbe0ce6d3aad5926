"""Fusion quality metrics of sources A, B and fused F, per slice and per series.

Conventions (defaults; each is an option of ``compute_metrics``): images on 0..255; F rounded half
away from zero to 8 bits and clipped to 0..255 before scoring; colour images scored on BT.601
luminance; MI in bits; SSIM and PSNR's MSE averaged over the two sources; VIF summed over them.
The formula, parameters and direction of every metric are in docs/metrics.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from dicomnode.domain import luma
from dicomnode.log import event
from dicomnode.quality import basic, information, perceptual, stack, structural
from dicomnode.quality.fsim import fsim
from dicomnode.quality.names import DEFAULT_SERIES_METRICS, DIRECTIONS, METRIC_NAMES
from dicomnode.quality.sampling import select_slices

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "METRIC_NAMES",
    "DEFAULT_SERIES_METRICS",
    "MetricInfo",
    "MetricOptions",
    "CONVENTIONS",
    "SeriesQuality",
    "MetricInputError",
    "compute_metrics",
    "convention_options",
    "score_series",
    "to_luminance",
    "round_half_away",
    "threshold_failures",
]


class MetricInputError(ValueError):
    """The images cannot be scored together (shape, dimensionality or an unknown metric name)."""


@dataclass(frozen=True)
class MetricOptions:
    """Conventions that published tables disagree on; the defaults are this project's pinned ones."""

    round_fused: bool = True  # round F half away from zero to 0..255 integers before scoring
    round_luma: bool = True  # colour inputs: BT.601 luma rounded to 8 bits (as stored in YCbCr)
    mi_unit: str = "bits"  # "bits" or "nats" for MI
    ssim_combine: str = "mean"  # "mean" or "sum" of SSIM(A,F) and SSIM(B,F)
    # "gaussian": 11x11 Gaussian window (Wang 2004); "skimage": scikit-image's defaults as CDDFuse's
    # evaluator calls them on 0..255 floats (7x7 uniform window, data range 2: the range old releases
    # assumed for float images, which makes the stabilising constants vanish).
    ssim_window: str = "gaussian"
    psnr_peak: float | str = 255.0  # a number, or "max" for max(F)
    vif_combine: str = "sum"  # "sum" or "mean" of VIFp(A,F) and VIFp(B,F)
    vif_sigma_nsq: float = 2.0
    fmi_window: int = 3
    saliency: np.ndarray | None = None  # DFRS: saliency map in [0, 1], same shape as F
    mask: np.ndarray | None = None  # DFRS: diagnostic-feature mask (e.g. SUV above a threshold)

    def __post_init__(self) -> None:
        checks = {
            "mi_unit": (self.mi_unit, ("bits", "nats")),
            "ssim_combine": (self.ssim_combine, ("mean", "sum")),
            "ssim_window": (self.ssim_window, ("gaussian", "skimage")),
            "vif_combine": (self.vif_combine, ("mean", "sum")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise MetricInputError(f"{key} must be one of {allowed}, not {value!r}")
        if isinstance(self.psnr_peak, str) and self.psnr_peak != "max":
            raise MetricInputError("psnr_peak must be a number or 'max'")


# Named sets of MetricOptions, so tables compare with published ones. "dicomnode" is the default;
# "cddfuse" is CDDFuse's (CVPR 2023) evaluation: MI in nats (sklearn's mutual_info_score on 8-bit
# images), SSIM (scikit-image's, as its evaluator calls it) and VIFp summed over the two sources, grey
# images as BT.601 luma in 8 bits.
CONVENTIONS: dict[str, dict[str, object]] = {
    "dicomnode": {},
    "cddfuse": {"mi_unit": "nats", "ssim_combine": "sum", "ssim_window": "skimage", "vif_combine": "sum",
                "round_fused": True, "round_luma": True},
}


def convention_options(name: str) -> dict[str, object]:
    """The MetricOptions fields of a named convention; MetricInputError for an unknown name."""
    if name not in CONVENTIONS:
        raise MetricInputError(f"unknown conventions {name!r}; known: {', '.join(CONVENTIONS)}")
    return dict(CONVENTIONS[name])


class _Scoring:
    """One (A, B, F) triple with its options and a cache for values several metrics share."""

    def __init__(self, a: np.ndarray, b: np.ndarray, f: np.ndarray, options: MetricOptions):
        self.a, self.b, self.f, self.options = a, b, f, options
        self._cache: dict[str, float] = {}

    def cached(self, key: str, compute: Callable[[], float]) -> float:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def ssim_pair(self) -> tuple[float, float]:
        ssim = structural.ssim if self.options.ssim_window == "gaussian" else structural.ssim_skimage
        return (
            self.cached("ssim_a", lambda: ssim(self.a, self.f)),
            self.cached("ssim_b", lambda: ssim(self.b, self.f)),
        )

    def mse_mean(self) -> float:
        return self.cached("mse", lambda: (basic.mse(self.a, self.f) + basic.mse(self.b, self.f)) / 2)

    def epi(self) -> float:
        return self.cached(
            "epi", lambda: (basic.edge_preservation(self.a, self.f) + basic.edge_preservation(self.b, self.f)) / 2
        )

    def fsim(self) -> float:
        return self.cached("fsim", lambda: (fsim(self.a, self.f) + fsim(self.b, self.f)) / 2)


def _mi(s: _Scoring) -> float:
    base = 2.0 if s.options.mi_unit == "bits" else float(np.e)
    return basic.mutual_information(s.a, s.f, base=base) + basic.mutual_information(s.b, s.f, base=base)


def _ssim(s: _Scoring) -> float:
    pair = s.ssim_pair()
    return sum(pair) / (2 if s.options.ssim_combine == "mean" else 1)


def _psnr(s: _Scoring) -> float:
    peak = float(s.f.max()) if s.options.psnr_peak == "max" else float(s.options.psnr_peak)
    return basic.psnr_from_mse(s.mse_mean(), peak)


def _vif(s: _Scoring) -> float:
    sig = s.options.vif_sigma_nsq
    total = structural.vifp(s.a, s.f, sig) + structural.vifp(s.b, s.f, sig)
    return total / (2 if s.options.vif_combine == "mean" else 1)


def _fmi(feature: str) -> Callable[[_Scoring], float]:
    return lambda s: information.fmi(s.a, s.b, s.f, feature=feature, window=s.options.fmi_window)


def soft_overlap(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Soft Dice 2 sum(s m) / (sum s + sum m) of a [0, 1] saliency map and a binary mask; 1 when both are empty."""
    s = np.clip(np.asarray(saliency, dtype=np.float64), 0, 1)
    m = np.asarray(mask, dtype=bool).astype(np.float64)
    den = s.sum() + m.sum()
    return 1.0 if den == 0 else float(2 * (s * m).sum() / den)


def _dfrs(s: _Scoring) -> float:
    o = s.options
    if o.saliency is None or o.mask is None:
        return float("nan")  # defined only when the caller supplies a saliency map and a feature mask
    if np.shape(o.saliency) != s.f.shape or np.shape(o.mask) != s.f.shape:
        raise MetricInputError(f"DFRS saliency and mask must have the image shape {s.f.shape}")
    ssim_value = sum(s.ssim_pair()) / 2
    return 100.0 * (0.35 * ssim_value + 0.25 * s.epi() + 0.20 * s.fsim() + 0.20 * soft_overlap(o.saliency, o.mask))


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric: its key, whether higher is better, and how to compute it."""

    name: str
    higher_is_better: bool
    compute: Callable[[_Scoring], float]


_COMPUTE: dict[str, Callable[[_Scoring], float]] = {
    "EN": lambda s: basic.entropy(s.f),
    "SD": lambda s: basic.standard_deviation(s.f),
    "SF": lambda s: basic.spatial_frequency(s.f),
    "AG": lambda s: basic.average_gradient(s.f),
    "MI": _mi,
    "SSIM": _ssim,
    "SSIM_A": lambda s: s.ssim_pair()[0],
    "SSIM_B": lambda s: s.ssim_pair()[1],
    "MSE": lambda s: s.mse_mean(),
    "PSNR": _psnr,
    "CC": lambda s: (basic.correlation(s.a, s.f) + basic.correlation(s.b, s.f)) / 2,
    "SCD": lambda s: basic.scd(s.a, s.b, s.f),
    "Qabf": lambda s: perceptual.qabf(s.a, s.b, s.f),
    "VIF": _vif,
    "VIFF": lambda s: structural.viff(s.a, s.b, s.f),
    "FMI_pixel": _fmi("pixel"),
    "FMI_dct": _fmi("dct"),
    "FMI_w": _fmi("wavelet"),
    "FMI_gradient": _fmi("gradient"),
    "Qcb": lambda s: perceptual.qcb(s.a, s.b, s.f),
    "Qcv": lambda s: perceptual.qcv(s.a, s.b, s.f),
    "QNCIE": lambda s: information.qncie(s.a, s.b, s.f),
    "EPI": lambda s: s.epi(),
    "FSIM": lambda s: s.fsim(),
    "DFRS": _dfrs,
    "Kept": lambda s: basic.functional_kept(s.a, s.b, s.f),
}

METRICS: dict[str, MetricInfo] = {n: MetricInfo(n, DIRECTIONS[n], _COMPUTE[n]) for n in METRIC_NAMES}


def to_luminance(rgb: np.ndarray, axis: int = -1) -> np.ndarray:
    """BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B along ``axis`` (3 channels), same scale as the input."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape[axis] != 3:
        raise MetricInputError(f"colour images need 3 channels on axis {axis}, got shape {rgb.shape}")
    r, g, b = np.moveaxis(rgb, axis, 0)
    return luma(r, g, b)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (MATLAB/8-bit convention; numpy's round is half to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _as_grey(x: np.ndarray, what: str, round_luma: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = to_luminance(x)
        if round_luma:
            x = round_half_away(x)
    if x.ndim != 2:
        raise MetricInputError(f"{what} must be a 2-D image (or H x W x 3 colour), got shape {x.shape}")
    return x


def _names(names: Iterable[str] | None) -> list[str]:
    chosen = list(METRIC_NAMES if names is None else names)
    unknown = [n for n in chosen if n not in METRICS]
    if unknown:
        raise MetricInputError(f"unknown metric names {unknown}; known: {', '.join(METRIC_NAMES)}")
    return chosen


def compute_metrics(a: np.ndarray, b: np.ndarray, f: np.ndarray, names: Iterable[str] | None = None, **options) -> dict[str, float]:
    """Metrics of sources ``a``, ``b`` and fused ``f`` (2-D, 0..255; H x W x 3 colour is scored on luminance).

    ``names``: metric keys (default: all of METRIC_NAMES); ``options``: fields of MetricOptions.
    Returns {name: value} in the order asked; NaN where a metric is undefined for these images.
    """
    opts = MetricOptions(**options)
    a, b, f = (_as_grey(x, w, opts.round_luma) for x, w in ((a, "A"), (b, "B"), (f, "F")))
    if not a.shape == b.shape == f.shape:
        raise MetricInputError(f"A, B and F must have one shape, got {a.shape}, {b.shape}, {f.shape}")
    if opts.round_fused:
        f = np.clip(round_half_away(f), 0, 255)
    scoring = _Scoring(a, b, f, opts)
    return {n: float(METRICS[n].compute(scoring)) for n in _names(names)}


@dataclass
class SeriesQuality:
    """Metrics of one fused series: one dict per slice (NaN values for slices not scored) and their mean."""

    names: list[str]
    per_slice: list[dict[str, float]]
    summary: dict[str, float]
    skipped: list[int] = field(default_factory=list)  # slice indices with no content in either source
    elapsed_s: float = 0.0
    scored_slices: list[int] = field(default_factory=list)  # the slices the summary averages, ascending

    @property
    def scored(self) -> int:
        return len(self.scored_slices)


def _slice_option(value, i: int, n: int):
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[0] == n:
        return value[i]
    return value


# Metrics with a whole-stack implementation (stack.py); the rest are scored slice by slice.
_STACKED = ("EN", "MI", "SSIM", "SSIM_A", "SSIM_B", "Qabf", "VIF")
# Slices per stacked call are capped by pixel count: a few slices per call amortise the fixed cost
# per call while the working arrays stay in the CPU cache (measured fastest near 64 k pixels).
_STACK_PIXELS = 1 << 16


def _score_stack(a: np.ndarray, b: np.ndarray, f: np.ndarray, names: list[str], opts: MetricOptions) -> dict[str, np.ndarray]:
    """Per-slice values of the stacked metrics in ``names`` for (N, H, W) a, b and (already rounded) f."""
    out: dict[str, np.ndarray] = {}
    if "EN" in names:
        out["EN"] = stack.entropy_stack(f)
    if "MI" in names:
        joint = stack._JointHistograms(f)
        base = 2.0 if opts.mi_unit == "bits" else float(np.e)
        out["MI"] = joint.mutual_information(a, base) + joint.mutual_information(b, base)
    if {"SSIM", "SSIM_A", "SSIM_B"} & set(names):
        if opts.ssim_window == "gaussian":
            sa, sb = stack.ssim_stack([a, b], f)
        else:
            sa, sb = (np.array([structural.ssim_skimage(x[i], f[i]) for i in range(len(f))]) for x in (a, b))
        out["SSIM_A"], out["SSIM_B"] = sa, sb
        out["SSIM"] = (sa + sb) / (2 if opts.ssim_combine == "mean" else 1)
    if "Qabf" in names:
        out["Qabf"] = stack.qabf_stack(a, b, f)
    if "VIF" in names:
        va, vb = stack.vifp_stack([a, b], f, opts.vif_sigma_nsq)
        out["VIF"] = (va + vb) / (2 if opts.vif_combine == "mean" else 1)
    return out


def score_series(
    a: np.ndarray, b: np.ndarray, f: np.ndarray, names: Iterable[str] | None = None, *, max_slices: int = 0, **options
) -> SeriesQuality:
    """Score a fused series slice by slice. a, b (moving), f: (N, H, W) on 0..255, slice index first.

    A slice where both sources are constant (blank slices beyond the body) is skipped. ``max_slices``
    > 0 scores at most that many of the others, spread through the series and always including the
    one with the most moving-image signal (sampling.select_slices). A slice not scored has NaN in
    its dict. The summary is the mean over the scored slices of each metric, ignoring NaN values;
    NaN when no slice was scored. Saliency and mask options may be (N, H, W) and are then taken
    per slice. EN, MI, SSIM, Qabf and VIF are computed on many slices at once (stack.py) and equal
    compute_metrics on each slice to rounding.
    """
    chosen = _names(DEFAULT_SERIES_METRICS if names is None else names)
    # Only the slices scored are converted to float64: a whole-body series is never copied whole.
    a, b, f = (np.asarray(v) for v in (a, b, f))
    if a.ndim != 3 or not a.shape == b.shape == f.shape:
        raise MetricInputError(f"series must be (N, H, W) of one shape, got {a.shape}, {b.shape}, {f.shape}")
    if max_slices < 0:
        raise MetricInputError(f"max_slices must be 0 (every slice) or more, not {max_slices}")
    start = time.perf_counter()
    n = a.shape[0]
    selection = select_slices(a, b, max_slices)
    scored_idx = np.asarray(selection.scored, dtype=np.intp)
    table = np.full((n, len(chosen)), np.nan)
    stacked = [m for m in chosen if m in _STACKED]
    per_slice_names = [m for m in chosen if m not in _STACKED]
    if stacked and scored_idx.size:
        opts = MetricOptions(**{k: v for k, v in options.items() if k not in ("saliency", "mask")})
        step = max(1, _STACK_PIXELS // max(1, a[0].size))
        for lo in range(0, scored_idx.size, step):
            idx = scored_idx[lo : lo + step]
            ai, bi, fi = (np.asarray(v[idx], dtype=np.float64) for v in (a, b, f))
            fi = np.clip(round_half_away(fi), 0, 255) if opts.round_fused else fi
            values = _score_stack(ai, bi, fi, stacked, opts)
            for m in stacked:
                table[idx, chosen.index(m)] = values[m]
    if per_slice_names:
        for i in scored_idx:
            opts_i = {k: _slice_option(v, int(i), n) for k, v in options.items()}
            row = compute_metrics(a[i], b[i], f[i], per_slice_names, **opts_i)
            for m in per_slice_names:
                table[i, chosen.index(m)] = row[m]
    per_slice = [dict(zip(chosen, (float(v) for v in row), strict=True)) for row in table]
    elapsed = time.perf_counter() - start
    event(log, "series_scored", slices=n, scored=int(scored_idx.size), blank=len(selection.blank), metrics=",".join(chosen),
          seconds=round(elapsed, 3))
    return SeriesQuality(chosen, per_slice, _means(chosen, table[scored_idx]), selection.blank, elapsed,
                         selection.scored)


def _means(names: list[str], scored: np.ndarray) -> dict[str, float]:
    """The series value of each metric: the mean over the scored slices (rows), ignoring NaN values."""
    with np.errstate(all="ignore"):
        means = [float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in scored.T]
    return dict(zip(names, means, strict=True))


def slices_per_call(plane: tuple[int, ...]) -> int:
    """How many slices of this (H, W) ``score_series`` scores in one stacked call.

    Scoring a series in parts of a multiple of this gives the values of scoring it at once
    (``joined_quality``): the slices are grouped the same way.
    """
    return max(1, _STACK_PIXELS // max(1, int(np.prod(plane))))


def joined_quality(parts: list[SeriesQuality]) -> SeriesQuality:
    """Consecutive parts of one series, each scored by ``score_series``, as the series' quality."""
    if not parts:
        raise MetricInputError("no scored parts to join")
    names = parts[0].names
    per_slice, skipped, scored, offset = [], [], [], 0
    for part in parts:
        per_slice += part.per_slice
        skipped += [offset + i for i in part.skipped]
        scored += [offset + i for i in part.scored_slices]
        offset += len(part.per_slice)
    table = np.array([[row[m] for m in names] for row in per_slice], dtype=np.float64).reshape(len(per_slice), -1)
    return SeriesQuality(names, per_slice, _means(names, table[np.asarray(scored, dtype=np.intp)]), skipped,
                         sum(p.elapsed_s for p in parts), scored)


def threshold_failures(summary: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """Names whose value is worse than its threshold: below it (higher is better) or above it (lower is better).

    A NaN value fails its threshold (the quality could not be shown).
    """
    failed = []
    for name, limit in thresholds.items():
        value = summary.get(name, float("nan"))
        higher = DIRECTIONS.get(name, True)
        if not np.isfinite(value) and not np.isinf(value) or (value < limit if higher else value > limit):
            failed.append(name)
    return failed
