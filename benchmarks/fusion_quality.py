"""Fusion quality of the network against the classical baselines on the held-out AANLIB cases.

Usage: python benchmarks/fusion_quality.py [--weights models/fusion_net.pt] [--stride 1] [--card]
Scores Qabf, VIF, MI, SSIM, FMI_pixel on luminance (dicomnode.quality.metrics conventions) for
every validation pair (every ``stride``-th with --stride), prints a markdown table per task and the
share of the functional image's excess each method keeps, and with --card rewrites the model card
beside the weights with the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dicomnode.fusion.datasets import load_training_data, split_by_case
from dicomnode.fusion.evaluate import evaluate_methods, markdown_table, wins, write_model_card
from dicomnode.fusion.network import load_model

REPO = Path(__file__).resolve().parents[1]
TASKS = ("CT-MRI", "PET-MRI", "SPECT-MRI")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO / "models" / "fusion_net.pt")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "aanlib")
    parser.add_argument("--stride", type=int, default=1, help="score every n-th validation pair")
    parser.add_argument("--card", action="store_true", help="rewrite MODEL_CARD.md beside the weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    _, val = split_by_case(load_training_data([args.data / t for t in TASKS]))
    val = val[:: args.stride]
    model = load_model(args.weights)
    evaluation = evaluate_methods(val, model)
    table = evaluation.metrics
    print(f"validation pairs scored: {len(val)}\n")
    print(markdown_table(table))
    for task, rows in sorted(table.items()):
        print(f"{task}: network best on {len(wins(rows))}/5 ({', '.join(wins(rows))})")
    print("\nShare of the moving image's excess over the fixed one kept where B > A + 0.1 (1 = all):")
    for task, rows in sorted(evaluation.kept.items()):
        print(f"{task}: " + ", ".join(f"{name} {value:.2f}" for name, value in rows.items()))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    if args.card:
        meta = torch.load(args.weights, map_location="cpu", weights_only=True)["meta"]
        meta["val_pairs_scored"] = len(val)
        write_model_card(args.weights.parent / "MODEL_CARD.md", meta, table)


if __name__ == "__main__":
    main()
