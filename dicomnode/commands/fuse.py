"""``dicomnode fuse``: fuse two registered 2-D images, or a folder of ``<id>_<MOD>`` pairs.

A colour (RGB) functional image is fused on luminance and keeps its chroma; a grey image stored
as RGB with equal channels is grey. Exit status: 0 all fused, 1 some pair could not be fused
(each named on stderr; the others are still written), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dicomnode.fusion.api import FusionEngine, UnknownMethod
from dicomnode.fusion.images import ImagePair, LoadedImage, PairError, find_pairs, load_image, order_pair, parse_pair_name, save_image
from dicomnode.log import event

log = logging.getLogger(__name__)


def _fusion_config(method: str | None):
    from dicomnode.config import FusionConfig

    # The command line writes fused images only; the saliency backward pass would be wasted.
    cfg = FusionConfig().model_copy(update={"saliency": False})
    return cfg, method or cfg.default_method


def order_inputs(a: Path, b: Path, img_a: LoadedImage, img_b: LoadedImage) -> tuple[LoadedImage, LoadedImage]:
    """(fixed, moving): a colour image is the moving one; else ``<id>_<MOD>`` names decide; else A, B."""
    if img_a.rgb is not None and img_b.rgb is not None:
        raise PairError(f"{a.name} and {b.name} are both colour images; one must be a grey anatomical image")
    if img_a.rgb is not None:
        return img_b, img_a
    if img_b.rgb is not None:
        return img_a, img_b
    pa, pb = parse_pair_name(a), parse_pair_name(b)
    if pa and pb:
        pair = order_pair(pa[0], (a, pa[1], pa[2]), (b, pb[1], pb[2]))
        return (img_a, img_b) if pair.fixed == a else (img_b, img_a)
    return img_a, img_b


def _as_tensors(fixed: LoadedImage, moving: LoadedImage) -> tuple[torch.Tensor, torch.Tensor]:
    moving_arr = moving.rgb if moving.rgb is not None else moving.grey[None]
    return torch.from_numpy(fixed.grey)[None, None], torch.from_numpy(np.ascontiguousarray(moving_arr))[None]


def _fuse_single(engine: FusionEngine, a: Path, b: Path, out: Path) -> None:
    img_a, img_b = load_image(a), load_image(b)
    if img_a.grey.shape != img_b.grey.shape:
        raise PairError(f"{a.name} is {img_a.grey.shape} but {b.name} is {img_b.grey.shape}; register and resample first")
    fixed, moving = order_inputs(a, b, img_a, img_b)
    result = engine.fuse(*_as_tensors(fixed, moving))
    save_image(out, result.fused[0].numpy())


def _load_pair(pair: ImagePair) -> tuple[torch.Tensor, torch.Tensor]:
    fixed, moving = load_image(pair.fixed), load_image(pair.moving)
    if fixed.rgb is not None:
        raise PairError(f"pair {pair.pair_id}: the anatomical image {pair.fixed.name} is in colour")
    if fixed.grey.shape != moving.grey.shape:
        raise PairError(f"pair {pair.pair_id}: sizes differ ({fixed.grey.shape} vs {moving.grey.shape})")
    return _as_tensors(fixed, moving)


def _fuse_folder(engine: FusionEngine, folder: Path, out_dir: Path) -> list[str]:
    pairs, problems = find_pairs(folder)
    groups: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for pair in pairs:
        try:
            fixed, moving = _load_pair(pair)
        except (PairError, OSError) as exc:
            problems.append(str(exc))
            continue
        groups.setdefault((tuple(fixed.shape), tuple(moving.shape)), []).append((pair.pair_id, fixed, moving))
    out_dir.mkdir(parents=True, exist_ok=True)
    done = 0
    for items in groups.values():
        # One call per shape group: the engine batches slices (fusion.batch_size) on its device.
        result = engine.fuse(torch.cat([f for _, f, _ in items]), torch.cat([m for _, _, m in items]))
        for (pair_id, _, _), fused in zip(items, result.fused):
            save_image(out_dir / f"{pair_id}.png", fused.numpy())
            done += 1
    if not pairs and not problems:
        problems.append(f"no <id>_<MOD> image pairs found in {folder}")
    event(log, "fuse_folder", folder=folder, fused=done, problems=len(problems))
    return problems


def fuse_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if args.pairs is not None:
        if args.inputs or args.out is None:
            print("usage: dicomnode fuse --pairs DIR --out DIR [--method NAME]", file=sys.stderr)
            return 2
        if not args.pairs.is_dir():
            print(f"error: {args.pairs} is not a folder", file=sys.stderr)
            return 2
    elif len(args.inputs) != 3:
        print("usage: dicomnode fuse A B OUT [--method NAME]  or  dicomnode fuse --pairs DIR --out DIR", file=sys.stderr)
        return 2
    cfg, method = _fusion_config(args.method)
    try:
        engine = FusionEngine(method, cfg, args.device)
    except (UnknownMethod, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.pairs is not None:
        problems = _fuse_folder(engine, args.pairs, args.out)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        event(log, "fuse_done", method=method, seconds=round(time.perf_counter() - start, 2))
        return 1 if problems else 0
    a, b, out = args.inputs
    try:
        _fuse_single(engine, a, b, out)
    except (PairError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
