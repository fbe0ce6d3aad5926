"""Retention and pairing never contradict each other, and the audit says when a spool file is gone.

- A configuration whose spool retention is shorter than a patient rule's pairing window is refused
  by ``dicomnode check-config`` (and so by ``serve``): the partner could arrive after the purge.
- When retention deletes received files, their instance rows get ``purged_at``, and a job that
  needs such a series fails with that reason (not "file does not exist").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomnode.audit.models import Instance, Job, JobState, Series
from dicomnode.config import load_config
from dicomnode.node import Node
from tests.conftest import REPO, free_port, require_tool
from tests.e2e.dcmtk_peers import storescu

pytestmark = pytest.mark.e2e

RULE = '[[pairing]]\nname = "MR on CT"\nfixed = "CT"\nmoving = "MR"\nmatch = "patient"\nmax_days = 30\n'


def check_config(tmp_path: Path, spool_days: int) -> subprocess.CompletedProcess:
    path = tmp_path / f"node-{spool_days}.toml"
    path.write_text(f"[retention]\nspool_days = {spool_days}\n\n{RULE}")
    return subprocess.run([sys.executable, "-m", "dicomnode", "check-config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_check_config_refuses_spool_retention_shorter_than_a_patient_pairing_window(tmp_path):
    refused = check_config(tmp_path, 7)
    assert refused.returncode == 2, refused.stderr
    assert "spool_days = 7" in refused.stderr and "MR on CT" in refused.stderr and "at least 31" in refused.stderr
    for days in (31, 0):  # long enough, or forever
        accepted = check_config(tmp_path, days)
        assert accepted.returncode == 0, accepted.stdout


def test_purged_series_is_marked_and_its_job_fails_with_the_reason(tmp_path):
    from dicomnode.testing.study import write_synthetic_study

    scu = require_tool("storescu")
    study = write_synthetic_study(tmp_path / "study", modalities=("CT", "PT"), shape=(8, 32, 32), seed=13)
    port = free_port()
    cfg = load_config(overrides={
        "node": {"port": port},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "completion": {"stable_age_s": 0.5, "check_interval_s": 0.2, "use_expected_count": False},
        "destinations": [{"name": "back", "ae_title": "MODALITY1", "host": "127.0.0.1", "port": free_port()}],
        "retention": {"spool_days": 7},
    })
    processed: list[int] = []
    node = Node(cfg, process=lambda inputs: processed.append(inputs.job_id))
    node.start()
    try:
        storescu(scu, study["CT"], port=port, calling_ae="MODALITY1")
        with node.db.session() as s:
            ct_files = [Path(p) for p in s.scalars(select(Instance.spool_path))]
        ten_days_ago = time.time() - 10 * 86400
        for path in ct_files:  # the CT has been in the spool for ten days
            os.utime(path, (ten_days_ago, ten_days_ago))
        with node.db.session() as s:
            for row in s.scalars(select(Instance)):
                row.received_at = row.received_at.fromtimestamp(ten_days_ago, row.received_at.tzinfo)
        node.purge_spool()
        assert not any(p.exists() for p in ct_files)
        with node.db.session() as s:
            rows = s.scalars(select(Instance)).all()
            assert len(rows) == len(ct_files) and all(r.purged_at is not None for r in rows)
        storescu(scu, study["PT"], port=port, calling_ae="MODALITY1")  # the partner arrives late
        deadline = time.monotonic() + 30
        job = None
        while time.monotonic() < deadline:
            with node.db.session() as s:
                job = s.scalars(select(Job)).first()
            if job is not None and job.state == JobState.failed:
                break
            time.sleep(0.2)
        assert job is not None and job.state == JobState.failed, job and job.state
        with node.db.session() as s:
            ct_uid = s.scalars(select(Series.series_uid).where(Series.modality == "CT")).one()
        assert f"{len(ct_files)} of {len(ct_files)} instances of series {ct_uid} were deleted by spool retention" in job.reason
        assert processed == []  # never processed with a partial or missing series
    finally:
        node.stop()
