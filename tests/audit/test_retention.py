"""Audit retention deletes ended work older than the limit and never anything still in flight."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from dicomnode.audit.models import (
    Association, Instance, Job, JobEvent, JobState, Metric, Rejection, Send, SendState, Series, SeriesState,
)
from dicomnode.audit.retention import mark_purged_instances, purge_audit

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=2)


def _series(uid: str, at: datetime, state: SeriesState = SeriesState.complete) -> Series:
    return Series(series_uid=uid, study_uid="1.9", modality="CT", state=state, first_received_at=at,
                  last_received_at=at)


def _job(fixed: str, moving: str, state: JobState, at: datetime) -> Job:
    return Job(rule="PT->CT", fixed_series_uid=fixed, moving_series_uid=moving, study_uid="1.9", method="alpha",
               state=state, created_at=at, updated_at=at)


def _fill(session) -> dict[str, int]:
    assoc_old = Association(calling_ae="A", called_ae="N", peer_host="h", peer_port=1, accepted=True,
                            started_at=OLD, ended_at=OLD)
    assoc_unused = Association(calling_ae="B", called_ae="N", peer_host="h", peer_port=1, accepted=False,
                               started_at=OLD, ended_at=OLD)
    session.add_all([assoc_old, assoc_unused])
    session.flush()
    # Old and finished: goes with its inputs.
    session.add_all([_series("1.1", OLD), _series("1.2", OLD)])
    # Old inputs of a job still sending: stay.
    session.add_all([_series("2.1", OLD), _series("2.2", OLD)])
    # An old series still receiving (e.g. the node was down): stays.
    session.add(_series("3.1", OLD, SeriesState.receiving))
    # A recent finished job: stays.
    session.add_all([_series("4.1", RECENT), _series("4.2", RECENT)])
    session.flush()
    ids = {uid: sid for uid, sid in session.execute(select(Series.series_uid, Series.id))}
    session.add_all([
        Instance(sop_instance_uid="1.1.1", sop_class_uid="x", series_id=ids["1.1"], association_id=assoc_old.id,
                 transfer_syntax_uid="t", size_bytes=1, sha256="0" * 64, spool_path="p", received_at=OLD),
        Instance(sop_instance_uid="2.1.1", sop_class_uid="x", series_id=ids["2.1"], association_id=None,
                 transfer_syntax_uid="t", size_bytes=1, sha256="0" * 64, spool_path="p", received_at=OLD),
    ])
    old_done = _job("1.1", "1.2", JobState.done, OLD)
    old_failed_pending = _job("2.1", "2.2", JobState.failed, OLD)
    recent = _job("4.1", "4.2", JobState.done, RECENT)
    session.add_all([old_done, old_failed_pending, recent])
    session.flush()
    session.add_all([
        JobEvent(job_id=old_done.id, to_state="done", at=OLD),
        Metric(job_id=old_done.id, slice_index=None, name="MI", value=1.0),
        Send(job_id=old_done.id, series_uid="9.1", destination="pacs", state=SendState.sent),
        Send(job_id=old_failed_pending.id, series_uid="9.2", destination="pacs", state=SendState.pending),
        Metric(job_id=recent.id, slice_index=None, name="MI", value=2.0),
        Rejection(at=OLD, reason="no pixel data"),
        Rejection(at=RECENT, reason="unsupported SOP class"),
    ])
    return {"old_done": old_done.id, "pending": old_failed_pending.id, "recent": recent.id}


def _count(session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))


def test_purge_deletes_ended_work_older_than_the_limit(db):
    with db.session() as s:
        jobs = _fill(s)
    with db.session() as s:
        report = purge_audit(s, 30, now=NOW)
    assert (report.jobs, report.series, report.instances, report.rejections, report.associations) == (1, 2, 1, 1, 2)
    with db.session() as s:
        assert set(s.scalars(select(Job.id))) == {jobs["pending"], jobs["recent"]}
        assert set(s.scalars(select(Series.series_uid))) == {"2.1", "2.2", "3.1", "4.1", "4.2"}
        assert list(s.scalars(select(Instance.sop_instance_uid))) == ["2.1.1"]
        assert list(s.scalars(select(Rejection.reason))) == ["unsupported SOP class"]
        assert _count(s, JobEvent) == 0 and _count(s, Association) == 0
        assert list(s.scalars(select(Metric.job_id))) == [jobs["recent"]]
        assert list(s.scalars(select(Send.job_id))) == [jobs["pending"]]


def test_zero_days_keeps_everything(db):
    with db.session() as s:
        _fill(s)
    with db.session() as s:
        assert purge_audit(s, 0, now=NOW).rows == 0
        assert _count(s, Job) == 3 and _count(s, Series) == 7 and _count(s, Rejection) == 2


def test_instances_whose_spool_file_is_gone_are_marked_purged(db, tmp_path):
    kept, gone, young = tmp_path / "kept.dcm", tmp_path / "gone.dcm", tmp_path / "young-gone.dcm"
    kept.write_bytes(b"x")
    with db.session() as s:
        series = _series("5.1", OLD)
        s.add(series)
        s.flush()
        for n, (path, at) in enumerate(((kept, OLD), (gone, OLD), (young, RECENT))):
            s.add(Instance(sop_instance_uid=f"5.1.{n}", sop_class_uid="1.2", series_id=series.id,
                           transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, sha256="0" * 64,
                           spool_path=str(path), received_at=at))
    with db.session() as s:
        assert mark_purged_instances(s, 7, now=NOW) == 1
        assert mark_purged_instances(s, 0, now=NOW) == 0  # retention off: nothing checked
    with db.session() as s:
        marked = {r.spool_path: r.purged_at for r in s.scalars(select(Instance))}
    # Only the old row with a missing file; a young row is not retention's doing.
    assert marked == {str(kept): None, str(gone): NOW, str(young): None}
    with db.session() as s:
        assert mark_purged_instances(s, 7, now=NOW) == 0  # marked once
