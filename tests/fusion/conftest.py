"""Fixtures for the fusion tests: a few real AANLIB pairs as luminance tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.fusion.images import load_image

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "fusion_net.pt"
# Pairs from the validation cases (never seen in training): task -> pair ids.
VALIDATION_PAIRS = {"CT-MRI": ("28012", "33013"), "PET-MRI": ("30037", "30047"), "SPECT-MRI": ("4012", "15010")}


def load_task_pair(aanlib_dir: Path, task: str, pair_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(fixed MRI luminance, moving luminance) in [0, 1] for one AANLIB pair."""
    folder = aanlib_dir / task
    moving = next(p for p in folder.glob(f"{pair_id}_*.png") if not p.stem.endswith("_MRI"))
    return load_image(folder / f"{pair_id}_MRI.png").grey, load_image(moving).grey


@pytest.fixture(scope="session")
def pet_pair(aanlib_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(MRI grey (1,1,H,W), PET RGB (1,3,H,W)) in [0, 1]."""
    mri = load_image(aanlib_dir / "PET-MRI" / "30037_MRI.png")
    pet = load_image(aanlib_dir / "PET-MRI" / "30037_PET.png")
    assert pet.rgb is not None
    return torch.from_numpy(mri.grey)[None, None], torch.from_numpy(pet.rgb)[None]


@pytest.fixture(scope="session")
def grey_batch(aanlib_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Five CT-MRI pairs as (5,1,H,W) fixed MRI and moving CT, in [0, 1]."""
    ids = sorted(p.stem.split("_")[0] for p in (aanlib_dir / "CT-MRI").glob("*_CT.png"))[:5]
    pairs = [load_task_pair(aanlib_dir, "CT-MRI", i) for i in ids]
    fixed = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
    moving = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    return fixed, moving
