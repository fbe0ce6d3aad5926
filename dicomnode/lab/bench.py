"""The fusion benchmark (``dicomnode bench``): run fusion methods over folders of registered 2-D pairs and compare them.

A folder holds ``<id>_<MOD>.png`` pairs (AANLIB layout); the anatomical image is fixed (A), the
other moving (B). Colour functional images are fused on luminance by the fusion engine; all
metrics are scored on 8-bit BT.601 luma of A, B and the fused image F (see docs/metrics.md).
Outputs in ``--out``: per-pair ``metrics.csv``, ``summary.json`` (mean +- SD, 95% CI, paired tests
against the reference, Friedman / RM-ANOVA), ``table.md``, box plots and example figures.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomnode.log import event
from dicomnode.quality.metrics import METRIC_NAMES, compute_metrics, convention_options, round_half_away, to_luminance

log = logging.getLogger(__name__)

EXAMPLES_PER_TASK = 3


class BenchError(RuntimeError):
    """The benchmark cannot run (no pairs, unknown method, fusion engine missing)."""


@dataclass
class BenchRow:
    """Metrics of one method on one pair."""

    task: str
    pair_id: str
    method: str
    metrics: dict[str, float]
    fuse_s: float
    score_s: float


@dataclass
class Example:
    """Images of one pair for the side-by-side figure: A grey, B grey or RGB (H, W, 3), fused per method."""

    task: str
    pair_id: str
    a: np.ndarray
    b: np.ndarray
    fused: dict[str, np.ndarray] = field(default_factory=dict)


def _to_8bit(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> 0..255 integers in float64, rounded half away from zero (as images are saved)."""
    return np.clip(round_half_away(np.clip(x, 0, 1) * 255.0), 0, 255)


def _luma(img: np.ndarray) -> np.ndarray:
    """(3, H, W) or (H, W) 0..255 -> 8-bit BT.601 luma (H, W)."""
    return round_half_away(to_luminance(img, axis=0)) if img.ndim == 3 else img


def list_methods(requested: str | None) -> list[str]:
    try:
        from dicomnode.fusion.api import available_methods
    except ImportError as exc:  # the fusion engine is not installed in this build
        raise BenchError(f"the fusion engine is not available ({exc})") from exc
    known = list(available_methods())
    if not requested:
        return known
    methods = [m.strip() for m in requested.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise BenchError(f"unknown fusion methods {unknown}; available: {', '.join(known)}")
    return methods


def _engines(methods: list[str], device: str) -> dict[str, object]:
    from dicomnode.fusion.api import FusionEngine

    engines = {}
    for m in methods:
        try:
            engines[m] = FusionEngine(m, device=device)
        except Exception as exc:  # noqa: BLE001 - e.g. missing network weights: bench the others
            event(log, "bench_method_skipped", logging.WARNING, method=m, reason=str(exc)[:200])
    if not engines:
        raise BenchError("none of the requested fusion methods could be started")
    return engines


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items evenly spaced over the sorted list, so a limited run still covers every case."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, limit)).astype(int))
    return [items[i] for i in idx]


def feature_mask(moving: np.ndarray, threshold: float) -> np.ndarray:
    """Diagnostic-feature proxy for 2-D pairs: moving luma (0..255) at or above ``threshold`` x 255."""
    return moving >= threshold * 255.0


def run_bench(
    folders: list[Path],
    methods: list[str],
    device: str = "auto",
    limit: int | None = None,
    names: list[str] | None = None,
    feature_threshold: float = 0.5,
    progress: bool = True,
    conventions: str = "dicomnode",
) -> tuple[list[BenchRow], list[Example]]:
    """Fuse every pair of every folder with every method and score it; rows in (task, pair, method) order.

    ``conventions``: a name of ``quality.metrics.CONVENTIONS`` (MI unit, SSIM/VIF combination).
    """
    import torch
    from tqdm import tqdm

    from dicomnode.fusion.images import find_pairs, load_image

    names = list(names or METRIC_NAMES)
    options = convention_options(conventions)
    work = []
    for folder in folders:
        if not folder.is_dir():
            raise BenchError(f"{folder} is not a folder")
        pairs, problems = find_pairs(folder)
        for problem in problems:
            event(log, "bench_pair_skipped", logging.WARNING, folder=folder.name, problem=problem)
        work += [(folder.name, p) for p in spread(pairs, limit)]
    if not work:
        raise BenchError(f"no <id>_<MOD> image pairs found in {', '.join(str(f) for f in folders)}")
    engines = _engines(methods, device)
    rows: list[BenchRow] = []
    examples: list[Example] = []
    per_task: dict[str, int] = {}
    bar = tqdm(total=len(work) * len(engines), desc="bench", unit="fusion", disable=not progress, file=sys.stderr)
    for task, pair in work:
        fixed, moving = load_image(pair.fixed), load_image(pair.moving)
        a = _to_8bit(fixed.grey)
        b_img = _to_8bit(moving.rgb) if moving.rgb is not None else _to_8bit(moving.grey)
        b = _luma(b_img)
        mask = feature_mask(b, feature_threshold)
        fixed_t = torch.from_numpy(fixed.grey)[None, None]
        moving_t = torch.from_numpy(moving.rgb if moving.rgb is not None else moving.grey[None])[None]
        keep = per_task.get(task, 0) < EXAMPLES_PER_TASK
        if keep:
            per_task[task] = per_task.get(task, 0) + 1
            examples.append(Example(task, pair.pair_id, a, b_img.transpose(1, 2, 0) if b_img.ndim == 3 else b_img))
        for method, engine in engines.items():
            bar.set_postfix_str(f"{task} {pair.pair_id} {method}")
            t0 = time.perf_counter()
            result = engine.fuse(fixed_t, moving_t)
            t1 = time.perf_counter()
            fused = _to_8bit(result.fused[0].numpy().astype(np.float64))
            saliency = None if result.saliency is None else result.saliency[0].numpy().astype(np.float64)
            f = _luma(fused if fused.shape[0] == 3 else fused[0])
            values = compute_metrics(a, b, f, names, saliency=saliency, mask=mask if saliency is not None else None,
                                     **options)
            rows.append(BenchRow(task, pair.pair_id, method, values, t1 - t0, time.perf_counter() - t1))
            if keep:
                examples[-1].fused[method] = fused.transpose(1, 2, 0) if fused.shape[0] == 3 else fused[0]
            bar.update(1)
    bar.close()
    event(log, "bench_done", pairs=len(work), methods=len(engines), rows=len(rows))
    return rows, examples
