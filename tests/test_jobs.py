"""The job state machine: legal transitions with events, the worker, settling sends, recovery."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, PositronEmissionTomographyImageStorage
from sqlalchemy import select

from tests.backends import BACKENDS, open_test_db
from dicomnode.audit.models import Instance, Job, JobEvent, JobState, Metric, Send, SendState, Series, SeriesState
from dicomnode.config import load_config
from dicomnode.jobs import IllegalTransition, create_job, settle_sending_jobs, transition
from dicomnode.pipeline import OutputSeries, ProcessingOutput
from dicomnode.routing import Pairing, SeriesRef
from dicomnode.store.spool import Spool
from dicomnode.worker import JobWorker, recover


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    with open_test_db(request.param, tmp_path) as database:
        yield database


def config(**over):
    base = {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
            "quality": {"thresholds": {"EN": 5.0}}}
    base.update(over)
    return load_config(overrides=base)


def seed_pair(db, spool_root: Path, calling_ae="PACS"):
    """A complete CT and PT series with one spooled instance each, paired into a job."""
    cfg = config()
    refs = {}
    with db.session() as s:
        for uid, modality in (("1.1", "CT"), ("1.2", "PT")):
            row = Series(series_uid=uid, study_uid="1.0", modality=modality, patient_id="P", state=SeriesState.complete,
                         calling_ae=calling_ae, received_count=1)
            s.add(row)
            s.flush()
            sop_class = CTImageStorage if modality == "CT" else PositronEmissionTomographyImageStorage
            s.add(Instance(sop_instance_uid=uid + ".1", sop_class_uid=sop_class, series_id=row.id, transfer_syntax_uid="1.2",
                           size_bytes=1, sha256="0" * 64, spool_path=f"incoming/{uid}.dcm"))
            refs[modality] = SeriesRef.of(row)
        job = create_job(s, Pairing(refs["CT"], refs["PT"], cfg.pairing[0]), "alpha")
        assert create_job(s, Pairing(refs["CT"], refs["PT"], cfg.pairing[0]), "alpha") is None
        return job.id


def events(db, job_id):
    with db.session() as s:
        return [(e.from_state, e.to_state) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]


def test_transitions_write_events_and_illegal_ones_raise(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    with db.session() as s:
        job = s.get(Job, job_id)
        with pytest.raises(IllegalTransition):
            transition(s, job, JobState.done)
        transition(s, job, JobState.processing)
        transition(s, job, JobState.failed, "processing: boom")
        with pytest.raises(IllegalTransition):
            transition(s, job, JobState.processing)  # failed is final
    with db.session() as s:
        assert s.get(Job, job_id).reason == "processing: boom"
    assert events(db, job_id) == [(None, "paired"), ("paired", "processing"), ("processing", "failed")]


class Recorder:
    def __init__(self):
        self.inputs = []
        self.sends = []

    def process(self, tmp_path):
        def run(inputs):
            self.inputs.append(inputs)
            out = tmp_path / "out.dcm"
            out.write_bytes(b"x")
            return ProcessingOutput(series=[OutputSeries("9.9", "fused", [out])], timings={"fuse": 0.1},
                                    cpu_seconds={"fuse": 0.2},
                                    per_slice=[{"EN": 4.0, "MI": 1.0}], summary={"EN": 4.0, "MI": float("nan")}, quality_failures=["EN"])
        return run

    def enqueue(self, job_id, series_uid, dest, files):
        self.sends.append((job_id, series_uid, dest, [str(f) for f in files]))


def run_worker(db, spool, cfg, process, rec):
    worker = JobWorker(db, spool, cfg, process, rec.enqueue)
    worker.start()
    return worker


def test_worker_processes_records_metrics_flags_quality_and_queues_sends(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    spool = Spool(tmp_path / "spool")
    rec = Recorder()
    worker = run_worker(db, spool, config(), rec.process(tmp_path), rec)
    worker.submit(job_id)
    assert worker.wait_idle(30)
    worker.stop()
    (inputs,) = rec.inputs
    assert inputs.fixed.modality == "CT" and inputs.moving.modality == "PT" and inputs.method == "alpha"
    assert inputs.fixed_files == [spool.root / "incoming/1.1.dcm"]
    assert rec.sends == [(job_id, "9.9", "pacs", [str(tmp_path / "out.dcm")])]
    assert events(db, job_id) == [(None, "paired"), ("paired", "processing"), ("processing", "encoded"), ("encoded", "sending")]
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.timings == {"fuse": 0.1, "cpu_s": {"fuse": 0.2}} and job.outputs["series"][0]["count"] == 1
        assert job.quality_flag == "under threshold: EN=4"
        metrics = {(m.slice_index, m.name) for m in s.scalars(select(Metric).where(Metric.job_id == job_id))}
    assert metrics == {(0, "EN"), (0, "MI"), (None, "EN")}  # NaN summary MI is left out


def test_no_destination_fails_the_job_before_processing(db, tmp_path):
    job_id = seed_pair(db, tmp_path, calling_ae="UNKNOWN")
    rec = Recorder()
    worker = run_worker(db, Spool(tmp_path / "spool"), config(), rec.process(tmp_path), rec)
    worker.submit(job_id)
    assert worker.wait_idle(30)
    worker.stop()
    assert rec.inputs == [] and rec.sends == []
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.failed and "no destination" in job.reason and "UNKNOWN" in job.reason


def test_processing_error_fails_the_job_with_the_reason(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    rec = Recorder()

    def broken(inputs):
        raise RuntimeError("volumes do not overlap")

    worker = run_worker(db, Spool(tmp_path / "spool"), config(), broken, rec)
    worker.submit(job_id)
    assert worker.wait_idle(30)
    worker.stop()
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.failed and job.reason == "processing: RuntimeError: volumes do not overlap"


def test_settle_sending_jobs(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    with db.session() as s:
        job = s.get(Job, job_id)
        for state in (JobState.processing, JobState.encoded, JobState.sending):
            transition(s, job, state)
        s.add(Send(job_id=job_id, series_uid="9.1", destination="pacs", files=["a"], state=SendState.sent))
        s.add(Send(job_id=job_id, series_uid="9.2", destination="pacs", files=["b"], state=SendState.pending))
    with db.session() as s:
        assert settle_sending_jobs(s) == []
        s.scalars(select(Send).where(Send.series_uid == "9.2")).one().state = SendState.failed
    with db.session() as s:
        assert settle_sending_jobs(s) == [(job_id, JobState.failed)]
        assert "send to pacs failed" in s.get(Job, job_id).reason


def test_recover_requeues_interrupted_jobs(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    with db.session() as s:
        transition(s, s.get(Job, job_id), JobState.processing)
    rec = Recorder()
    worker = JobWorker(db, Spool(tmp_path / "spool"), config(), rec.process(tmp_path), rec.enqueue)
    assert recover(db, worker) == {"requeued": 1, "resend": 0}  # counted before the worker runs
    worker.start()
    assert worker.wait_idle(30)
    worker.stop()
    assert len(rec.inputs) == 1
    assert events(db, job_id)[1:4] == [("paired", "processing"), ("processing", "paired"), ("paired", "processing")]
    with db.session() as s:
        assert s.get(Job, job_id).state == JobState.sending


def test_requeue_failed_sends_only_where_it_can_deliver(db, tmp_path):
    from dicomnode.jobs import requeue_failed_sends

    kept = tmp_path / "out.dcm"
    kept.write_bytes(b"x")
    with db.session() as s:
        def job(i, state, reason=None):
            row = Job(rule="PT->CT", fixed_series_uid=f"{i}.1", moving_series_uid=f"{i}.2", study_uid="9", method="alpha",
                      state=state, reason=reason)
            s.add(row)
            s.flush()
            return row.id
        resendable = job(1, JobState.failed, "send to pacs failed")
        purged = job(2, JobState.failed, "send to pacs failed")
        early = job(3, JobState.failed, "registration failed: too few overlapping voxels")
        done = job(4, JobState.done)
        s.add_all([
            Send(job_id=resendable, series_uid="7.1", destination="pacs", files=[str(kept)], state=SendState.failed, attempts=5),
            Send(job_id=resendable, series_uid="7.2", destination="pacs", files=[str(kept)], state=SendState.sent, attempts=1),
            Send(job_id=purged, series_uid="7.3", destination="pacs", files=[str(tmp_path / "gone.dcm")], state=SendState.failed),
            Send(job_id=done, series_uid="7.4", destination="pacs", files=[str(kept)], state=SendState.sent),
        ])
    with db.session() as s:
        report = requeue_failed_sends(s, [resendable, purged, early, done, 99])
    assert report.jobs == {resendable: 1}
    assert set(report.refused) == {purged, early, done, 99}
    assert "files are gone" in report.refused[purged] and "registration failed" in report.refused[early]
    assert report.refused[99] == "no such job"
    with db.session() as s:
        states = {j.id: j.state for j in s.scalars(select(Job))}
        sends = {r.series_uid: (r.state, r.attempts) for r in s.scalars(select(Send))}
    assert states == {resendable: JobState.sending, purged: JobState.failed, early: JobState.failed, done: JobState.done}
    with db.session() as s:
        assert s.get(Job, resendable).reason is None and s.get(Job, early).reason.startswith("registration failed")
    assert sends["7.1"] == (SendState.pending, 0) and sends["7.2"] == (SendState.sent, 1)
    assert sends["7.3"] == (SendState.failed, 0)
    assert events(db, resendable)[-1] == ("failed", "sending")
    # --all-failed: the purged job is the only failed job with failed sends left, and it stays refused.
    with db.session() as s:
        again = requeue_failed_sends(s)
    assert again.jobs == {} and set(again.refused) == {purged}


def test_series_flagged_after_pairing_fails_the_job_before_processing(db, tmp_path):
    from sqlalchemy import update

    job_id = seed_pair(db, tmp_path)
    with db.session() as s:  # an instance of another patient arrived after the pair was made
        s.execute(update(Series).where(Series.series_uid == "1.2").values(identity_conflict="identity conflict: PatientID"))
    rec = Recorder()
    worker = run_worker(db, Spool(tmp_path / "spool"), config(), rec.process(tmp_path), rec)
    worker.submit(job_id)
    assert worker.wait_idle(30)
    worker.stop()
    assert rec.inputs == [] and rec.sends == []
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.failed and job.reason == "series 1.2: identity conflict: PatientID"
