"""No patient identifier in the node's output at INFO, from any library: a real node process, a
real association and a real job on a study whose patient attributes make pydicom and highdicom warn."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from tests.conftest import free_port, require_tool
from tests.e2e.dcmtk_peers import StoreSCPPeer
from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Job, JobState

pytestmark = pytest.mark.e2e

SENDER = "MODALITY1"
# A one-word PatientName (highdicom: "unlikely to represent the intended person name") and an
# invalid PatientAge (pydicom: "Invalid value for VR AS") quote their values in warnings.
CANARIES = {"PatientName": "CANARYSMITH", "PatientID": "CANARYID", "PatientAge": "CANARYAGE"}


def _serve_config(tmp_path: Path, node_port: int, peer_port: int) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nport = {node_port}\n\n'
        f'[storage]\nspool_dir = "{tmp_path / "spool"}"\ndatabase_url = "sqlite:///{tmp_path / "audit.db"}"\n\n'
        '[completion]\nstable_age_s = 2.0\ncheck_interval_s = 0.5\n\n'
        '[fusion]\ndefault_method = "alpha"\n\n[processing]\ndevice = "cpu"\n\n'
        '[sending]\ninitial_delay_s = 0.5\nbackoff = 1.0\n\n[logging]\nlevel = "INFO"\n\n'
        f'[[destinations]]\nname = "back"\nae_title = "{SENDER}"\nhost = "127.0.0.1"\nport = {peer_port}\n'
    )
    return path


def _wait_done(url: str, timeout_s: float) -> Job | None:
    db = AuditDB.open(url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with db.session() as s:
                job = s.scalars(select(Job)).first()
            if job is not None and job.state in (JobState.done, JobState.failed):
                return job
            time.sleep(0.25)
        return None
    finally:
        db.close()


def test_no_patient_identifier_at_info_from_receive_and_job(tmp_path):
    from dicomnode.testing.study import write_synthetic_study

    storescp = require_tool("storescp")
    study = write_synthetic_study(tmp_path / "study", modalities=("CT", "PT"), shape=(8, 32, 32),
                                  patient_id=CANARIES["PatientID"], patient_name=CANARIES["PatientName"])
    datasets = []
    for files in study.values():
        for path in files:
            ds = pydicom.dcmread(path)
            ds.PatientAge = CANARIES["PatientAge"]
            datasets.append(ds)
    node_port = free_port()
    with StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        config = _serve_config(tmp_path, node_port, peer.port)
        serve = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ae = AE(ae_title=SENDER)
            for ds in datasets[:1]:
                ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            for ds in datasets:
                ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            deadline = time.monotonic() + 60
            while True:
                assoc = ae.associate("127.0.0.1", node_port, ae_title="DICOMNODE")
                if assoc.is_established or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert assoc.is_established, "the node did not start listening"
            assert {assoc.send_c_store(ds).Status for ds in datasets} == {0x0000}
            assoc.release()
            job = _wait_done(f"sqlite:///{tmp_path / 'audit.db'}", timeout_s=300)
            assert job is not None and job.state is JobState.done, job and job.reason
            assert peer.files()  # the outputs reached the peer: the job's whole path ran
        finally:
            serve.terminate()
            out, err = serve.communicate(timeout=60)
    output = out + err
    assert "event=node_started" in output  # the node did log at INFO
    leaked = [line for line in output.splitlines() if any(c in line for c in CANARIES.values())]
    assert leaked == []
