"""Series completion seen from a real sender: an instance after completion is stored, logged, not fused."""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import select

from dicomnode.audit.models import Instance, Series, SeriesState
from dicomnode.config import load_config
from dicomnode.node import Node
from tests.conftest import free_port, require_tool
from tests.e2e.dcmtk_peers import storescu

pytestmark = pytest.mark.e2e


def test_instance_after_completion_is_kept_and_reported(tmp_path, caplog):
    from dicomnode.testing.study import write_synthetic_study

    scu = require_tool("storescu")
    study = write_synthetic_study(tmp_path / "study", modalities=("CT",), shape=(8, 32, 32), seed=11)
    port = free_port()
    cfg = load_config(overrides={
        "node": {"port": port},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "completion": {"stable_age_s": 0.5, "check_interval_s": 0.2},
    })
    node = Node(cfg, process=lambda inputs: None)  # a lone CT pairs with nothing: no job runs
    node.start()
    try:
        storescu(scu, study["CT"][:-1], port=port, calling_ae="MODALITY1")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with node.db.session() as s:
                if s.scalars(select(Series.state)).one() == SeriesState.complete:
                    break
            time.sleep(0.1)
        with caplog.at_level(logging.WARNING, logger="dicomnode.node"):
            storescu(scu, study["CT"][-1:], port=port, calling_ae="MODALITY1")
        with node.db.session() as s:
            row = s.scalars(select(Series)).one()
            assert row.state == SeriesState.complete and row.completion_reason == "stable_age"
            assert row.received_count == s.query(Instance).count() == len(study["CT"])
        lines = [r.getMessage() for r in caplog.records if "event=late_instance" in r.getMessage()]
        assert len(lines) == 1 and row.series_uid in lines[0]
    finally:
        node.stop()
