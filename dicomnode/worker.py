"""Processing workers: claim a job through the audit database, process it, record it, queue its sends.

A claim is a lease: the job row gets the worker's id and an expiry, taken with the database's own
row lock (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so workers in several processes
or on several machines share one queue; on SQLite every write transaction starts with ``BEGIN
IMMEDIATE``, which serialises claims the same way). The lease is renewed while the job is
processed. A worker that dies leaves its lease to run out; then any worker claims the job again
(``processing -> paired -> processing``). A worker records a result only while it still holds
the claim, under the row lock, so every job is encoded once and its sends are queued once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Job, JobEvent, JobState, Metric
from dicomnode.config import Config
from dicomnode.log import event as log_event
from dicomnode.jobs import transition
from dicomnode.pipeline import JobInputs, ProcessingOutput
from dicomnode.routing import NoDestination, destinations_for, rule_for
from dicomnode.store.series import InputsUnusable, series_files, series_ref as _series_ref

log = logging.getLogger(__name__)

# Start of the job event written when a claim is taken over; counted to stop a job that kills workers.
LEASE_RAN_OUT = "lease of worker"

ProcessFn = Callable[[JobInputs], ProcessingOutput]


def record_output(session: Session, job: Job, out: ProcessingOutput) -> None:
    """Timings, registration report, outputs and metrics of a processed job (metrics as rows)."""
    job.timings = dict(out.timings)
    if out.cpu_seconds:  # the process's CPU per stage, all threads: what a stage costs beside its wall time
        job.timings["cpu_s"] = dict(out.cpu_seconds)
    job.registration = dict(out.registration)
    job.outputs = {"series": [s.describe() for s in out.series]}
    if out.input_changes:  # values only here, in the audit row: the log line says how many
        job.outputs["input_changes"] = list(out.input_changes)
    rows = [(index, values) for index, values in enumerate(out.per_slice)] + [(None, out.summary)]
    for index, values in rows:
        session.add_all(Metric(job_id=job.id, slice_index=index, name=k, value=float(v))
                        for k, v in values.items() if _finite(v))
    low = [f"{k}={out.summary.get(k, float('nan')):.4g}" for k in out.quality_failures]
    job.quality_flag = ("under threshold: " + ", ".join(low)) if low else None
    if low:
        log_event(log, "quality_flag", logging.WARNING, job_id=job.id, below=", ".join(low))


def _finite(value: float) -> bool:
    # NaN/inf are not storable in every backend (SQLite turns NaN into NULL); such a metric is absent.
    try:
        return float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


def default_worker_id() -> str:
    """``host:pid:random``: unique per process, and says where to look for it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _claimable(now: datetime):
    """Jobs a worker may claim: paired ones, and processing/encoded ones whose lease ran out."""
    stale = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
    return or_(Job.state == JobState.paired,
               (Job.state.in_((JobState.processing, JobState.encoded))) & stale)


class JobWorker:
    """Claims jobs from the audit database, one at a time, and runs them to ``sending``.

    ``process`` turns a job's inputs into output series in the outbox (``pipeline.process_job``,
    or any callable with the same signature). ``enqueue_send(job_id, series_uid, dest, files)``
    persists a send; ``on_sending`` is called when a job's sends are queued (to wake the sender).
    ``start`` runs the loop on a thread (``serve``); ``run_until`` runs it in the caller's thread.
    """

    def __init__(self, db: AuditDB, spool, config: Config, process: ProcessFn,
                 enqueue_send: Callable[[int, str, str, list[Path]], None], on_sending: Callable[[], None] = lambda: None,
                 warm_up: Callable[[], None] | None = None, worker_id: str | None = None):
        self.db = db
        self.spool = spool
        self.config = config
        self.process = process
        self.enqueue_send = enqueue_send
        self.on_sending = on_sending
        self.warm_up = warm_up
        self.id = worker_id or default_worker_id()
        self.lease = timedelta(seconds=config.worker.lease_s)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._lock = threading.Lock()
        self._asked = 0  # submit() calls so far: idle only when a poll started after the last one found nothing
        self._in_hand: int | None = None

    def start(self) -> None:
        self._stopping = threading.Event()  # a thread left running by a timed-out stop keeps its own
        self._thread = threading.Thread(target=self.run_until, args=(self._stopping,), name="dicomnode-worker",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> bool:
        """Finish the job in hand (up to ``timeout`` s) and stop; an unfinished job is given back."""
        if self._thread is None:
            return True
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        in_hand = self._in_hand
        if not stopped and in_hand is not None:
            self.give_back(in_hand, "interrupted by a stop; queued again")
        self._thread = None
        return stopped

    @property
    def alive(self) -> bool:
        """True while the worker thread runs (the health check)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job_id: int | None = None) -> None:
        """Look for work now (a job was just committed) instead of at the next poll."""
        with self._lock:
            self._asked += 1
            self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once a poll after the last ``submit`` found nothing to claim."""
        return self._idle.wait(timeout)

    def run_until(self, stopping: threading.Event) -> None:
        """Claim and run jobs until ``stopping`` is set; sleeps ``worker.poll_s`` when none is claimable."""
        if self.warm_up is not None:
            try:
                self.warm_up()
            except Exception:  # the first job will hit the same problem and fail with its reason
                log_event(log, "worker_warm_up_failed", logging.ERROR, exc_info=True)
        log_event(log, "worker_started", worker=self.id, lease_s=self.config.worker.lease_s)
        while not stopping.is_set():
            with self._lock:
                asked = self._asked
            try:
                ran = self.run_next()
            except Exception:  # a bug or a database outage must not kill the worker; the lease protects the job
                log_event(log, "worker_error", logging.ERROR, exc_info=True, worker=self.id)
                ran = False
            if ran:
                continue
            with self._lock:
                if asked == self._asked:
                    self._idle.set()
            self._wake.wait(self.config.worker.poll_s)
            self._wake.clear()
        log_event(log, "worker_stopped", worker=self.id)

    def run_next(self) -> bool:
        """Claim one job and run it; False when nothing is claimable."""
        claimed = self.claim()
        if claimed is None:
            return False
        job_id, inputs = claimed
        if inputs is None:  # encoded by a worker that died before queueing the sends
            self.queue_sends(job_id)
            return True
        self._in_hand = job_id
        try:
            self.run_job(job_id, inputs)
        finally:
            self._in_hand = None
        return True

    def claim(self) -> tuple[int, JobInputs | None] | None:
        """Take the oldest claimable job under a lease: (id, inputs), or (id, None) for sends only."""
        now = datetime.now(timezone.utc)
        with self.db.session() as session:
            while True:
                job = session.scalars(select(Job).where(_claimable(now)).order_by(Job.id).limit(1)
                                      .with_for_update(skip_locked=True)).first()
                if job is None:
                    return None
                if job.state is JobState.processing and self._lost_too_often(session, job):
                    continue
                if job.state is JobState.processing:
                    transition(session, job, JobState.paired, f"{LEASE_RAN_OUT} {job.worker_id} ran out; queued again")
                job.worker_id, job.lease_expires_at = self.id, now + self.lease
                if job.state is JobState.encoded:
                    return job.id, None
                inputs = self._start(session, job)
                if inputs is not None:
                    return job.id, inputs

    def _lost_too_often(self, session: Session, job: Job) -> bool:
        """Fail a job whose workers died ``worker.max_attempts`` times (a job that kills its worker)."""
        lost = 1 + session.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == job.id, JobEvent.to_state == JobState.paired.value,
            JobEvent.detail.like(f"{LEASE_RAN_OUT} %")))
        if lost < self.config.worker.max_attempts:
            return False
        transition(session, job, JobState.failed,
                   f"processing: {lost} workers died or stalled past worker.lease_s on this job, the last {job.worker_id}; "
                   "not tried again (see that worker's log: out of memory?)")
        return True

    def _start(self, session: Session, job: Job) -> JobInputs | None:
        """Move a claimed job to ``processing`` with its inputs; None when it failed its checks."""
        try:
            rule = rule_for(self.config, job.rule)
            fixed = _series_ref(session, job.fixed_series_uid)
            moving = _series_ref(session, job.moving_series_uid)
            destinations_for(self.config, rule, fixed.calling_ae)
            for ref in (fixed, moving):
                if ref.identity_conflict:  # flagged after the pair was made
                    raise InputsUnusable(f"series {ref.series_uid}: {ref.identity_conflict}")
            fixed_files = series_files(session, self.spool.root, job.fixed_series_uid)
            moving_files = series_files(session, self.spool.root, job.moving_series_uid)
        except (LookupError, NoDestination, InputsUnusable) as exc:
            transition(session, job, JobState.failed, str(exc))
            return None
        transition(session, job, JobState.processing, f"method={job.method} worker={self.id}")
        return JobInputs(
            job_id=job.id,
            rule=rule,
            method=job.method,
            fixed=fixed,
            moving=moving,
            fixed_files=fixed_files,
            moving_files=moving_files,
            config=self.config,
            spool=self.spool,
        )

    def run_job(self, job_id: int, inputs: JobInputs) -> None:
        """Process one claimed job to ``encoded`` (or ``failed``) and queue its sends."""
        started = time.monotonic()
        with self._renewing(job_id):
            try:
                out = self.process(inputs)
            except Exception as exc:
                log_event(log, "processing_error", logging.WARNING, exc_info=True, job_id=job_id, error=type(exc).__name__)
                with self.db.session() as session:
                    job = self._owned(session, job_id)
                    if job is not None:
                        transition(session, job, JobState.failed, f"processing: {type(exc).__name__}: {exc}")
                return
            seconds = time.monotonic() - started
            with self.db.session() as session:
                job = self._owned(session, job_id)
                if job is None:
                    return
                record_output(session, job, out)
                changed = f" input_changes={len(out.input_changes)}" if out.input_changes else ""
                transition(session, job, JobState.encoded,
                           f"series={len(out.series)} instances={sum(len(s.files) for s in out.series)} "
                           f"seconds={seconds:.2f}{changed}")
        self.queue_sends(job_id)

    def _owned(self, session: Session, job_id: int) -> Job | None:
        """The job, row-locked, while this worker still holds its claim; else None (and a log line)."""
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is not None and job.state is JobState.processing and job.worker_id == self.id:
            return job
        log_event(log, "claim_lost", logging.WARNING, job=job_id, worker=self.id, holder=job and job.worker_id,
                  state=job and job.state.value, note="result discarded; the job is another worker's now")
        return None

    def renew(self, job_id: int) -> bool:
        """Extend this worker's lease on a processing job; False when the claim is lost."""
        with self.db.session() as session:
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.worker_id == self.id, Job.state == JobState.processing)
                .values(lease_expires_at=datetime.now(timezone.utc) + self.lease)
            )
            log_event(log, "lease_renewed", logging.DEBUG, job=job_id, worker=self.id, held=result.rowcount == 1)
            return result.rowcount == 1

    @contextmanager
    def _renewing(self, job_id: int) -> Iterator[None]:
        done = threading.Event()

        def renew_until_done() -> None:
            while not done.wait(self.config.worker.lease_s / 3):
                try:
                    if not self.renew(job_id):
                        return  # _owned logs it when the result comes
                except Exception:  # a database hiccup: the next renewal may still be in time
                    log_event(log, "lease_renew_error", logging.WARNING, exc_info=True, job_id=job_id, worker=self.id)

        thread = threading.Thread(target=renew_until_done, name=f"dicomnode-lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def give_back(self, job_id: int, detail: str) -> bool:
        """Return a processing job this worker holds to ``paired`` (claimable at once)."""
        with self.db.session() as session:
            job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
            if job is None or job.state is not JobState.processing or job.worker_id != self.id:
                return False
            transition(session, job, JobState.paired, detail)
            job.lease_expires_at = None
            return True

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
    """After a (re)start: count the jobs waiting for a worker and wake it; counts by kind.

    Nothing is moved here: ``paired`` jobs and jobs whose lease ran out (``processing``: queued
    again; ``encoded``: sends queued) are claimed by the worker loop, which also covers workers in
    other processes. ``sending`` jobs need nothing: their pending ``Send`` rows are picked up by
    the send queue, and rows already ``sent`` are never sent again.
    """
    now = datetime.now(timezone.utc)
    with db.session() as session:
        rows = session.execute(select(Job.state, func.count()).where(_claimable(now)).group_by(Job.state)).all()
    by_state = {state: n for state, n in rows}
    worker.submit()
    return {"requeued": by_state.get(JobState.paired, 0) + by_state.get(JobState.processing, 0),
            "resend": by_state.get(JobState.encoded, 0)}
