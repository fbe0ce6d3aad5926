"""Training of the attention fusion network on image pairs, unsupervised (``dicomnode train``).

Random crops of the training pairs (flips, 90-degree turns, fixed/moving swapped at random so
the network does not learn which input is which; ``crop`` 256 trains on whole AANLIB slices).
A ``rule`` loss weight trains the selection head (``FusionNet(select=True)``) on the guarded
selection map instead; that map treats the moving image differently, so inputs are not swapped.
AdamW with cosine decay over the steps, or over a wall-clock budget (``time_budget_s``: on a
shared CPU the step rate is unknown in advance). The final state is kept: the held-out cases are
scored once, after training, for the model card, and never used to choose a state (choosing the
checkpoint by their loss would make the card's held-out figures optimistic).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dicomnode.fusion.network import FusionNet, load_model, parameter_count
from dicomnode.lab.datasets import VALIDATION_CASES, PairSample, split_by_case
from dicomnode.lab.losses import LossWeights, fusion_loss
from dicomnode.log import event

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ("aanlib/CT-MRI", "aanlib/PET-MRI", "aanlib/SPECT-MRI", "dicom/sts/STS_002")


@dataclass
class TrainSettings:
    steps: int = 2000
    batch: int = 8
    crop: int = 80  # 256 trains on whole AANLIB slices (global structure), ~10x the pixels per crop
    lr: float = 2e-3
    weight_decay: float = 1e-4
    log_every: int = 200  # progress line: mean training loss over the last this many steps
    seed: int = 0
    # One thread: on a shared 2-core machine two threads spent ~10x the CPU per step waiting on each other.
    threads: int = 1
    init: Path | None = None  # start from these weights (fine-tuning) instead of from scratch
    volume_share: float = 0.15  # fraction of each batch drawn from 3-D slices, when there are any
    time_budget_s: float | None = None  # train until this much wall time has passed (steps = upper bound)
    loss: LossWeights = field(default_factory=LossWeights)


def _crop_batch(samples: list[PairSample], count: int, crop: int, rng: np.random.Generator,
                swap: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    a_list, b_list = [], []
    for idx in rng.integers(0, len(samples), count):
        s = samples[idx]
        a, b = s.fixed, s.moving
        h, w = a.shape
        if h < crop or w < crop:
            pad = ((0, max(crop - h, 0)), (0, max(crop - w, 0)))
            a, b = np.pad(a, pad), np.pad(b, pad)
            h, w = a.shape
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        a, b = a[y : y + crop, x : x + crop], b[y : y + crop, x : x + crop]
        k = int(rng.integers(0, 4))
        a, b = np.rot90(a, k), np.rot90(b, k)
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        if swap and rng.random() < 0.5:
            a, b = b, a
        a_list.append(np.ascontiguousarray(a))
        b_list.append(np.ascontiguousarray(b))
    return torch.from_numpy(np.stack(a_list))[:, None], torch.from_numpy(np.stack(b_list))[:, None]


def train(samples: list[PairSample], settings: TrainSettings, device: torch.device) -> tuple[FusionNet, dict]:
    """Train (from scratch or ``settings.init``); returns the final model and a summary for the model card."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    train_set, val_set = split_by_case(samples)
    if not train_set:
        raise ValueError("no training pairs found (check --data folders)")
    flat = [s for s in train_set if not s.task.endswith("-3D")]
    volume = [s for s in train_set if s.task.endswith("-3D")]
    select = settings.loss.rule > 0
    if settings.init:
        start_from = load_model(settings.init)
        model = FusionNet(start_from.widths, start_from.refine_width, select=select)
        model.load_state_dict(start_from.state_dict())  # same layers for both heads
    else:
        model = FusionNet(select=select)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    budget = settings.time_budget_s
    event(log, "train_start", params=parameter_count(model), train_pairs=len(flat), val_pairs=len(val_set),
          volume_slices=len(volume), steps=settings.steps, device=device)
    history = []
    recent: list[dict[str, float]] = []
    start = time.perf_counter()
    n_volume = int(round(settings.batch * settings.volume_share)) if volume and flat else 0
    step = 0
    while step < settings.steps:
        step += 1
        elapsed = time.perf_counter() - start
        progress = min(elapsed / budget, 1.0) if budget else (step - 1) / settings.steps
        last = step == settings.steps or (budget is not None and progress >= 1.0)
        for group in opt.param_groups:
            group["lr"] = settings.lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * progress))
        a, b = _crop_batch(flat or volume, settings.batch - n_volume, settings.crop, rng, swap=not select)
        if n_volume:
            va, vb = _crop_batch(volume, n_volume, settings.crop, rng, swap=not select)
            a, b = torch.cat([a, va]), torch.cat([b, vb])
        a, b = a.to(device), b.to(device)
        out = model(a, b)
        terms = fusion_loss(out.fused, a, b, settings.loss, out.logit)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append({k: float(v.detach()) for k, v in terms.items()})
        if step % settings.log_every == 0 or last:
            values = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
            history.append((step, values["total"]))
            event(log, "train_progress", step=step, loss=values["total"], ssim=values["ssim"], gradient=values["gradient"],
                  intensity=values["intensity"], selection=values.get("selection", 0.0), rule=values.get("rule", 0.0),
                  elapsed_s=round(time.perf_counter() - start))
            recent.clear()
        if last:
            break
    model.eval()
    summary = {
        "parameters": parameter_count(model),
        "train_pairs": len(flat),
        "train_volume_slices": len(volume),
        "val_pairs": len(val_set),
        "val_cases": {k: list(v) for k, v in VALIDATION_CASES.items()},
        "steps_done": step,
        "final_loss": history[-1][1],
        "train_seconds": round(time.perf_counter() - start),
        "history": history,
        # Plain types only: the weights file is read back with torch.load(weights_only=True).
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items() if k != "loss"},
                     "loss": asdict(settings.loss)},
        "device": str(device),
    }
    return model.cpu(), summary
