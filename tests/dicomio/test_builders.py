"""The output builders check their inputs in the constructor, as highdicom's IODs do.

Every bad input is refused with an EncodingError that names the problem when the builder is
made, before any dataset is built; what a builder gives is complete (no caller adds to it) and
dciodvfy-clean.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from dicomnode.dicomio.derived import EncodingError
from dicomnode.dicomio.parametric_map import ParametricMapSeries
from dicomnode.dicomio.secondary_capture import FusedSeries
from dicomnode.dicomio.validate import validate_dataset
from tests.conftest import require_tool


def _rgb(volume) -> np.ndarray:
    n, rows, cols = len(volume.headers), int(volume.headers[0].Rows), int(volume.headers[0].Columns)
    return np.random.default_rng(0).integers(0, 256, (n, rows, cols, 3), dtype=np.uint8)


def _values(volume) -> np.ndarray:
    n, rows, cols = len(volume.headers), int(volume.headers[0].Rows), int(volume.headers[0].Columns)
    return np.random.default_rng(1).random((n, rows, cols))


def _without(volume, keyword: str, index: int = 0):
    """The volume with ``keyword`` removed from one of its slice headers."""
    headers = [copy.deepcopy(h) for h in volume.headers]
    del headers[index][keyword]
    return dataclasses.replace(volume, headers=headers)


def _fused(ct, pt, **changes):
    options = {"method": "alpha", "derivation": "PT resampled to CT, alpha blend", "series_number": 9011}
    return FusedSeries(changes.pop("fixed", ct), changes.pop("moving", pt), changes.pop("rgb", _rgb(ct)),
                       **{**options, **changes})


def _map(ct, pt, **changes):
    options = {"quantity": "contribution", "series_number": 9012, "series_description": "PT contribution",
               "method": "alpha"}
    fixed, moving = changes.pop("fixed", ct), changes.pop("moving", pt)
    return ParametricMapSeries(fixed, changes.pop("values", _values(ct)), sources=[fixed, moving],
                               **{**options, **changes})


# (case, changes to the builder's inputs, words the error must contain)
BAD_INPUTS = [
    ("fixed slice without frame of reference", lambda ct, pt: {"fixed": _without(ct, "FrameOfReferenceUID", 3)},
     "FrameOfReferenceUID"),
    ("moving slice without SOP instance", lambda ct, pt: {"moving": _without(pt, "SOPInstanceUID", 1)},
     "lacks SOPInstanceUID"),
    ("moving slice without position", lambda ct, pt: {"moving": _without(pt, "ImagePositionPatient")},
     "lacks ImagePositionPatient"),
    ("series number zero", lambda ct, pt: {"series_number": 0}, "series number 0"),
    ("series number beyond IS", lambda ct, pt: {"series_number": 2**31}, "series number"),
    ("series number as text", lambda ct, pt: {"series_number": "9001"}, "series number"),
    ("NUL in the method", lambda ct, pt: {"method": "alpha\x00"}, "control characters"),
    ("derivation not text", lambda ct, pt: {"derivation": 42}, "derivation must be text"),
]


@pytest.mark.parametrize("case, changes, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("builder", [_fused, _map], ids=["fused", "parametric_map"])
def test_bad_inputs_are_refused_in_the_constructor(synthetic_volumes, builder, case, changes, words):
    ct, pt = synthetic_volumes["CT"], synthetic_volumes["PT"]
    with pytest.raises(EncodingError, match=words):
        builder(ct, pt, **changes(ct, pt))


def test_layout_controls_of_st_are_allowed_in_the_derivation(synthetic_volumes):
    ct, pt = synthetic_volumes["CT"], synthetic_volumes["PT"]
    first = next(iter(_fused(ct, pt, derivation="registered\r\nthen fused")))
    assert "registered\r\nthen fused" in first.DerivationDescription


def test_built_outputs_are_complete_and_conform(synthetic_volumes):
    ct, pt = synthetic_volumes["CT"], synthetic_volumes["PT"]
    fused, pm = _fused(ct, pt), _map(ct, pt)
    datasets = list(fused)
    assert len(datasets) == len(fused) == len(ct.headers)
    assert {ds.SeriesInstanceUID for ds in datasets} == {fused.series_uid}
    assert all(int(ds.SeriesNumber) == fused.series_number == 9011 for ds in datasets)
    assert all(ds.FrameOfReferenceUID == ct.frame_of_reference_uid for ds in datasets)
    assert int(pm.dataset.SeriesNumber) == pm.series_number == 9012 and pm.dataset.ContentLabel == pm.label
    # Every source is referenced by the builder itself.
    referenced = {item.SeriesInstanceUID for item in pm.dataset.ReferencedSeriesSequence}
    assert referenced == {ct.series_uid, pt.series_uid}
    require_tool("dciodvfy")
    assert validate_dataset(datasets[0]).errors == []
    assert validate_dataset(pm.dataset).errors == []
