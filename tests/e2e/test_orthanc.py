"""Orthanc (a real PACS, on loopback) routes a CT+PET study to the node; the fused series come back.

The node receives by C-STORE from Orthanc, completes and pairs the series, fuses, and sends the
Secondary Capture and Parametric Map series back to Orthanc (the destination whose AE title sent
the CT). The audit database must tell the whole story.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import free_port, require
from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Association, Instance, Job, JobEvent, JobState, Metric, Send, SendState, Series, SeriesState
from dicomnode.config import QualityConfig, load_config
from dicomnode.node import Node
from dicomnode.testing.orthanc import NodePeer, Orthanc, find_orthanc

pytestmark = pytest.mark.e2e

FINAL = (JobState.done, JobState.failed)
EXPECTED_EVENTS = [(None, "paired"), ("paired", "processing"), ("processing", "encoded"), ("encoded", "sending"),
                   ("sending", "done")]


def node_config(tmp_path: Path, node_port: int, pacs: Orthanc):
    return load_config(overrides={
        "node": {"ae_title": "DICOMNODE", "port": node_port},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        # Short timers keep the test fast; Orthanc sends a series in well under a second.
        "completion": {"stable_age_s": 1.5, "check_interval_s": 0.25},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
        "sending": {"initial_delay_s": 0.5, "max_attempts": 3},
        "processing": {"device": "cpu"},
    })


def wait_for_jobs(db: AuditDB, count: int, timeout_s: float) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with db.session() as s:
            jobs = s.scalars(select(Job).order_by(Job.id)).all()
        if len(jobs) >= count and all(j.state in FINAL for j in jobs):
            return jobs
        time.sleep(0.3)
    raise AssertionError(f"jobs not finished within {timeout_s} s: {[(j.id, j.state, j.reason) for j in jobs]}")


def run_study(tmp_path: Path, study: dict[str, list[Path]], timeout_s: float) -> None:
    """Upload ``study`` to Orthanc, route it to the node, wait for the output, check PACS and audit."""
    require(find_orthanc() is not None, "Orthanc is not installed")
    node_port = free_port()
    pacs = Orthanc(NodePeer("DICOMNODE", "127.0.0.1", node_port), workdir=tmp_path / "orthanc")
    (tmp_path / "orthanc").mkdir()
    ct_files, pt_files = study["CT"], study["PT"]
    study_uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID)
    with pacs:
        pacs.upload(ct_files + pt_files)
        config = node_config(tmp_path, node_port, pacs)
        node = Node(config)
        node.start()
        try:
            pacs.route([pacs.lookup(study_uid, "Study")])
            (job,) = wait_for_jobs(node.db, 1, timeout_s)
            assert job.state == JobState.done, job.reason
            # The PACS holds the outputs in the same study, with the right instance counts.
            in_pacs = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in pacs.study_series(study_uid)}
            outputs = {o["series_uid"]: o for o in job.outputs["series"]}
            assert set(outputs) <= set(in_pacs)
            assert len(in_pacs) == 2 + len(outputs)
            kinds = {o["kind"]: o for o in outputs.values()}
            assert kinds["fused"]["count"] == len(ct_files)
            assert len(in_pacs[kinds["fused"]["series_uid"]]["Instances"]) == len(ct_files)
            assert len(in_pacs[kinds["heatmap"]["series_uid"]]["Instances"]) == 1
            fused_id = in_pacs[kinds["fused"]["series_uid"]]["Instances"][0]
            fused = pydicom.dcmread(io.BytesIO(pacs.download(fused_id)))
            assert fused.StudyInstanceUID == study_uid and fused.PhotometricInterpretation == "RGB"
            heatmap_id = in_pacs[kinds["heatmap"]["series_uid"]]["Instances"][0]
            heatmap = pydicom.dcmread(io.BytesIO(pacs.download(heatmap_id)))
            assert heatmap.ContentLabel == "HEATMAP" and heatmap.BitsAllocated == 16
            assert pacs.preview_png(heatmap_id)[:4] == b"\x89PNG"  # the PACS can render the map
            check_iod(tmp_path, {"fused": pacs.download(fused_id), "heatmap": pacs.download(heatmap_id)},
                      source=sorted(ct_files)[0])
            check_audit(node.db, job, len(ct_files), len(pt_files))
        finally:
            node.stop()


def check_iod(tmp_path: Path, objects: dict[str, bytes], source: Path) -> None:
    """The objects as the PACS holds them conform to their IODs (dciodvfy: no errors of their own).

    Study attributes are copied exactly as received, so an error the source itself has (STS_002's
    StudyID is 17 characters, one over SH's 16) is the only kind allowed.
    """
    from dicomnode.dicomio.validate import find_dciodvfy, validate_file

    require(find_dciodvfy() is not None, "dciodvfy is not installed (dicom3tools)")
    inherited = set(validate_file(source).errors)
    for name, raw in objects.items():
        path = tmp_path / f"from-pacs-{name}.dcm"
        path.write_bytes(raw)
        report = validate_file(path)
        assert set(report.errors) <= inherited, f"{name}: {report.errors}"


def check_audit(db: AuditDB, job: Job, n_ct: int, n_pt: int) -> None:
    with db.session() as s:
        assocs = s.scalars(select(Association).where(Association.calling_ae == "ORTHANC")).all()
        assert assocs and all(a.accepted for a in assocs)
        assert s.query(Instance).count() == n_ct + n_pt
        series = {r.modality: r for r in s.scalars(select(Series))}
        assert series["CT"].state == series["PT"].state == SeriesState.complete
        assert (series["CT"].received_count, series["PT"].received_count) == (n_ct, n_pt)
        assert series["CT"].completion_reason == "stable_age"  # CT carries no expected count
        assert series["PT"].completion_reason == "expected_count"  # PET's NumberOfSlices arrived
        events = [(e.from_state, e.to_state) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))]
        assert events == EXPECTED_EVENTS
        sends = s.scalars(select(Send).where(Send.job_id == job.id)).all()
        assert len(sends) == len(job.outputs["series"]) and all(x.state == SendState.sent and x.attempts == 1 for x in sends)
        per_series = s.scalars(select(Metric).where(Metric.job_id == job.id, Metric.slice_index.is_(None))).all()
        per_slice = s.scalars(select(Metric).where(Metric.job_id == job.id, Metric.slice_index.is_not(None))).all()
        assert per_series and per_slice
        check_scored_slices(per_series, per_slice, n_ct)
        assert set(job.timings) >= {"load", "register", "fuse", "encode"}
        # Both studies share one frame of reference: resampling only, and the report says so.
        assert job.registration["skipped_reason"] == "same FrameOfReferenceUID"


def check_scored_slices(per_series: list[Metric], per_slice: list[Metric], n_slices: int) -> None:
    """Per-slice rows exist for the scored slices only, spread through the series; each series value is their mean."""
    limit = QualityConfig().max_slices
    scored = sorted({m.slice_index for m in per_slice})
    assert len(scored) == min(n_slices, limit) and set(scored) <= set(range(n_slices))
    edges = [-1, *scored, n_slices]
    assert max(np.diff(edges)) <= 2 * math.ceil(n_slices / limit)  # no long stretch left unscored
    for series_row in per_series:
        values = [m.value for m in per_slice if m.name == series_row.name]
        assert series_row.value == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_synthetic_study_round_trip(tmp_path):
    from dicomnode.testing.study import write_synthetic_study

    study = write_synthetic_study(tmp_path / "study", modalities=("CT", "PT"), shape=(32, 64, 64), seed=3)
    run_study(tmp_path, study, timeout_s=120)


@pytest.mark.slow
def test_sts_002_round_trip(tmp_path, sts_dir):
    study = {
        "CT": sorted((sts_dir / "CT" / "dicom" / "image").glob("*.dcm")),
        "PT": sorted((sts_dir / "PET" / "dicom" / "image").glob("*.dcm")),
    }
    require(len(study["CT"]) > 0 and len(study["PT"]) > 0, f"STS_002 CT/PET files not found under {sts_dir}")
    run_study(tmp_path, study, timeout_s=300)
