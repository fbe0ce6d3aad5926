"""Which slices of a fused series are scored when the quality check is limited to a number of slices.

The per-slice metrics stay the published 2-D ones on whole slices; only the set of slices shrinks,
so a series value remains the mean of literature-comparable per-slice values. The selection is
stratified: the slices with content are cut into ``max_slices`` runs of consecutive slices, one
slice is taken from each run (its middle one), and the run holding the slice with the most
moving-image signal takes that slice instead, so the functional peak (e.g. a PET hot spot) is
always scored. The choice depends only on the images, never on a random draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SliceSelection:
    """Slice indices (into the series, ascending) to score, and those skipped for having no content."""

    scored: list[int]
    blank: list[int]  # both sources constant: nothing to score
    peak: int | None  # the content slice with the largest moving-image sum; None when no slice has content


def stratified_pick(candidates: list[int], count: int, keep: int | None = None) -> list[int]:
    """``count`` of ``candidates`` (ascending): the middle of each of ``count`` equal runs; ``keep`` replaces its run's pick.

    ``count`` <= 0 or >= len(candidates) keeps them all.
    """
    m = len(candidates)
    if count <= 0 or count >= m:
        return list(candidates)
    pos = candidates.index(keep) if keep in candidates else -1
    picks = []
    for j in range(count):
        lo, hi = j * m // count, (j + 1) * m // count  # run j: positions lo..hi-1, never empty as count < m
        picks.append(keep if lo <= pos < hi else candidates[(lo + hi - 1) // 2])
    return picks


def select_slices(a: np.ndarray, b: np.ndarray, max_slices: int = 0) -> SliceSelection:
    """The slices of (N, H, W) fixed ``a`` and moving ``b`` to score; ``max_slices`` 0 scores every slice with content.

    A slice has content unless both sources are constant on it (blank slices beyond the body).
    """
    if not a.shape[0]:
        return SliceSelection([], [], None)
    flat = (np.ptp(a, axis=(1, 2)) == 0) & (np.ptp(b, axis=(1, 2)) == 0)
    return select_from_profile(flat, b.sum(axis=(1, 2), dtype=np.float64), max_slices)


def select_from_profile(flat: np.ndarray, signal: np.ndarray, max_slices: int = 0) -> SliceSelection:
    """``select_slices`` from per-slice facts gathered slab by slab: ``flat`` (both sources constant)
    and ``signal`` (the moving image's sum), so a streamed series is sampled as a whole one is."""
    flat, signal = np.asarray(flat, dtype=bool), np.asarray(signal, dtype=np.float64)
    content = [int(i) for i in np.flatnonzero(~flat)]
    blank = [int(i) for i in np.flatnonzero(flat)]
    if not content:
        return SliceSelection([], blank, None)
    peak = content[int(np.argmax(signal[content]))]  # first of equal maxima: deterministic
    return SliceSelection(stratified_pick(content, max_slices, keep=peak), blank, peak)
