"""``dicomnode train`` and ``dicomnode bench``: the research tools of ``dicomnode.lab`` from the command line.

``train`` writes the network weights and the model card into ``--out``; ``bench`` compares fusion
methods with paired statistics and writes its reports into ``--out``. Exit status: 0 done,
2 bad usage (unknown method or metric, no pairs).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from dicomnode.log import event

log = logging.getLogger(__name__)


def train_command(args: argparse.Namespace) -> int:
    import torch

    from dicomnode.fusion.api import resolve_device
    from dicomnode.fusion.network import save_weights
    from dicomnode.lab.datasets import load_training_data, split_by_case
    from dicomnode.lab.evaluate import against_best_baseline, evaluate_methods, write_model_card
    from dicomnode.lab.losses import LossWeights
    from dicomnode.lab.training import DEFAULT_DATA, REPO_ROOT, TrainSettings, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = TrainSettings(seed=args.seed)
    for name in ("steps", "batch", "crop", "lr", "init"):
        if getattr(args, name, None) is not None:
            setattr(settings, name, getattr(args, name))
    if getattr(args, "minutes", None) is not None:
        settings.time_budget_s = args.minutes * 60.0
        settings.steps = 10**9 if args.steps is None else settings.steps
    if getattr(args, "loss_weights", None):
        values = [float(v) for v in args.loss_weights.split(",")]
        if len(values) not in (3, 4, 5):
            raise ValueError("--loss-weights takes SSIM,GRADIENT,INTENSITY[,SELECTION[,RULE]] (RULE > 0: selection head)")
        settings.loss = LossWeights(*values)
    torch.set_num_threads(settings.threads)
    shared = REPO_ROOT.parent / "shared" / "data"
    folders = list(args.data) if args.data else [shared / d for d in DEFAULT_DATA]
    samples = load_training_data(folders)
    if args.epochs is not None:
        train_count = len(split_by_case(samples)[0])
        settings.steps = max(1, math.ceil(args.epochs * train_count / settings.batch))
    device = resolve_device(args.device)
    model, summary = train(samples, settings, device)
    out: Path = args.out
    weights = out / "fusion_net.pt"
    save_weights(model, weights, meta={k: v for k, v in summary.items() if k != "history"})
    event(log, "train_done", weights=weights, steps=summary["steps_done"], seconds=summary["train_seconds"])
    _, val_set = split_by_case(samples)
    evaluation = evaluate_methods(val_set, model) if val_set and not getattr(args, "no_eval", False) else None
    write_model_card(out / "MODEL_CARD.md", summary, evaluation and evaluation.metrics,
                     evaluation and against_best_baseline(evaluation))
    event(log, "model_card", path=out / "MODEL_CARD.md")
    return 0


def _default_reference(methods: list[str]) -> str:
    return "average" if "average" in methods else methods[0]


def bench_command(args) -> int:
    """Run the benchmark described by the parsed arguments; write the reports into args.out."""
    from dicomnode.config import QualityConfig
    from dicomnode.lab import bench_report
    from dicomnode.lab.bench import BenchError, list_methods, run_bench
    from dicomnode.quality.metrics import METRIC_NAMES

    try:
        methods = list_methods(getattr(args, "methods", None))
        names = getattr(args, "metrics", None)
        names = [n.strip() for n in names.split(",")] if names else list(METRIC_NAMES)
        unknown = [n for n in names if n not in METRIC_NAMES]
        if unknown:
            raise BenchError(f"unknown metric names {unknown}")
        rows, examples = run_bench(
            [Path(p) for p in args.data], methods, args.device, args.limit, names,
            feature_threshold=QualityConfig().feature_threshold, progress=not getattr(args, "quiet", False),
            conventions=getattr(args, "conventions", "dicomnode"),
        )
    except BenchError as exc:
        print(f"dicomnode bench: {exc}", file=sys.stderr)
        return 2
    ran = list(dict.fromkeys(r.method for r in rows))
    reference = args.reference or _default_reference(ran)
    if reference not in ran:
        print(f"dicomnode bench: reference method {reference!r} did not run; ran: {', '.join(ran)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = bench_report.summarize(rows, names, reference, args.correction)
    table = bench_report.format_table(summary)
    print(table)
    bench_report.write_csv(rows, names, out / "metrics.csv")
    bench_report.write_json(summary, out / "summary.json")
    (out / "table.md").write_text(bench_report.format_markdown(summary))
    bench_report.plot_boxes(rows, names, out / "boxplots")
    bench_report.plot_examples(examples, out / "examples")
    print(f"wrote {out}/metrics.csv, summary.json, table.md, boxplots/, examples/")
    return 0
