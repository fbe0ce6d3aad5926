"""Workers that scale out: three ``dicomnode worker`` processes share one PostgreSQL job queue.

The node (SCP, completion, sender) runs here with ``worker.in_serve = false``; the workers are
real processes started from the command line. One is killed with SIGKILL while it processes a
job: its lease runs out, another worker takes the job, and every job is encoded once and every
output instance reaches the DCMTK storescp peer (which keeps every copy) exactly once (unless
the sender itself retried a series after a peer timeout, which the send rows then show).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.backends import postgres_schema_url
from tests.conftest import REPO, free_port, require_tool, wait_for
from tests.e2e.dcmtk_peers import StoreSCPPeer, storescu
from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Job, JobEvent, JobState, Send
from dicomnode.config import load_config
from dicomnode.node import Node

pytestmark = pytest.mark.e2e

SENDER = "MODALITY1"
STUDIES = 3


def write_config(path: Path, tmp_path: Path, url: str, node_port: int, peer_port: int) -> Path:
    path.write_text(f"""
[node]
port = {node_port}
[storage]
spool_dir = "{tmp_path / 'spool'}"
database_url = "{url}"
[completion]
stable_age_s = 1.0
check_interval_s = 0.25
[[destinations]]
name = "back"
ae_title = "{SENDER}"
host = "127.0.0.1"
port = {peer_port}
[sending]
initial_delay_s = 0.5
backoff = 1.0
max_attempts = 20
# A send association that stalls (seen here: the node stops sending mid-series, the peer waits)
# is aborted after this and retried; the assertions below allow exactly that resend.
connect_timeout_s = 20.0
[fusion]
default_method = "alpha"
[processing]
device = "cpu"
[worker]
in_serve = false
# Short, so the test waits little for the dead worker's lease; long enough for the renewals
# (every lease_s/3) on a loaded machine.
lease_s = 10.0
poll_s = 0.2
""")
    return path


def start_worker(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "dicomnode", "worker", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)



@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from dicomnode.testing.study import write_synthetic_study

    root = tmp_path_factory.mktemp("studies")
    return [write_synthetic_study(root / str(i), modalities=("CT", "PT"), shape=(16, 48, 48), seed=i)
            for i in range(STUDIES)]


def test_three_workers_share_the_queue_and_a_killed_one_loses_nothing(tmp_path, studies):
    storescp, scu = require_tool("storescp"), require_tool("storescu")
    with postgres_schema_url() as url, StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        config_file = write_config(tmp_path / "node.toml", tmp_path, url, free_port(), peer.port)
        cfg = load_config(config_file)
        node = Node(cfg)  # no worker of its own: in_serve = false
        assert node.worker is None
        node.start()
        db = AuditDB.open(url)
        logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
        workers = [start_worker(config_file, log) for log in logs]
        try:
            for log, proc in zip(logs, workers):
                wait_for(lambda: proc.poll() is not None or "event=worker_started" in log.read_text(), 180,
                         f"worker {proc.pid} starts")
                assert proc.poll() is None, log.read_text()[-2000:]
            for study in studies:
                storescu(scu, study["CT"] + study["PT"], port=cfg.node.port, calling_ae=SENDER)

            def processing_job():
                with db.session() as s:
                    return s.scalars(select(Job).where(Job.state == JobState.processing)).first()

            victim_job = wait_for(processing_job, 120, "a worker processes a job")
            victim_pid = int(victim_job.worker_id.split(":")[1])
            victim = next(p for p in workers if p.pid == victim_pid)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            with db.session() as s:
                row = s.get(Job, victim_job.id)
                # Killed mid-job: the job is still the dead worker's, until its lease runs out.
                assert (row.state, row.worker_id) == (JobState.processing, victim_job.worker_id)

            def all_settled():
                with db.session() as s:
                    jobs = s.scalars(select(Job)).all()
                    return len(jobs) == STUDIES and all(j.state in (JobState.done, JobState.failed) for j in jobs) and jobs

            jobs = wait_for(all_settled, 300, f"{STUDIES} jobs done")
            assert all(j.state == JobState.done for j in jobs), [(j.id, j.reason) for j in jobs]
            time.sleep(1.0)  # give a (wrong) duplicate send the chance to arrive
            with db.session() as s:
                evts = s.scalars(select(JobEvent).order_by(JobEvent.id)).all()
            encoded = Counter(e.job_id for e in evts if e.to_state == "encoded")
            assert encoded == {j.id: 1 for j in jobs}  # each job processed to the end exactly once
            victim_events = [e for e in evts if e.job_id == victim_job.id]
            assert any(e.to_state == "paired" and f"lease of worker {victim_job.worker_id} ran out" in (e.detail or "")
                       for e in victim_events)
            holders = {e.detail.split("worker=")[1] for e in evts if e.to_state == "processing"}
            assert victim_job.worker_id in holders and len(holders) >= 2
            assert next(j for j in jobs if j.id == victim_job.id).worker_id != victim_job.worker_id
            series_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): o["series_uid"]
                         for j in jobs for o in j.outputs["series"] for f in o["files"]}
            assert len(series_of) == sum(len(o["files"]) for j in jobs for o in j.outputs["series"])
            received = Counter(peer.received_uids())
            with db.session() as s:
                sends = s.scalars(select(Send)).all()
            # One send per output series: the workers queued each job's outputs once.
            assert sorted(x.series_uid for x in sends) == sorted({o["series_uid"] for j in jobs for o in j.outputs["series"]})
            # Every output arrived, and nothing else: the dead worker's half-written outputs never left.
            assert set(received) == set(series_of)
            # Each arrived once, unless the sender itself retried that series after a peer timeout
            # (at-least-once delivery, net/scu.py); then the send's attempts and status say so.
            retried = {x.series_uid for x in sends if x.attempts > 1}
            twice = {uid for uid, n in received.items() if n > 1}
            assert {series_of[uid] for uid in twice} <= retried, [(x.series_uid, x.attempts, x.last_status) for x in sends]
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.terminate()
            for proc in workers:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            db.close()
            node.stop()
