"""``dicomnode register FIXED MOVING --out T.h5``: align two volumes and write the transform."""

from __future__ import annotations

import argparse
import sys

import SimpleITK as sitk

from dicomnode.config import ConfigError, load_config
from dicomnode.imaging.register import RegistrationFailed, register_volumes
from dicomnode.imaging.volume import VolumeError, load_volume

_STAGES = ("rigid", "affine", "deformable")


def register_command(args: argparse.Namespace) -> int:
    """Write one composite transform mapping fixed LPS points to moving ones; print per-stage results.

    Without --config the command always registers (a shared FrameOfReferenceUID does not skip);
    with --config, ``registration.mode`` applies as in the node.
    """
    stages = tuple(s.strip() for s in str(args.stages).split(",") if s.strip())
    unknown = [s for s in stages if s not in _STAGES]
    if unknown:
        print(f"error: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(_STAGES)}", file=sys.stderr)
        return 2
    try:
        overrides: dict = {"registration": {"stages": list(stages)}}
        if args.config is None:
            overrides["registration"]["mode"] = "always"
        config = load_config(args.config, overrides).registration
        fixed, moving = load_volume(args.fixed), load_volume(args.moving)
        result = register_volumes(fixed, moving, config)
    except (ConfigError, VolumeError, RegistrationFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(result.transform, str(args.out))
    if result.skipped_reason:
        print(f"registration skipped: {result.skipped_reason}; identity transform written")
    else:
        print(f"initialization: {result.initialization}")
    print(f"{'stage':<11} {'kept':<5} {'MI before':>10} {'MI after':>10} {'iter':>5} {'seconds':>8}  note")
    for s in result.stages:
        print(f"{s.name:<11} {str(s.kept).lower():<5} {s.metric_before:>10.4f} {s.metric_after:>10.4f} "
              f"{s.iterations:>5d} {s.seconds:>8.1f}  {s.note}")
    print(f"total {result.seconds:.1f} s; transform written to {args.out}")
    return 0
