"""A CT and a PET of different patients in one study: refused, audited, logged; never fused or sent."""

from __future__ import annotations

import logging
import time

import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import free_port, require_tool
from tests.e2e.dcmtk_peers import StoreSCPPeer, storescu
from dicomnode.audit.models import Job, Rejection, Series, SeriesState
from dicomnode.config import load_config
from dicomnode.node import Node

pytestmark = pytest.mark.e2e


def test_patient_mismatch_in_one_study_is_refused(tmp_path, caplog):
    from dicomnode.testing.study import write_synthetic_study

    storescp, scu = require_tool("storescp"), require_tool("storescu")
    study = write_synthetic_study(tmp_path / "study", modalities=("CT", "PT"), shape=(32, 64, 64), seed=7,
                                  patient_id="DN-A")
    for path in study["PT"]:  # same StudyInstanceUID, another patient's PET
        ds = pydicom.dcmread(path)
        ds.PatientID = "DN-B"
        ds.save_as(path)
    node_port = free_port()
    with StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        cfg = load_config(overrides={
            "node": {"port": node_port},
            "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
            "completion": {"stable_age_s": 1.0, "check_interval_s": 0.25},
            "destinations": [{"name": "back", "ae_title": "MODALITY1", "host": "127.0.0.1", "port": peer.port}],
        })
        node = Node(cfg)
        node.start()
        try:
            with caplog.at_level(logging.INFO):
                storescu(scu, study["CT"] + study["PT"], port=node_port, calling_ae="MODALITY1")
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with node.db.session() as s:
                        rejections = s.scalars(select(Rejection)).all()
                        states = {r.state for r in s.scalars(select(Series))}
                    if rejections and states == {SeriesState.complete}:
                        break
                    time.sleep(0.2)
                time.sleep(1.0)  # a job, if one were wrongly made, would be processed by now
            with node.db.session() as s:
                (rejection,) = s.scalars(select(Rejection)).all()
                assert "PatientID" in rejection.reason and "pairing refused" in rejection.reason
                assert s.query(Job).count() == 0
            lines = [r.getMessage() for r in caplog.records if "event=pairing_refused" in r.getMessage()]
            assert len(lines) == 1 and "mismatch=PatientID" in lines[0]
            assert "DN-A" not in lines[0] and "DN-B" not in lines[0]
            # Nothing of this study came back (a file from an unrelated sender on the machine would not count).
            study_uid = pydicom.dcmread(study["CT"][0], stop_before_pixels=True).StudyInstanceUID
            assert not [f for f in peer.files() if pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == study_uid]
            assert not any(p.is_file() for p in (tmp_path / "spool" / "outbox").rglob("*"))
        finally:
            node.stop()
