"""The patient's body on the fixed grid: where fused pixels and explanation maps mean something.

CT: voxels above -400 HU (air and lung below, soft tissue above), axial holes filled so lungs and
bowel gas count as body, then the largest 3-D component (drops the table and loose objects).
Other modalities (MR, PET, NM): Otsu's threshold of the intensities instead of the HU cut.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

CT_BODY_HU = -400.0
# Slices labelled at a time when the largest component is found (``largest_component``).
_SLAB_SLICES = 32


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of the finite values (SimpleITK's, 256 bins)."""
    finite = np.asarray(values, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        return float(finite.max()) if finite.size else 0.0
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(finite.reshape(1, 1, -1)))
    return float(otsu.GetThreshold())


def body_mask(volume: np.ndarray, modality: str) -> np.ndarray:
    """Boolean (z, y, x) mask of the body in ``volume`` (stored real values: HU for CT)."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"body mask needs a (z, y, x) volume, got shape {volume.shape}")
    threshold = CT_BODY_HU if modality.upper() == "CT" else otsu_threshold(volume)
    mask = volume > threshold
    # Holes are filled per axial slice: in 3-D a lung open to the FOV edge is no hole.
    for plane in mask:
        plane[...] = ndimage.binary_fill_holes(plane)
    return largest_component(mask)


def largest_component(mask: np.ndarray, slab_slices: int = _SLAB_SLICES) -> np.ndarray:
    """The largest face-connected component of ``mask`` (z, y, x), in place; of equal ones, the first met.

    Equal to ``ndimage.label`` of the whole volume, but labelled ``slab_slices`` slices at a time
    and the slabs' components joined where they touch across a boundary (a graph's connected
    components), so a whole-body label volume (4 bytes per voxel) never exists. Labels number
    components in the raster order of their first voxel, so the smallest label of a joined set
    is the one the whole-volume labelling gives it, and ties are broken the same way.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    bounds = [(lo, min(lo + slab_slices, mask.shape[0])) for lo in range(0, mask.shape[0], slab_slices)]
    sizes, offsets, edges, last, total = [np.zeros(1, np.int64)], [], [], None, 0
    for lo, hi in bounds:
        labels, count = ndimage.label(mask[lo:hi])
        offsets.append(total)
        sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
        if last is not None:
            touching = (last > 0) & (labels[0] > 0)
            edges.append(np.stack([last[touching], labels[0][touching] + total]))
        last = np.where(labels[-1] > 0, labels[-1] + total, 0)
        total += count
    if total <= 1:
        return mask
    pairs = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), np.int64)
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(total + 1, total + 1))
    sets, joined = connected_components(graph, directed=False)
    size = np.bincount(joined, weights=np.concatenate(sizes), minlength=sets)
    first = np.full(sets, total + 1)
    np.minimum.at(first, joined[1:], np.arange(1, total + 1))
    size[joined[0]] = -1  # the background
    largest = min(np.flatnonzero(size == size.max()), key=lambda c: first[c])
    keep = joined == largest
    for (lo, hi), offset, count in zip(bounds, offsets, (len(v) for v in sizes[1:]), strict=True):
        kept = np.concatenate([[False], keep[offset + 1 : offset + count + 1]])  # this slab's labels -> kept
        if kept[1:].all():
            continue
        mask[lo:hi] = kept[ndimage.label(mask[lo:hi])[0]] if kept.any() else False
    return mask
