"""Registration accuracy cases with exact ground truth.

An aligned source pair (T1-like image + CT-/PET-like image in one space: a synthetic phantom, or
the MNI152 template with its tissue maps) becomes a case: the fixed MR is the T1 source warped by
a known transform G (rigid + affine + smooth displacement), F(x) = T1(G(x)); the moving image is
the second modality in source space, unwarped. So the true fixed -> moving mapping is G itself,
the convention of sitk.Resample(moving, fixed, T). Target registration error (TRE) is
|T(x) - G(x)| in mm over points x inside the fixed body.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicomnode.imaging.volume import Volume


FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))  # a Gaussian's full width at half maximum, in sigmas


@dataclass
class Sources:
    """Aligned images in one LPS space: T1-like, CT-like (HU), PET-like (SUV), body and structure masks."""

    t1: sitk.Image
    ct: sitk.Image
    pet: sitk.Image
    body: sitk.Image  # uint8
    structure: sitk.Image  # uint8, scored by Dice overlap


@dataclass
class RegistrationCase:
    name: str
    fixed: Volume
    moving: Volume
    truth: sitk.Transform  # fixed -> moving, LPS mm
    points: np.ndarray  # (n, 3) fixed-space points inside the body, LPS mm
    structure: sitk.Image  # structure mask on the moving grid
    deformation_mm: float  # 95th percentile |smooth displacement| inside the body


@dataclass
class Score:
    mean_mm: float
    p95_mm: float
    max_mm: float
    dice: float  # structure overlap: warped by estimate vs by truth


def _grid(reference: sitk.Image, size: tuple[int, int, int], margin_mm: float = 0.0) -> sitk.Image:
    """An empty float32 image of ``size`` voxels spanning ``reference``'s physical box plus a margin."""
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing()) + 2 * margin_mm
    spacing = extent / np.array(size)
    corner = np.array(reference.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    origin = corner - direction @ np.full(3, margin_mm) + direction @ (spacing / 2)
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(origin.tolist())
    img.SetDirection(reference.GetDirection())
    return img


def phantom_sources(spacing_mm: float = 2.0, seed: int = 0) -> Sources:
    """A synthetic head: scalp, skull, brain, white matter, ventricles and random nuclei."""
    rng = np.random.default_rng(seed)
    shape = [int(round(e / spacing_mm)) for e in (170.0, 200.0, 160.0)]  # x, y, z extent in mm
    ref = sitk.Image(shape, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin([-(n - 1) * spacing_mm / 2 for n in shape])
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * spacing_mm for n in shape[::-1]], indexing="ij")

    def ellipsoid(c, r):
        return ((xx - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((zz - c[2]) / r[2]) ** 2 <= 1

    head = ellipsoid((0, 0, 0), (75, 90, 70))
    skull_out = ellipsoid((0, 0, 0), (70, 85, 65))
    brain = ellipsoid((0, 0, 0), (64, 79, 59))
    wm = ellipsoid((0, 5, 5), (45, 58, 38))
    vent = ellipsoid((-12, 0, 8), (6, 22, 10)) | ellipsoid((12, 0, 8), (6, 22, 10))
    t1 = np.where(head, 0.6, 0.0)
    ct = np.where(head, 20.0, -1000.0)
    pet = np.where(head, 0.5, 0.0)
    for arr, (skull, gm, w, csf) in ((t1, (0.1, 0.45, 0.8, 0.15)), (ct, (900, 40, 28, 8)), (pet, (0.3, 8, 2.5, 0.4))):
        arr[skull_out] = skull
        arr[brain] = gm
        arr[wm] = w
        arr[vent] = csf
    structure = np.zeros(t1.shape, bool)
    for i in range(160):  # nuclei with unrelated intensities per modality: a multimodal texture to align
        c = rng.uniform(-1, 1, 3) * (45, 60, 40)
        blob = ellipsoid(c, rng.uniform(4, 10, 3)) & brain
        t1[blob], ct[blob], pet[blob] = rng.uniform(0.2, 0.95), rng.uniform(15, 70), rng.uniform(1.5, 12)
        if i < 3:
            structure |= blob

    def image(arr, dtype=sitk.sitkFloat32):
        img = sitk.GetImageFromArray(arr.astype(np.float32 if dtype == sitk.sitkFloat32 else np.uint8))
        img.CopyInformation(ref)
        return img

    smooth = 0.7 * spacing_mm  # partial volume at tissue borders
    return Sources(sitk.SmoothingRecursiveGaussian(image(t1), smooth), sitk.SmoothingRecursiveGaussian(image(ct), smooth),
                   sitk.SmoothingRecursiveGaussian(image(pet), smooth), image(head, sitk.sitkUInt8),
                   image(structure, sitk.sitkUInt8))


def mni_sources(nifti_dir: Path) -> Sources:
    """MNI152 2009a T1 + GM/WM maps -> a head (synthetic CSF rim, skull, scalp) in T1, CT and PET.

    The template is skull-stripped; the same synthetic layers are added to every modality so the
    images stay a consistent multimodal pair (T1: dark skull, bright scalp; CT: bright skull).
    """
    base = Path(nifti_dir)
    t1 = sitk.ReadImage(str(next(base.glob("*t1*.nii*"))), sitk.sitkFloat32)
    g, w = (sitk.GetArrayFromImage(sitk.ReadImage(str(next(base.glob(f"*{k}*.nii*"))), sitk.sitkFloat32)) / 255.0
            for k in ("gm", "wm"))  # stored as probability x 255
    a = sitk.GetArrayFromImage(t1)
    peak = float(np.percentile(a, 99))
    brain = sitk.BinaryFillhole(sitk.BinaryThreshold(sitk.SmoothingRecursiveGaussian(t1, 1.0), 0.1 * peak, 1e30, 1, 0))
    b = sitk.GetArrayFromImage(brain).astype(bool)
    rim, skull, scalp = (sitk.GetArrayFromImage(sitk.BinaryDilate(brain, [r] * 3)).astype(bool) for r in (2, 7, 11))
    layers = ((scalp & ~skull, 0.7 * peak, 20.0, 0.6), (skull & ~rim, 0.05 * peak, 900.0, 0.3),
              (rim & ~b, 0.15 * peak, 10.0, 0.4))
    t1_head, ct = np.where(b, a, 0.0).astype(np.float32), np.full(a.shape, -1000.0, np.float32)
    pet = np.zeros(a.shape, np.float32)
    for region, t1_value, ct_value, pet_value in layers:
        t1_head[region], ct[region], pet[region] = t1_value, ct_value, pet_value
    csf = np.clip(1 - g - w, 0, 1)
    ct[b] = (8 * csf + 40 * g + 28 * w)[b]
    pet[b] = (0.4 * csf + 8 * g + 2.5 * w)[b]

    def image(arr):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(t1)
        return img

    head = image(scalp.astype(np.uint8))
    t1_smooth = sitk.SmoothingRecursiveGaussian(image(t1_head), 0.5)  # soften the synthetic layer edges
    return Sources(t1_smooth, image(ct), image(pet), head, image((w > 0.5).astype(np.uint8)))


def smooth_displacement(reference: sitk.Image, body: sitk.Image, p95_mm: float, seed: int,
                        correlation_mm: float = 20.0) -> tuple[sitk.Transform, float]:
    """A random smooth displacement x -> x + d(x) (smoothed noise, not a B-spline), scaled on the body."""
    rng = np.random.default_rng(seed)
    grid = _grid(reference, tuple(max(4, int(n * s / 4.0)) for n, s in zip(reference.GetSize(), reference.GetSpacing())),
                 margin_mm=20.0)
    comps = []
    for _ in range(3):
        noise = sitk.GetImageFromArray(rng.standard_normal(sitk.GetArrayViewFromImage(grid).shape).astype(np.float32))
        noise.CopyInformation(grid)
        comps.append(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, correlation_mm)))
    field = np.stack(comps, axis=-1)
    inside = sitk.GetArrayFromImage(sitk.Resample(body, grid, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    field *= p95_mm / np.percentile(np.linalg.norm(field[inside], axis=-1), 95)
    disp = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    disp.CopyInformation(grid)
    return sitk.DisplacementFieldTransform(disp), p95_mm


def _linear(center, seed: int, scale: float = 1.0) -> sitk.AffineTransform:
    """Rigid (~5 deg, ~6 mm) then affine (~4 % scale, ~2 % shear) about ``center``."""
    rng = np.random.default_rng(seed)
    euler = sitk.Euler3DTransform(center, *np.deg2rad(rng.uniform(-6, 6, 3) * scale),
                                  tuple(rng.uniform(-7, 7, 3) * scale))
    m = np.eye(3) + np.diag(rng.uniform(-0.04, 0.04, 3) * scale) + (rng.uniform(-0.02, 0.02, (3, 3)) * scale) * (1 - np.eye(3))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(center)
    affine.SetMatrix((np.array(euler.GetMatrix()).reshape(3, 3) @ m).ravel().tolist())
    affine.SetTranslation(euler.GetTranslation())
    return affine


def _volume(image: sitk.Image, modality: str, units: str) -> Volume:
    return Volume(sitk.Cast(image, sitk.sitkFloat32), modality, units, generate_uid(), generate_uid(), generate_uid())


def make_case(sources: Sources, moving: str = "CT", fixed_size=(96, 96, 64), moving_spacing_mm: float | None = None,
              deformation_mm: float = 4.0, seed: int = 0, n_points: int = 4000, name: str = "",
              fixed_modality: str = "MR", pet_fwhm_mm: float | None = None) -> RegistrationCase:
    """Fixed MR = T1 warped by a known G; moving CT-like ("CT") or PET-like ("PT": blurred, coarse, noisy).

    ``fixed_modality="CT"`` swaps the roles: fixed CT-like = CT warped by G, moving ``"MR"`` = T1 unwarped.
    PET-like: ``moving_spacing_mm`` voxels (default 4), Gaussian blur of ``pet_fwhm_mm`` FWHM (default
    sigma 2.5 mm, ~5.9 mm FWHM: the scanner's resolution).
    """
    rng = np.random.default_rng(seed + 1)
    fixed_grid = _grid(sources.t1, fixed_size)
    center = fixed_grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed_size])
    body_fixed = sitk.Resample(sources.body, fixed_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    deform, p95 = smooth_displacement(fixed_grid, body_fixed, deformation_mm, seed)
    truth = sitk.CompositeTransform([_linear(center, seed), deform])  # x -> A(x + d(x))
    if fixed_modality == "CT":
        fixed = sitk.Resample(sources.ct, fixed_grid, truth, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
        fixed = fixed + _noise(fixed, rng, 8.0)
    else:
        fixed = sitk.Resample(sources.t1, fixed_grid, truth, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        peak = float(np.percentile(sitk.GetArrayViewFromImage(fixed), 99))
        fixed = fixed + _noise(fixed, rng, 0.02 * peak)
    if moving == "MR":
        mov = sitk.Resample(sources.t1, _grid(sources.t1, fixed_size), sitk.Transform(), sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32)
        peak = float(np.percentile(sitk.GetArrayViewFromImage(mov), 99))
        moving_vol = _volume(mov + _noise(mov, rng, 0.02 * peak), "MR", "")
    elif moving == "PT":
        spacing = moving_spacing_mm or 4.0
        sigma = 2.5 if pet_fwhm_mm is None else pet_fwhm_mm / FWHM_PER_SIGMA
        blurred = sitk.SmoothingRecursiveGaussian(sources.pet, sigma)
        size = tuple(max(8, int(round(n * s / spacing))) for n, s in zip(sources.pet.GetSize(), sources.pet.GetSpacing()))
        grid = _grid(sources.pet, size)
        mov = sitk.Resample(blurred, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(mov)
        arr = np.clip(arr + rng.normal(0, 1, arr.shape) * (0.08 * arr + 0.05), 0, None).astype(np.float32)
        mov_img = sitk.GetImageFromArray(arr)
        mov_img.CopyInformation(grid)
        moving_vol = _volume(mov_img, "PT", "SUVbw")
    else:
        size = fixed_size if moving_spacing_mm is None else tuple(
            max(8, int(round(n * s / moving_spacing_mm))) for n, s in zip(sources.ct.GetSize(), sources.ct.GetSpacing()))
        grid = _grid(sources.ct, size)
        mov = sitk.Resample(sources.ct, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
        moving_vol = _volume(mov + _noise(mov, rng, 8.0), "CT", "HU")
    structure = sitk.Resample(sources.structure, moving_vol.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              sitk.sitkUInt8)
    # Points: fixed voxels whose true image lies inside the body.
    body_warped = sitk.Resample(sources.body, fixed_grid, truth, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    idx = np.argwhere(sitk.GetArrayViewFromImage(body_warped) > 0)
    idx = idx[rng.choice(len(idx), size=min(n_points, len(idx)), replace=False)]
    points = np.array([fixed_grid.TransformIndexToPhysicalPoint([int(i) for i in k[::-1]]) for k in idx])
    fixed_vol = _volume(fixed, "CT", "HU") if fixed_modality == "CT" else _volume(fixed, "MR", "")
    return RegistrationCase(name or f"{fixed_modality}<-{moving}", fixed_vol, moving_vol, truth, points, structure, p95)


def _noise(image: sitk.Image, rng: np.random.Generator, sigma: float) -> sitk.Image:
    out = sitk.GetImageFromArray(rng.normal(0, sigma, sitk.GetArrayViewFromImage(image).shape).astype(np.float32))
    out.CopyInformation(image)
    return out


def _map(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points])


def score(case: RegistrationCase, transform: sitk.Transform) -> Score:
    """TRE (mm) of ``transform`` against the truth over the case's points, and structure Dice."""
    err = np.linalg.norm(_map(transform, case.points) - _map(case.truth, case.points), axis=1)
    ref = case.fixed.image
    est = sitk.GetArrayFromImage(sitk.Resample(case.structure, ref, transform, sitk.sitkNearestNeighbor, 0)) > 0
    tru = sitk.GetArrayFromImage(sitk.Resample(case.structure, ref, case.truth, sitk.sitkNearestNeighbor, 0)) > 0
    dice = 2 * float((est & tru).sum()) / max(1, int(est.sum() + tru.sum()))
    return Score(float(err.mean()), float(np.percentile(err, 95)), float(err.max()), dice)


def best_affine_fit(case: RegistrationCase) -> sitk.AffineTransform:
    """The least-squares affine of the true mapping over the case's points (the best any affine can do)."""
    target = _map(case.truth, case.points)
    design = np.column_stack([case.points, np.ones(len(case.points))])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)  # target = points @ M.T + t
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(coef[:3].T.ravel().tolist())
    affine.SetTranslation(coef[3].tolist())
    return affine
