"""The model card's evaluation: method tables, wins, and the functional-signal share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.lab.datasets import PairSample
from dicomnode.lab.evaluate import evaluate_methods, excess_kept, wins


def _sample(task: str, seed: int) -> PairSample:
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(0.0, 0.5, (32, 32)).astype(np.float32)
    moving = fixed.copy()
    moving[8:20, 8:20] += 0.4  # "uptake": the moving image is clearly brighter here
    return PairSample(task, "1", str(seed), fixed, moving)


def test_excess_kept_on_hand_cases():
    a = np.zeros((4, 4))
    b = a.copy()
    b[:2] = 0.8
    assert excess_kept(a, b, a) == 0.0
    assert excess_kept(a, b, b) == 1.0
    assert excess_kept(a, b, (a + b) / 2) == pytest.approx(0.5)
    assert math.isnan(excess_kept(a, a, a))  # no pixel where B exceeds A by the margin


def test_tables_per_task_and_method():
    samples = [_sample("PET-MRI", 0), _sample("PET-MRI", 1), _sample("CT-MRI", 2)]
    evaluation = evaluate_methods(samples, None, methods=("average", "maxabs"), metrics=("MI", "SSIM"))
    table, kept = evaluation.metrics, evaluation.kept
    assert set(table) == {"PET-MRI", "CT-MRI"} and set(table["PET-MRI"]) == {"average", "maxabs"}
    assert all(np.isfinite(v) for row in table["PET-MRI"].values() for v in row.values())
    assert kept["PET-MRI"]["maxabs"] == pytest.approx(1.0) and kept["PET-MRI"]["average"] == pytest.approx(0.5, abs=0.01)
    assert wins({"network": {"MI": 2.0, "SSIM": 0.5}, "average": {"MI": 1.0, "SSIM": 0.6}}) == ["MI"]


def test_network_against_the_best_baseline_is_paired_per_figure():
    from dicomnode.lab.evaluate import against_best_baseline

    samples = [_sample("PET-MRI", seed) for seed in range(6)]
    evaluation = evaluate_methods(samples, None, methods=("average", "maxabs"), metrics=("MI", "Kept"))
    rows = {r["metric"]: r for r in against_best_baseline(evaluation, candidate="maxabs")["PET-MRI"]}
    table = evaluation.metrics["PET-MRI"]
    assert rows["Kept"]["baseline"] == "average" and rows["Kept"]["n"] == 6
    assert rows["Kept"]["mean_diff"] == pytest.approx(table["maxabs"]["Kept"] - table["average"]["Kept"])
    assert rows["Kept"]["mean_diff"] == pytest.approx(0.5, abs=0.01)
    # Six pairs, all better: the exact two-sided signed-rank p is 2 / 2**6, doubled by Holm over two figures.
    assert rows["Kept"]["wilcoxon_p"] == pytest.approx(2 / 64)
    assert rows["Kept"]["wilcoxon_p_holm"] >= rows["Kept"]["wilcoxon_p"]


def test_target_v2_needs_kept_and_no_dominating_baseline():
    from dicomnode.lab.evaluate import target_v2

    met = target_v2({"T": {"network": {"Kept": 0.95, "MI": 2.0}, "maxabs": {"Kept": 1.0, "MI": 1.0}}})
    assert met == ["- T: Kept 0.950 (>= 0.90), dominated by none: met"]
    dominated = target_v2({"T": {"network": {"Kept": 0.95, "MI": 1.0}, "maxabs": {"Kept": 1.0, "MI": 1.0}}})
    assert "dominated by maxabs: **not met**" in dominated[0]
    assert "(< 0.90)" in target_v2({"T": {"network": {"Kept": 0.85, "MI": 2.0}}})[0]


def test_model_card_rewrite_keeps_the_hand_written_notes(tmp_path):
    from dicomnode.lab.evaluate import NOTES_MARKER, write_model_card

    summary = {"parameters": 10, "train_pairs": 3, "train_volume_slices": 0, "val_pairs": 1,
               "val_cases": {"PET-MRI": ["30"]}, "steps_done": 2, "train_seconds": 1, "device": "cpu",
               "settings": {"crop": 32, "batch": 2, "lr": 0.001, "weight_decay": 0.0, "seed": 0, "threads": 1,
                            "init": None, "loss": {"rule": 1.0}}}
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(f"old generated text\n{NOTES_MARKER}\n## Why these weights\nA note by hand.\n")
    table = {"PET-MRI": {"network": {"Kept": 0.95, "MI": 2.0}, "average": {"Kept": 0.5, "MI": 1.0}}}
    write_model_card(card, summary, table, published="| a published table |")
    text = card.read_text()
    assert "old generated text" not in text and text.count(NOTES_MARKER) == 1
    assert text.rstrip().endswith("A note by hand.")
    assert "- PET-MRI: Kept 0.950 (>= 0.90), dominated by none: met" in text and "| a published table |" in text
