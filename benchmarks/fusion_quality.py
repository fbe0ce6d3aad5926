"""Fusion quality of the network against the classical baselines on the held-out AANLIB cases.

Usage: python benchmarks/fusion_quality.py [--weights models/fusion_net.pt] [--stride 1] [--card]
       python benchmarks/fusion_quality.py --conventions cddfuse   (the table against CDDFuse's published one)
Scores Qabf, VIF, MI, SSIM, FMI_pixel and Kept on luminance (dicomnode.quality.metrics conventions)
for every validation pair (every ``stride``-th with --stride), prints a markdown table per task, the
quality target v2 (Kept, domination) and the network against the best baseline per figure with paired
statistics; with --card it also scores CDDFuse's conventions and rewrites the model card beside the
weights with all of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dicomnode.lab.datasets import load_training_data, split_by_case
from dicomnode.lab.evaluate import (TARGET_METRICS, against_best_baseline, evaluate_methods, markdown_table,
                                    paired_table, target_v2, wins, write_model_card)
from dicomnode.fusion.network import load_model

REPO = Path(__file__).resolve().parents[1]
TASKS = ("CT-MRI", "PET-MRI", "SPECT-MRI")
# CDDFuse (Zhao et al., CVPR 2023), its MIF test set, its own conventions: MI / VIF / Qabf / SSIM.
CDDFUSE = {"CT-MRI": (2.61, 0.61, 0.68, 1.34), "PET-MRI": (2.03, 0.71, 0.71, 1.49), "SPECT-MRI": (2.49, 0.97, 0.78, 1.48)}
PUBLISHED = ("MI", "VIF", "Qabf", "SSIM")


def published_table(table: dict) -> str:
    """Network and best baseline per task beside CDDFuse's published values (higher is better on all four)."""
    lines = ["| task | method | " + " | ".join(PUBLISHED) + " | at least CDDFuse |", "|---|---|" + "---|" * (len(PUBLISHED) + 1)]
    for task in sorted(table):
        theirs = dict(zip(PUBLISHED, CDDFUSE[task]))
        lines.append(f"| {task} | CDDFuse (published) | " + " | ".join(f"{v:.2f}" for v in CDDFUSE[task]) + " | |")
        for method, values in table[task].items():
            ok = [m for m in PUBLISHED if values[m] >= theirs[m]]
            lines.append(f"| {task} | {method} | " + " | ".join(f"{values[m]:.3f}" for m in PUBLISHED)
                         + f" | {len(ok)}/4 ({', '.join(ok) or 'none'}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO / "models" / "fusion_net.pt")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "aanlib")
    parser.add_argument("--stride", type=int, default=1, help="score every n-th validation pair")
    parser.add_argument("--card", action="store_true", help="rewrite MODEL_CARD.md beside the weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    parser.add_argument("--conventions", default="dicomnode", choices=["dicomnode", "cddfuse"],
                        help="cddfuse: score with CDDFuse's conventions and print the published comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    _, val = split_by_case(load_training_data([args.data / t for t in TASKS]))
    val = val[:: args.stride]
    model = load_model(args.weights)
    if args.conventions == "cddfuse":
        table = evaluate_methods(val, model, metrics=PUBLISHED, conventions="cddfuse").metrics
        print(f"validation pairs scored: {len(val)} (CDDFuse conventions)\n")
        print(published_table(table))
        return
    evaluation = evaluate_methods(val, model, metrics=TARGET_METRICS)
    table, comparisons = evaluation.metrics, against_best_baseline(evaluation)
    print(f"validation pairs scored: {len(val)}\n")
    print(markdown_table(table))
    for task, rows in sorted(table.items()):
        print(f"{task}: network best on {len(wins(rows))}/{len(TARGET_METRICS)} ({', '.join(wins(rows))})")
    print("\nQuality target v2:\n" + "\n".join(target_v2(table)))
    print("\n" + paired_table(comparisons))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    if args.card:
        published = published_table(evaluate_methods(val, model, metrics=PUBLISHED, conventions="cddfuse").metrics)
        print(published)
        meta = torch.load(args.weights, map_location="cpu", weights_only=True)["meta"]
        meta["val_pairs_scored"] = len(val)
        write_model_card(args.weights.parent / "MODEL_CARD.md", meta, table, comparisons, published)


if __name__ == "__main__":
    main()
