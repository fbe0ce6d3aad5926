"""Command line: serve | worker | demo | send | register | fuse | train | metrics | bench | audit | resend | check-config.

Every handler lives in ``dicomnode.commands`` (a module per command group); this file only
parses arguments and dispatches, so ``dicomnode --help`` stays fast (heavy imports happen in the
command that needs them).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from dicomnode.domain import MODALITIES

# command -> "module:function"; the function takes the parsed arguments and returns an exit code.
COMMANDS = {
    "serve": "dicomnode.commands.node:serve_command",
    "worker": "dicomnode.commands.node:worker_command",
    "demo": "dicomnode.commands.demo:demo_command",
    "send": "dicomnode.commands.send:send_command",
    "register": "dicomnode.commands.register:register_command",
    "fuse": "dicomnode.commands.fuse:fuse_command",
    "train": "dicomnode.commands.lab:train_command",
    "metrics": "dicomnode.commands.metrics:metrics_command",
    "bench": "dicomnode.commands.lab:bench_command",
    "audit": "dicomnode.commands.audit:audit_command",
    "resend": "dicomnode.commands.send:resend_command",
    "check-config": "dicomnode.commands.node:check_config_command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the node (SCP, completion timers, worker, sender)")
    p.add_argument("--config", type=Path, help="TOML file (default: embedded defaults)")

    p = sub.add_parser("worker", help="claim and process jobs from the audit database (more workers: run more)")
    p.add_argument("--config", type=Path, help="TOML file (default: embedded defaults)")

    p = sub.add_parser("demo", help="end-to-end demo against a local Orthanc PACS")
    p.add_argument("--workdir", type=Path, default=Path("var"), help="where the demo writes (default ./var)")
    p.add_argument("--synthetic", action="store_true", help="use a generated study even if shared data exists")

    p = sub.add_parser("send", help="C-STORE files or folders to a peer")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ae", default="ANY-SCP", help="called AE title")
    p.add_argument("--calling-ae", default="DICOMNODE")

    p = sub.add_parser("register", help="register MOVING onto FIXED and write the transform")
    p.add_argument("fixed", type=Path, help="DICOM series folder or NIfTI/MHA file")
    p.add_argument("moving", type=Path, help="DICOM series folder or NIfTI/MHA file")
    p.add_argument("--out", type=Path, required=True, help="transform file (.h5 / .tfm)")
    p.add_argument("--stages", default="rigid,affine,deformable")
    p.add_argument("--config", type=Path)
    for role in ("fixed", "moving"):  # files without DICOM headers say nothing of their modality
        p.add_argument(f"--{role}-modality", choices=MODALITIES,
                       help=f"DICOM modality of the {role} image (overrides the series' own)")

    p = sub.add_parser("fuse", help="fuse two registered 2-D images, or a folder of pairs")
    p.add_argument("inputs", nargs="*", type=Path, help="A B OUT")
    p.add_argument("--pairs", type=Path, help="folder of <id>_<MOD>.png pairs")
    p.add_argument("--out", type=Path, help="output folder with --pairs")
    p.add_argument("--method", default=None, help="fusion method (default: fusion.default_method)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("train", help="train the fusion network from image pairs")
    p.add_argument("--data", type=Path, action="append", help="folder of pairs (repeatable)")
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 2000; --epochs overrides)")
    p.add_argument("--batch", type=int, default=None, help="crops per step (default 8)")
    p.add_argument("--crop", type=int, default=None, help="crop size in pixels (default 80)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    p.add_argument("--no-eval", action="store_true", help="skip the metric table of the model card")
    p.add_argument("--init", type=Path, default=None, help="fine-tune from these weights")
    p.add_argument("--loss-weights", default=None,
                   help="SSIM,GRADIENT,INTENSITY[,SELECTION[,RULE]] loss weights (default 1,20,4,0,0; RULE > 0: selection head)")
    p.add_argument("--minutes", type=float, default=None, help="train for this wall time (cosine schedule over it)")

    p = sub.add_parser("metrics", help="fusion metrics of sources A, B and fused F")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("f", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--conventions", default="dicomnode", choices=["dicomnode", "cddfuse"],
                   help="metric conventions: this project's (default) or CDDFuse's published ones")

    p = sub.add_parser("bench", help="compare fusion methods on a data set with paired statistics")
    p.add_argument("data", type=Path, nargs="+", help="folders of registered pairs")
    p.add_argument("--methods", default=None, help="comma-separated (default: all)")
    p.add_argument("--reference", default=None, help="method the others are tested against")
    p.add_argument("--out", type=Path, default=Path("var/bench"))
    p.add_argument("--limit", type=int, default=None, help="at most this many pairs per folder")
    p.add_argument("--correction", default="holm", choices=["holm", "bonferroni"])
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--conventions", default="dicomnode", choices=["dicomnode", "cddfuse"],
                   help="metric conventions: this project's (default) or CDDFuse's published ones")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("audit", help="recent jobs, series, sends and rejections")
    p.add_argument("--config", type=Path)
    p.add_argument("--database-url", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--job", type=int, default=None, help="show one job with its events and metrics")
    p.add_argument("--json", action="store_true", help="with --job: the full record as JSON")
    p.add_argument("--study", default=None, help="only this StudyInstanceUID")
    p.add_argument("--patient", default=None, help="only this PatientID")
    p.add_argument("--state", default=None, help="only jobs in this state (paired, processing, ..., done, failed)")

    p = sub.add_parser("resend", help="requeue the failed sends of failed jobs (a running node sends them)")
    p.add_argument("--config", type=Path)
    p.add_argument("--database-url", default=None)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, nargs="+", default=[], help="these jobs")
    which.add_argument("--all-failed", action="store_true", help="every failed job with failed sends")

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("file", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = COMMANDS[args.command].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except SystemExit as exc:  # a handler that cannot go on (commands.load_config_or_exit) says with which status
        return exc.code if isinstance(exc.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
