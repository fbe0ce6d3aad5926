"""The attention fusion network: size, weights checks, shipped weights, explanations."""

import numpy as np
import pytest
import torch

from dicomnode.config import FusionConfig
from dicomnode.fusion import FusionEngine, check_method_available, fuse
from dicomnode.fusion.explain import weighted_contribution
from dicomnode.fusion.network import FusionNet, WeightsError, load_model, parameter_count, save_weights
from dicomnode.quality.metrics import compute_metrics

from .conftest import SHIPPED_WEIGHTS, VALIDATION_PAIRS, load_task_pair


def test_network_is_small_and_keeps_shape_for_odd_sizes():
    model = FusionNet().eval()
    assert parameter_count(model) <= 1_000_000
    a, b = torch.rand(2, 1, 37, 50), torch.rand(2, 1, 37, 50)
    with torch.no_grad():
        out = model(a, b)
    assert out.fused.shape == a.shape and out.weight.shape == a.shape
    assert float(out.fused.min()) >= 0 and float(out.fused.max()) <= 1


def test_check_method_available_rejects_missing_and_mismatched_weights(tmp_path):
    missing = FusionConfig(weights=tmp_path / "absent.pt")
    with pytest.raises(WeightsError, match="not found"):
        check_method_available("network", missing)
    other = tmp_path / "other.pt"
    torch.save({"architecture": "something-else", "state_dict": {}}, other)
    with pytest.raises(WeightsError, match="architecture"):
        check_method_available("network", FusionConfig(weights=other))
    resized = tmp_path / "resized.pt"
    save_weights(FusionNet((8, 16, 16)), resized)
    payload = torch.load(resized, weights_only=True)
    payload["widths"] = [16, 32, 32]  # claims the default widths, holds tensors of another size
    torch.save(payload, resized)
    with pytest.raises(WeightsError, match="do not match"):
        check_method_available("network", FusionConfig(weights=resized))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="unreadable"):
        load_model(garbage)
    check_method_available("gff", missing)  # classical methods need no weights


def test_weights_round_trip(tmp_path):
    model = FusionNet().eval()
    path = tmp_path / "w.pt"
    save_weights(model, path, meta={"note": "test"})
    loaded = load_model(path)
    a, b = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(a, b).fused, loaded(a, b).fused)


def test_shipped_weights_load():
    assert SHIPPED_WEIGHTS.is_file(), "models/fusion_net.pt must ship with the project"
    check_method_available("network", FusionConfig())
    # The network misses the clinical-fidelity targets (models/MODEL_CARD.md): not the default.
    assert FusionConfig().default_method == "chroma"


def test_shipped_network_beats_the_mean_baseline_on_validation_pairs(aanlib_dir):
    engine = FusionEngine("network", FusionConfig(saliency=False), "cpu")
    for task, ids in VALIDATION_PAIRS.items():
        for pair_id in ids:
            a, b = load_task_pair(aanlib_dir, task, pair_id)
            ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
            net = engine.fuse(ta, tb).fused[0, 0].numpy()
            mean = fuse(ta, tb, "average", "cpu").fused[0, 0].numpy()
            # The quality target's metrics; a majority of them, and always the edge transfer (Qabf).
            names = ["Qabf", "VIF", "MI", "SSIM", "FMI_pixel"]
            got = compute_metrics(a * 255, b * 255, net * 255, names=names)
            ref = compute_metrics(a * 255, b * 255, mean * 255, names=names)
            better = [n for n in names if got[n] > ref[n]]
            assert len(better) >= 3 and "Qabf" in better, f"{task} {pair_id}: network {got} vs mean {ref}"


def test_network_explanations(pet_pair):
    mri, pet = pet_pair
    result = FusionEngine("network", FusionConfig(), "cpu").fuse(torch.cat([mri, mri]), torch.cat([pet, pet]))
    assert result.fused.shape == (2, 3, *mri.shape[-2:])
    assert result.saliency is not None and result.saliency.shape == (2, *mri.shape[-2:])
    assert float(result.saliency.max()) == pytest.approx(1.0) and float(result.saliency.min()) >= 0
    assert torch.allclose(result.saliency[0], result.saliency[1], atol=1e-5)
    c = result.contribution
    assert float(c.min()) >= 0 and float(c.max()) <= 1
    # Where the PET is dark and the MRI bright, the fused value comes from the MRI.
    pet_y = pet.mean(dim=1)[0]
    mask = (pet_y < 0.02) & (mri[0, 0] > 0.3)
    assert mask.sum() > 50 and float(c[0][mask].mean()) < 0.1


def test_weighted_contribution_limits():
    a, b = torch.full((1, 1, 4, 4), 0.5), torch.zeros(1, 1, 4, 4)
    w = torch.full_like(a, 0.7)
    assert torch.all(weighted_contribution(w, a, b) == 0)
    assert torch.allclose(weighted_contribution(w, torch.zeros_like(a), a + 0.5), torch.ones(1, 4, 4))
    assert torch.allclose(weighted_contribution(w, torch.zeros_like(a), torch.zeros_like(a)), torch.full((1, 4, 4), 0.7))


def test_network_batch_size_invariance(grey_batch):
    fixed, moving = grey_batch
    one = FusionEngine("network", FusionConfig(batch_size=1, saliency=True), "cpu").fuse(fixed, moving)
    many = FusionEngine("network", FusionConfig(batch_size=5, saliency=True), "cpu").fuse(fixed, moving)
    assert torch.allclose(one.fused, many.fused, atol=1e-5)
    assert torch.allclose(one.saliency, many.saliency, atol=1e-4)
    assert np.isfinite(one.contribution.numpy()).all()


def test_selection_head_copies_one_source_per_pixel_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = FusionNet(select=True).eval()
    a, b = torch.rand(2, 1, 40, 48), torch.rand(2, 1, 40, 48)
    with torch.no_grad():
        out = model(a, b)
    assert set(torch.unique(out.weight).tolist()) <= {0.0, 1.0}
    assert torch.equal(out.fused, torch.where(out.weight > 0.5, b, a))
    assert torch.all(out.detail == 0)
    path = tmp_path / "select.pt"
    save_weights(model, path)
    assert torch.load(path, weights_only=True)["architecture"] == "attention-selection-v2"
    loaded = load_model(path)
    assert loaded.select
    with torch.no_grad():
        assert torch.equal(loaded(a, b).fused, out.fused)
    save_weights(FusionNet(), path)  # the blend head keeps its own tag and output
    assert torch.load(path, weights_only=True)["architecture"] == "attention-fusion-v1" and not load_model(path).select


def test_selection_head_keeps_a_saliency_gradient():
    from dicomnode.fusion.explain import network_method

    torch.manual_seed(0)
    run = network_method(FusionNet(select=True).eval(), saliency=True)
    fused, contribution, cam = run(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    # The hard choice has no gradient; the straight-through soft weight gives Grad-CAM one.
    assert float(cam.max()) > 0
    assert set(torch.unique(contribution).tolist()) <= {0.0, 1.0}


def test_selection_fast_path_matches_the_general_formulas():
    from dicomnode.fusion.explain import network_method, weighted_contribution

    torch.manual_seed(1)
    model = FusionNet(select=True).eval()
    a, b = torch.rand(3, 1, 40, 48), torch.rand(3, 1, 40, 48)
    a[0, 0, :8] = 0  # dark in both: weighted_contribution falls back to w there
    b[0, 0, :8] = 0
    fused, share, _ = network_method(model, saliency=False)(a, b)
    with torch.no_grad():
        out = model(a, b)
    assert torch.equal(fused, (1 - out.weight) * a + out.weight * b)
    assert torch.equal(share, weighted_contribution(out.weight, a, b))
