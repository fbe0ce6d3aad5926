"""Restart: a node stopped mid-way resumes from the audit database, and nothing is sent twice.

The receiving peer is DCMTK storescp keeping every received copy in its own file, so a second
C-STORE of any output instance would show as an extra file.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import free_port, require_tool
from tests.e2e.dcmtk_peers import ReservedPort, StoreSCPPeer, storescu
from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Instance, Job, JobEvent, JobState, Send, SendState, Series, SeriesState
from dicomnode.config import load_config
from dicomnode.node import Node

pytestmark = pytest.mark.e2e

SENDER = "MODALITY1"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from dicomnode.testing.study import write_synthetic_study

    return write_synthetic_study(tmp_path_factory.mktemp("study"), modalities=("CT", "PT"), shape=(32, 64, 64), seed=5)


def config(tmp_path: Path, node_port: int, peer_port: int, stable_age_s: float = 2.0):
    return load_config(overrides={
        "node": {"port": node_port},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        # Completion by stable age only, so the node can be stopped before the series complete.
        "completion": {"stable_age_s": stable_age_s, "check_interval_s": 0.25, "use_expected_count": False},
        "destinations": [{"name": "back", "ae_title": SENDER, "host": "127.0.0.1", "port": peer_port}],
        "sending": {"initial_delay_s": 0.5, "backoff": 1.0, "max_attempts": 20, "connect_timeout_s": 5},
        "processing": {"device": "cpu"},
    })


def wait_job(url: str, states: tuple[JobState, ...], timeout_s: float) -> Job:
    """The job once it is in one of ``states``; generous deadlines, the database is the event."""
    db = AuditDB.open(url)
    try:
        deadline = time.monotonic() + timeout_s
        job = None
        while time.monotonic() < deadline:
            with db.session() as s:
                job = s.scalars(select(Job)).first()
            if job is not None and job.state in states:
                return job
            time.sleep(0.25)
        raise AssertionError(f"job not in {states} within {timeout_s} s: {job and (job.state, job.reason)}")
    finally:
        db.close()


def output_uids(job: Job) -> list[str]:
    """SOP Instance UIDs of a job's output files (as written to the outbox)."""
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for o in job.outputs["series"] for f in o["files"]]


def assert_received_once(peer: StoreSCPPeer, job: Job, sends: list[Send]) -> None:
    """Every output instance arrived exactly once, as many as the send rows say were acknowledged.

    Call it after the node stopped: its send workers are joined then, so no C-STORE is still on
    the way and the peer's files are all there is (copies from unrelated senders are ignored).
    """
    expected = output_uids(job)
    received = Counter(uid for uid in peer.received_uids() if uid in set(expected))
    assert sorted(received) == sorted(expected)
    assert set(received.values()) == {1}, {uid: n for uid, n in received.items() if n > 1}
    assert sum(x.acked_count for x in sends) == sum(len(x.files) for x in sends) == sum(received.values())


def test_stop_before_completion_then_restart_finishes_once(tmp_path, study):
    storescp, scu = require_tool("storescp"), require_tool("storescu")
    node_port = free_port()
    with StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        # The first node's stable age is far beyond the upload, so however slow the machine is
        # both series are still receiving when it stops; the second completes them after 2 s.
        first = Node(config(tmp_path, node_port, peer.port, stable_age_s=600))
        first.start()
        storescu(scu, study["CT"] + study["PT"], port=node_port, calling_ae=SENDER)
        first.stop()
        cfg = config(tmp_path, node_port, peer.port)
        db = AuditDB.open(cfg.storage.database_url)
        with db.session() as s:
            assert {r.state for r in s.scalars(select(Series))} == {SeriesState.receiving}
            assert s.query(Instance).count() == len(study["CT"]) + len(study["PT"])
            assert s.query(Job).count() == 0
        db.close()

        second = Node(cfg)
        second.start()
        try:
            job = wait_job(cfg.storage.database_url, (JobState.done, JobState.failed), 300)
            assert job.state == JobState.done, job.reason
        finally:
            second.stop()  # joins the send workers: nothing can reach the peer after this
        counts = {o["kind"]: o["count"] for o in job.outputs["series"]}
        # One fused instance per CT slice; each heat map is one multi-frame instance.
        assert counts["fused"] == len(study["CT"]) and counts["heatmap"] == 1
        assert all(n == 1 for kind, n in counts.items() if kind != "fused")
        db = AuditDB.open(cfg.storage.database_url)
        try:
            with db.session() as s:
                sends = s.scalars(select(Send)).all()
                assert sends and all(x.state == SendState.sent and x.attempts == 1 for x in sends), \
                    [(x.state, x.attempts, x.last_status) for x in sends]
                assert {r.completion_reason for r in s.scalars(select(Series))} == {"stable_age"}
                events = [e.to_state for e in s.scalars(select(JobEvent).order_by(JobEvent.id))]
                assert events == ["paired", "processing", "encoded", "sending", "done"]  # processed once
        finally:
            db.close()
        assert_received_once(peer, job, sends)


def test_pending_sends_survive_a_restart_and_are_not_repeated(tmp_path, study):
    storescp, scu = require_tool("storescp"), require_tool("storescu")
    node_port, peer_down = free_port(), ReservedPort()
    cfg = config(tmp_path, node_port, peer_down.port)
    first = Node(cfg)
    first.start()
    try:
        storescu(scu, study["CT"] + study["PT"], port=node_port, calling_ae=SENDER)
        # The peer is not up yet: the job reaches ``sending`` and its sends wait for a retry.
        job = wait_job(cfg.storage.database_url, (JobState.sending, JobState.failed), 300)
        assert job.state == JobState.sending, job.reason
        deadline = time.monotonic() + 60
        while True:
            with first.db.session() as s:
                tried = [x.attempts for x in s.scalars(select(Send))]
            if tried and min(tried) >= 1:
                break
            assert time.monotonic() < deadline, f"sends not attempted within 60 s: attempts {tried}"
            time.sleep(0.2)
    finally:
        first.stop()
    with StoreSCPPeer(storescp, tmp_path / "peer", port=peer_down.release()) as peer:
        second = Node(cfg)
        second.start()
        try:
            job = wait_job(cfg.storage.database_url, (JobState.done, JobState.failed), 120)
            assert job.state == JobState.done, job.reason
        finally:
            second.stop()  # joins the send workers: nothing can reach the peer after this
        db = AuditDB.open(cfg.storage.database_url)
        try:
            with db.session() as s:
                sends = s.scalars(select(Send)).all()
                assert all(x.state == SendState.sent and x.attempts >= 2 for x in sends)
                events = [e.to_state for e in s.scalars(select(JobEvent).order_by(JobEvent.id))]
                assert events == ["paired", "processing", "encoded", "sending", "done"]  # processed once
        finally:
            db.close()
        assert_received_once(peer, job, sends)


def test_a_peer_stalled_longer_than_the_connect_timeout_gets_each_instance_once(tmp_path, study):
    """The cause of the duplicate outputs after a restart (issue 16 item 5), with DCMTK as the peer.

    ``connect_timeout_s`` also bounded each C-STORE response: a peer that stalled longer than
    that mid-series (load) failed the attempt, and the retry sent the whole series again, so
    every instance it had already stored arrived twice. Here storescp is frozen (SIGSTOP) for
    longer than the connect timeout after it stored five instances.
    """
    import os
    import signal
    import threading

    from dicomnode.net.send_queue import SendQueue

    storescp = require_tool("storescp")
    files = study["CT"]
    with StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        cfg = config(tmp_path, free_port(), peer.port)  # connect_timeout_s = 5
        db = AuditDB.open(cfg.storage.database_url)
        with db.session() as s:
            job = Job(rule="PT->CT", fixed_series_uid="1", moving_series_uid="2", study_uid="3", method="alpha")
            s.add(job)
            s.flush()
            job_id = job.id
        queue = SendQueue(db, cfg)
        queue.enqueue(job_id, "1.2.3", "back", files)
        stalled = threading.Event()

        def stall() -> None:
            deadline = time.monotonic() + 120
            while len(peer.files()) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(peer._proc.pid, signal.SIGSTOP)
            try:
                stalled.set()
                time.sleep(cfg.sending.connect_timeout_s + 2)
            finally:
                os.kill(peer._proc.pid, signal.SIGCONT)

        staller = threading.Thread(target=stall)
        staller.start()
        try:
            assert queue.run_due() == [job_id]
        finally:
            staller.join(150)
        assert stalled.is_set()
        with db.session() as s:
            send = s.scalars(select(Send)).one()
        db.close()
        assert (send.state, send.attempts, send.acked_count) == (SendState.sent, 1, len(files)), send.last_status
        received = Counter(peer.received_uids())
        assert len(received) == len(files) and set(received.values()) == {1}
