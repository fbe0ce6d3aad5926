"""``dicomnode worker``: the node's processing side alone (``dicomnode.worker``)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from dicomnode.commands import load_config_or_exit
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
