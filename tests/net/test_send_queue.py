"""The persisted send queue: backoff, resume after acknowledged instances, one worker per destination.

Peers are real associations on 127.0.0.1: the node's own StoreSCP, scripted pynetdicom SCPs that
abort, stall or answer chosen statuses, a socket that accepts TCP and never answers, and DCMTK
storescp.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Instance, Job, JobState, Send, SendState
from dicomnode.config import SendingConfig, load_config
from dicomnode.config import SendingConfig
from dicomnode.net.send_queue import SendQueue, retry_delay, retry_schedule

from tests.backends import BACKENDS, open_test_db
from tests.conftest import require_tool
from tests.net.conftest import free_port, start_node
from tests.net.scripted_scp import ABORT, ScriptedSCP
from tests.net.test_scu import write_series


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 60.0) -> object:
    """Poll ``check`` until it returns something truthy; generous deadline, fails with ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def send_row(db: AuditDB, send_id: int = 1) -> Send:
    with db.session() as s:
        return s.get(Send, send_id)


def job_state(db: AuditDB, job_id: int) -> JobState:
    with db.session() as s:
        return s.get(Job, job_id).state


def test_retry_delay_is_bounded_exponential():
    assert [retry_delay(n, 5, 2, 30) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]


def test_default_retry_budget_outlasts_a_one_hour_outage():
    """Issue 13 item 12: the old defaults gave up after ~155 s; mercure retries 5 x 900 s."""
    schedule = retry_schedule(SendingConfig())
    assert len(schedule) == SendingConfig().max_attempts - 1
    assert schedule[-1] >= 3600  # the last attempt comes after a destination down for an hour is back
    assert schedule[:5] == [30, 90, 210, 450, 930]  # after attempt n: 30 * 2**(n-1) s, not 2**n
    assert max(b - a for a, b in zip([0.0, *schedule], schedule)) == SendingConfig().max_delay_s


def _queue_setup(tmp_path: Path, port: int, max_attempts: int = 5, ae_title: str = "DICOMNODE",
                 db: AuditDB | None = None, **sending):
    config = load_config(
        None,
        {
            "destinations": [{"name": "pacs", "ae_title": ae_title, "host": "127.0.0.1", "port": port}],
            "sending": {"max_attempts": max_attempts, "initial_delay_s": 10, "backoff": 2, "max_delay_s": 60,
                        "connect_timeout_s": 3, **sending},
        },
    )
    db = db or AuditDB.open(f"sqlite:///{tmp_path / 'sender.db'}")
    with db.session() as s:
        job = Job(rule="PT->CT", fixed_series_uid="1", moving_series_uid="2", study_uid="3", method="alpha")
        s.add(job)
        s.flush()
        job_id = job.id
    return config, db, job_id


def test_queue_backs_off_then_sends_once_after_restart(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    port = free_port()
    config, db, job_id = _queue_setup(tmp_path, port)
    files = write_series(tmp_path / "out", 3)
    queue = SendQueue(db, config)
    queue.enqueue(job_id, "1.2.3", "pacs", files)
    queue.enqueue(job_id, "1.2.3", "pacs", files)  # idempotent
    t0 = datetime.now(timezone.utc)
    assert queue.run_due(t0) == []  # nobody listens: attempt 1 fails
    assert queue.run_due(t0 + timedelta(seconds=5)) == []  # not due yet (10 s delay): no attempt
    assert queue.run_due(t0 + timedelta(seconds=11)) == []  # attempt 2 fails, next in 20 s
    with db.session() as s:
        row = s.scalars(select(Send)).one()
        assert (row.state, row.attempts) == (SendState.pending, 2)
        assert row.next_attempt_at == t0 + timedelta(seconds=31)
        assert "attempt 2" in row.last_status and "next in 20 s" in row.last_status
    assert queue.job_send_state(job_id) == "pending"
    assert len([r for r in caplog.records if "event=send_attempt" in r.getMessage()]) == 2

    receiver = start_node(tmp_path / "receiver", node={"port": port})
    try:
        restarted = SendQueue(db, config)  # a new process would build a new queue on the same DB
        assert restarted.run_due(t0 + timedelta(seconds=40)) == [job_id]
        assert restarted.run_due(t0 + timedelta(hours=1)) == []
        assert restarted.job_send_state(job_id) == "sent"
        with receiver.db.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 3
        assert len(receiver.nudges) == 3  # each instance arrived exactly once
        with db.session() as s:
            row = s.scalars(select(Send)).one()
            assert (row.state, row.attempts) == (SendState.sent, 3) and row.sent_at is not None
    finally:
        receiver.scp.stop()
        receiver.db.close()
        db.close()


def test_queue_gives_up_after_max_attempts(tmp_path):
    config, db, job_id = _queue_setup(tmp_path, free_port(), max_attempts=2)
    queue = SendQueue(db, config)
    queue.enqueue(job_id, "1.2.3", "pacs", write_series(tmp_path / "out", 1))
    queue.enqueue(job_id, "1.2.4", "elsewhere", [])  # a destination that is not configured
    t0 = datetime.now(timezone.utc)
    assert queue.run_due(t0) == [job_id]  # "elsewhere" fails at once: no retry can make it configured
    assert queue.run_due(t0 + timedelta(minutes=5)) == [job_id]  # "pacs": attempt 2 of 2 fails
    assert queue.job_send_state(job_id) == "failed"
    with db.session() as s:
        rows = s.scalars(select(Send).order_by(Send.id)).all()
    assert [r.state for r in rows] == [SendState.failed, SendState.failed]
    assert "giving up after 2 attempts" in rows[0].last_status
    assert "not configured" in rows[1].last_status
    db.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_after_an_abort_sends_only_what_was_not_acknowledged(tmp_path, backend):
    """Issue 13 item 9: a peer aborting mid-series got the whole series again on the retry."""
    with open_test_db(backend, tmp_path) as db:
        _resume_after_abort(tmp_path, db)


def _resume_after_abort(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path / "out", 8)
    # The peer stores three instances, then aborts instead of answering the fourth.
    with ScriptedSCP(lambda n, uid: ABORT if n == 3 else 0x0000) as peer:
        config, db, job_id = _queue_setup(tmp_path, peer.port, ae_title=peer.ae_title, db=db)
        SendQueue(db, config).enqueue(job_id, "1.2.3", "pacs", files)
        t0 = datetime.now(timezone.utc)
        assert SendQueue(db, config).run_due(t0) == []
        row = send_row(db)
        assert (row.state, row.attempts, row.acked_count) == (SendState.pending, 1, 3)
        assert "3 of 8 acknowledged" in row.last_status
        # A restarted node (a new queue on the same database) resumes at the fourth file.
        assert SendQueue(db, config).run_due(t0 + timedelta(seconds=11)) == [job_id]
    row = send_row(db)
    assert (row.state, row.attempts, row.acked_count) == (SendState.sent, 2, 8)
    assert "sent 5 instances" in row.last_status and "resumed after 3 acknowledged" in row.last_status
    assert peer.requests == 9  # 8 instances + the one the peer aborted on
    assert sorted(peer.counts().values()) == [1] * 8, peer.counts()


def test_acknowledgements_are_committed_while_the_series_is_sent(tmp_path):
    """A crash mid-series resumes after the acknowledged instances: they are in the row before the attempt ends."""
    files = write_series(tmp_path / "out", 5)
    release = threading.Event()

    def answer(n: int, uid: str) -> int:
        if n == 1:
            time.sleep(SendingConfig().ack_commit_every_s + 0.2)  # the commit interval has passed when this answer comes
        if n == 2:
            release.wait(60)  # hold the third response until the test has looked at the row
        return 0x0000

    with ScriptedSCP(answer) as peer:
        config, db, job_id = _queue_setup(tmp_path, peer.port, ae_title=peer.ae_title, response_timeout_s=90)
        queue = SendQueue(db, config)
        queue.enqueue(job_id, "1.2.3", "pacs", files)
        sender = threading.Thread(target=queue.run_due)
        sender.start()
        try:
            wait_for("two acknowledged instances in the send row", lambda: send_row(db).acked_count == 2)
            row = send_row(db)
            assert sender.is_alive() and (row.state, row.attempts) == (SendState.pending, 0)
        finally:
            release.set()
            sender.join(60)
    row = send_row(db)
    assert (row.state, row.attempts, row.acked_count) == (SendState.sent, 1, 5)
    assert sorted(peer.counts().values()) == [1] * 5
    db.close()


def test_a_slow_response_is_not_a_failure_and_is_not_sent_again(tmp_path):
    """Issue 16 item 5: the connect timeout also bounded each response, and a slow answer re-sent the series.

    The peer answers the second instance after 6 s, more than ``connect_timeout_s`` (3 s) but
    well inside ``response_timeout_s``: one attempt, every instance once.
    """
    files = write_series(tmp_path / "out", 4)
    with ScriptedSCP(lambda n, uid: (time.sleep(6), 0x0000)[1] if n == 1 else 0x0000) as peer:
        config, db, job_id = _queue_setup(tmp_path, peer.port, ae_title=peer.ae_title, response_timeout_s=60)
        queue = SendQueue(db, config)
        queue.enqueue(job_id, "1.2.3", "pacs", files)
        assert queue.run_due() == [job_id]
    row = send_row(db)
    assert (row.state, row.attempts, row.acked_count) == (SendState.sent, 1, 4), row.last_status
    assert sorted(peer.counts().values()) == [1] * 4
    db.close()


def test_warning_statuses_are_delivered_and_recorded(tmp_path, caplog):
    """Issue 16 item 3: 0xB000/0xB006/0xB007 count as delivered (stored with coercion), with a record of it."""
    caplog.set_level(logging.INFO)
    files = write_series(tmp_path / "out", 4)
    answers = [0xB000, 0xB006, 0xB007, 0xB000]
    with ScriptedSCP(lambda n, uid: answers[n]) as peer:
        config, db, job_id = _queue_setup(tmp_path, peer.port, ae_title=peer.ae_title)
        queue = SendQueue(db, config)
        queue.enqueue(job_id, "1.2.3", "pacs", files)
        assert queue.run_due() == [job_id]
    row = send_row(db)
    assert (row.state, row.attempts, row.acked_count) == (SendState.sent, 1, 4)
    assert "stored with warning 0xB000 x2, 0xB006 x1, 0xB007 x1" in row.last_status
    lines = [r.getMessage() for r in caplog.records if "event=send_attempt" in r.getMessage()]
    assert len(lines) == 1 and "state=sent" in lines[0] and "warnings=4" in lines[0]
    assert peer.requests == 4
    db.close()


def test_a_failure_status_is_retried_from_the_refused_instance(tmp_path):
    """A failure status (0xA700 out of resources) is not delivered: the retry starts at that instance."""
    files = write_series(tmp_path / "out", 3)
    with ScriptedSCP(lambda n, uid: 0xA700 if n == 1 else 0x0000) as peer:
        config, db, job_id = _queue_setup(tmp_path, peer.port, ae_title=peer.ae_title)
        queue = SendQueue(db, config)
        queue.enqueue(job_id, "1.2.3", "pacs", files)
        t0 = datetime.now(timezone.utc)
        assert queue.run_due(t0) == []
        row = send_row(db)
        assert (row.state, row.acked_count) == (SendState.pending, 1)
        assert "0xA700 (Failure: Refused: Out of Resources) for 002.dcm" in row.last_status and "next in 10 s" in row.last_status
        assert queue.run_due(t0 + timedelta(seconds=11)) == [job_id]
    assert (send_row(db).state, send_row(db).acked_count) == (SendState.sent, 3)
    assert peer.requests == 4 and sorted(peer.counts().values()) == [1, 1, 1]
    db.close()


class HungPeer:
    """Accepts TCP connections (the kernel completes them from the backlog) and never answers."""

    def __enter__(self) -> HungPeer:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self._sock.close()


def test_a_hung_destination_delays_only_its_own_sends(tmp_path, caplog):
    """Issue 13 item 8: sends ran one at a time, so a healthy destination waited for a hung one."""
    from dicomnode.node import Node
    from tests.e2e.dcmtk_peers import StoreSCPPeer

    storescp = require_tool("storescp")
    caplog.set_level(logging.WARNING, logger="apscheduler")
    files = write_series(tmp_path / "out", 3)
    with HungPeer() as hung, StoreSCPPeer(storescp, tmp_path / "healthy") as healthy:
        config = load_config(None, {
            "node": {"port": free_port()},
            "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'node.db'}"},
            "destinations": [
                {"name": "hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hung.port},
                {"name": "healthy", "ae_title": healthy.ae_title, "host": "127.0.0.1", "port": healthy.port},
            ],
            # Long enough that the hung attempt is still negotiating when the healthy send is done.
            "sending": {"connect_timeout_s": 20, "max_attempts": 1},
        })
        node = Node(config, process=lambda inputs: None)
        with node.db.session() as s:
            job = Job(rule="PT->CT", fixed_series_uid="1", moving_series_uid="2", study_uid="3", method="alpha",
                      state=JobState.sending)
            s.add(job)
            s.flush()
            job_id = job.id
        node.sends.enqueue(job_id, "1.2.3", "hung", files)  # first in line, as in the reported case
        node.sends.enqueue(job_id, "1.2.3", "healthy", files)
        node.start()
        try:
            with node.db.session() as s:
                ids = dict(s.execute(select(Send.destination, Send.id)).all())
            wait_for("the healthy destination's send is sent",
                     lambda: send_row(node.db, ids["healthy"]).state == SendState.sent, timeout_s=60)
            hung_row = send_row(node.db, ids["hung"])
            assert (hung_row.state, hung_row.attempts) == (SendState.pending, 0)  # its first attempt still waits
            assert len(healthy.files()) == 3
            wait_for("the hung send gives up", lambda: send_row(node.db, ids["hung"]).state == SendState.failed)
            wait_for("the job settles as failed", lambda: job_state(node.db, job_id) == JobState.failed)
            assert "aborted during negotiation" in send_row(node.db, ids["hung"]).last_status
        finally:
            node.stop()
    assert not [r for r in caplog.records if "maximum number of running instances" in r.getMessage()]


def test_an_administrator_resend_sends_only_the_unacknowledged_rest(tmp_path):
    """``dicomnode resend`` after a send gave up mid-series: acknowledged files are neither resent nor needed."""
    from dicomnode.jobs import requeue_failed_sends

    files = write_series(tmp_path / "out", 5)
    # Two instances stored, then the peer aborts on every later request: the one attempt fails.
    with ScriptedSCP(lambda n, uid: ABORT if n >= 2 else 0x0000) as down:
        config, db, job_id = _queue_setup(tmp_path, down.port, max_attempts=1, ae_title=down.ae_title)
        with db.session() as s:
            s.get(Job, job_id).state = JobState.sending
        queue = SendQueue(db, config)
        queue.enqueue(job_id, "1.2.3", "pacs", files)
        assert queue.run_due() == [job_id]
    assert (send_row(db).state, send_row(db).acked_count) == (SendState.failed, 2)
    with db.session() as s:
        s.get(Job, job_id).state = JobState.failed
    for done in files[:2]:
        done.unlink()  # retention may purge them: they are delivered already
    with db.session() as s:
        report = requeue_failed_sends(s, [job_id])
    assert report.jobs == {job_id: 1} and report.refused == {}
    with ScriptedSCP(lambda n, uid: 0x0000) as back:
        config = config.model_copy(update={"destinations": (config.destinations[0].model_copy(update={"port": back.port}),)})
        assert SendQueue(db, config).run_due() == [job_id]
    assert (send_row(db).state, send_row(db).acked_count) == (SendState.sent, 5)
    assert back.requests == 3 and sorted(back.counts().values()) == [1, 1, 1]
    db.close()
