"""The body mask: CT by HU with lungs filled and the table dropped; other modalities by Otsu."""

from __future__ import annotations

import numpy as np

from scipy import ndimage

from dicomnode.imaging.body import body_mask, largest_component
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


def _old_largest(mask):
    """The whole-volume labelling the slab-wise one replaces."""
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask


def test_largest_component_slab_by_slab_equals_labelling_the_whole_volume():
    rng = np.random.default_rng(1)
    for _ in range(150):
        mask = rng.random(tuple(rng.integers(1, 12, size=3))) < rng.uniform(0.2, 0.7)
        for slab in (1, 2, 5):
            assert np.array_equal(largest_component(mask.copy(), slab), _old_largest(mask))
    ties = np.zeros((6, 5, 5), bool)
    ties[0:2, 0, 0] = ties[4:6, 4, 4] = True  # two equal components: the first met is kept
    u_shape = np.zeros((6, 5, 5), bool)
    u_shape[:, 0, 0] = u_shape[:, 0, 4] = u_shape[5, 0, :] = True  # two arms joined in the last slab only
    u_shape[0, 3, 2] = True
    for mask in (ties, u_shape):
        for slab in (1, 2, 4):
            kept = largest_component(mask.copy(), slab)
            assert np.array_equal(kept, _old_largest(mask)) and 0 < kept.sum() < mask.sum()


def test_body_mask_memory_does_not_grow_with_a_label_volume():
    """No whole-volume int32 label array: the mask grows by about a byte per voxel of the series."""
    import tracemalloc

    hu = _volume(synthetic_datasets(modalities=("CT",), shape=(8, 128, 128), seed=2)["CT"])
    hu[:, -3:, :] = 300.0  # a table: two components, so the largest must be chosen
    body_mask(hu, "CT")  # imports done before anything is traced
    peaks, masks = {}, {}
    for n in (32, 128):
        volume = np.concatenate([hu] * (n // 8))
        tracemalloc.start()
        try:
            masks[n] = body_mask(volume, "CT")
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert np.array_equal(masks[128], np.concatenate([masks[32]] * 4))
    assert not masks[128][:, -3:, :].any()
    grown = (peaks[128] - peaks[32]) / (96 * 128 * 128)
    assert grown < 2.0, f"{grown:.1f} bytes per voxel"
