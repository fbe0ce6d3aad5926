"""The processing worker: takes ``paired`` jobs, runs the processing callable, records the output
and hands the sends to the send queue. State changes go through ``jobs.transition``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Job, JobState, Metric
from dicomnode.config import Config
from dicomnode.jobs import _quote, transition
from dicomnode.pipeline import JobInputs, ProcessingOutput
from dicomnode.routing import NoDestination, destinations_for, rule_for
from dicomnode.store.series import series_files, series_ref as _series_ref

log = logging.getLogger(__name__)

ProcessFn = Callable[[JobInputs], ProcessingOutput]


def record_output(session: Session, job: Job, out: ProcessingOutput) -> None:
    """Timings, registration report, outputs and metrics of a processed job (metrics as rows)."""
    job.timings = dict(out.timings)
    job.registration = dict(out.registration)
    job.outputs = {"series": [s.describe() for s in out.series]}
    rows = [(index, values) for index, values in enumerate(out.per_slice)] + [(None, out.summary)]
    for index, values in rows:
        session.add_all(Metric(job_id=job.id, slice_index=index, name=k, value=float(v))
                        for k, v in values.items() if _finite(v))
    low = [f"{k}={out.summary.get(k, float('nan')):.4g}" for k in out.quality_failures]
    job.quality_flag = ("under threshold: " + ", ".join(low)) if low else None
    if low:
        log.warning("event=quality_flag job_id=%s below=%s", job.id, _quote(", ".join(low)))


def _finite(value: float) -> bool:
    # NaN/inf are not storable in every backend (SQLite turns NaN into NULL); such a metric is absent.
    try:
        return float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False



class JobWorker:
    """One thread that processes ``paired`` jobs in order and hands their output to the send queue.

    ``process`` turns a job's inputs into output series in the outbox (``pipeline.process_job``,
    or any callable with the same signature). ``enqueue_send(job_id, series_uid, dest, files)``
    persists a send; ``on_sending`` is called when a job's sends are queued (to wake the sender).
    """

    def __init__(self, db: AuditDB, spool, config: Config, process: ProcessFn,
                 enqueue_send: Callable[[int, str, str, list[Path]], None], on_sending: Callable[[], None] = lambda: None,
                 warm_up: Callable[[], None] | None = None):
        self.db = db
        self.spool = spool
        self.config = config
        self.process = process
        self.enqueue_send = enqueue_send
        self.on_sending = on_sending
        self.warm_up = warm_up
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dicomnode-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> bool:
        """Finish the job in hand (up to ``timeout`` s) and stop; queued jobs stay ``paired`` in the DB."""
        if self._thread is None:
            return True
        while True:  # drop what is queued: those jobs are still ``paired`` and are re-queued at start
            try:
                if self._queue.get_nowait() is not None:
                    with self._lock:
                        self._pending -= 1
            except queue.Empty:
                break
        with self._lock:
            if self._pending <= 0:
                self._idle.set()
        self._queue.put(None)
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        self._thread = None
        return stopped

    def submit(self, job_id: int) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put(job_id)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def _loop(self) -> None:
        if self.warm_up is not None:
            try:
                self.warm_up()
            except Exception:  # the first job will hit the same problem and fail with its reason
                log.exception("event=worker_warm_up_failed")
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self.run_job(job_id)
            except Exception:  # a bug must not kill the only worker; the job is left as it is
                log.exception("event=worker_error job_id=%s", job_id)
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def run_job(self, job_id: int) -> None:
        """Process one ``paired`` job to ``sending`` (or ``failed``); other states are left alone."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.paired:
                return
            try:
                rule = rule_for(self.config, job.rule)
                fixed = _series_ref(session, job.fixed_series_uid)
                destinations_for(self.config, rule, fixed.calling_ae)
            except (LookupError, NoDestination) as exc:
                transition(session, job, JobState.failed, str(exc))
                return
            transition(session, job, JobState.processing, f"method={job.method}")
            inputs = JobInputs(
                job_id=job.id,
                rule=rule,
                method=job.method,
                fixed=fixed,
                moving=_series_ref(session, job.moving_series_uid),
                fixed_files=series_files(session, self.spool.root, job.fixed_series_uid),
                moving_files=series_files(session, self.spool.root, job.moving_series_uid),
                config=self.config,
                spool=self.spool,
            )
        started = time.monotonic()
        try:
            out = self.process(inputs)
        except Exception as exc:
            log.warning("event=processing_error job_id=%s error=%s", job_id, type(exc).__name__, exc_info=True)
            with self.db.session() as session:
                transition(session, session.get(Job, job_id), JobState.failed, f"processing: {type(exc).__name__}: {exc}")
            return
        seconds = time.monotonic() - started
        with self.db.session() as session:
            job = session.get(Job, job_id)
            record_output(session, job, out)
            transition(session, job, JobState.encoded,
                       f"series={len(out.series)} instances={sum(len(s.files) for s in out.series)} seconds={seconds:.2f}")
        self.queue_sends(job_id)

    def queue_sends(self, job_id: int) -> None:
        """Persist the sends of an ``encoded`` job (idempotent) and move it to ``sending``."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.encoded:
                return
            try:
                dests = destinations_for(self.config, rule_for(self.config, job.rule),
                                         _series_ref(session, job.fixed_series_uid).calling_ae)
            except (LookupError, NoDestination) as exc:
                transition(session, job, JobState.failed, str(exc))
                return
            outputs = list(job.outputs.get("series", []))
        for out in outputs:
            for dest in dests:
                self.enqueue_send(job_id, out["series_uid"], dest, [Path(f) for f in out["files"]])
        with self.db.session() as session:
            job = session.get(Job, job_id)
            transition(session, job, JobState.sending, f"destinations={','.join(dests)} series={len(outputs)}")
        self.on_sending()


def recover(db: AuditDB, worker: JobWorker) -> dict[str, int]:
    """After a (re)start: re-queue ``paired``/``processing`` jobs, re-send ``encoded`` ones; counts by kind.

    ``sending`` jobs need nothing: their pending ``Send`` rows are picked up by the send queue,
    and rows already ``sent`` are never sent again.
    """
    counts = {"requeued": 0, "resend": 0}
    with db.session() as session:
        for job in session.scalars(select(Job).where(Job.state == JobState.processing)).all():
            transition(session, job, JobState.paired, "interrupted by a stop; queued again")
        paired = session.scalars(select(Job.id).where(Job.state == JobState.paired).order_by(Job.id)).all()
        encoded = session.scalars(select(Job.id).where(Job.state == JobState.encoded).order_by(Job.id)).all()
    for job_id in paired:
        worker.submit(job_id)
        counts["requeued"] += 1
    for job_id in encoded:
        worker.queue_sends(job_id)
        counts["resend"] += 1
    return counts
