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


def _output_header(files: list) -> tuple[str, str]:
    """(SeriesNumber, SeriesDescription) from an output series' first file; "-" once it is purged."""
    import pydicom

    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesNumber", "SeriesDescription"])
    except (IndexError, OSError, pydicom.errors.InvalidDicomError):
        return "-", "-"
    return str(ds.get("SeriesNumber", "-")), str(ds.get("SeriesDescription", "-"))


def _num(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _registration_lines(reg: dict) -> list[str]:
    if not reg:
        return ["registration: (not recorded)", ""]
    if reg.get("skipped_reason") and not reg.get("stages"):
        return [f"registration: not run ({reg['skipped_reason']}); resampled only", ""]
    head = (f"registration: {_num(reg.get('seconds'), '.1f')} s, start {reg.get('initialization') or '-'}, "
            f"transform {reg.get('transform') or '-'}, deformable {'yes' if reg.get('deformable') else 'no'}")
    if reg.get("skipped_reason"):  # stages ran, and the result was held back (same frame of reference)
        head += f"\n  held at identity: {reg['skipped_reason']}"
    rows = [[st["name"], "yes" if st.get("kept") else "no", _num(st.get("metric_before")), _num(st.get("metric_after")),
             str(st.get("iterations", "-")), _num(st.get("seconds"), ".1f"),
             ",".join(f"{v:g}" for v in st.get("levels_mm") or ()) or "-", st.get("note") or ""]
            for st in reg.get("stages", [])]
    # Metric: held-out Mattes mutual information, SimpleITK's sign (lower is better).
    return [head] + _table("  stages", ["stage", "kept", "metric before", "metric after", "iterations", "seconds",
                                        "levels mm", "note"], rows)[1:]


def job_record(db: AuditDB, job_id: int) -> dict | None:
    """Everything the audit database holds about one job, JSON-able (``audit --job N --json``)."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        columns = {c.name: getattr(job, c.name) for c in Job.__table__.columns}
        columns["state"] = job.state.value
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        metrics = session.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.id)).all()
        sends = session.scalars(select(Send).where(Send.job_id == job_id).order_by(Send.id)).all()
        inputs = {role: session.scalars(select(Series).where(Series.series_uid == uid)).first()
                  for role, uid in (("fixed", job.fixed_series_uid), ("moving", job.moving_series_uid))}
        return {
            **columns,
            # The input series as the node saw them; patient identifiers stay out, as in the text view.
            "inputs": {role: None if s is None else {
                "series_uid": s.series_uid, "modality": s.modality, "calling_ae": s.calling_ae,
                "received_count": s.received_count, "expected_count": s.expected_count, "state": s.state.value,
                "completion_reason": s.completion_reason, "frame_of_reference_uid": s.frame_of_reference_uid,
            } for role, s in inputs.items()},
            "events": [{"at": e.at, "from": e.from_state, "to": e.to_state, "detail": e.detail} for e in events],
            "metrics": [{"name": m.name, "slice_index": m.slice_index, "value": m.value} for m in metrics],
            "sends": [{c.name: getattr(x, c.name) for c in Send.__table__.columns} | {"state": x.state.value}
                      for x in sends],
        }


def job_text(db: AuditDB, job_id: int) -> str:
    """One job as an administrator reads it: inputs, registration, outputs, sends, metrics, events."""
    record = job_record(db, job_id)
    if record is None:
        return f"no job {job_id}\n"
    timings = record["timings"] or {}
    lines = [
        f"job {record['id']}: {record['state']}  rule {record['rule']}  method {record['method']}",
        f"  study {record['study_uid']}",
        f"  created {_ts(record['created_at'])}  updated {_ts(record['updated_at'])}  "
        f"total {_num(timings.get('total_s'), '.1f')} s",
    ]
    if record["reason"]:
        lines.append(f"  reason: {record['reason']}")
    if record["quality_flag"]:
        lines.append(f"  quality flag: {record['quality_flag']}")
    lines.append("")
    input_rows = []
    for role in ("fixed", "moving"):
        s = record["inputs"][role]
        uid = record[f"{role}_series_uid"]
        if s is None:
            input_rows.append([role, "-", uid, "-", "-", "(no series row)"])
        else:
            expected = "?" if s["expected_count"] is None else s["expected_count"]
            input_rows.append([role, s["modality"], uid, f"{s['received_count']}/{expected}", s["calling_ae"],
                               s["completion_reason"] or s["state"]])
    lines += _table("inputs", ["role", "modality", "series", "instances", "from", "completed by"], input_rows)
    lines += _registration_lines(record["registration"] or {})
    stages = [f"{k}={v:.2f}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in timings.items()
              if k not in ("total_s", "cpu_s")]
    lines += [f"timings (s): {' '.join(stages) or '(none)'}"]
    if timings.get("cpu_s"):
        lines += ["CPU (s, the process): " + " ".join(f"{k}={v:.2f}" for k, v in timings["cpu_s"].items())]
    lines += [""]
    output_rows = []
    for out in (record["outputs"] or {}).get("series", []):
        number, description = _output_header(out.get("files") or [])
        output_rows.append([out.get("kind", "-"), str(out.get("count", len(out.get("files") or []))), number,
                            description, out.get("series_uid", "-")])
    lines += _table("outputs", ["kind", "instances", "series number", "description", "series"], output_rows)
    lines += _table(
        "sends",
        ["destination", "series", "files", "state", "attempts", "sent", "last status"],
        [[x["destination"], _short(x["series_uid"]), str(len(x["files"] or [])), x["state"], str(x["attempts"]),
          _ts(x["sent_at"]), x["last_status"] or ""] for x in record["sends"]],
    )
    per_series = {m["name"]: m["value"] for m in record["metrics"] if m["slice_index"] is None}
    per_slice: dict[str, list[float]] = defaultdict(list)
    for m in record["metrics"]:
        if m["slice_index"] is not None:
            per_slice[m["name"]].append(m["value"])
    metric_rows = []
    for name in sorted(set(per_series) | set(per_slice)):
        values = per_slice.get(name, [])
        stats = (min(values), sum(values) / len(values), max(values)) if values else (None, None, None)
        metric_rows.append([name, _num(per_series.get(name)), str(len(values)), *map(_num, stats)])
    lines += _table("metrics", ["name", "series", "slices", "min", "mean", "max"], metric_rows)
    lines += _table("events", ["at", "from", "to", "detail"],
                    [[_ts(e["at"]), e["from"] or "-", e["to"], e["detail"] or ""] for e in record["events"]])
    return "\n".join(lines).rstrip() + "\n"
