"""Read-only views of the audit database: ``dicomnode audit`` and the demo's summary.

The text names series by UID and modality only; patient identifiers stay in the database.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Association, Job, JobEvent, JobState, Metric, Rejection, Send, Series


def _ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _short(uid: str, keep: int = 12) -> str:
    return uid if len(uid) <= keep + 3 else "..." + uid[-keep:]


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [f"{title} ({len(rows)})"]
    if not rows:
        return lines + ["  (none)", ""]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    return lines + [""]


def _series_metrics(session, job_ids: list[int]) -> dict[int, str]:
    """``name=value`` of each job's series-level metrics (slice_index NULL), in name order."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Metric.job_id, Metric.name, Metric.value).where(Metric.job_id.in_(job_ids), Metric.slice_index.is_(None)).order_by(Metric.name)
    ).all()
    out: dict[int, list[str]] = defaultdict(list)
    for job_id, name, value in rows:
        out[job_id].append(f"{name}={value:.4g}")
    return {k: " ".join(v) for k, v in out.items()}


def _seconds(job: Job) -> str:
    total = (job.timings or {}).get("total_s")
    if total is None and job.updated_at and job.created_at:
        total = (job.updated_at - job.created_at).total_seconds()
    return f"{total:.1f}" if total is not None else "-"


@dataclass(frozen=True)
class AuditFilter:
    """Narrow the summary to one study, one patient and/or one job state (None = no condition)."""

    study_uid: str | None = None
    patient_id: str | None = None
    state: JobState | None = None

    @property
    def narrows_series(self) -> bool:
        return self.study_uid is not None or self.patient_id is not None


def _scopes(f: AuditFilter):
    """(series UIDs, job ids) that ``f`` allows, as subqueries; None where it allows everything."""
    series = None
    if f.narrows_series:
        series = select(Series.series_uid)
        if f.study_uid is not None:
            series = series.where(Series.study_uid == f.study_uid)
        if f.patient_id is not None:
            series = series.where(Series.patient_id == f.patient_id)
    if series is None and f.state is None:
        return None, None
    jobs = select(Job.id)
    if series is not None:
        jobs = jobs.where(Job.fixed_series_uid.in_(series) | Job.moving_series_uid.in_(series))
    if f.state is not None:
        jobs = jobs.where(Job.state == f.state)
    return series, jobs


def summary_text(db: AuditDB, limit: int = 20, where: AuditFilter = AuditFilter()) -> str:
    """Recent jobs (state, method, timings, metric summary), sends, rejections and series, as text.

    With a study or patient filter, rejections are left out: they are recorded per instance and
    association, before any series exists to tie them to a study.
    """
    series_scope, job_scope = _scopes(where)
    job_query, send_query, series_query = select(Job), select(Send), select(Series)
    if job_scope is not None:
        job_query, send_query = job_query.where(Job.id.in_(job_scope)), send_query.where(Send.job_id.in_(job_scope))
    if series_scope is not None:
        series_query = series_query.where(Series.series_uid.in_(series_scope))
    with db.session() as session:
        jobs = session.scalars(job_query.order_by(Job.id.desc()).limit(limit)).all()
        metrics = _series_metrics(session, [j.id for j in jobs])
        job_rows = [
            [str(j.id), j.state.value, j.rule, j.method, _ts(j.created_at), _seconds(j), metrics.get(j.id, ""), j.reason or ""]
            for j in jobs
        ]
        sends = session.scalars(send_query.order_by(Send.id.desc()).limit(limit)).all()
        send_rows = [
            [str(s.id), str(s.job_id), s.destination, _short(s.series_uid), str(len(s.files or [])), s.state.value, str(s.attempts), s.last_status or ""]
            for s in sends
        ]
        rejections = session.scalars(select(Rejection).order_by(Rejection.id.desc()).limit(limit)).all()
        rejection_rows = [
            [_ts(r.at), r.calling_ae, f"0x{r.status:04X}" if r.status is not None else "-", _short(r.sop_instance_uid) or "-", r.reason]
            for r in rejections
        ]
        series = session.scalars(series_query.order_by(Series.id.desc()).limit(limit)).all()
        series_rows = [
            [
                _short(s.series_uid),
                s.modality,
                s.calling_ae,
                f"{s.received_count}/{s.expected_count if s.expected_count is not None else '?'}",
                s.state.value,
                s.completion_reason or "",
                _ts(s.last_received_at),
            ]
            for s in series
        ]
        accepted, refused = (
            session.scalar(select(func.count()).select_from(Association).where(Association.accepted.is_(flag))) or 0
            for flag in (True, False)
        )
    lines = [f"associations: {accepted} accepted, {refused} refused", ""]
    lines += _table("jobs", ["id", "state", "rule", "method", "created", "seconds", "metrics", "reason"], job_rows)
    lines += _table("sends", ["id", "job", "destination", "series", "files", "state", "attempts", "last status"], send_rows)
    lines += _table("series", ["series", "modality", "from", "received", "state", "completion", "last received"], series_rows)
    if not where.narrows_series:
        lines += _table("rejections", ["at", "calling AE", "status", "instance", "reason"], rejection_rows)
    return "\n".join(lines).rstrip() + "\n"


def job_text(db: AuditDB, job_id: int) -> str:
    """One job with its state changes, outputs, sends and metrics, as text."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return f"no job {job_id}\n"
        lines = [
            f"job {job.id}: {job.state.value} rule={job.rule} method={job.method}",
            f"  fixed  {job.fixed_series_uid}",
            f"  moving {job.moving_series_uid}",
            f"  study  {job.study_uid}",
            f"  created {_ts(job.created_at)} updated {_ts(job.updated_at)} seconds {_seconds(job)}",
        ]
        if job.reason:
            lines.append(f"  reason: {job.reason}")
        if job.quality_flag:
            lines.append(f"  quality flag: {job.quality_flag}")
        for label, data in (("timings", job.timings), ("registration", job.registration), ("outputs", job.outputs)):
            if data:
                lines.append(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in data.items()))
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        lines.append("")
        lines += _table("events", ["at", "from", "to", "detail"], [[_ts(e.at), e.from_state or "-", e.to_state, e.detail or ""] for e in events])
        per_series = session.execute(
            select(Metric.name, Metric.value).where(Metric.job_id == job_id, Metric.slice_index.is_(None)).order_by(Metric.name)
        ).all()
        per_slice = session.execute(
            select(Metric.name, func.count(), func.min(Metric.value), func.avg(Metric.value), func.max(Metric.value))
            .where(Metric.job_id == job_id, Metric.slice_index.is_not(None))
            .group_by(Metric.name)
            .order_by(Metric.name)
        ).all()
        slice_stats = {name: (n, lo, mean, hi) for name, n, lo, mean, hi in per_slice}
        names = sorted({n for n, _ in per_series} | set(slice_stats))
        series_values = dict(per_series)
        metric_rows = []
        for name in names:
            n, lo, mean, hi = slice_stats.get(name, (0, None, None, None))
            fmt = lambda v: f"{v:.4g}" if v is not None else "-"  # noqa: E731
            metric_rows.append([name, fmt(series_values.get(name)), str(n), fmt(lo), fmt(mean), fmt(hi)])
        lines += _table("metrics", ["name", "series", "slices", "min", "mean", "max"], metric_rows)
        sends = session.scalars(select(Send).where(Send.job_id == job_id).order_by(Send.id)).all()
        lines += _table(
            "sends",
            ["id", "destination", "series", "files", "state", "attempts", "sent", "last status"],
            [[str(s.id), s.destination, s.series_uid, str(len(s.files or [])), s.state.value, str(s.attempts), _ts(s.sent_at), s.last_status or ""] for s in sends],
        )
    return "\n".join(lines).rstrip() + "\n"


def audit_command(args) -> int:
    """``dicomnode audit [--config F] [--database-url U] [--limit N] [--job N | --study UID --patient ID --state S]``."""
    from dicomnode.config import ConfigError, load_config

    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(exc)
        return 2
    state = getattr(args, "state", None)
    if state is not None and state not in JobState.__members__:
        print(f"unknown job state {state!r}; one of: {', '.join(JobState.__members__)}")
        return 2
    where = AuditFilter(getattr(args, "study", None), getattr(args, "patient", None), state and JobState(state))
    url = getattr(args, "database_url", None) or config.storage.database_url
    db = AuditDB.open(url)
    try:
        if getattr(args, "job", None) is not None:
            print(job_text(db, args.job), end="")
        else:
            print(summary_text(db, limit=getattr(args, "limit", 20), where=where), end="")
    finally:
        db.close()
    return 0
