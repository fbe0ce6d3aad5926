"""The node: SCP, completion timers, pairing, the processing worker and the send queue, wired.

Threads: pynetdicom's association threads only spool and record instances; an apscheduler
``BackgroundScheduler`` runs the completion check (which pairs and creates jobs) and the send
queue; one worker thread processes jobs. All state is in the audit database, so ``start`` after
a stop or crash resumes: receiving series keep their timers, interrupted jobs are queued again.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.orm import Session

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import SeriesState
from dicomnode.audit.retention import mark_purged_instances, purge_audit
from dicomnode.config import Config, ConfigError, load_config
from dicomnode.jobs import JobWorker, ProcessFn, create_job, recover, settle_sending_jobs
from dicomnode.routing import find_pairings, record_refusal
from dicomnode.store.series import (
    CompletedSeries,
    SeriesProgress,
    complete_due_series,
    complete_if_expected,
    series_progress,
)
from dicomnode.store.spool import Spool

log = logging.getLogger(__name__)

# How often the send queue is polled between wake-ups (seconds); retries are timed by Send rows.
SEND_POLL_S = 2.0
# How often retention runs (hours): spool files and audit rows go once older than their limit.
RETENTION_EVERY_H = 6.0


class StartupError(RuntimeError):
    """The node cannot start with this configuration; the message says what to fix."""


def check_fusion_methods(config: Config) -> None:
    """Fail fast when a configured fusion method is unknown or its weights are missing."""
    from dicomnode.fusion.api import check_method_available

    methods = {config.fusion.default_method} | {r.method for r in config.pairing if r.method}
    for method in sorted(methods):
        try:
            check_method_available(method, config.fusion)
        except Exception as exc:  # UnknownMethod, WeightsError, ...: all mean "cannot run this method"
            raise StartupError(f"fusion method {method!r} cannot run: {exc}") from exc


class Node:
    """One running node. ``process`` replaces the processing stage (default ``pipeline.process_job``)."""

    def __init__(self, config: Config, process: ProcessFn | None = None):
        from dicomnode.monitoring import MonitoringServer
        from dicomnode.net.scp import StoreSCP
        from dicomnode.net.scu import SendQueue

        warm_up = None
        if process is None:
            check_fusion_methods(config)
            from dicomnode.pipeline import process_job as process
            from dicomnode.pipeline import warm_up
        self.config = config
        self.db = AuditDB.open(config.storage.database_url)
        # Absolute, so the spool paths recorded in the audit DB do not depend on the working directory.
        self.spool = Spool(Path(config.storage.spool_dir).expanduser().resolve())
        self.sends = SendQueue(self.db, config)
        self.worker = JobWorker(self.db, self.spool, config, process, self.sends.enqueue, on_sending=self.wake_sender,
                                warm_up=warm_up)
        self.scp = StoreSCP(config, self.db, self.spool, on_instance=self._on_instance)
        self._scheduler = None
        self.monitor = MonitoringServer(self) if config.http.enabled else None
        # Completion + pairing run from the timer and from association threads; one at a time.
        self._pairing_lock = threading.Lock()
        self._send_lock = threading.Lock()
        # Stable age counts from here at the earliest: an outage never completes a series early.
        self._up_since: datetime | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        # apscheduler logs every timer run at INFO (several lines a second here); keep it to
        # warnings unless someone set its level on purpose.
        aps = logging.getLogger("apscheduler")
        if aps.level == logging.NOTSET:
            aps.setLevel(logging.WARNING)
        self._up_since = datetime.now(timezone.utc)
        self.clean_leftovers()
        self.worker.start()
        counts = recover(self.db, self.worker)
        self._scheduler = BackgroundScheduler(timezone=timezone.utc, job_defaults={"coalesce": True, "max_instances": 1})
        now = datetime.now(timezone.utc)
        self._scheduler.add_job(self.check_completion, "interval", seconds=self.config.completion.check_interval_s,
                                id="completion", next_run_time=now)
        self._scheduler.add_job(self.run_sends, "interval", seconds=SEND_POLL_S, id="sends", next_run_time=now)
        if self.config.retention.spool_days > 0 or self.config.retention.audit_days > 0:
            # First run one interval after start, so jobs recovered at start use their inputs first.
            self._scheduler.add_job(self.apply_retention, "interval", hours=RETENTION_EVERY_H, id="retention")
        self._scheduler.start()
        try:
            self.scp.start()
        except Exception as exc:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            self.worker.stop(timeout=5)
            node = self.config.node
            raise StartupError(f"cannot listen on {node.host}:{node.port}: {exc}") from exc
        if self.monitor is not None:
            try:
                self.monitor.start()
            except Exception as exc:
                self.stop()
                raise StartupError(str(exc)) from exc
        log.info("event=node_started ae_title=%s host=%s port=%d requeued=%d resent=%d", self.config.node.ae_title,
                 self.config.node.host, self.config.node.port, counts["requeued"], counts["resend"])

    def clean_leftovers(self) -> None:
        """Before anything writes: drop temporary files and the outbox of jobs that will run again."""
        from sqlalchemy import select

        from dicomnode.audit.models import Job, JobState

        wanted = (JobState.encoded, JobState.sending, JobState.done, JobState.failed)
        with self.db.session() as session:
            keep = set(session.scalars(select(Job.id).where(Job.state.in_(wanted))).all())
        report = self.spool.clean_leftovers(keep)
        log.info("event=spool_leftovers_removed tmp_files=%d outbox_files=%d", report.tmp_files, report.outbox_files)

    def stop(self) -> None:
        """Stop accepting, finish the job in hand, stop timers, close the database."""
        if self.monitor is not None:
            self.monitor.stop()
        self.scp.stop()
        self.worker.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        self.db.close()
        log.info("event=node_stopped ae_title=%s", self.config.node.ae_title)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- completion and pairing -------------------------------------------------------------
    def _on_instance(self, series_uid: str, progress: SeriesProgress | None = None) -> None:
        """Per stored instance (association thread): complete at once when the expected count arrived.

        ``progress``: the series after this instance, from the instance's own write transaction
        (no session of its own per instance); read here only when the caller has none.
        An instance for a series already complete reopened it at receive (``series_reopened``):
        the grown series completes again and is paired as a new job.
        """
        new_jobs: list = []
        try:
            # Association threads only queue on the lock when a series is due.
            if progress is None:
                with self.db.session() as session:
                    progress = series_progress(session, series_uid)
            if progress is None:
                return
            if progress.state == SeriesState.complete:
                return  # completed by a racing check after this instance reopened it
            if not (self.config.completion.use_expected_count and progress.expected_reached):
                return
            with self._pairing_lock, self.db.session() as session:
                complete_if_expected(session, series_uid, self.config.completion,
                                     on_complete=lambda s, c: new_jobs.extend(self._pair(s, c)))
        except Exception:  # the instance is stored already; the timer will retry the check
            log.exception("event=completion_check_error series_uid=%s", series_uid)
            return
        self._submit(new_jobs)

    def check_completion(self) -> list[CompletedSeries]:
        """Timer: complete due series, pair them, queue new jobs (all in one transaction per run)."""
        new_jobs: list = []
        with self._pairing_lock, self.db.session() as session:
            done = complete_due_series(session, self.config.completion,
                                       on_complete=lambda s, c: new_jobs.extend(self._pair(s, c)),
                                       up_since=self._up_since)
        self._submit(new_jobs)
        return done

    def _pair(self, session: Session, completed: CompletedSeries) -> list[int]:
        """Jobs (ids) for the pairs a newly complete series forms; refusals are recorded."""
        pairings, refusals = find_pairings(session, completed.series_uid, self.config.pairing)
        for refusal in refusals:
            record_refusal(session, refusal)
        jobs = [create_job(session, p, p.rule.method or self.config.fusion.default_method) for p in pairings]
        return [job.id for job in jobs if job is not None]

    def _submit(self, job_ids: list[int]) -> None:
        # Called after the creating transaction committed, so the worker sees the jobs.
        for job_id in job_ids:
            self.worker.submit(job_id)

    # -- sending ----------------------------------------------------------------------------
    def wake_sender(self) -> None:
        """Run the send queue now (on a scheduler thread) instead of at the next poll."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        try:
            scheduler.add_job(self.run_sends, id=f"sends-now-{uuid.uuid4().hex}")
        except Exception:  # stopping: the next start's poll sends what is pending
            log.debug("sender wake-up skipped", exc_info=True)

    def run_sends(self) -> None:
        """Attempt due sends, then settle jobs whose sends are all sent or failed."""
        with self._send_lock:
            self.sends.run_due()
            with self.db.session() as session:
                settle_sending_jobs(session)


    # -- retention ---------------------------------------------------------------------------
    def apply_retention(self) -> None:
        self.purge_spool()
        self.purge_audit()

    def purge_audit(self) -> None:
        """Delete audit rows of work that ended more than ``retention.audit_days`` ago."""
        days = self.config.retention.audit_days
        with self.db.session() as session:
            report = purge_audit(session, days)
        if report.rows:
            log.info("event=audit_purge days=%d jobs=%d series=%d instances=%d rejections=%d associations=%d",
                     days, report.jobs, report.series, report.instances, report.rejections, report.associations)

    def purge_spool(self) -> None:
        """Delete spool files older than ``retention.spool_days`` (received, quarantined and sent).

        Instance rows whose file went get ``purged_at``, so the audit says the file is gone.
        """
        days = self.config.retention.spool_days
        report = self.spool.purge_older_than(days)
        with self.db.session() as session:
            marked = mark_purged_instances(session, days)
        if report.files or marked:
            log.info("event=retention_purge days=%d files=%d bytes=%d instances_marked=%d", days, report.files,
                     report.bytes, marked)


def serve_command(args) -> int:
    """``dicomnode serve --config FILE``: run until SIGTERM/SIGINT, then stop cleanly."""
    from dicomnode.log import setup_logging

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return 2
    setup_logging(config.logging)
    try:
        node = Node(config)
        node.start()
    except Exception as exc:
        log.error("event=start_failed error=%r", str(exc))
        print(f"dicomnode: cannot start: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()

    def _stop(signum, _frame):
        log.info("event=signal signal=%s", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping.wait(1.0):
        pass
    node.stop()
    return 0


def check_config_command(args) -> int:
    """``dicomnode check-config FILE``: each problem with its key path (exit 1), or OK and a summary."""
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.file}: {problem}")
        return 1
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
