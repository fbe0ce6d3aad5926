"""The job state machine: paired -> processing -> encoded -> sending -> done | failed(reason).

A job is one pairing (moving series onto fixed series under a rule). Its states before
``paired`` are those of its series (received -> complete, see ``store/series.py``). Every
transition is checked against ``TRANSITIONS`` and written as a ``JobEvent`` row in the same
transaction as the state, so the audit log and the state never disagree. Processing runs on one
worker (``worker.py``), never on an association thread; sends are handed to the persisted send
queue, and a job is ``done`` once every send of it is ``sent``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.audit.models import Job, JobEvent, JobState, Send, SendState
from dicomnode.log import event
from dicomnode.routing import Pairing

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


class IllegalTransition(Exception):
    """A job was asked to move to a state its current state cannot lead to (a bug, not bad input)."""


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
    event(log, "job_state", level, job_id=job.id, **{"from": current and current.value}, to=to.value, detail=detail)


def create_job(session: Session, pairing: Pairing, method: str) -> Job | None:
    """The ``paired`` job for ``pairing``; None when that pair, at these series revisions, was already made.

    A series reopened by late instances has a new revision, so the grown series is fused again.
    """
    exists = session.scalars(
        select(Job.id).where(
            Job.rule == pairing.rule.label,
            Job.fixed_series_uid == pairing.fixed.series_uid,
            Job.moving_series_uid == pairing.moving.series_uid,
            Job.fixed_revision == pairing.fixed.revision,
            Job.moving_revision == pairing.moving.revision,
        )
    ).first()
    if exists is not None:
        return None
    job = Job(
        rule=pairing.rule.label,
        fixed_series_uid=pairing.fixed.series_uid,
        moving_series_uid=pairing.moving.series_uid,
        fixed_revision=pairing.fixed.revision,
        moving_revision=pairing.moving.revision,
        study_uid=pairing.fixed.study_uid,
        method=method,
    )
    revisions = (f" fixed_revision={pairing.fixed.revision} moving_revision={pairing.moving.revision}"
                 if pairing.fixed.revision or pairing.moving.revision else "")
    transition(session, job, JobState.paired,
               f"rule={pairing.rule.label} fixed={pairing.fixed.modality} moving={pairing.moving.modality}{revisions}")
    return job


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
