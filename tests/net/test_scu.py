"""send_files and SendQueue against the node's own StoreSCP on 127.0.0.1 (no external tools needed)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Instance, Job, Send, SendState
from dicomnode.config import Destination, load_config
from dicomnode.net.scu import SendFailed, send_files
from dicomnode.net.send_queue import SendQueue, retry_delay, retry_schedule

from tests.net.conftest import free_port, make_ct, start_node


def write_series(folder: Path, count: int, **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = "1.2.826.0.1.3680043.8.498.1"
    paths = []
    for i in range(1, count + 1):
        ds = make_ct(series_uid=series_uid, study_uid="1.2.826.0.1.3680043.8.498.2", index=i, **kwargs)
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dest_for(node, name: str = "pacs") -> Destination:
    return Destination(name=name, ae_title=node.config.node.ae_title, host="127.0.0.1", port=node.port)


def test_send_files_delivers_all(node, tmp_path):
    files = write_series(tmp_path / "out", 4)
    report = send_files(dest_for(node), files, calling_ae="SENDER", timeout_s=10)
    assert report.sent == 4 and set(report.statuses.values()) == {0}
    with node.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4


def test_send_files_raises_on_failure_status(node, tmp_path):
    files = write_series(tmp_path / "out", 2)
    from pydicom import dcmread

    broken = dcmread(files[1])
    del broken.PixelData
    broken.save_as(files[1])
    with pytest.raises(SendFailed, match="0xA900"):
        send_files(dest_for(node), files, calling_ae="SENDER", timeout_s=10)


def test_send_files_raises_when_no_peer(tmp_path):
    files = write_series(tmp_path / "out", 1)
    with pytest.raises(SendFailed, match="unreachable"):
        send_files(Destination(name="x", ae_title="NOBODY", host="127.0.0.1", port=free_port()), files, calling_ae="S", timeout_s=3)


def test_retry_delay_is_bounded_exponential():
    assert [retry_delay(n, 5, 2, 30) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]


def _queue_setup(tmp_path: Path, port: int, max_attempts: int = 5):
    config = load_config(
        None,
        {
            "destinations": [{"name": "pacs", "ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port}],
            "sending": {"max_attempts": max_attempts, "initial_delay_s": 10, "backoff": 2, "max_delay_s": 60, "connect_timeout_s": 3},
        },
    )
    db = AuditDB.open(f"sqlite:///{tmp_path / 'sender.db'}")
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
