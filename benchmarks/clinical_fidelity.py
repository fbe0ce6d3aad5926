"""Clinical fidelity of the fused series, next to the standard viewer overlay, on the real path.

For each study (STS_002: CT + PET + MR with its tumour mask; a synthetic CT + PET + MR phantom with
a known lesion) it starts ``dicomnode serve`` as a subprocess, C-STOREs the study to it with
pynetdicom, lets the node C-STORE its outputs to a DCMTK ``storescp`` peer, and scores what the
peer received. In the same run it renders the standard viewer overlay from the same inputs:

* overlay: CT at window 40/400 in grey, the moving image in the hot colour map with alpha 0.5
  above 10 % of its display range (PET SUV 0..max(p99.9, 5); MR p1..p99 in its field of view);
* anatomy kept: I(F; CT) / H(CT) over the body (CT > -400 HU, holes filled; CT windowed 40/400 in
  16 bins, F's colours quantised 8x8x8), and mean SSIM(luma F, CT window) over tumour pixels;
* function kept: I(F; M) / H(M) over the body inside the moving field of view, and inside the
  tumour dilated by 10 px (M in 16 bins of its display range);
* seam: mean Sobel magnitude of luma F over that of the windowed CT on a 3-px band along the
  moving field-of-view edge, inside the body (n/a when the moving image covers the CT);
* maps: share of each map's value mass outside the body, and whether frames are rescaled one by one.

    python benchmarks/clinical_fidelity.py [--study sts|synthetic|both] [--write-docs] [--png DIR]

``--write-docs`` rewrites the marked block in docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CT_WINDOW = (40.0, 400.0)
OVERLAY_ALPHA = 0.5
OVERLAY_THRESHOLD = 0.1
BINS = 16


def ct_window(hu: np.ndarray, window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    center, width = window
    return np.clip((hu - (center - width / 2)) / width, 0.0, 1.0).astype(np.float32)


def display_range(values: np.ndarray, modality: str, fov: np.ndarray) -> tuple[float, float]:
    """The viewer's display range: PET SUV 0..max(p99.9, 5); others p1..p99 inside the field of view."""
    inside = values[fov]
    if modality == "PT":
        return 0.0, max(float(np.percentile(inside, 99.9)), 5.0)
    low, high = np.percentile(inside, [1.0, 99.0])
    return float(low), float(max(high, low + 1e-6))


def hot(values: np.ndarray) -> np.ndarray:
    """The hot colour map (black -> red -> yellow -> white) of values in [0, 1], (..., 3)."""
    import torch

    from dicomnode.fusion.color import colorize

    flat = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(1, -1, 1))
    return colorize(flat, "hot")[0, :, :, 0].permute(1, 0).numpy().reshape(*values.shape, 3)


def viewer_overlay(ct_w: np.ndarray, moving_display: np.ndarray) -> np.ndarray:
    """The standard overlay (see the module docstring), (z, y, x, 3) in [0, 1]."""
    grey = np.repeat(ct_w[..., None], 3, axis=-1)
    alpha = np.where(moving_display > OVERLAY_THRESHOLD, OVERLAY_ALPHA, 0.0)[..., None]
    return (1 - alpha) * grey + alpha * hot(moving_display)


def luma(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """F's colours quantised 8 x 8 x 8 -> one label 0..511 per pixel."""
    q = np.clip((rgb * 8).astype(np.int64), 0, 7)
    return q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]


def _bins(values: np.ndarray) -> np.ndarray:
    return np.clip((values * BINS).astype(np.int64), 0, BINS - 1)


def normalised_mi(labels: np.ndarray, reference: np.ndarray) -> float:
    """I(F; X) / H(X) in [0, 1] from integer labels of F and of X (bits cancel)."""
    if labels.size == 0:
        return float("nan")
    joint = np.zeros((int(labels.max()) + 1, int(reference.max()) + 1))
    np.add.at(joint, (labels, reference), 1.0)
    p = joint / joint.sum()
    pf, px = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pf[:, None] * px[None, :])[nz])).sum())
    hx = float(-(px[px > 0] * np.log(px[px > 0])).sum())
    return mi / hx if hx > 0 else float("nan")


def tumour_ssim(f_luma: np.ndarray, ct_w: np.ndarray, tumour: np.ndarray) -> float:
    """Mean SSIM (7x7 window, data range 1) of luma F against the windowed CT over tumour pixels."""
    from skimage.metrics import structural_similarity

    values = []
    for k in np.flatnonzero(tumour.reshape(tumour.shape[0], -1).any(axis=1)):
        _, ssim_map = structural_similarity(f_luma[k], ct_w[k], data_range=1.0, full=True)
        values.append(ssim_map[tumour[k]])
    return float(np.concatenate(values).mean()) if values else float("nan")


def dilate_slices(mask: np.ndarray, pixels: int) -> np.ndarray:
    structure = ndimage.generate_binary_structure(2, 1)
    return np.stack([ndimage.binary_dilation(m, structure, iterations=pixels) if m.any() else m for m in mask])


def sobel(x: np.ndarray) -> np.ndarray:
    return np.hypot(ndimage.sobel(x, axis=-1), ndimage.sobel(x, axis=-2))


def seam_band(fov: np.ndarray, body: np.ndarray) -> np.ndarray:
    """3-px band along the moving field-of-view edge inside the CT image and the body, per slice."""
    band = np.zeros_like(fov)
    for k, plane in enumerate(fov):
        if not plane.any() or plane.all():
            continue
        edge = plane ^ ndimage.binary_erosion(plane, border_value=1)
        band[k] = ndimage.binary_dilation(edge, iterations=1)
    # A field of view that ends with the slices leaves no in-plane seam; a slice just beyond it is not one either.
    return band & body


def seam_ratio(f_luma: np.ndarray, ct_w: np.ndarray, band: np.ndarray) -> float:
    if not band.any():
        return float("nan")
    gf = np.stack([sobel(p) for p in f_luma])
    gc = np.stack([sobel(p) for p in ct_w])
    return float(gf[band].mean() / max(gc[band].mean(), 1e-9))


def figures(fused: np.ndarray, hu: np.ndarray, moving_display: np.ndarray, body: np.ndarray,
            tumour: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """The fidelity figures of one fused volume (z, y, x, 3) in [0, 1] (see the module docstring)."""
    ct_w = ct_window(hu)
    labels = colour_labels(fused)
    f_luma = luma(fused)
    in_fov = body & fov
    near_tumour = dilate_slices(tumour, 10) & fov
    return {
        "anatomy_mi": normalised_mi(labels[body], _bins(ct_w[body])),
        "anatomy_ssim_tumour": tumour_ssim(f_luma, ct_w, tumour),
        "function_mi": normalised_mi(labels[in_fov], _bins(moving_display[in_fov])),
        "function_mi_tumour": normalised_mi(labels[near_tumour], _bins(moving_display[near_tumour])),
        "seam": seam_ratio(f_luma, ct_w, seam_band(fov, body)),
    }


def map_air_share(values: np.ndarray, body: np.ndarray) -> float:
    """Share of a map's value mass (sum of |values|) outside the body."""
    total = float(np.abs(values).sum())
    return float(np.abs(values[~body]).sum()) / total if total > 0 else 0.0


def rescaled_per_frame(values: np.ndarray) -> bool:
    """True when every frame with signal peaks at the same value (each scaled to its own maximum)."""
    peaks = values.reshape(values.shape[0], -1).max(axis=1)
    peaks = peaks[peaks > 0]
    return bool(peaks.size > 1 and np.allclose(peaks, peaks.max(), rtol=1e-3))


def fov_mask(fixed, moving) -> np.ndarray:
    """Fixed voxels (z, y, x) whose centre lies inside the moving image's field of view (identity)."""
    import SimpleITK as sitk

    from dicomnode.imaging.resample import resample_image

    ones = sitk.Image(moving.image.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving.image)
    return sitk.GetArrayFromImage(resample_image(fixed.image, ones, None, 0.0)) > 0.5
