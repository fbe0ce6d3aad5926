"""Training data, the validation split by case, and a tiny end-to-end training run."""

import argparse

import torch

from dicomnode.fusion.datasets import VALIDATION_CASES, load_pair_folder, split_by_case
from dicomnode.fusion.losses import LossWeights, fusion_loss
from dicomnode.fusion.network import load_model
from dicomnode.fusion.training import train_command


def test_validation_split_is_by_case(aanlib_dir):
    samples = load_pair_folder(aanlib_dir / "PET-MRI") + load_pair_folder(aanlib_dir / "CT-MRI")
    train, val = split_by_case(samples)
    assert train and val
    for task in ("PET-MRI", "CT-MRI"):
        train_cases = {s.case for s in train if s.task == task}
        val_cases = {s.case for s in val if s.task == task}
        assert val_cases == set(VALIDATION_CASES[task])
        assert not train_cases & val_cases
    assert all(s.fixed.shape == s.moving.shape and 0 <= s.fixed.min() and s.fixed.max() <= 1 for s in samples)


def test_loss_prefers_a_fusion_over_one_source():
    a = torch.zeros(1, 1, 32, 32)
    b = torch.zeros(1, 1, 32, 32)
    a[..., :16, :] = 0.8
    b[..., :, :16] = 0.6
    w = LossWeights()
    only_a = fusion_loss(a, a, b, w)["total"]
    fused = fusion_loss(torch.maximum(a, b), a, b, w)["total"]
    assert fused < only_a


def test_train_command_writes_weights_and_model_card(aanlib_dir, tmp_path):
    pet = tmp_path / "PET-MRI"
    pet.mkdir()
    # Two cases: 25 trains, 30 is the held-out validation case.
    for pair_id in ("25015", "25017", "30037"):
        for path in (aanlib_dir / "PET-MRI").glob(f"{pair_id}_*.png"):
            (pet / path.name).write_bytes(path.read_bytes())
    args = argparse.Namespace(data=[pet], out=tmp_path / "models", epochs=None, device="cpu", seed=0,
                              steps=4, batch=2, crop=32, lr=None, no_eval=True)
    threads = torch.get_num_threads()
    try:
        assert train_command(args) == 0
    finally:
        torch.set_num_threads(threads)  # the command pins threads for the whole process
    model = load_model(tmp_path / "models" / "fusion_net.pt")
    assert model is not None
    card = (tmp_path / "models" / "MODEL_CARD.md").read_text()
    assert "not for primary diagnosis" in card.lower() and "validation pairs: 1" in card
