"""A study whose PatientSex is nonstandard ("Male", "U", "m") still yields valid outputs, and the change is audited."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.audit.models import Job, JobEvent, JobState
from dicomnode.config import load_config
from dicomnode.dicomio.validate import find_dciodvfy, validate_file
from dicomnode.node import Node
from tests.conftest import free_port, require, require_tool
from tests.e2e.dcmtk_peers import StoreSCPPeer, storescu

pytestmark = pytest.mark.e2e

SENDER = "MODALITY1"


def test_nonstandard_patient_sex_is_mapped_and_outputs_are_sent(tmp_path):
    from dicomnode.testing.study import write_synthetic_study

    storescp, scu = require_tool("storescp"), require_tool("storescu")
    require(find_dciodvfy() is not None, "dciodvfy is not installed (dicom3tools)")
    study = write_synthetic_study(tmp_path / "study", modalities=("CT", "PT"), shape=(32, 64, 64), seed=5)
    for modality, sex in (("CT", "Male"), ("PT", "U")):  # what real scanners and RIS exports send
        for path in study[modality]:
            ds = pydicom.dcmread(path)
            ds.PatientSex = sex
            ds.save_as(path)
    node_port = free_port()
    with StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        cfg = load_config(overrides={
            "node": {"port": node_port},
            "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
            "completion": {"stable_age_s": 1.0, "check_interval_s": 0.25},
            "destinations": [{"name": "back", "ae_title": SENDER, "host": "127.0.0.1", "port": peer.port}],
            "processing": {"device": "cpu"},
        })
        node = Node(cfg)
        node.start()
        try:
            storescu(scu, study["CT"] + study["PT"], port=node_port, calling_ae=SENDER)
            deadline = time.monotonic() + 300
            job = None
            while time.monotonic() < deadline:
                with node.db.session() as s:
                    job = s.scalars(select(Job)).first()
                if job is not None and job.state in (JobState.done, JobState.failed):
                    break
                time.sleep(0.5)
            assert job is not None and job.state == JobState.done, job and job.reason
            assert sorted(job.outputs["input_changes"]) == ["PatientSex 'Male' -> 'M'", "PatientSex 'U' -> ''"]
            with node.db.session() as s:
                events = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
            encoded = next(e for e in events if e.to_state == "encoded")
            assert "input_changes=2" in encoded.detail and "Male" not in encoded.detail
            files = [f for o in job.outputs["series"] for f in o["files"]]
            assert files and len(peer.files()) >= len(files)
            for path in files:
                assert str(pydicom.dcmread(path, stop_before_pixels=True).PatientSex) == "M"
                report = validate_file(Path(path))
                assert report.ok, f"{path}: {report.errors}"
        finally:
            node.stop()
