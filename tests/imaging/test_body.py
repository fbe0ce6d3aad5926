"""The body mask: CT by HU with lungs filled and the table dropped; other modalities by Otsu."""

from __future__ import annotations

import numpy as np

from dicomnode.imaging.body import body_mask
from dicomnode.testing.study import synthetic_datasets


def _volume(datasets):
    ordered = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))
                     for d in ordered]).astype(np.float32)


def test_ct_body_fills_the_lungs_and_drops_a_table():
    hu = _volume(synthetic_datasets(modalities=("CT",), shape=(8, 64, 64), seed=2)["CT"])
    hu[:, -3:, :] = 300.0  # a table below the patient, not touching the body
    mask = body_mask(hu, "CT")
    assert not mask[:, -3:, :].any(), "the table is not the body"
    lungs = (hu < -400) & mask
    assert lungs.sum() > 100, "lungs are holes of the body and count as body"
    assert not mask[:, :, :2].any()  # air beside the phantom


def test_mr_body_by_otsu_matches_the_ct_body():
    data = synthetic_datasets(modalities=("CT", "MR"), shape=(8, 64, 64), seed=2)
    ct, mr = body_mask(_volume(data["CT"]), "CT"), body_mask(_volume(data["MR"]), "MR")
    overlap = (ct & mr).sum() / (ct | mr).sum()
    assert overlap > 0.9
