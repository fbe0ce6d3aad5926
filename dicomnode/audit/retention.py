"""Audit retention: delete the rows of what ended more than ``retention.audit_days`` ago.

What goes: finished jobs (done or failed) with their events, metrics and sends; complete series
no remaining job refers to, with their instances; rejections; associations nothing refers to.
What stays: anything still in flight (receiving series, unfinished jobs, pending sends) however
old, so a purge can never make the node forget work it owes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.audit.models import (
    Association, Instance, Job, JobEvent, JobState, Metric, Rejection, Send, SendState, Series, SeriesState,
)

ENDED = (JobState.done, JobState.failed)


@dataclass(frozen=True)
class AuditPurgeReport:
    jobs: int
    series: int
    instances: int
    rejections: int
    associations: int

    @property
    def rows(self) -> int:
        return self.jobs + self.series + self.instances + self.rejections + self.associations


def purge_audit(session: Session, days: float, now: datetime | None = None) -> AuditPurgeReport:
    """Delete audit rows older than ``days`` (0 = keep all); returns what went, by kind."""
    if days <= 0:
        return AuditPurgeReport(0, 0, 0, 0, 0)
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=days)

    # A job with a send still pending is not over, whatever its state says.
    pending = select(Send.job_id).where(Send.state == SendState.pending)
    old_jobs = select(Job.id).where(Job.state.in_(ENDED), Job.updated_at < cutoff, Job.id.not_in(pending))
    job_ids = list(session.scalars(old_jobs))
    for model in (JobEvent, Metric, Send):
        session.execute(delete(model).where(model.job_id.in_(job_ids)))
    jobs = session.execute(delete(Job).where(Job.id.in_(job_ids))).rowcount

    in_use = select(Job.fixed_series_uid).union(select(Job.moving_series_uid))
    old_series = select(Series.id).where(
        Series.state == SeriesState.complete, Series.last_received_at < cutoff, Series.series_uid.not_in(in_use))
    series_ids = list(session.scalars(old_series))
    instances = session.execute(delete(Instance).where(Instance.series_id.in_(series_ids))).rowcount
    series = session.execute(delete(Series).where(Series.id.in_(series_ids))).rowcount

    rejections = session.execute(delete(Rejection).where(Rejection.at < cutoff)).rowcount
    referenced = select(Instance.association_id).where(Instance.association_id.is_not(None)).union(
        select(Rejection.association_id).where(Rejection.association_id.is_not(None)))
    associations = session.execute(delete(Association).where(
        or_(Association.ended_at < cutoff, Association.ended_at.is_(None) & (Association.started_at < cutoff)),
        Association.id.not_in(referenced))).rowcount
    return AuditPurgeReport(jobs, series, instances, rejections, associations)


# Spool files are purged by modification time, written just before their row's received_at:
# rows this much younger than the cutoff are checked too, so none is missed by a clock edge.
PURGE_SLACK = timedelta(hours=1)


def mark_purged_instances(session: Session, days: float, now: datetime | None = None,
                          exists: Callable[[Path], bool] = Path.exists) -> int:
    """Stamp ``purged_at`` on instance rows whose spool file spool retention deleted; how many.

    The rows stay (the audit trail keeps what was received), but never point at a missing file
    without saying so; a job that needs such a series fails with that reason.
    """
    if days <= 0:
        return 0
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(days=days) + PURGE_SLACK
    rows = session.execute(
        select(Instance.id, Instance.spool_path).where(Instance.purged_at.is_(None), Instance.received_at < cutoff)
    ).all()
    gone = [r.id for r in rows if not exists(Path(r.spool_path))]
    for start in range(0, len(gone), 500):
        session.execute(update(Instance).where(Instance.id.in_(gone[start:start + 500])).values(purged_at=now))
    return len(gone)
