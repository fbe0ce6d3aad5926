"""Worker claims on SQLite and PostgreSQL: one holder per job, leases that run out, renewal, give-back."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import wait_for
from sqlalchemy import select

from tests.backends import BACKENDS, open_test_db
from tests.test_jobs import Recorder, config, events, seed_pair
from dicomnode.audit.models import Job, JobState
from dicomnode.store.spool import Spool
from dicomnode.worker import JobWorker


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    with open_test_db(request.param, tmp_path) as database:
        yield database


def worker(db, tmp_path, process, rec, lease_s, max_attempts=3):
    cfg = config(worker={"lease_s": lease_s, "poll_s": 0.1, "max_attempts": max_attempts})
    return JobWorker(db, Spool(tmp_path / "spool"), cfg, process, rec.enqueue)



def job_row(db, job_id) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def test_a_claim_excludes_other_workers_until_its_lease_runs_out(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    rec = Recorder()
    a = worker(db, tmp_path, rec.process(tmp_path), rec, lease_s=5.0)
    b = worker(db, tmp_path, rec.process(tmp_path), rec, lease_s=5.0)
    claimed_a = a.claim()
    assert claimed_a is not None and claimed_a[0] == job_id
    assert b.claim() is None  # held by a
    row = job_row(db, job_id)
    assert row.state == JobState.processing and row.worker_id == a.id
    # a never renews (as if it had died): once the lease ran out, b takes the job.
    claimed_b = wait_for(b.claim, 30, "b claims the job after a's lease ran out")
    assert claimed_b[0] == job_id and job_row(db, job_id).worker_id == b.id
    a.run_job(*claimed_a)  # a wakes up late: its result must not count
    assert job_row(db, job_id).state == JobState.processing and rec.sends == []
    b.run_job(*claimed_b)
    assert len(rec.inputs) == 2 and len(rec.sends) == 1  # processed twice, recorded and queued once
    assert events(db, job_id) == [(None, "paired"), ("paired", "processing"), ("processing", "paired"),
                                  ("paired", "processing"), ("processing", "encoded"), ("encoded", "sending")]
    with db.session() as s:
        from dicomnode.audit.models import JobEvent

        details = [e.detail for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]
    assert f"lease of worker {a.id} ran out" in details[2] and b.id in details[3]


def test_a_renewed_lease_keeps_the_job_while_it_is_processed(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    rec = Recorder()
    release = threading.Event()
    inner = rec.process(tmp_path)

    def slow(inputs):
        release.wait(60)
        return inner(inputs)

    # Renewed every second: a loaded machine may delay one renewal by a second or two, not three.
    a = worker(db, tmp_path, slow, rec, lease_s=3.0)
    b = worker(db, tmp_path, rec.process(tmp_path), rec, lease_s=3.0)
    a.start()
    try:
        wait_for(lambda: job_row(db, job_id).worker_id == a.id, 30, "a claims the job")
        deadline = time.monotonic() + 7.0  # more than two lease periods
        while time.monotonic() < deadline:
            assert b.claim() is None
            time.sleep(0.2)
        release.set()
        wait_for(lambda: job_row(db, job_id).state == JobState.sending, 30, "a finishes the job")
    finally:
        release.set()
        a.stop()
    assert len(rec.inputs) == 1 and len(rec.sends) == 1
    assert [to for _, to in events(db, job_id)] == ["paired", "processing", "encoded", "sending"]


def test_stop_gives_the_job_in_hand_back_and_drops_its_late_result(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    rec = Recorder()
    release = threading.Event()
    inner = rec.process(tmp_path)

    def stuck(inputs):
        release.wait(60)
        return inner(inputs)

    a = worker(db, tmp_path, stuck, rec, lease_s=30.0)
    a.start()
    wait_for(lambda: job_row(db, job_id).state == JobState.processing, 30, "a claims the job")
    thread = a._thread
    assert a.stop(timeout=0.5) is False
    row = job_row(db, job_id)
    assert row.state == JobState.paired and row.lease_expires_at is None  # claimable at once, not after 30 s
    release.set()
    wait_for(lambda: not thread.is_alive(), 30, "a's thread ends")
    assert len(rec.inputs) == 1
    assert job_row(db, job_id).state == JobState.paired and rec.sends == []
    b = worker(db, tmp_path, rec.process(tmp_path), rec, lease_s=30.0)
    b.start()
    try:
        b.submit()
        assert b.wait_idle(30)
    finally:
        b.stop()
    assert job_row(db, job_id).state == JobState.sending and len(rec.sends) == 1
    assert events(db, job_id)[2] == ("processing", "paired")


def test_a_job_whose_workers_keep_dying_fails_with_the_reason(db, tmp_path):
    job_id = seed_pair(db, tmp_path)
    rec = Recorder()
    holders = []
    for _ in range(3):  # each claims, then "dies" (never renews, never records)
        w = worker(db, tmp_path, rec.process(tmp_path), rec, lease_s=1.0)
        wait_for(w.claim, 30, "a worker claims the job")
        holders.append(w.id)
    last = worker(db, tmp_path, rec.process(tmp_path), rec, lease_s=1.0)
    wait_for(lambda: job_row(db, job_id).state == JobState.failed or last.claim(), 30, "the job fails")
    row = job_row(db, job_id)
    assert row.state == JobState.failed and rec.inputs == []
    assert row.reason.startswith("processing: 3 workers died or stalled") and holders[-1] in row.reason
    assert [to for _, to in events(db, job_id)] == ["paired", "processing", "paired", "processing", "paired",
                                                    "processing", "failed"]


def test_worker_command_refuses_a_bad_config_with_the_key_path(tmp_path, capsys):
    from dicomnode.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nlease_s = 0\n")
    assert main(["worker", "--config", str(bad)]) == 2
    assert f"{bad}: worker.lease_s" in capsys.readouterr().err
