"""Quality of the fusion methods on validation pairs, and the model card that reports it.

Scored on luminance, 0..255, with ``dicomnode.quality.metrics.compute_metrics`` (its pinned
conventions: F rounded to 8 bits, MI in bits, SSIM averaged and VIF summed over both sources).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dicomnode.fusion.api import get_method
from dicomnode.lab.datasets import PairSample
from dicomnode.lab.stats import holm, paired_tests
from dicomnode.fusion.explain import network_method
from dicomnode.fusion.network import FusionNet

log = logging.getLogger(__name__)

TARGET_METRICS = ("Qabf", "VIF", "MI", "SSIM", "FMI_pixel", "Kept")
KEPT_TARGET = 0.90  # quality target v2: share of the functional image's excess the network keeps
BASELINES = ("average", "maxabs", "pca", "laplacian", "dwt", "gff", "alpha")
NETWORK = "network"


@dataclass
class Evaluation:
    """Per task and method: the target metrics per pair and their means, and the functional-signal share."""

    pairs: dict[str, dict[str, dict[str, list[float]]]]  # {task: {method: {metric: value per pair}}}
    kept: dict[str, dict[str, float]]  # {task: {method: mean excess_kept, pairs without excess skipped}}

    @property
    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """{task: {method: {metric: mean over the pairs, NaN values left out}}}."""
        return {task: {name: {m: float(np.nanmean(v)) for m, v in by_metric.items()} for name, by_metric in by.items()}
                for task, by in self.pairs.items()}


def evaluate_methods(samples: list[PairSample], model: FusionNet | None, methods: tuple[str, ...] = BASELINES,
                     metrics: tuple[str, ...] = TARGET_METRICS, conventions: str = "dicomnode") -> Evaluation:
    """Fuse every sample with every method once (the network too when ``model`` is given) and score it.

    ``conventions``: a name of ``quality.metrics.CONVENTIONS``.
    """
    from dicomnode.quality.metrics import compute_metrics, convention_options

    options = convention_options(conventions)

    runners = {name: get_method(name) for name in methods}
    if model is not None:
        runners[NETWORK] = network_method(model.eval(), saliency=False)
    scores: dict[str, dict[str, list[dict[str, float]]]] = {}
    kept: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        a = torch.from_numpy(sample.fixed)[None, None]
        b = torch.from_numpy(sample.moving)[None, None]
        for name, run in runners.items():
            with torch.no_grad():
                fused = run(a, b)[0][0, 0].clamp(0, 1).numpy()
            values = compute_metrics(sample.fixed * 255.0, sample.moving * 255.0, fused * 255.0, names=metrics, **options)
            scores.setdefault(sample.task, {}).setdefault(name, []).append(values)
            kept.setdefault(sample.task, {}).setdefault(name, []).append(excess_kept(sample.fixed, sample.moving, fused))
    return Evaluation(
        {task: {name: {m: [v[m] for v in rows] for m in metrics} for name, rows in by.items()}
         for task, by in scores.items()},
        {task: {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in by.items()}
         for task, by in kept.items()},
    )


def against_best_baseline(evaluation: Evaluation, candidate: str = NETWORK) -> dict[str, list[dict]]:
    """Per task and metric: ``candidate`` against the baseline with the best mean, paired over the same
    pairs (mean difference, Wilcoxon signed-rank p, Holm-corrected over the task's metrics)."""
    out = {}
    for task, by in sorted(evaluation.pairs.items()):
        if candidate not in by:
            continue
        rows = []
        for metric in by[candidate]:
            best = max((m for m in by if m != candidate), key=lambda m: np.nanmean(by[m][metric]))
            test = paired_tests({candidate: by[candidate][metric], best: by[best][metric]}, reference=best)[0]
            rows.append({"metric": metric, "baseline": best, "n": test.n, "mean_diff": test.mean_diff,
                         "wilcoxon_p": test.wilcoxon_p})
        for row, adjusted in zip(rows, holm([r["wilcoxon_p"] for r in rows]), strict=True):
            row["wilcoxon_p_holm"] = float(adjusted)
        out[task] = rows
    return out


def paired_table(comparisons: dict[str, list[dict]]) -> str:
    """``against_best_baseline`` as markdown."""
    lines = ["| task | metric | best baseline | pairs | network - baseline | Wilcoxon p (Holm) |", "|---|---|---|---|---|---|"]
    for task, rows in comparisons.items():
        for r in rows:
            lines.append(f"| {task} | {r['metric']} | {r['baseline']} | {r['n']} | {r['mean_diff']:+.4f} | "
                         f"{r['wilcoxon_p_holm']:.2g} |")
    return "\n".join(lines) + "\n"


def target_v2(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One line per task: Kept against KEPT_TARGET and the methods that dominate the network."""
    lines = []
    for task, rows in sorted(table.items()):
        kept = rows.get(NETWORK, {}).get("Kept", float("nan"))
        dominating = dominated_by(rows)
        ok = kept >= KEPT_TARGET and not dominating
        lines.append(f"- {task}: Kept {kept:.3f} ({'>=' if kept >= KEPT_TARGET else '<'} {KEPT_TARGET:.2f}), "
                     f"dominated by {', '.join(dominating) or 'none'}: {'met' if ok else '**not met**'}")
    return lines


def excess_kept(a: np.ndarray, b: np.ndarray, fused: np.ndarray, margin: float = 0.1) -> float:
    """``quality.basic.functional_kept`` for images on 0..1 (``margin`` a fraction of the range)."""
    from dicomnode.quality.basic import functional_kept

    return functional_kept(a * 255.0, b * 255.0, fused * 255.0, margin * 255.0)


def wins(table: dict[str, dict[str, float]], candidate: str = NETWORK) -> list[str]:
    """Metrics on which ``candidate`` beats every other method of one task's table."""
    if candidate not in table:
        return []
    others = [m for m in table if m != candidate]
    return [k for k in table[candidate] if all(table[candidate][k] > table[o][k] for o in others)]


def dominated_by(table: dict[str, dict[str, float]], candidate: str = NETWORK) -> list[str]:
    """Methods at least as good as ``candidate`` on every metric of one task's table and better on one.

    Every metric in the table is higher-is-better (Qabf, VIF, MI, SSIM, FMI_pixel, Kept). NaN counts
    as worse, so a method without a value cannot dominate.
    """
    if candidate not in table:
        return []
    mine = table[candidate]

    def at_least(x: float, y: float) -> bool:
        return bool(np.isfinite(x)) and (not np.isfinite(y) or x >= y)

    out = []
    for other, values in table.items():
        if other == candidate:
            continue
        if all(at_least(values[k], mine[k]) for k in mine) and any(
                np.isfinite(values[k]) and (not np.isfinite(mine[k]) or values[k] > mine[k]) for k in mine):
            out.append(other)
    return out


def markdown_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for task in sorted(table):
        rows = table[task]
        metrics = list(next(iter(rows.values())))
        lines.append(f"**{task}** (network beats every baseline on: {', '.join(wins(rows)) or 'none'})\n")
        lines.append("| method | " + " | ".join(metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for name, values in rows.items():
            best = {m: max(r[m] for r in rows.values()) for m in metrics}
            cells = [(f"**{values[m]:.4f}**" if values[m] == best[m] else f"{values[m]:.4f}") for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


NOTES_MARKER = "<!-- notes: everything below this line is kept when the card is regenerated -->"


def write_model_card(path: Path, summary: dict, table: dict | None, comparisons: dict | None = None,
                     published: str | None = None) -> None:
    """Write ``MODEL_CARD.md``: data, losses, hyper-parameters, metrics against the baselines, limits.

    ``comparisons``: ``against_best_baseline``; ``published``: the CDDFuse-convention table. The card's
    hand-written notes (below ``NOTES_MARKER``) survive a rewrite.
    """
    settings = summary["settings"]
    metrics_text = markdown_table(table) if table else "_not evaluated (run `benchmarks/fusion_quality.py`)_\n"
    if table:
        metrics_text += ("\n**Quality target v2** (Kept >= 0.90, no baseline at least as good on all six figures "
                         "and better on one):\n" + "\n".join(target_v2(table)) + "\n")
    if comparisons:
        metrics_text += ("\n**Paired statistics**, network against the baseline with the best mean per figure, "
                         "over the same pairs:\n\n" + paired_table(comparisons))
    if published:
        metrics_text += ("\n**Against CDDFuse's published figures** (its MIF test set; here scored on the "
                         "validation pairs with CDDFuse's conventions, `--conventions cddfuse`; target: at least "
                         "as good on 3 of 4 per task):\n\n" + published + "\n")
    notes = ""
    if path.exists() and NOTES_MARKER in path.read_text():
        notes = "\n" + NOTES_MARKER + path.read_text().split(NOTES_MARKER, 1)[1]
    rule = settings["loss"].get("rule", 0.0)
    if rule:
        model_text = f"""Multi-scale attention selection CNN (`dicomnode/fusion/network.py`, architecture tag
`attention-selection-v2`), {summary['parameters']:,} parameters: a shared encoder (image + Sobel edge
prior) at 1/2, 1/4 and 1/8 scale with channel and spatial attention, cross-modal attention gates
per scale, a decoder, and a full-resolution edge-aware refinement. It predicts a per-pixel
selection map `w` (1 = take the moving image) and fuses `F = (1 - w) A + w B` with `w` rounded to
0 or 1 at inference, so every fused pixel is an exact copy of one source; `w` is the contribution
map. Colour functional images are fused on BT.601 luminance (Y), their chroma kept."""
        others = ", ".join(f"{settings['loss'][k]} x {k}" for k in ("ssim", "gradient", "intensity", "selection")
                           if settings["loss"].get(k))
        loss_text = f"""Supervised by a fixed rule (`dicomnode.lab.losses.guarded_selection`): loss = {rule} x binary cross-entropy of the
selection logit to the rule's map{' + ' + others + ' (unsupervised terms)' if others else ''}. The rule picks regions of the source with more local activity
(Gaussian-weighted Sobel, sigma 5 px, plus a vote for the brighter source; majority filter sigma 5 px)
and always keeps the moving image where it is brighter than the fixed one by more than 0.1 (smoothed,
and pixel by pixel), so functional uptake is not traded for anatomy. Inputs are never swapped (the rule is asymmetric).
"""
    else:
        model_text = f"""Multi-scale attention fusion CNN (`dicomnode/fusion/network.py`, architecture tag
`attention-fusion-v1`), {summary['parameters']:,} parameters: a shared encoder (image + Sobel edge
prior) at 1/2, 1/4 and 1/8 scale with channel and spatial attention, cross-modal attention gates
per scale, a decoder, and a full-resolution edge-aware refinement. It predicts a per-pixel
weight map `w` (the moving image's share) and a small detail residual `d`:
`F = (1 - w) A + w B + d`. Colour functional images are fused on BT.601 luminance (Y), their
chroma kept."""
        loss_text = f"""Unsupervised; loss = {settings['loss']['ssim']} x (1 - mean(SSIM(F,A), SSIM(F,B)))
+ {settings['loss']['gradient']} x L1(|Sobel F|, max(|Sobel A|, |Sobel B|))
+ {settings['loss']['intensity']} x L1(F, max(A, B)).
"""
    if settings.get("init"):
        loss_text += f"Started from the weights `{Path(str(settings['init'])).name}` of the previous run (same layers).\n"
    text = f"""# Model card: attention fusion network (`fusion_net.pt`)

**Not for primary diagnosis.** The fused images are a reading aid next to the source series,
which remain the reference.

## Model
{model_text}

## Data
AANLIB (Harvard Whole Brain Atlas) registered 2-D pairs, 256 x 256 (`../shared/data/aanlib`),
luminance of PET/SPECT pseudo-colour, plus axial slice pairs (CT-PET, MR-PET, MR-CT) of one
co-registered soft-tissue-sarcoma patient (STS_002; PET as SUV 0-10, hot colour map, luminance).
- training pairs: {summary['train_pairs']} AANLIB + {summary['train_volume_slices']} 3-D slices
- validation pairs: {summary['val_pairs']}, split **by case** (never seen in training):
  `{json.dumps(summary['val_cases'])}`. CT-MRI and SPECT-MRI case 28 share their MRI, so it is
  held out of both.

## Training
{loss_text}
Random {settings['crop']} x {settings['crop']} crops, batch {settings['batch']}, flips and 90-degree turns,
{'fixed/moving in order' if rule else 'fixed/moving swapped at random'}; AdamW (lr {settings['lr']}, weight decay {settings['weight_decay']}),
100-step warm-up then cosine decay, {summary['steps_done']} steps, gradient clipping 1.0, seed {settings['seed']}.
The final state is kept; the validation cases are scored once, after training, never used to choose a state.
Trained on {summary['device']} in {summary['train_seconds']} s ({settings['threads']} torch thread(s); the 2-core
machine was shared with other work).

## Metrics on the validation cases
Luminance, 0..255, `dicomnode.quality.metrics` conventions (F rounded to 8 bits, MI in bits,
SSIM = mean of SSIM(A,F) and SSIM(B,F), VIF = VIFp(A,F) + VIFp(B,F), FMI on pixels; Kept = the share
of the moving image's excess over the MRI that F shows, where that excess is above 25.5). Means over
the validation pairs; bold = best of the row's column.

{metrics_text}
## Limitations
- Trained on few cases (brain atlas slices and one sarcoma patient); other anatomy, scanners and
  intensity preparations are out of distribution. Check the per-series quality metrics.
- Unsupervised losses reward edge transfer and source intensities, not diagnostic correctness:
  the network can attenuate or hide a lesion of one modality where the other is brighter.
- AANLIB PET/SPECT are 8-bit pseudo-colour renderings, not quantitative SUV.
- Not validated clinically; not for primary diagnosis.
{notes}"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
