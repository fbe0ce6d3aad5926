"""Series completion seen from a real sender: outages never complete a series early, late instances are fused.

A node stopped mid-series for longer than ``stable_age_s`` gives the series its full stable age
again after the restart (stable age counts node up-time). An instance arriving after its series
completed reopens the series; when it completes again, the grown series is fused as a new job.
"""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import select

from dicomnode.audit.models import Instance, Job, Series, SeriesState
from dicomnode.config import load_config
from dicomnode.node import Node
from dicomnode.pipeline import ProcessingOutput
from tests.conftest import free_port, require_tool, wait_for
from tests.e2e.dcmtk_peers import storescu

pytestmark = pytest.mark.e2e

STABLE_AGE_S = 3.0


def node_config(tmp_path, port: int, stable_age_s: float):
    return load_config(overrides={
        "node": {"port": port},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "completion": {"stable_age_s": stable_age_s, "check_interval_s": 0.2, "use_expected_count": False},
        "destinations": [{"name": "back", "ae_title": "MODALITY1", "host": "127.0.0.1", "port": free_port()}],
    })


class Recorder:
    """A processing stage that records how many files each job was given (outputs nothing)."""

    def __init__(self) -> None:
        self.fixed_counts: dict[int, int] = {}

    def __call__(self, inputs) -> ProcessingOutput:
        self.fixed_counts[inputs.job_id] = len(inputs.fixed_files)
        return ProcessingOutput(series=[])



@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from dicomnode.testing.study import write_synthetic_study

    return write_synthetic_study(tmp_path_factory.mktemp("study"), modalities=("CT", "PT"), shape=(12, 32, 32), seed=11)


def test_outage_longer_than_stable_age_does_not_complete_a_half_received_series(tmp_path, study):
    scu = require_tool("storescu")
    port = free_port()
    cfg = node_config(tmp_path, port, STABLE_AGE_S)
    ct, pt = study["CT"], study["PT"]
    first = Node(cfg, process=Recorder())
    first.start()
    try:
        storescu(scu, ct[: len(ct) // 2] + pt, port=port, calling_ae="MODALITY1")
    finally:
        first.stop()
    time.sleep(STABLE_AGE_S + 1.5)  # the outage: longer than the stable age
    recorder = Recorder()
    second = Node(cfg, process=recorder)
    started = time.monotonic()
    second.start()
    try:
        time.sleep(1.0)  # several completion checks have run since the restart
        assert time.monotonic() - started < STABLE_AGE_S
        with second.db.session() as s:
            assert {r.state for r in s.scalars(select(Series))} == {SeriesState.receiving}
            assert s.query(Job).count() == 0
        storescu(scu, ct[len(ct) // 2 :], port=port, calling_ae="MODALITY1")  # the modality resends the rest

        def one_job():
            with second.db.session() as s:
                return s.scalars(select(Job)).all()

        (job,) = wait_for(one_job)
        wait_for(lambda: job.id in recorder.fixed_counts)
        assert recorder.fixed_counts[job.id] == len(ct)
    finally:
        second.stop()


def test_late_instance_reopens_the_series_and_the_grown_series_is_fused_again(tmp_path, study, caplog):
    scu = require_tool("storescu")
    port = free_port()
    recorder = Recorder()
    ct, pt = study["CT"], study["PT"]
    node = Node(node_config(tmp_path, port, 1.0), process=recorder)
    node.start()
    try:
        storescu(scu, ct[:-1] + pt, port=port, calling_ae="MODALITY1")
        wait_for(lambda: len(recorder.fixed_counts) == 1)
        with caplog.at_level(logging.WARNING, logger="dicomnode.net.records"):
            storescu(scu, ct[-1:], port=port, calling_ae="MODALITY1")
        wait_for(lambda: len(recorder.fixed_counts) == 2)
        with node.db.session() as s:
            jobs = s.scalars(select(Job).order_by(Job.id)).all()
            ct_row = s.scalars(select(Series).where(Series.modality == "CT")).one()
            assert ct_row.state == SeriesState.complete and ct_row.revision == 1
            assert ct_row.received_count == s.query(Instance).filter(Instance.series_id == ct_row.id).count() == len(ct)
        assert [(j.fixed_revision, j.moving_revision) for j in jobs] == [(0, 0), (1, 0)]
        assert [recorder.fixed_counts[j.id] for j in jobs] == [len(ct) - 1, len(ct)]
        lines = [r.getMessage() for r in caplog.records if "event=series_reopened" in r.getMessage()]
        assert len(lines) == 1 and ct_row.series_uid in lines[0]
    finally:
        node.stop()
