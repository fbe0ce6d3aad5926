"""Slab processing equals whole-series processing, and each output references its own sources."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.config import Config, PairingRule
from dicomnode.dicomio.derived import overlapping_slices
from dicomnode.imaging.volume import load_series
from dicomnode.pipeline import JobInputs, process_job
from dicomnode.slabs import slab_bounds
from dicomnode.store.spool import Spool
from dicomnode.testing.study import write_synthetic_study
from tests.test_pipeline import _ref


def _run(tmp: Path, paths, job_id: int, method: str, slab_slices: int, batch_size: int):
    config = Config(registration={"mode": "never"}, processing={"slab_slices": slab_slices},
                    fusion={"batch_size": batch_size})
    inputs = JobInputs(job_id=job_id, rule=PairingRule(fixed="CT", moving="PT"), method=method,
                       fixed=_ref(paths["CT"]), moving=_ref(paths["PT"]), fixed_files=paths["CT"],
                       moving_files=paths["PT"], config=config, spool=Spool(tmp / f"spool{job_id}"))
    return process_job(inputs)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slabs")
    return tmp, write_synthetic_study(tmp / "in", modalities=("CT", "PT"), shape=(11, 40, 40), seed=7)


def _by_kind(output) -> dict[str, list[pydicom.Dataset]]:
    return {s.kind: [pydicom.dcmread(f) for f in s.files] for s in output.series}


def _same_numbers(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(
        (math.isnan(x[k]) and math.isnan(y[k])) or x[k] == y[k] for k in x)


def test_slab_bounds_are_whole_batches_and_cover_the_series():
    assert slab_bounds(11, 3, 16) == (3, [(0, 3), (3, 6), (6, 9), (9, 11)])
    assert slab_bounds(11, 1000, 3) == (3, [(0, 11)])
    assert slab_bounds(10, 7, 2) == (2, [(0, 6), (6, 10)])


@pytest.mark.parametrize("method", ["network", "chroma"])
def test_slabs_of_three_equal_the_whole_series(study, method):
    tmp, paths = study
    # The same fusion batches either way (3 slices): only the slab size differs.
    slabbed = _run(tmp, paths, 1, method, slab_slices=3, batch_size=3)
    whole = _run(tmp, paths, 2, method, slab_slices=1000, batch_size=3)
    a, b = _by_kind(slabbed), _by_kind(whole)
    assert a.keys() == b.keys() and {"fused", "heatmap"} <= a.keys()
    assert ("saliency" in a) == (method == "network")
    assert len(a["fused"]) == len(b["fused"]) == 11
    for x, y in zip(a["fused"], b["fused"], strict=True):
        assert x.InstanceNumber == y.InstanceNumber and x.ImagePositionPatient == y.ImagePositionPatient
        assert x.PixelData == y.PixelData
        assert x.DerivationDescription == y.DerivationDescription
    for kind in a.keys() - {"fused"}:
        (x,), (y,) = a[kind], b[kind]
        assert np.array_equal(x.pixel_array, y.pixel_array), kind
        xm = x.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        ym = y.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert (xm.RealWorldValueSlope, xm.RealWorldValueIntercept) == (ym.RealWorldValueSlope, ym.RealWorldValueIntercept)
    # Maps with content, not two blank ones (this small network study's contribution is 0).
    assert a["saliency" if method == "network" else "heatmap"][0].pixel_array.max() > 0
    assert _same_numbers(slabbed.summary, whole.summary)
    assert len(slabbed.per_slice) == 11
    assert all(_same_numbers(p, q) for p, q in zip(slabbed.per_slice, whole.per_slice, strict=True))


def test_each_fused_instance_references_its_own_sources(study):
    tmp, paths = study
    out = _run(tmp, paths, 3, "chroma", slab_slices=4, batch_size=4)
    fixed, moving = load_series(paths["CT"]), load_series(paths["PT"])
    overlap = {str(h.SOPInstanceUID): {str(m.SOPInstanceUID) for m in ms}
               for h, ms in zip(fixed.headers, overlapping_slices(fixed, moving), strict=True)}
    moving_uids = {str(h.SOPInstanceUID) for h in moving.headers}
    (fused,) = [s for s in out.series if s.kind == "fused"]
    counts = []
    for path in fused.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources = [str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence]
        own = sources[0]
        assert own in overlap  # the first source is this instance's fixed slice
        assert set(sources[1:]) == overlap[own] and set(sources[1:]) <= moving_uids
        series = {str(s.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedInstanceSequence}
                  for s in ds.ReferencedSeriesSequence}
        assert series[fixed.series_uid] == {own}
        assert series.get(moving.series_uid, set()) == overlap[own]
        counts.append(len(overlap[own]))
    # Not every moving instance on every fused instance: the overlap is a few slices.
    assert 0 < max(counts) < len(moving_uids)
