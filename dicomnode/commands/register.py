"""``dicomnode register FIXED MOVING --out T.h5``: align two volumes and write the transform."""

from __future__ import annotations

import argparse
import sys

import SimpleITK as sitk

from dicomnode.commands import load_config_or_exit
from dicomnode.domain import MODALITIES
from dicomnode.imaging.prepare import modality_used
from dicomnode.imaging.register import Registration, RegistrationFailed, register_volumes
from dicomnode.imaging.volume import Volume, VolumeError, load_volume

_STAGES = ("rigid", "affine", "deformable")


def _apply_hint(vol: Volume, hint: str | None, role: str) -> str:
    """Set the hinted modality on ``vol``; returns where the modality the stages use comes from."""
    if hint is None:
        return modality_used(vol)[1]
    if vol.modality and vol.modality != hint:
        print(f"warning: --{role}-modality {hint} overrides the series' DICOM Modality {vol.modality}",
              file=sys.stderr)
    vol.modality = hint
    return f"--{role}-modality"


def _stage_line(stage) -> str:
    """Why a stage did or did not run, and whether its result was kept."""
    if stage.iterations == 0 and not stage.kept and stage.note:
        return f"not run: {stage.note}"
    levels = ", ".join(f"{mm:g}" for mm in stage.levels_mm)
    ran = f"ran at {levels} mm" if levels else "ran"
    if stage.kept:
        return f"{ran}; kept: held-out MI improved" + (f"; {stage.note}" if stage.note else "")
    return f"{ran}; {stage.note}"


def _warn_unknown(result: Registration) -> None:
    """An unknown modality that kept a stage from running is said on stderr, with the way out."""
    unknown = [role for role, m in zip(("fixed", "moving"), result.modalities) if not m]
    for s in result.stages:
        if unknown and s.iterations == 0 and "deformable_modalities" in s.note:
            roles = " and ".join(unknown) + (" modalities are" if len(unknown) > 1 else " modality is")
            flags = " / ".join(f"--{r}-modality {'|'.join(MODALITIES)}" for r in unknown)
            print(f"warning: the {s.name} stage did not run because the {roles} unknown "
                  f"(no DICOM header); say what the file is with {flags}", file=sys.stderr)


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
    overrides: dict = {"registration": {"stages": list(stages)}}
    if args.config is None:
        overrides["registration"]["mode"] = "always"
    config = load_config_or_exit(args.config, overrides).registration
    try:
        fixed, moving = load_volume(args.fixed), load_volume(args.moving)
        sources = (_apply_hint(fixed, getattr(args, "fixed_modality", None), "fixed"),
                   _apply_hint(moving, getattr(args, "moving_modality", None), "moving"))
        result = register_volumes(fixed, moving, config)
    except (VolumeError, RegistrationFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(result.transform, str(args.out))
    used = result.modalities if result.stages else (modality_used(fixed)[0], modality_used(moving)[0])
    print("modalities: " + ", ".join(f"{role} {m or 'unknown'} ({src})"
                                     for role, m, src in zip(("fixed", "moving"), used, sources)))
    if result.skipped_reason:
        print(f"registration skipped: {result.skipped_reason}; identity transform written")
    else:
        print(f"initialization: {result.initialization}")
    print(f"{'stage':<11} {'kept':<5} {'MI before':>10} {'MI after':>10} {'iter':>5} {'seconds':>8}  why")
    for s in result.stages:
        print(f"{s.name:<11} {str(s.kept).lower():<5} {s.metric_before:>10.4f} {s.metric_after:>10.4f} "
              f"{s.iterations:>5d} {s.seconds:>8.1f}  {_stage_line(s)}")
    _warn_unknown(result)
    print(f"total {result.seconds:.1f} s; transform written to {args.out}")
    return 0
