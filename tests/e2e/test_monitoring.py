"""The monitoring endpoint during a real run: storescu in, a real job, storescp out, scraped over HTTP.

/metrics is parsed with prometheus_client's own parser, so what is checked is what Prometheus reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dicomnode.audit.models import Job, JobState
from dicomnode.domain import series_number
from dicomnode.config import load_config
from dicomnode.node import Node
from tests.conftest import free_port, require_tool
from tests.e2e.dcmtk_peers import ENV, StoreSCPPeer, storescu

pytestmark = pytest.mark.e2e

SENDER = "MODALITY1"


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def samples(base: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from a real scrape of /metrics."""
    status, content_type, body = get(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def wait_done(node: Node, timeout_s: float) -> Job:
    deadline = time.monotonic() + timeout_s
    job = None
    while time.monotonic() < deadline:
        with node.db.session() as s:
            job = s.scalars(select(Job)).first()
        if job is not None and job.state in (JobState.done, JobState.failed):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job not finished within {timeout_s} s: {job and (job.state, job.reason)}")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> dict:
    """One node run: storescu sends CT + PET (and one bad instance), the job runs, storescp gets the outputs.

    /health is read before any input and /metrics mid-run and at the end; the audit database is left
    for the audit CLI test.
    """
    from dicomnode.testing.study import write_synthetic_study

    storescp, scu = require_tool("storescp"), require_tool("storescu")
    tmp_path = tmp_path_factory.mktemp("run")
    study = write_synthetic_study(tmp_path / "study", modalities=("CT", "PT"), shape=(24, 48, 48), seed=3)
    # One CT file without its SeriesInstanceUID: refused with a failure status, counted as a rejection.
    bad = pydicom.dcmread(study["CT"][0])
    del bad.SeriesInstanceUID
    bad.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.save_as(tmp_path / "bad.dcm")
    node_port = free_port()
    with StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        cfg = load_config(overrides={
            "node": {"port": node_port},
            "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
            "completion": {"stable_age_s": 1.0, "check_interval_s": 0.25},
            "destinations": [{"name": "back", "ae_title": SENDER, "host": "127.0.0.1", "port": peer.port}],
            "sending": {"initial_delay_s": 0.5},
            "processing": {"device": "cpu"},
            # The series share a frame of reference; register anyway (one stage) so the audit view has a stage row.
            "registration": {"mode": "always", "stages": ["rigid"]},
            "http": {"enabled": True, "port": 0},
        })
        node = Node(cfg)
        node.start()
        try:
            base = f"http://127.0.0.1:{node.monitor.port}"
            status, content_type, body = get(base + "/health")
            assert (status, content_type) == (200, "application/json"), body
            assert json.loads(body)["status"] == "ok"
            assert get(base + "/nothing")[0] == 404

            storescu(scu, study["CT"] + study["PT"], port=node_port, calling_ae=SENDER)
            subprocess.run([scu, "-aet", SENDER, "-aec", "DICOMNODE", "127.0.0.1", str(node_port), str(tmp_path / "bad.dcm")],
                           env=ENV, capture_output=True, timeout=60)
            during = samples(base)  # mid-run: received, probably still processing

            job = wait_done(node, 180)
            assert job.state == JobState.done, job.reason
            after = samples(base)
        finally:
            node.stop()
    return {"study": study, "job": job, "during": during, "after": after, "url": cfg.storage.database_url}


def test_metrics_during_a_real_run(real_run):
    study, job, after = real_run["study"], real_run["job"], real_run["after"]
    outputs = len(job.outputs["series"])
    assert real_run["during"][("dicomnode_instances_received_total", (("modality", "CT"),))] == len(study["CT"])
    assert after[("dicomnode_instances_received_total", (("modality", "PT"),))] == len(study["PT"])
    assert after[("dicomnode_instances_rejected_total", (("status", "0xA900"),))] == 1
    assert after[("dicomnode_associations_total", (("result", "accepted"),))] == 2
    assert sum(v for (name, _), v in after.items() if name == "dicomnode_series_completed_total") == 2
    assert after[("dicomnode_jobs", (("state", "done"),))] == 1
    assert after[("dicomnode_jobs", (("state", "failed"),))] == 0
    assert after[("dicomnode_pending_jobs", ())] == 0
    # One observation per stage of the one job, in the histogram's count and its +Inf bucket.
    for stage in ("load", "register", "fuse", "encode"):
        assert after[("dicomnode_job_stage_seconds_count", (("stage", stage),))] == 1
        assert after[("dicomnode_job_stage_seconds_bucket", (("le", "+Inf"), ("stage", stage)))] == 1
        assert after[("dicomnode_job_stage_seconds_sum", (("stage", stage),))] == pytest.approx(job.timings[stage])
    assert after[("dicomnode_send_attempts_total", (("destination", "back"),))] == outputs
    assert after[("dicomnode_send_failures_total", (("destination", "back"),))] == 0
    assert after[("dicomnode_sends", (("destination", "back"), ("state", "sent")))] == outputs
    assert after[("dicomnode_pending_sends", ())] == 0
    assert after[("dicomnode_spool_bytes", (("area", "incoming"),))] > 0
    assert after[("dicomnode_spool_files", (("area", "quarantine"),))] == 2  # the instance and its reason
    assert after[("dicomnode_gpu_in_use", ())] == 0  # device = cpu
    assert after[("dicomnode_health_check", (("check", "spool"),))] == 1


def test_audit_job_summary_of_the_real_run(real_run, capsys):
    from dicomnode.cli import main

    study, job = real_run["study"], real_run["job"]
    assert main(["audit", "--database-url", real_run["url"], "--job", str(job.id)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"job {job.id}: done  rule PT->CT  method {job.method}" and job.method == "chroma"
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("  ")}
    assert rows["fixed"][1:2] == ["CT"] and f"{len(study['CT'])}/?" in rows["fixed"] and SENDER in rows["fixed"]
    assert rows["moving"][1:2] == ["PT"] and f"{len(study['PT'])}/{len(study['PT'])}" in rows["moving"]
    assert "registration: " in text and "transform " in text
    # The stage row: name, kept, held-out metric before/after, iterations, seconds.
    stage = rows["rigid"]
    assert stage[1] in ("yes", "no") and float(stage[2]) < 0 and float(stage[3]) < 0 and int(stage[4]) >= 1
    assert float(stage[5]) == pytest.approx(job.registration["stages"][0]["seconds"], abs=0.051)
    # One row per output series: kind, instance count, series number, description (from the files).
    fused = rows["fused"]
    assert fused[1:3] == [str(len(study["CT"])), str(series_number(job.id, "fused", 9000))] and "PET on CT fusion" in text
    assert rows["heatmap"][1:3] == ["1", str(series_number(job.id, "heatmap", 9000))]
    assert sum(line.split()[:1] == ["back"] and "sent" in line.split() for line in lines) == len(job.outputs["series"])
    assert {"MI", "SSIM"} <= set(rows) and "timings (s): " in text and "register=" in text
    # Readable: no raw dictionaries, no file paths, no line a terminal must wrap many times.
    assert "{" not in text and ".dcm" not in text and max(map(len, lines)) < 200
    assert "DN-SYN-001" not in text and "Synthetic" not in text

    assert main(["audit", "--database-url", real_run["url"], "--job", str(job.id), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["id"] == job.id and record["state"] == "done"
    assert record["registration"]["stages"][0]["name"] == "rigid"
    assert sum(o["count"] for o in record["outputs"]["series"]) == sum(len(o["files"]) for o in record["outputs"]["series"])
    assert [e["to"] for e in record["events"]] == ["paired", "processing", "encoded", "sending", "done"]
    assert any(m["slice_index"] is None for m in record["metrics"]) and len(record["sends"]) == len(job.outputs["series"])
    assert main(["audit", "--database-url", real_run["url"], "--json"]) == 2
    assert "--json needs --job N" in capsys.readouterr().out


def test_health_is_503_with_the_reason_when_the_spool_is_not_writable(tmp_path):
    cfg = load_config(overrides={
        "node": {"port": free_port()},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "http": {"enabled": True, "port": 0},
    })
    node = Node(cfg, process=lambda inputs: None)
    node.start()
    try:
        base = f"http://127.0.0.1:{node.monitor.port}"
        assert get(base + "/health")[0] == 200
        # The incoming area replaced by a plain file: nothing can be received (works as root too,
        # where a read-only mode would not stop writes).
        incoming = node.spool.incoming
        shutil.move(incoming, tmp_path / "incoming-away")
        incoming.write_text("not a folder")
        status, content_type, body = get(base + "/health")
        report = json.loads(body)
        assert (status, content_type, report["status"]) == (503, "application/json", "unavailable")
        assert not report["checks"]["spool"]["ok"] and "incoming" in report["checks"]["spool"]["reason"]
        assert all(report["checks"][name]["ok"] for name in ("scp", "database", "worker"))
        assert samples(base)[("dicomnode_health_check", (("check", "spool"),))] == 0
        incoming.unlink()
        shutil.move(tmp_path / "incoming-away", incoming)
        assert get(base + "/health")[0] == 200
        node.worker.stop()
        status, _, body = get(base + "/health")
        assert status == 503 and "worker" in json.loads(body)["checks"]["worker"]["reason"]
    finally:
        node.stop()


def test_http_port_in_use_is_a_clear_startup_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = load_config(overrides={
            "node": {"port": free_port()},
            "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
            "http": {"enabled": True, "port": port},
        })
        node = Node(cfg, process=lambda inputs: None)
        from dicomnode.node import StartupError

        with pytest.raises(StartupError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            node.start()
        assert not node.scp.listening
