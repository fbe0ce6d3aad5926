"""Registration inputs: the modality the stages assume, intensities clamped for mutual information,
pyramid levels in millimetres, body masks and the held-out voxel split."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from dicomnode.config import RegistrationConfig
from dicomnode.imaging.volume import Volume


def modality_used(vol: Volume) -> tuple[str, str]:
    """(modality the stages use, why): the volume's own modality, or for files without one "CT" when
    the values look like HU (air near -1000), else "" (unknown)."""
    if vol.modality:
        return vol.modality, "from the series"
    sample = sitk.GetArrayViewFromImage(vol.image)[::2, ::2, ::2]
    if float(np.percentile(sample, 0.5)) < -500:
        return "CT", "guessed: values look like HU (air near -1000)"
    return "", "no modality in the file and values not CT-like"


def modality(vol: Volume) -> str:
    return modality_used(vol)[0]


def prepare(vol: Volume, config: RegistrationConfig) -> sitk.Image:
    """Float32 image with intensities clamped for mutual information (CT: adaptive soft-tissue window)."""
    img = sitk.Cast(vol.image, sitk.sitkFloat32)
    sample = sitk.GetArrayViewFromImage(img)[::2, ::2, ::2]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if modality(vol) == "CT":
        lo, hi = ct_window(sample, config)
    return sitk.Clamp(img, sitk.sitkFloat32, float(lo), float(max(hi, lo + 1e-3)))


def ct_window(sample: np.ndarray, config: RegistrationConfig) -> tuple[float, float]:
    """HU window: percentiles of the voxels inside ``ct_window_hu``, so the histogram bins span the tissue.

    A head's soft tissue spans ~100 HU, a limb's or trunk's (fat to muscle) ~300 HU: with one fixed
    window the brain's grey and white matter share one or two bins and MI prefers wrong warps.
    """
    lo, hi = config.ct_window_hu
    soft = sample[(sample > lo) & (sample < hi)]
    if soft.size < 1000:
        return lo, hi
    p_lo, p_hi = np.percentile(soft, config.ct_window_percentiles)
    return float(p_lo), float(max(p_hi, p_lo + 20.0))


def level_image(img: sitk.Image, mm: float) -> sitk.Image:
    spacing = np.array(img.GetSpacing())
    target = np.maximum(spacing, mm)
    if np.allclose(target, spacing):
        return img
    # Half the new voxel size on every axis (already coarse axes get mild, harmless smoothing).
    smooth = sitk.SmoothingRecursiveGaussian(img, (0.5 * target).tolist())
    size = [max(2, int(np.ceil(n * s / t))) for n, s, t in zip(img.GetSize(), spacing, target)]
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), target.tolist(),
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def split_heldout(mask: sitk.Image, samples: int, seed: int) -> tuple[sitk.Image, sitk.Image, int]:
    """(training mask, held-out mask, training voxels): ``samples`` random voxels of ``mask`` (at most
    half) set aside, so the stage checks score voxels the optimiser never sampled."""
    arr = sitk.GetArrayFromImage(mask).astype(bool)
    inside = np.flatnonzero(arr)
    held = np.zeros(arr.size, dtype=bool)
    held[np.random.default_rng(seed).choice(inside, size=min(samples, inside.size // 2), replace=False)] = True
    held = held.reshape(arr.shape)

    def image(a: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(a.astype(np.uint8))
        img.CopyInformation(mask)
        return img

    train = arr & ~held
    return image(train), image(held), int(train.sum())


def body_mask(img: sitk.Image) -> sitk.Image:
    """Voxels clearly above background, dilated so the body outline (an MI edge) is sampled."""
    arr = sitk.GetArrayViewFromImage(img)
    lo, hi = np.percentile(arr, [1, 99])
    mask = sitk.BinaryThreshold(img, float(lo + 0.1 * (hi - lo)), 1e30, 1, 0)
    return sitk.BinaryDilate(mask, [2, 2, 2])
