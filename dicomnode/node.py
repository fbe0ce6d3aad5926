"""The node: SCP, completion timers, pairing, the processing worker and the send queue, wired.

Threads: pynetdicom's association threads only spool and record instances; an apscheduler
``BackgroundScheduler`` runs the completion check (which pairs and creates jobs) and retention;
one worker thread processes jobs (``worker.in_serve``; more workers run as ``dicomnode worker``
processes and claim jobs through the same database); the send queue has one worker thread per
destination. All state is in the audit database, so ``start`` after a stop or crash resumes:
receiving series keep their timers, interrupted jobs are claimed again.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.orm import Session

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import SeriesState
from dicomnode.audit.retention import mark_purged_instances, purge_audit
from dicomnode.config import Config
from dicomnode.jobs import create_job, settle_sending_jobs
from dicomnode.log import SkippedOverlapToDebug, event
from dicomnode.routing import find_pairings, record_refusal
from dicomnode.store.series import (
    CompletedSeries,
    SeriesProgress,
    complete_due_series,
    complete_if_expected,
    series_progress,
)
from dicomnode.store.spool import Spool
from dicomnode.worker import JobWorker, ProcessFn, recover

log = logging.getLogger(__name__)

# How often retention runs (hours): spool files and audit rows go once older than their limit.


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
        from dicomnode.net.send_queue import SendQueue

        warm_up = None
        if process is None:
            check_fusion_methods(config)
            from dicomnode.pipeline import process_job as process
            from dicomnode.pipeline import warm_up
        self.config = config
        self.db = AuditDB.open(config.storage.database_url)
        # Absolute, so the spool paths recorded in the audit DB do not depend on the working directory.
        self.spool = Spool(Path(config.storage.spool_dir).expanduser().resolve())
        self.sends = SendQueue(self.db, config, on_final=self.settle_jobs)
        # In-process by default: the thread shares this process's imports and the GPU context, and
        # its processing is mostly native code that releases the GIL. None: processing is left to
        # ``dicomnode worker`` processes.
        self.worker: JobWorker | None = None
        if config.worker.in_serve:
            self.worker = JobWorker(self.db, self.spool, config, process, self.sends.enqueue,
                                    on_sending=self.wake_sender, warm_up=warm_up)
        self.scp = StoreSCP(config, self.db, self.spool, on_instance=self._on_instance)
        self._scheduler = None
        self.monitor = MonitoringServer(self) if config.http.enabled else None
        # Completion + pairing run from the timer and from association threads; one at a time.
        self._pairing_lock = threading.Lock()
        # Destination workers settle jobs from their own threads; one settles at a time.
        self._settle_lock = threading.Lock()
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
        scheduler_log = logging.getLogger("apscheduler.scheduler")
        if not any(isinstance(f, SkippedOverlapToDebug) for f in scheduler_log.filters):
            scheduler_log.addFilter(SkippedOverlapToDebug())
        self._up_since = datetime.now(timezone.utc)
        self.clean_leftovers()
        counts = {"requeued": 0, "resend": 0}
        if self.worker is not None:
            self.worker.start()
            counts = recover(self.db, self.worker)
        self._scheduler = BackgroundScheduler(timezone=timezone.utc, job_defaults={"coalesce": True, "max_instances": 1})
        now = datetime.now(timezone.utc)
        self._scheduler.add_job(self.check_completion, "interval", seconds=self.config.completion.check_interval_s,
                                id="completion", next_run_time=now)
        if self.config.retention.spool_days > 0 or self.config.retention.audit_days > 0:
            # First run one interval after start, so jobs recovered at start use their inputs first.
            self._scheduler.add_job(self.apply_retention, "interval", hours=self.config.retention.every_h, id="retention")
        self._scheduler.start()
        self.settle_jobs()  # jobs whose last send finished just before a stop
        self.sends.start()
        try:
            self.scp.start()
        except Exception as exc:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            if self.worker is not None:
                self.worker.stop(timeout=5)
            self.sends.stop(timeout=5)
            node = self.config.node
            raise StartupError(f"cannot listen on {node.host}:{node.port}: {exc}") from exc
        if self.monitor is not None:
            try:
                self.monitor.start()
            except Exception as exc:
                self.stop()
                raise StartupError(str(exc)) from exc
        event(log, "node_started", ae_title=self.config.node.ae_title, host=self.config.node.host,
              port=self.config.node.port, requeued=counts["requeued"], resent=counts["resend"])

    def clean_leftovers(self) -> None:
        """Before anything writes: drop temporary files and the outbox of jobs that will run again.

        Worker processes elsewhere may share the spool: a job they hold under a live lease keeps its
        outbox, and only temporary files older than one lease are taken as leftovers.
        """
        from sqlalchemy import or_, select

        from dicomnode.audit.models import Job, JobState

        wanted = (JobState.encoded, JobState.sending, JobState.done, JobState.failed)
        now = datetime.now(timezone.utc)
        with self.db.session() as session:
            keep = set(session.scalars(select(Job.id).where(or_(
                Job.state.in_(wanted), (Job.state == JobState.processing) & (Job.lease_expires_at > now)))).all())
        report = self.spool.clean_leftovers(keep, tmp_older_than_s=self.config.worker.lease_s)
        event(log, "spool_leftovers_removed", tmp_files=report.tmp_files, outbox_files=report.outbox_files)

    def stop(self) -> None:
        """Stop accepting, finish the job in hand, end sends after their current instance, stop timers."""
        if self.monitor is not None:
            self.monitor.stop()
        self.scp.stop()
        if self.worker is not None:
            self.worker.stop()
        # A send in hand stops after the instance on the wire (released, its acks kept). A worker
        # still negotiating with a hung peer is left to its timeout: it can send nothing more.
        self.sends.stop(timeout=self.config.sending.connect_timeout_s + 10)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        self.db.close()
        event(log, "node_stopped", ae_title=self.config.node.ae_title)

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
            event(log, "completion_check_error", logging.ERROR, exc_info=True, series_uid=series_uid)
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
        # Called after the creating transaction committed, so the worker sees the jobs; workers
        # in other processes find them at their next poll.
        if self.worker is not None and job_ids:
            self.worker.submit()

    # -- sending ----------------------------------------------------------------------------
    def wake_sender(self) -> None:
        """Have the destination workers look for due sends now instead of at their next poll."""
        self.sends.wake()

    def settle_jobs(self, _job_ids: list[int] | None = None) -> None:
        """Move ``sending`` jobs whose sends are all sent or failed to ``done``/``failed``."""
        with self._settle_lock, self.db.session() as session:
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
            event(log, "audit_purge", days=days, jobs=report.jobs, series=report.series, instances=report.instances,
                  rejections=report.rejections, associations=report.associations)

    def purge_spool(self) -> None:
        """Delete spool files older than ``retention.spool_days`` (received, quarantined and sent).

        Instance rows whose file went get ``purged_at``, so the audit says the file is gone.
        """
        days = self.config.retention.spool_days
        report = self.spool.purge_older_than(days)
        with self.db.session() as session:
            marked = mark_purged_instances(session, days)
        if report.files or marked:
            event(log, "retention_purge", days=days, files=report.files, bytes=report.bytes, instances_marked=marked)
