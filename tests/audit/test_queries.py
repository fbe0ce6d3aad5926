"""The audit summary and the job view show what happened, without patient identifiers."""

from __future__ import annotations

import argparse

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Job, JobEvent, JobState, Metric, Rejection, Send, SendState, Series
from dicomnode.audit.queries import audit_command, job_text, summary_text


def _fill(db: AuditDB) -> int:
    with db.session() as s:
        s.add(Series(series_uid="1.2.3.4.5.6.7.8.9.10.11.12", study_uid="1.2", modality="PT", patient_id="SECRET42",
                     patient_name="Doe^Jane", received_count=48, expected_count=48, calling_ae="ORTHANC"))
        job = Job(rule="PT->CT", fixed_series_uid="1.1", moving_series_uid="1.2", study_uid="1.2", method="alpha",
                  state=JobState.done, timings={"total_s": 12.5, "fusion_s": 3.0})
        s.add(job)
        s.flush()
        s.add_all([
            JobEvent(job_id=job.id, from_state="paired", to_state="processing"),
            JobEvent(job_id=job.id, from_state="processing", to_state="done", detail="ok"),
            Metric(job_id=job.id, slice_index=None, name="MI", value=1.25),
            Metric(job_id=job.id, slice_index=0, name="MI", value=1.0),
            Metric(job_id=job.id, slice_index=1, name="MI", value=2.0),
            Send(job_id=job.id, series_uid="9.9", destination="pacs", files=["a", "b"], state=SendState.sent, attempts=1,
                 last_status="attempt 1: sent 2 instances"),
            Rejection(calling_ae="BAD", status=0xA900, reason="no pixel data"),
        ])
        return job.id


def test_summary_and_job_text(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    db = AuditDB.open(url)
    job_id = _fill(db)
    text = summary_text(db)
    assert "PT->CT" in text and "done" in text and "MI=1.25" in text and "12.5" in text
    assert "0xA900" in text and "no pixel data" in text and "48/48" in text and "sent 2 instances" in text
    assert "SECRET42" not in text and "Doe" not in text
    detail = job_text(db, job_id)
    assert "processing" in detail and "fusion_s=3.0" in detail
    assert "1.5" in detail  # mean of the per-slice MI values
    db.close()
    args = argparse.Namespace(config=None, database_url=url, limit=5, job=None)
    assert audit_command(args) == 0
    assert "PT->CT" in capsys.readouterr().out
    args.job = job_id
    assert audit_command(args) == 0
    assert "events" in capsys.readouterr().out
