"""Interoperability with DCMTK: storescu -> node, node -> storescp, and the send queue's retries."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from tests.conftest import free_port, require_tool
from tests.e2e.dcmtk_peers import StoreSCPPeer, storescu
from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Association, Instance, Job, JobEvent, JobState, Send, SendState, Series
from dicomnode.config import Destination, load_config
from dicomnode.net.scp import StoreSCP
from dicomnode.net.scu import send_files
from dicomnode.net.send_queue import SendQueue
from dicomnode.store.spool import Spool

pytestmark = pytest.mark.e2e


@pytest.fixture
def node(tmp_path):
    config = load_config(None, {"node": {"port": free_port()}})
    db = AuditDB.open(f"sqlite:///{tmp_path / 'audit.db'}")
    scp = StoreSCP(config, db, Spool(tmp_path / "spool"))
    scp.start()
    yield scp
    scp.stop()
    db.close()


def test_storescu_to_node(node, sts_dir):
    tool = require_tool("storescu")
    ct = sorted((sts_dir / "CT" / "dicom" / "image").glob("*.dcm"))
    pet = sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm"))[:5]
    storescu(tool, ct + pet, port=node.port, calling_ae="DCMTKSCU")
    with node.db.session() as s:
        series = {r.modality: r for r in s.scalars(select(Series)).all()}
        assert s.scalar(select(func.count()).select_from(Instance)) == len(ct) + len(pet)
        assoc = s.scalars(select(Association)).one()
    assert series["CT"].received_count == len(ct) and series["PT"].received_count == len(pet)
    assert series["CT"].calling_ae == "DCMTKSCU" and assoc.accepted
    # Files in the spool are the bytes storescu sent, readable as the original instances.
    first = dcmread(next(node.spool.incoming.rglob("*.dcm")))
    assert first.Modality in ("CT", "PT") and "PixelData" in first


def test_node_to_storescp(tmp_path, sts_dir):
    tool = require_tool("storescp")
    files = sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm"))[:6]
    with StoreSCPPeer(tool, tmp_path / "peer") as peer:
        dest = Destination(name="peer", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port)
        report = send_files(dest, files, calling_ae="DICOMNODE", timeout_s=15)
        assert report.sent == len(files)
        received = peer.files()
    assert len(received) == len(files)
    assert {dcmread(p).SOPInstanceUID for p in received} == {dcmread(p).SOPInstanceUID for p in files}


def test_send_queue_retries_until_storescp_starts_and_never_sends_twice(tmp_path, sts_dir):
    tool = require_tool("storescp")
    port = free_port()
    config = load_config(
        None,
        {
            "destinations": [{"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1", "port": port}],
            "sending": {"max_attempts": 4, "initial_delay_s": 30, "backoff": 2, "max_delay_s": 300},
        },
    )
    db = AuditDB.open(f"sqlite:///{tmp_path / 'audit.db'}")
    with db.session() as s:
        job = Job(rule="PT->CT", fixed_series_uid="1", moving_series_uid="2", study_uid="3", method="alpha")
        s.add(job)
        s.flush()
        job_id = job.id
    files: list[Path] = sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm"))[:4]
    queue = SendQueue(db, config)
    queue.enqueue(job_id, "1.2.3", "pacs", files)
    t0 = datetime.now(timezone.utc)
    assert queue.run_due(t0) == []
    with db.session() as s:
        row = s.scalars(select(Send)).one()
        assert row.attempts == 1 and row.next_attempt_at == t0 + timedelta(seconds=30)
    with StoreSCPPeer(tool, tmp_path / "peer", port=port) as peer:
        restarted = SendQueue(db, config)
        assert restarted.run_due(t0 + timedelta(seconds=10)) == []  # backing off: no attempt yet
        assert peer.files() == []
        assert restarted.run_due(t0 + timedelta(seconds=31)) == [job_id]
        assert SendQueue(db, config).run_due(t0 + timedelta(days=1)) == []
        received = peer.files()
    assert len(received) == len(files)  # --unique-filenames: a second send would add files
    with db.session() as s:
        row = s.scalars(select(Send)).one()
        assert (row.state, row.attempts) == (SendState.sent, 2)
    db.close()


def test_resend_after_the_sends_gave_up(tmp_path, sts_dir, capsys):
    from dicomnode.cli import main
    from dicomnode.jobs import settle_sending_jobs
    from tests.e2e.dcmtk_peers import ReservedPort

    tool = require_tool("storescp")
    down = ReservedPort()  # the PACS is down: connections are refused
    config = load_config(None, {
        "destinations": [{"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1", "port": down.port}],
        "sending": {"max_attempts": 1},
    })
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    db = AuditDB.open(url)
    with db.session() as s:
        job = Job(rule="PT->CT", fixed_series_uid="1", moving_series_uid="2", study_uid="3", method="alpha",
                  state=JobState.sending)
        s.add(job)
        s.flush()
        job_id = job.id
    files = sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm"))[:3]
    queue = SendQueue(db, config)
    queue.enqueue(job_id, "1.2.3", "pacs", files)
    assert queue.run_due() == [job_id]
    with db.session() as s:
        assert settle_sending_jobs(s) == [(job_id, JobState.failed)]

    assert main(["resend", "--database-url", url, "--job", str(job_id)]) == 0
    assert f"job {job_id}: 1 send(s) requeued" in capsys.readouterr().out
    with StoreSCPPeer(tool, tmp_path / "peer", port=down.release()) as peer:
        assert queue.run_due() == [job_id]
        received = peer.received_uids()
    with db.session() as s:
        assert settle_sending_jobs(s) == [(job_id, JobState.done)]
        row = s.scalars(select(Send)).one()
        assert (row.state, row.attempts) == (SendState.sent, 1) and "requeued" not in row.last_status
        steps = [e.to_state for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]
    assert sorted(received) == sorted(dcmread(p).SOPInstanceUID for p in files)
    assert steps == ["failed", "sending", "done"]
    # Nothing left to resend: a second request is refused with the reason, and nothing is sent twice.
    assert main(["resend", "--database-url", url, "--job", str(job_id)]) == 1
    assert "state done, no failed send" in capsys.readouterr().err
    db.close()
