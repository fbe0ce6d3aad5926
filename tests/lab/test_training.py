"""Training data, the validation split by case, and a tiny end-to-end training run."""

import argparse
import time

import pytest
import torch

from dicomnode.lab.datasets import VALIDATION_CASES, load_pair_folder, split_by_case
from dicomnode.lab.losses import LossWeights, fusion_loss
from dicomnode.fusion.network import load_model
from dicomnode.commands.lab import train_command
from dicomnode.lab.training import TrainSettings, train


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


def test_held_out_cases_never_influence_the_weights(aanlib_dir):
    """Training keeps its final state: the validation pairs are never used to choose one."""
    from dataclasses import replace

    samples = load_pair_folder(aanlib_dir / "PET-MRI")
    train_set, val_set = split_by_case(samples)
    settings = TrainSettings(steps=3, batch=2, crop=32, log_every=1)
    flipped = [replace(s, moving=s.moving[::-1].copy()) for s in val_set]  # different held-out content
    states = []
    for held_out in (val_set, flipped, []):
        model, summary = train(train_set[:6] + held_out, settings, torch.device("cpu"))
        states.append(model.state_dict())
        assert summary["steps_done"] == 3 and summary["val_pairs"] == len(held_out)
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


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


def test_separable_ssim_matches_the_2d_window():
    import torch.nn.functional as F

    from dicomnode.lab.losses import _gaussian_1d, ssim_map

    x, y = torch.rand(2, 1, 40, 40), torch.rand(2, 1, 40, 40)
    g = _gaussian_1d(x.device, x.dtype)
    win = (g[:, None] * g[None, :]).view(1, 1, 11, 11)
    mx, my = F.conv2d(x, win), F.conv2d(y, win)
    sxx, syy, sxy = F.conv2d(x * x, win) - mx**2, F.conv2d(y * y, win) - my**2, F.conv2d(x * y, win) - mx * my
    ref = ((2 * mx * my + 1e-4) * (2 * sxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (sxx + syy + 9e-4))
    assert torch.allclose(ssim_map(x, y), ref, atol=1e-5)


def test_activity_selection_copies_the_busier_source():
    from dicomnode.lab.losses import LossWeights, activity_selection, fusion_loss

    a = torch.full((1, 1, 64, 64), 0.5)
    b = torch.zeros(1, 1, 64, 64)
    b[..., ::4, :] = 0.4  # stripes: much more local activity than the flat A
    target = activity_selection(a, b)
    assert torch.allclose(target[..., 16:48, 16:48], b[..., 16:48, 16:48], atol=0.02)
    terms = fusion_loss(a, a, b, LossWeights(selection=1.0))
    assert float(terms["selection"]) > 0.1 and "selection" not in fusion_loss(a, a, b, LossWeights())


def test_train_command_stops_at_its_time_budget(aanlib_dir, tmp_path):
    pet = tmp_path / "PET-MRI"
    pet.mkdir()
    for pair_id in ("25015", "30037"):
        for path in (aanlib_dir / "PET-MRI").glob(f"{pair_id}_*.png"):
            (pet / path.name).write_bytes(path.read_bytes())
    args = argparse.Namespace(data=[pet], out=tmp_path / "models", epochs=None, device="cpu", seed=0, steps=None,
                              batch=2, crop=32, lr=None, no_eval=True, minutes=0.01, loss_weights="1,20,4,5")
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        assert train_command(args) == 0
    finally:
        torch.set_num_threads(threads)
    wall_s = time.perf_counter() - started
    meta = torch.load(tmp_path / "models" / "fusion_net.pt", weights_only=True)["meta"]
    assert meta["steps_done"] >= 2
    # The loop checks the clock before each step, so it may overrun by one step (a 32-pixel crop
    # step takes milliseconds): its own seconds are the 0.6 s budget rounded, 1, never 2 or more.
    assert meta["train_seconds"] == 1 and wall_s >= 0.6
    assert meta["settings"]["time_budget_s"] == pytest.approx(0.6) and meta["settings"]["loss"]["selection"] == 5.0


def test_guarded_selection_prefers_busier_regions_but_keeps_brighter_uptake():
    from dicomnode.lab.losses import LossWeights, fusion_loss, guarded_selection

    a = torch.zeros(1, 1, 96, 96)
    a[..., ::4, :] = 0.4  # stripes: the busier source everywhere
    b = torch.full((1, 1, 96, 96), 0.05)
    b[..., 40:64, 40:64] = 0.9  # "uptake", much brighter than A: must survive
    target = guarded_selection(a, b)
    assert set(torch.unique(target).tolist()) <= {0.0, 1.0}
    assert float(target[..., 44:60, 44:60].min()) == 1.0
    assert float(target[..., 8:24, 8:24].max()) == 0.0
    logit = torch.full_like(a, -5.0)
    terms = fusion_loss(a, a, b, LossWeights(rule=1.0), logit)
    assert float(terms["rule"]) > 0.1 and "rule" not in fusion_loss(a, a, b, LossWeights(), logit)


def test_guarded_selection_keeps_thin_uptake_pixel_by_pixel():
    """A 2-px line of weak uptake (B - A = 0.15 > 0.1) in busy anatomy: the smoothed guard alone dropped it."""
    from dicomnode.lab.losses import guarded_selection

    a = torch.zeros(1, 1, 96, 96)
    a[..., ::4, :] = 0.4
    b = torch.full((1, 1, 96, 96), 0.05)
    b[..., 20:76, 47:49] = (a[..., 20:76, 47:49] + 0.15).clamp(max=1.0)
    target = guarded_selection(a, b)
    assert float(target[..., 20:76, 47:49].min()) == 1.0
    assert float(target[..., 20:76, 10:30].max()) == 0.0  # the busier anatomy away from the line
