"""``dicomnode serve``, ``dicomnode worker`` and ``dicomnode check-config``: run the node, or its processing side alone, or check its configuration."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from dicomnode.commands import load_config_or_exit
from dicomnode.config import Config
from dicomnode.log import event

log = logging.getLogger(__name__)


def worker_command(args) -> int:
    """``dicomnode worker --config FILE``: claim and process jobs until SIGTERM/SIGINT."""
    from dicomnode.audit.db import AuditDB
    from dicomnode.log import setup_logging
    from dicomnode.net.send_queue import SendQueue
    from dicomnode.node import StartupError, check_fusion_methods
    from dicomnode.pipeline import process_job, warm_up
    from dicomnode.store.spool import Spool
    from dicomnode.worker import JobWorker

    config = load_config_or_exit(args.config)
    setup_logging(config.logging)
    try:
        check_fusion_methods(config)
        db = AuditDB.open(config.storage.database_url)
    except (StartupError, RuntimeError) as exc:
        event(log, "start_failed", logging.ERROR, error=str(exc))
        print(f"dicomnode worker: cannot start: {exc}", file=sys.stderr)
        return 1
    spool = Spool(Path(config.storage.spool_dir).expanduser().resolve())
    worker = JobWorker(db, spool, config, process_job, SendQueue(db, config).enqueue, warm_up=warm_up)
    stopping = threading.Event()

    def _stop(signum, _frame):
        event(log, "signal", signal=signal.Signals(signum).name)
        stopping.set()
        worker.submit()  # end the poll wait

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run_until(stopping)
    finally:
        db.close()
    return 0


def serve_command(args) -> int:
    """``dicomnode serve --config FILE``: run until SIGTERM/SIGINT, then stop cleanly."""
    from dicomnode.log import setup_logging
    from dicomnode.node import Node

    config = load_config_or_exit(args.config)
    setup_logging(config.logging)
    try:
        node = Node(config)
        node.start()
    except Exception as exc:
        event(log, "start_failed", logging.ERROR, error=str(exc))
        print(f"dicomnode: cannot start: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()

    def _stop(signum, _frame):
        event(log, "signal", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping.wait(1.0):
        pass
    node.stop()
    return 0


def check_config_command(args) -> int:
    """``dicomnode check-config FILE``: OK and a summary, or each problem with its key path (exit 2)."""
    config = load_config_or_exit(args.file)
    print(f"OK {args.file}")
    for line in summary_lines(config):
        print(f"  {line}")
    return 0


def summary_lines(config: Config) -> list[str]:
    """What a configuration does, one line per topic (no secrets: database passwords are hidden)."""
    from sqlalchemy.engine import make_url

    node = config.node
    callers = ", ".join(c.ae_title + (f"@{c.host}" if c.host else "") for c in node.allowed_callers) or "any"
    dests = ", ".join(f"{d.name}={d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}" for d in config.destinations)
    expected = "used" if config.completion.use_expected_count else "ignored"
    lines = [
        f"node: {node.ae_title} on {node.host}:{node.port} (max PDU {node.max_pdu}, TLS {'on' if config.tls.enabled else 'off'})",
        f"allowed callers: {callers}",
        f"database: {make_url(config.storage.database_url).render_as_string(hide_password=True)}",
        f"spool: {config.storage.spool_dir}",
        f"completion: stable age {config.completion.stable_age_s:g} s, expected count {expected}",
        f"destinations: {dests or 'none'}",
    ]
    for rule in config.pairing:
        where = "same study" if rule.match == "study" else f"same patient within {rule.max_days} days"
        to = ", ".join(rule.destinations) or "the destination with the sender's AE title"
        lines.append(f"rule {rule.label}: {rule.moving} onto {rule.fixed}, {where}, method "
                     f"{rule.method or config.fusion.default_method}, to {to}")
    lines.append(f"processing device: {config.processing.device}; log {config.logging.level} {config.logging.format}")
    return lines
