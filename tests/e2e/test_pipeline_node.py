"""A running node registers and fuses what DCMTK storescu sends it, and storescp receives the outputs.

MR -> CT: two frames of reference and a known rigid + affine + smooth misalignment
(tests/registration_pair.py), under an MR -> CT rule added in the node's configuration. The
node's transform lands within 2 mm of the truth, the fused series shows the MR where the truth
puts it, and the displacement map series reaches the peer. NM -> MR: the default rule, one
frame of reference, resampling only.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from sqlalchemy import select

from dicomnode.audit.models import Job, JobState
from dicomnode.config import FusionConfig, load_config
from dicomnode.dicomio.validate import find_dciodvfy, validate_file
from dicomnode.node import Node
from dicomnode.testing.deform import score
from tests.conftest import free_port, require, require_tool
from tests.e2e.dcmtk_peers import StoreSCPPeer, storescu
from tests.registration_pair import FAST_REGISTRATION, cropped_mni, ct_mr_case, registrations, write_case  # noqa: F401

pytestmark = pytest.mark.e2e

DEFAULT_RULES = [{"fixed": "CT", "moving": "PT"}, {"fixed": "MR", "moving": "NM"}, {"fixed": "CT", "moving": "NM"}]


def node_config(tmp_path: Path, port: int, peer: StoreSCPPeer, **sections):
    return load_config(overrides={
        "node": {"port": port},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "completion": {"stable_age_s": 1.5, "check_interval_s": 0.25},
        # The outputs go back to the sender's AE title: storescu calls itself PEER, storescp is PEER.
        "destinations": [{"name": "peer", "ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.port}],
        "sending": {"initial_delay_s": 0.5},
        "processing": {"device": "cpu"},
        **sections,
    })


def wait_for_job(node: Node, timeout_s: float) -> Job:
    deadline = time.monotonic() + timeout_s
    jobs: list[Job] = []
    while time.monotonic() < deadline:
        with node.db.session() as s:
            jobs = s.scalars(select(Job)).all()
        if jobs and all(j.state in (JobState.done, JobState.failed) for j in jobs):
            (job,) = jobs
            return job
        time.sleep(0.3)
    raise AssertionError(f"no finished job within {timeout_s} s: {[(j.id, j.state, j.reason) for j in jobs]}")


def wait_for_files(peer: StoreSCPPeer, count: int, timeout_s: float) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(peer.files()) < count:
        time.sleep(0.2)
    return peer.files()


def received_by_kind(job: Job, files: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    kinds = {o["series_uid"]: o["kind"] for o in job.outputs["series"]}
    out: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        ds.filename = str(path)
        out.setdefault(kinds[str(ds.SeriesInstanceUID)], []).append(ds)
    return out


def check_conform(received: dict[str, list[pydicom.Dataset]]) -> None:
    require(find_dciodvfy() is not None, "dciodvfy is not installed (dicom3tools)")
    for kind, items in received.items():
        report = validate_file(Path(items[0].filename))
        assert report.ok, f"{kind} as the peer received it: {report.errors}"


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_node_registers_mr_onto_ct_and_sends_the_displacement_map(tmp_path, shared_data, registrations):  # noqa: F811
    scu, scp_tool = require_tool("storescu"), require_tool("storescp")
    case = ct_mr_case(cropped_mni(shared_data / "nifti" / "mni152_icbm2009a_nilearn"))
    study = write_case(case, tmp_path / "study")
    port = free_port()
    with StoreSCPPeer(scp_tool, tmp_path / "peer") as peer:
        # alpha 1: the fused image is the resampled MR wherever the MR has signal, so it shows the alignment.
        config = node_config(tmp_path, port, peer, registration=FAST_REGISTRATION, fusion={"alpha": 1.0},
                             pairing=[*DEFAULT_RULES, {"fixed": "CT", "moving": "MR", "method": "alpha"}])
        node = Node(config)
        node.start()
        try:
            storescu(scu, study["CT"] + study["MR"], port=port, calling_ae=peer.ae_title)
            job = wait_for_job(node, 600)
            assert job.state == JobState.done, job.reason
            expected = sum(o["count"] for o in job.outputs["series"])
            files = wait_for_files(peer, expected, 60)
        finally:
            node.stop()
    assert job.rule == "MR->CT" and job.method == "alpha"
    assert job.registration["skipped_reason"] is None and job.registration["deformable"] is True
    assert [s["name"] for s in job.registration["stages"] if s["kept"]] == ["rigid", "affine", "deformable"]
    received = received_by_kind(job, files)
    # The registration goes out as DICOM too: the matrix and the kept B-spline's deformation grid.
    assert len(files) == expected and set(received) == {"fused", "heatmap", "displacement", "registration",
                                                        "deformable_registration"}
    assert len(received["fused"]) == len(study["CT"]) and len(received["displacement"]) == 1
    (pm,) = received["displacement"]
    assert pm.ContentLabel == "DISPLACEMENT" and int(pm.NumberOfFrames) == len(study["CT"])
    check_conform(received)

    # The node's transform is within 2 mm of the truth ...
    (reg,) = registrations
    before, after = score(case, sitk.Transform(3, sitk.sitkIdentity)), score(case, reg.transform)
    assert before.mean_mm > 5.0 and after.mean_mm < 2.0, (before, after)
    # ... and the fused series it sent is the MR resampled by that transform, so near the truth.
    fused = sorted(received["fused"], key=lambda ds: float(ds.ImagePositionPatient[2]))
    grey = np.stack([ds.pixel_array.astype(float).mean(axis=-1) for ds in fused])
    fixed, moving = case.fixed.image, case.moving.image

    def mr_on_ct(transform) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))

    truth, estimate, unregistered = mr_on_ct(case.truth), mr_on_ct(reg.transform), mr_on_ct(sitk.Transform())
    head = truth > 0.2 * float(np.percentile(truth, 99))
    assert _corr(grey[head], estimate[head]) > 0.95
    assert _corr(grey[head], truth[head]) > _corr(grey[head], unregistered[head]) + 0.1


def test_node_fuses_nm_onto_mr(tmp_path):
    from dicomnode.testing.study import write_synthetic_study

    scu, scp_tool = require_tool("storescu"), require_tool("storescp")
    study = write_synthetic_study(tmp_path / "study", modalities=("MR", "NM"), shape=(16, 32, 32), seed=5)
    port = free_port()
    with StoreSCPPeer(scp_tool, tmp_path / "peer") as peer:
        node = Node(node_config(tmp_path, port, peer))  # the default rules: NM -> MR among them
        node.start()
        try:
            storescu(scu, study["MR"] + study["NM"], port=port, calling_ae=peer.ae_title)
            job = wait_for_job(node, 300)
            assert job.state == JobState.done, job.reason
            expected = sum(o["count"] for o in job.outputs["series"])
            files = wait_for_files(peer, expected, 60)
        finally:
            node.stop()
    assert job.rule == "NM->MR" and job.method == FusionConfig().default_method == "chroma"
    assert job.registration["skipped_reason"] == "same FrameOfReferenceUID"
    received = received_by_kind(job, files)
    # chroma (CT or MR as brightness, the moving image as colour) has no network saliency map.
    assert len(files) == expected and set(received) == {"fused", "heatmap"}
    assert len(received["fused"]) == len(study["MR"])
    check_conform(received)
