"""``dicomnode send`` (C-STORE files to a peer now) and ``dicomnode resend`` (requeue a failed job's sends)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from dicomnode.commands import load_config_or_exit


def _collect(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        else:
            files.append(path)
    return files


def send_command(args) -> int:
    """``dicomnode send PATHS --host --port --ae --calling-ae``: C-STORE files and folders."""
    from dicomnode.config import Destination, SendingConfig
    from dicomnode.net.scu import SendFailed, send_files

    timeouts = SendingConfig()  # the node's own defaults
    files = _collect(args.paths)
    dest = Destination(name="cli", ae_title=args.ae, host=args.host, port=args.port)
    try:
        report = send_files(dest, files, calling_ae=args.calling_ae, timeout_s=timeouts.connect_timeout_s,
                            response_timeout_s=timeouts.response_timeout_s, skip_refused=True)
    except SendFailed as exc:
        print(f"send failed: {exc}")
        return 1
    for path, why in report.skipped:
        print(f"skipped {path}: {why}")
    rate = report.sent / report.seconds if report.seconds > 0 else 0.0
    print(f"sent {report.sent} instances to {args.ae}@{args.host}:{args.port} in {report.seconds:.2f} s ({rate:.0f}/s)")
    if report.skipped:
        print(f"{len(report.skipped)} files skipped: the peer refused them")
        return 2
    return 0


def resend_command(args) -> int:
    """``dicomnode resend (--job N ... | --all-failed)``: requeue failed sends; a running node sends them."""
    from dicomnode.audit.db import AuditDB
    from dicomnode.jobs import requeue_failed_sends

    config = load_config_or_exit(args.config)
    db = AuditDB.open(args.database_url or config.storage.database_url)
    try:
        with db.session() as session:
            report = requeue_failed_sends(session, None if args.all_failed else list(args.job))
    finally:
        db.close()
    for job_id, n in report.jobs.items():
        print(f"job {job_id}: {n} send(s) requeued")
    for job_id, why in report.refused.items():
        print(f"job {job_id}: not requeued: {why}", file=sys.stderr)
    if not report.jobs and not report.refused:
        print("no failed job has failed sends")
    return 1 if report.refused else 0
