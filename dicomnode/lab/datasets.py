"""Training and validation pairs: AANLIB-style 2-D pair folders and slices of co-registered 3-D data.

Every sample is luminance in [0, 1]: fixed (anatomical) and moving, (H, W) float32, with the
case it comes from so that validation can be split by case (adjacent slices of one case are
strongly correlated; a per-slice split would leak).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomnode.fusion.images import find_pairs, load_image
from dicomnode.log import event

log = logging.getLogger(__name__)

# Cases held out of training, per AANLIB task (case numbers of the source collection).
# CT-MRI and SPECT-MRI case 28 share the same MRI slices, so it is held out of both.
VALIDATION_CASES = {"CT-MRI": ("28", "33"), "PET-MRI": ("30",), "SPECT-MRI": ("4", "15", "28")}


@dataclass(frozen=True)
class PairSample:
    task: str
    case: str
    pair_id: str
    fixed: np.ndarray
    moving: np.ndarray


def _case_ids(folder: Path) -> dict[str, str]:
    """pair id -> case id from a ``manifest.csv`` beside or above the folder, when there is one."""
    for manifest in (folder / "manifest.csv", folder.parent / "manifest.csv"):
        if manifest.is_file():
            with manifest.open(newline="") as fh:
                return {row["pair_id"]: row["case_id"] for row in csv.DictReader(fh) if row.get("task", folder.name) == folder.name}
    return {}


def _case_from_id(pair_id: str) -> str:
    # AANLIB ids are <case><3-digit slice>.
    return pair_id[:-3] if len(pair_id) > 3 and pair_id.isdigit() else pair_id


def load_pair_folder(folder: Path) -> list[PairSample]:
    pairs, problems = find_pairs(folder)
    for problem in problems:
        event(log, "skip_pair", logging.WARNING, folder=folder.name, problem=problem)
    cases = _case_ids(folder)
    samples = []
    for pair in pairs:
        fixed, moving = load_image(pair.fixed).grey, load_image(pair.moving).grey
        if fixed.shape != moving.shape:
            event(log, "skip_pair", logging.WARNING, folder=folder.name, pair=pair.pair_id, problem="size_mismatch")
            continue
        case = cases.get(pair.pair_id, _case_from_id(pair.pair_id))
        samples.append(PairSample(folder.name, case, pair.pair_id, fixed, moving))
    return samples


def load_volume_case(folder: Path, min_foreground: float = 0.05) -> list[PairSample]:
    """Axial slice pairs from a co-registered CT / MR_T1 / PET case (NIfTI under <MOD>/nifti/image).

    MR and PET are resampled onto the CT grid (one frame of reference: identity transform);
    PET is colour-mapped (hot) and its luminance used, as the node fuses it.
    """
    import SimpleITK as sitk
    import torch

    from dicomnode.config import FusionConfig
    from dicomnode.fusion.color import colorize, rgb_to_ycbcr
    from dicomnode.fusion.prepare import prepare_intensities

    def read(mod: str):
        files = sorted((folder / mod / "nifti" / "image").glob("*.nii*"))
        return sitk.ReadImage(str(files[0]), sitk.sitkFloat32) if files else None

    ct = read("CT")
    if ct is None:
        return []
    cfg = FusionConfig(pet_suv_max=10.0)  # the network's training scale, as its model card states
    arrays = {"CT": prepare_intensities(sitk.GetArrayFromImage(ct), "CT", None, cfg)}
    for mod, name, units in (("MR", "MR_T1", None), ("PT", "PET", "GML")):
        image = read(name)
        if image is not None:
            on_ct = sitk.Resample(image, ct, sitk.Transform(), sitk.sitkLinear, 0.0)
            arrays[mod] = prepare_intensities(sitk.GetArrayFromImage(on_ct), mod, units, cfg)
    if "PT" in arrays:
        pet = torch.from_numpy(arrays["PT"])
        arrays["PT"] = rgb_to_ycbcr(colorize(pet, "hot"))[:, 0].numpy()
    combos = [("CT", "PT"), ("MR", "PT"), ("MR", "CT")]
    samples = []
    for fixed_mod, moving_mod in combos:
        if fixed_mod not in arrays or moving_mod not in arrays:
            continue
        for z in range(arrays["CT"].shape[0]):
            f, m = arrays[fixed_mod][z], arrays[moving_mod][z]
            if (f > 0.05).mean() < min_foreground or (m > 0.05).mean() < min_foreground * 0.2:
                continue
            samples.append(PairSample(f"{fixed_mod}-{moving_mod}-3D", folder.name, f"{folder.name}_{z}", f, m))
    return samples


def split_by_case(samples: list[PairSample]) -> tuple[list[PairSample], list[PairSample]]:
    """(train, validation); AANLIB tasks hold out VALIDATION_CASES, other sources train only."""
    train, val = [], []
    for sample in samples:
        held_out = sample.case in VALIDATION_CASES.get(sample.task, ())
        (val if held_out else train).append(sample)
    return train, val


def load_training_data(folders: list[Path]) -> list[PairSample]:
    samples: list[PairSample] = []
    for folder in folders:
        if (folder / "CT" / "nifti").is_dir():
            samples += load_volume_case(folder)
        elif folder.is_dir():
            samples += load_pair_folder(folder)
        else:
            event(log, "missing_data", logging.WARNING, folder=folder)
    return samples
