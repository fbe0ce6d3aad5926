"""Reports of a bench run: statistics per task, terminal and Markdown tables, CSV, JSON and PNG figures."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dicomnode.lab import stats
from dicomnode.quality.names import DIRECTIONS

SIGNIFICANCE = 0.05


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.floating | float):
        return _finite_or_none(float(obj))
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def summarize(rows, names: list[str], reference: str, correction: str = "holm") -> dict:
    """Per task and metric: each method's mean/SD/CI, paired tests vs ``reference`` and omnibus tests.

    Values are aligned by pair id. A method with no finite value for a metric (e.g. DFRS without a
    saliency map) is left out of that metric's tests.
    """
    tasks = list(dict.fromkeys(r.task for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    result = {"reference": reference, "correction": correction, "methods": methods, "metrics": names, "tasks": {}}
    for task in tasks:
        task_rows = [r for r in rows if r.task == task]
        pair_ids = list(dict.fromkeys(r.pair_id for r in task_rows))
        index = {(r.pair_id, r.method): r for r in task_rows}
        per_metric = {}
        for name in names:
            scores = {
                m: np.array([index[(p, m)].metrics[name] if (p, m) in index else np.nan for p in pair_ids])
                for m in methods
            }
            entry = {"higher_is_better": DIRECTIONS[name], "summary": {m: asdict(stats.describe(v)) for m, v in scores.items()}}
            tested = {m: v for m, v in scores.items() if np.isfinite(v).any()}
            if reference in tested and len(tested) > 1:
                entry["paired"] = [asdict(c) for c in stats.paired_tests(tested, reference, correction)]
            else:
                entry["paired"] = []
            entry["omnibus"] = asdict(stats.omnibus(tested)) if len(tested) >= 3 else None
            per_metric[name] = entry
        fuse_s = {m: float(np.mean([r.fuse_s for r in task_rows if r.method == m])) for m in methods}
        result["tasks"][task] = {"pairs": len(pair_ids), "fuse_seconds_mean": fuse_s, "metrics": per_metric}
    return _clean(result)


def _cell(entry: dict, method: str, reference: str) -> str:
    s = entry["summary"][method]
    if s["mean"] is None:
        return "-"
    sd = s["sd"]
    text = f"{s['mean']:.4g}" + (f" ± {sd:.3g}" if sd is not None else "")
    for comp in entry["paired"]:
        if comp["method"] == method and comp["wilcoxon_p_adj"] is not None and comp["wilcoxon_p_adj"] < SIGNIFICANCE:
            text += " *"
    return text


def _task_lines(summary: dict, task: str) -> list[list[str]]:
    data = summary["tasks"][task]
    methods, ref = summary["methods"], summary["reference"]
    lines = [["metric", *[(m + " (ref)" if m == ref else m) for m in methods], "Friedman p"]]
    for name, entry in data["metrics"].items():
        arrow = "↑" if entry["higher_is_better"] else "↓"
        om = entry["omnibus"]
        fp = "-" if not om or om["friedman_p"] is None else f"{om['friedman_p']:.2g}"
        lines.append([f"{name} {arrow}", *[_cell(entry, m, ref) for m in methods], fp])
    return lines


def format_table(summary: dict) -> str:
    """Plain-text tables, one per task: metric rows, method columns, mean ± SD; * = differs from the reference."""
    out = []
    for task, data in summary["tasks"].items():
        lines = _task_lines(summary, task)
        widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
        out.append(f"{task}: {data['pairs']} pairs; * = Wilcoxon vs {summary['reference']}, {summary['correction']}-adjusted p < {SIGNIFICANCE}")
        for row in lines:
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        out.append("")
    return "\n".join(out)


def format_markdown(summary: dict) -> str:
    """The same tables as Markdown."""
    out = []
    for task, data in summary["tasks"].items():
        out.append(f"**{task}** ({data['pairs']} pairs; * = Wilcoxon signed-rank vs {summary['reference']}, "
                   f"{summary['correction']}-adjusted p < {SIGNIFICANCE}; ↑/↓ = higher/lower is better)\n")
        lines = _task_lines(summary, task)
        out.append("| " + " | ".join(lines[0]) + " |")
        out.append("|" + "---|" * len(lines[0]))
        out += ["| " + " | ".join(row) + " |" for row in lines[1:]]
        secs = " · ".join(f"{m} {s * 1000:.0f} ms" for m, s in data["fuse_seconds_mean"].items())
        out.append(f"\nMean fusion time per pair: {secs}\n")
    return "\n".join(out)


def write_csv(rows, names: list[str], path: Path) -> None:
    """One row per (task, pair, method) with every metric, fusion and scoring seconds."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "pair_id", "method", *names, "fuse_s", "score_s"])
        for r in rows:
            w.writerow([r.task, r.pair_id, r.method, *[repr(float(r.metrics[n])) for n in names], f"{r.fuse_s:.4f}", f"{r.score_s:.4f}"])


def write_json(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=False))


def plot_boxes(rows, names: list[str], folder: Path) -> list[Path]:
    """One PNG per metric: a panel per task, a box per method. Metrics with no finite value are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(r.task for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    written = []
    for name in names:
        panels = []
        for task in tasks:
            data = [[r.metrics[name] for r in rows if r.task == task and r.method == m] for m in methods]
            panels.append([[v for v in col if math.isfinite(v)] for col in data])
        if not any(any(col) for p in panels for col in p):
            continue
        fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 0.7 * len(methods) * len(tasks), 3.6), squeeze=False)
        for ax, task, data in zip(axes[0], tasks, panels, strict=True):
            ax.boxplot([col if col else [np.nan] for col in data], showfliers=True)
            ax.set_xticks(range(1, len(methods) + 1), methods, rotation=45, ha="right", fontsize=8)
            ax.set_title(task, fontsize=9)
        axes[0][0].set_ylabel(f"{name} ({'higher' if DIRECTIONS[name] else 'lower'} is better)")
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_examples(examples, folder: Path) -> list[Path]:
    """One PNG per task: a row per example pair with A, B and each method's fused image side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in dict.fromkeys(e.task for e in examples):
        chosen = [e for e in examples if e.task == task]
        methods = list(chosen[0].fused)
        cols = 2 + len(methods)
        fig, axes = plt.subplots(len(chosen), cols, figsize=(1.6 * cols, 1.7 * len(chosen)), squeeze=False)
        for row, ex in zip(axes, chosen, strict=True):
            images = [("A", ex.a), ("B", ex.b), *[(m, ex.fused[m]) for m in methods]]
            for ax, (title, img) in zip(row, images, strict=True):
                ax.imshow(img.astype(np.uint8), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
                ax.set_title(f"{ex.pair_id} {title}" if title in ("A", "B") else title, fontsize=7)
                ax.axis("off")
        fig.tight_layout()
        path = folder / f"{task}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
