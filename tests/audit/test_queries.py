"""The audit summary and the job view show what happened, without patient identifiers."""

from __future__ import annotations

import argparse

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Job, JobEvent, JobState, Metric, Rejection, Send, SendState, Series
from dicomnode.audit.queries import AuditFilter, job_text, summary_text
from dicomnode.commands.audit import audit_command


def _fill(db: AuditDB) -> int:
    with db.session() as s:
        s.add(Series(series_uid="1.2.3.4.5.6.7.8.9.10.11.12", study_uid="1.2", modality="PT", patient_id="SECRET42",
                     patient_name="Doe^Jane", received_count=48, expected_count=48, calling_ae="ORTHANC"))
        job = Job(rule="PT->CT", fixed_series_uid="1.1", moving_series_uid="1.2", study_uid="1.2", method="alpha",
                  state=JobState.done, timings={"total_s": 12.5, "fusion_s": 3.0, "cpu_s": {"fusion_s": 5.5}})
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
    assert "CPU (s, the process): fusion_s=5.50" in detail and "cpu_s=" not in detail
    assert "1.5" in detail  # mean of the per-slice MI values
    db.close()
    args = argparse.Namespace(config=None, database_url=url, limit=5, job=None, study=None, patient=None, state=None)
    assert audit_command(args) == 0
    assert "PT->CT" in capsys.readouterr().out
    args.job = job_id
    assert audit_command(args) == 0
    assert "events" in capsys.readouterr().out


def test_summary_filters_by_study_patient_and_state(db, capsys):
    with db.session() as s:
        for uid, study, patient in (("1.1", "9.1", "P1"), ("1.2", "9.1", "P1"), ("2.1", "9.2", "P2"), ("2.2", "9.2", "P2")):
            s.add(Series(series_uid=uid, study_uid=study, modality="CT" if uid.endswith(".1") else "PT", patient_id=patient))
        done = Job(rule="PT->CT", fixed_series_uid="1.1", moving_series_uid="1.2", study_uid="9.1", method="alpha",
                   state=JobState.done)
        failed = Job(rule="PT->CT", fixed_series_uid="2.1", moving_series_uid="2.2", study_uid="9.2", method="network",
                     state=JobState.failed, reason="registration failed")
        s.add_all([done, failed])
        s.flush()
        s.add_all([Send(job_id=done.id, series_uid="7.1", destination="pacs", state=SendState.sent),
                   Send(job_id=failed.id, series_uid="7.2", destination="archive", state=SendState.failed)])
        s.add(Rejection(calling_ae="BAD", status=0xA900, reason="no pixel data"))

    def jobs_and_sends(text: str) -> tuple[str, str]:
        return text.split("jobs (")[1][0], text.split("sends (")[1][0]

    everything = summary_text(db)
    assert jobs_and_sends(everything) == ("2", "2") and "no pixel data" in everything
    by_study = summary_text(db, where=AuditFilter(study_uid="9.2"))
    assert jobs_and_sends(by_study) == ("1", "1") and "registration failed" in by_study and "archive" in by_study
    assert "series (2)" in by_study and "rejections" not in by_study
    by_patient = summary_text(db, where=AuditFilter(patient_id="P1"))
    assert jobs_and_sends(by_patient) == ("1", "1") and "alpha" in by_patient and "network" not in by_patient
    by_state = summary_text(db, where=AuditFilter(state=JobState.failed))
    assert jobs_and_sends(by_state) == ("1", "1") and "series (4)" in by_state and "no pixel data" in by_state
    assert "jobs (0)" in summary_text(db, where=AuditFilter(patient_id="P1", state=JobState.failed))

    args = argparse.Namespace(config=None, database_url=None, limit=5, job=None, study=None, patient=None, state="lost")
    assert audit_command(args) == 2
    assert "unknown job state 'lost'" in capsys.readouterr().out
