"""The persisted send queue: one worker per destination, retries with backoff, resume after acknowledged files.

The queue keeps one ``Send`` row per (job, output series, destination). Each configured
destination has its own worker thread, so a destination that hangs delays only its own sends.
A worker attempts its destination's rows whose ``next_attempt_at`` has passed; a failure schedules
the next attempt after ``min(initial_delay_s * backoff**(attempts-1), max_delay_s)`` and the send
is ``failed`` after ``max_attempts``. The acknowledged instances are counted in the row
(``acked_count``, committed while the series is sent and when the attempt ends), so a retry or a
restart sends only what the peer has not acknowledged. The one instance in flight when a response timed out, the association aborted
or the process died may reach the peer twice (under the same SOP Instance UID).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Send, SendState
from dicomnode.config import Config, SendingConfig
from dicomnode.log import event as log_event
from dicomnode.net.scu import SendFailed, SendInterrupted, send_files

log = logging.getLogger(__name__)



def retry_delay(attempts: int, initial_s: float, backoff: float, max_s: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (1 -> initial_s)."""
    return min(initial_s * backoff ** max(0, attempts - 1), max_s)


def retry_schedule(sending: SendingConfig) -> list[float]:
    """Seconds from the first attempt to each later one, when every attempt fails at once."""
    out, at = [], 0.0
    for failed in range(1, sending.max_attempts):
        at += retry_delay(failed, sending.initial_delay_s, sending.backoff, sending.max_delay_s)
        out.append(at)
    return out


class SendQueue:
    """Persisted sends with bounded exponential backoff and one worker per destination (module docstring).

    ``run_due`` can be called from any thread: a send being attempted is claimed in memory, and
    its row is read again after the claim, so no send is ever attempted twice at once.
    ``on_final(job_ids)`` runs on a worker thread after sends of those jobs became sent or failed.
    """

    def __init__(self, db: AuditDB, config: Config, on_final: Callable[[list[int]], None] = lambda job_ids: None):
        self.db = db
        self.config = config
        self.on_final = on_final
        self._claims_lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._stopping = threading.Event()
        self._wakes: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []

    # -- workers ---------------------------------------------------------------------------
    def start(self) -> None:
        """Fail pending sends to destinations no longer configured; start one worker per destination."""
        self._stopping.clear()
        names = [d.name for d in self.config.destinations]
        with self.db.session() as session:
            orphans = session.scalars(
                select(Send.id).where(Send.state == SendState.pending, Send.destination.not_in(names)).order_by(Send.id)
            ).all()
        finished = self._attempt_each(orphans, datetime.now(timezone.utc))
        if finished:
            self.on_final(finished)
        for name in names:
            self._wakes[name] = threading.Event()
            thread = threading.Thread(target=self._serve, args=(name,), name=f"dicomnode-send-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wake(self) -> None:
        """Look for due sends now (e.g. a job's sends were just queued) instead of at the next poll."""
        for event in self._wakes.values():
            event.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the workers; a send in hand ends after its current instance (released, not aborted)."""
        self._stopping.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log_event(log, "send_workers_still_running", logging.WARNING, threads=",".join(alive))
        self._threads, self._wakes = [], {}
        return not alive

    def _serve(self, destination: str) -> None:
        wake = self._wakes[destination]
        while not self._stopping.is_set():
            try:
                finished = self.run_due(destination=destination)
                if finished:
                    self.on_final(finished)
                wait = self._seconds_to_next_due(destination)
            except Exception:  # the database may be down for a while: keep the worker, try again later
                log_event(log, "send_worker_error", logging.ERROR, exc_info=True, destination=destination)
                wait = self.config.sending.poll_s
            wake.wait(wait)
            wake.clear()

    def _seconds_to_next_due(self, destination: str) -> float:
        with self.db.session() as session:
            due = session.scalar(
                select(Send.next_attempt_at).where(Send.state == SendState.pending, Send.destination == destination)
                .order_by(Send.next_attempt_at).limit(1)
            )
        poll_s = self.config.sending.poll_s  # a wake-up ends the sleep sooner
        if due is None:
            return poll_s
        return min(poll_s, max(0.05, (due - datetime.now(timezone.utc)).total_seconds()))

    # -- the queue -------------------------------------------------------------------------
    def enqueue(self, job_id: int, series_uid: str, destination_name: str, files: Sequence[Path]) -> None:
        """Add a pending send; a second call for the same (job, series, destination) changes nothing."""
        try:
            with self.db.session() as session:
                exists = session.scalar(
                    select(Send.id).where(Send.job_id == job_id, Send.series_uid == series_uid, Send.destination == destination_name)
                )
                if exists is not None:
                    return
                session.add(
                    Send(
                        job_id=job_id,
                        series_uid=series_uid,
                        destination=destination_name,
                        files=[str(p) for p in files],
                        state=SendState.pending,
                        attempts=0,
                        acked_count=0,
                        next_attempt_at=datetime.now(timezone.utc),
                    )
                )
        except IntegrityError:
            return  # enqueued concurrently: the unique constraint keeps one row
        log_event(log, "send_queued", job=job_id, series=series_uid, destination=destination_name, files=len(files))

    def run_due(self, now: datetime | None = None, destination: str | None = None) -> list[int]:
        """Attempt the due pending sends (of one destination, or all); job ids with a send now sent/failed."""
        now = now or datetime.now(timezone.utc)
        query = select(Send.id).where(Send.state == SendState.pending, Send.next_attempt_at <= now)
        if destination is not None:
            query = query.where(Send.destination == destination)
        with self.db.session() as session:
            due = session.scalars(query.order_by(Send.id)).all()
        return self._attempt_each(due, now)

    def _attempt_each(self, send_ids: Sequence[int], now: datetime) -> list[int]:
        finished: list[int] = []
        for send_id in send_ids:
            if self._stopping.is_set():
                break
            with self._claims_lock:
                if send_id in self._in_flight:
                    continue
                self._in_flight.add(send_id)
            try:
                outcome = self._attempt(send_id, now)
            finally:
                with self._claims_lock:
                    self._in_flight.discard(send_id)
            if outcome is not None and outcome[1] and outcome[0] not in finished:
                finished.append(outcome[0])
        return finished

    def _attempt(self, send_id: int, now: datetime) -> tuple[int, bool] | None:
        """One attempt at one claimed send; None when it was no longer due (another caller got it first)."""
        with self.db.session() as session:
            row = session.get(Send, send_id)
            if row is None or row.state != SendState.pending or row.next_attempt_at > now:
                return None
            job_id, dest_name, files, attempts, acked = row.job_id, row.destination, list(row.files), row.attempts, row.acked_count
        sending = self.config.sending
        attempt_no = attempts + 1
        error: str | None = None
        final_error = False
        stored = 0
        warnings: Counter[int] = Counter()
        committed_at = time.monotonic()

        def on_stored(index: int, _uid: str, status: int) -> None:
            nonlocal stored, committed_at
            stored = index + 1
            if status:
                warnings[status] += 1
            if time.monotonic() - committed_at >= sending.ack_commit_every_s:  # a crash now resumes after it
                with self.db.session() as session:
                    session.execute(update(Send).where(Send.id == send_id).values(acked_count=acked + stored))
                committed_at = time.monotonic()

        started = time.perf_counter()
        try:
            dest = self.config.destination(dest_name)
            send_files(
                dest,
                [Path(f) for f in files[acked:]],
                calling_ae=self.config.node.ae_title,
                timeout_s=sending.connect_timeout_s,
                response_timeout_s=sending.response_timeout_s,
                tls=self.config.tls,
                max_pdu=self.config.node.max_pdu,
                on_stored=on_stored,
                stop=self._stopping,
            )
        except KeyError:
            error, final_error = f"destination {dest_name!r} is not configured", True
        except SendInterrupted as exc:
            return self._interrupted(send_id, job_id, dest_name, acked, stored, str(exc))
        except SendFailed as exc:
            error = str(exc)
        except Exception as exc:  # a bug or OS error must not kill the queue; it is audited like a failure
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - started
        done = f"sent {stored} instances in {seconds:.2f} s" + (f" (resumed after {acked} acknowledged)" if acked else "")
        if warnings:
            done += "; stored with warning " + ", ".join(f"0x{k:04X} x{n}" for k, n in sorted(warnings.items()))
        progress = f"; {acked + stored} of {len(files)} acknowledged" if acked + stored else ""
        with self.db.session() as session:
            row = session.get(Send, send_id)
            row.attempts = attempt_no
            row.acked_count = acked + stored
            if error is None:
                row.state = SendState.sent
                row.sent_at = datetime.now(timezone.utc)
                row.last_status = f"attempt {attempt_no}: {done}"
            elif final_error or attempt_no >= sending.max_attempts:
                row.state = SendState.failed
                row.last_status = f"attempt {attempt_no}: {error}{progress}; giving up after {attempt_no} attempts"
            else:
                delay = retry_delay(attempt_no, sending.initial_delay_s, sending.backoff, sending.max_delay_s)
                row.next_attempt_at = now + timedelta(seconds=delay)
                row.last_status = f"attempt {attempt_no}: {error}{progress}; next in {delay:.0f} s"
            state, acked_total = row.state, row.acked_count
        level = logging.INFO if error is None else logging.WARNING if state == SendState.pending else logging.ERROR
        log_event(
            log,
            "send_attempt",
            level,
            job=job_id,
            send=send_id,
            destination=dest_name,
            attempt=attempt_no,
            state=state.value,
            instances=stored,
            acked=acked_total,
            files=len(files),
            seconds=round(seconds, 3),
            warnings=sum(warnings.values()),
            error=error,
        )
        return job_id, state != SendState.pending

    def _interrupted(self, send_id: int, job_id: int, dest_name: str, acked: int, stored: int, why: str) -> tuple[int, bool]:
        # A stop is not the destination's fault: the attempt is not counted and the rest is due at once.
        with self.db.session() as session:
            row = session.get(Send, send_id)
            row.acked_count = acked + stored
            row.last_status = f"{why}; {acked + stored} of {len(row.files)} acknowledged, the rest goes at the next start"
        log_event(log, "send_interrupted", job=job_id, send=send_id, destination=dest_name, acked=acked + stored)
        return job_id, False

    def job_send_state(self, job_id: int) -> Literal["pending", "sent", "failed"]:
        """``failed`` if any send failed, ``sent`` when all are sent (or none exist), else ``pending``."""
        with self.db.session() as session:
            states = set(session.scalars(select(Send.state).where(Send.job_id == job_id)).all())
        if SendState.failed in states:
            return "failed"
        if SendState.pending in states:
            return "pending"
        return "sent"
