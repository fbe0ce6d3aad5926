"""The job state machine: paired -> processing -> encoded -> sending -> done | failed(reason).

A job is one pairing (moving series onto fixed series under a rule). Its states before
``paired`` are those of its series (received -> complete, see ``store/series.py``). Every
transition is checked against ``TRANSITIONS`` and written as a ``JobEvent`` row in the same
transaction as the state, so the audit log and the state never disagree. Processing runs on one
worker thread (the GPU is one resource), never on an association thread; sends are handed to
the persisted send queue, and a job is ``done`` once every send of it is ``sent``.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Instance, Job, JobEvent, JobState, Metric, Send, SendState, Series
from dicomnode.config import Config, PairingRule
from dicomnode.pipeline import JobInputs, ProcessingOutput
from dicomnode.routing import Pairing, SeriesRef

log = logging.getLogger(__name__)

TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.paired}),
    JobState.paired: frozenset({JobState.processing, JobState.failed}),
    # processing -> paired: a job interrupted by a stop is queued again at the next start.
    JobState.processing: frozenset({JobState.encoded, JobState.failed, JobState.paired}),
    JobState.encoded: frozenset({JobState.sending, JobState.failed}),
    JobState.sending: frozenset({JobState.done, JobState.failed}),
    JobState.done: frozenset(),
    # failed -> sending: an administrator asked to resend a job whose sends gave up (``dicomnode resend``).
    JobState.failed: frozenset({JobState.sending}),
}

ProcessFn = Callable[[JobInputs], ProcessingOutput]


class IllegalTransition(Exception):
    """A job was asked to move to a state its current state cannot lead to (a bug, not bad input)."""


class NoDestination(Exception):
    """A job has nowhere to send its output; the message names what to configure."""


def transition(session: Session, job: Job, to: JobState, detail: str | None = None) -> None:
    """Move ``job`` to ``to`` and write the ``JobEvent``; raises ``IllegalTransition`` when not allowed."""
    current = job.state  # None for a job not yet inserted
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(f"job {job.id}: {current and current.value} -> {to.value} is not a legal transition")
    now = datetime.now(timezone.utc)
    job.state = to
    job.updated_at = now
    if to is JobState.failed:
        job.reason = detail
    elif current is JobState.failed:
        job.reason = None  # the failure is history now; its event keeps the reason
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, at=now, from_state=current and current.value, to_state=to.value, detail=detail))
    session.flush()
    level = logging.WARNING if to is JobState.failed else logging.INFO
    log.log(level, "event=job_state job_id=%s from=%s to=%s detail=%s", job.id, current and current.value, to.value,
            _quote(detail))


def _quote(text: str | None) -> str:
    return '""' if not text else '"' + text.replace('"', "'") + '"'


def create_job(session: Session, pairing: Pairing, method: str) -> Job | None:
    """The ``paired`` job for ``pairing``; None when that pair was already made (idempotent)."""
    exists = session.scalars(
        select(Job.id).where(
            Job.rule == pairing.rule.label,
            Job.fixed_series_uid == pairing.fixed.series_uid,
            Job.moving_series_uid == pairing.moving.series_uid,
        )
    ).first()
    if exists is not None:
        return None
    job = Job(
        rule=pairing.rule.label,
        fixed_series_uid=pairing.fixed.series_uid,
        moving_series_uid=pairing.moving.series_uid,
        study_uid=pairing.fixed.study_uid,
        method=method,
    )
    transition(session, job, JobState.paired,
               f"rule={pairing.rule.label} fixed={pairing.fixed.modality} moving={pairing.moving.modality}")
    return job


def rule_for(config: Config, label: str) -> PairingRule:
    for rule in config.pairing:
        if rule.label == label:
            return rule
    raise LookupError(f"pairing rule {label!r} is no longer in the configuration")


def destinations_for(config: Config, rule: PairingRule, fixed_calling_ae: str) -> tuple[str, ...]:
    """Destination names for a job: the rule's, else the one whose AE title sent the fixed series."""
    if rule.destinations:
        return rule.destinations
    dest = config.destination_for_ae(fixed_calling_ae)
    if dest is None:
        raise NoDestination(
            f"no destination: rule {rule.label} names none and no [[destinations]] entry has the "
            f"AE title {fixed_calling_ae!r} that sent the fixed series"
        )
    return (dest.name,)


def series_files(session: Session, spool_root: Path, series_uid: str) -> list[Path]:
    """Spool paths of the received instances of one series (relative paths are under the spool)."""
    paths = session.scalars(
        select(Instance.spool_path).join(Series, Instance.series_id == Series.id).where(Series.series_uid == series_uid)
    ).all()
    return sorted(_spool_file(Path(p), spool_root) for p in paths)


def _spool_file(path: Path, spool_root: Path) -> Path:
    # Rows hold absolute paths; a relative one is tried from the working directory, then the spool.
    if path.is_absolute() or path.exists():
        return path
    return spool_root / path


def _series_ref(session: Session, series_uid: str) -> SeriesRef:
    return SeriesRef.of(session.scalars(select(Series).where(Series.series_uid == series_uid)).one())


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


def settle_sending_jobs(session: Session) -> list[tuple[int, JobState]]:
    """Move ``sending`` jobs whose sends are all settled to ``done`` or ``failed``; returns the moves."""
    moved = []
    for job in session.scalars(select(Job).where(Job.state == JobState.sending)).all():
        sends = session.scalars(select(Send).where(Send.job_id == job.id)).all()
        if not sends or any(s.state == SendState.pending for s in sends):
            continue
        failed = [s for s in sends if s.state == SendState.failed]
        if failed:
            detail = "; ".join(f"send to {s.destination} failed after {s.attempts} attempts: {s.last_status}" for s in failed)
            transition(session, job, JobState.failed, detail)
            moved.append((job.id, JobState.failed))
        else:
            transition(session, job, JobState.done, f"sends={len(sends)} instances={sum(len(s.files) for s in sends)}")
            moved.append((job.id, JobState.done))
    return moved


@dataclass(frozen=True)
class Requeued:
    """What ``requeue_failed_sends`` did: jobs moved back to sending, and jobs left alone with why."""

    jobs: dict[int, int] = field(default_factory=dict)  # job id -> sends requeued
    refused: dict[int, str] = field(default_factory=dict)  # job id -> reason


def requeue_failed_sends(session: Session, job_ids: list[int] | None = None) -> Requeued:
    """Put the failed sends of failed jobs (all such jobs when ``job_ids`` is None) back in the queue.

    Each send restarts with a fresh attempt budget, due now, and sends only the files the
    destination has not acknowledged; its job goes back to ``sending`` and settles as usual. A job is refused when it failed before sending, or when retention has
    already deleted output files it would send (nothing is sent half).
    """
    query = select(Job).where(Job.state == JobState.failed)
    if job_ids is not None:
        query = select(Job).where(Job.id.in_(job_ids))
    out = Requeued()
    found = set()
    for job in session.scalars(query.order_by(Job.id)).all():
        found.add(job.id)
        failed = session.scalars(select(Send).where(Send.job_id == job.id, Send.state == SendState.failed)).all()
        if job.state is not JobState.failed or not failed:
            if job_ids is not None:
                out.refused[job.id] = (f"state {job.state.value}, no failed send" if job.state is not JobState.failed
                                       else f"failed before sending: {job.reason}")
            continue
        missing = [f for s in failed for f in s.files[s.acked_count:] if not Path(f).is_file()]  # acked: not resent
        if missing:
            out.refused[job.id] = f"{len(missing)} output files are gone (retention?), e.g. {missing[0]}"
            continue
        now = datetime.now(timezone.utc)
        for send in failed:
            send.state = SendState.pending
            send.attempts = 0
            send.next_attempt_at = now
            send.last_status = f"requeued by an administrator; was: {send.last_status}"
        transition(session, job, JobState.sending, f"resend requested: {len(failed)} failed sends requeued")
        out.jobs[job.id] = len(failed)
    for job_id in job_ids or []:
        if job_id not in found:
            out.refused[job_id] = "no such job"
    return out


def resend_command(args) -> int:
    """``dicomnode resend (--job N ... | --all-failed)``: requeue failed sends; a running node sends them."""
    from dicomnode.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
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
