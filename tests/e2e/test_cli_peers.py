"""`dicomnode send` against DCMTK storescp and `dicomnode demo --synthetic` with Orthanc, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicomnode.dicomio.validate import find_dciodvfy, validate_file
from dicomnode.testing.orthanc import find_orthanc
from dicomnode.testing.study import write_synthetic_study
from tests.conftest import require, require_tool
from tests.e2e.dcmtk_peers import ReservedPort, StoreSCPPeer

pytestmark = pytest.mark.e2e


def dicomnode(*args: str, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout_s, env=dict(os.environ))


def test_send_command_stores_files_and_folders_at_storescp(tmp_path):
    tool = require_tool("storescp")
    study = write_synthetic_study(tmp_path / "study", modalities=("CT", "PT"), shape=(6, 16, 16), seed=2)
    with StoreSCPPeer(tool, tmp_path / "peer") as peer:
        # A folder (searched recursively) and a single file: every instance once.
        result = dicomnode("send", str(tmp_path / "study" / "CT"), str(study["PT"][0]), "--port", str(peer.port),
                           "--ae", peer.ae_title, "--calling-ae", "SENDER", cwd=tmp_path, timeout_s=120)
        assert result.returncode == 0, result.stdout + result.stderr
        received = peer.received_uids()
    sent = study["CT"] + study["PT"][:1]
    assert f"sent {len(sent)} instances to {peer.ae_title}@127.0.0.1:{peer.port}" in result.stdout
    assert sorted(received) == sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent)


def test_send_command_says_why_when_the_peer_is_down(tmp_path):
    study = write_synthetic_study(tmp_path / "study", modalities=("CT",), shape=(4, 16, 16), seed=2)
    closed = ReservedPort()  # bound, not listening: connections are refused
    result = dicomnode("send", *map(str, study["CT"]), "--port", str(closed.port), "--ae", "NOBODY", cwd=tmp_path,
                       timeout_s=120)
    closed.release()
    assert result.returncode == 1
    assert result.stdout.startswith("send failed: ") and "NOBODY" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_synthetic_round_trip_through_orthanc(tmp_path):
    require(find_orthanc() is not None, "Orthanc is not installed (make install installs it)")
    result = dicomnode("demo", "--synthetic", "--workdir", str(tmp_path / "var"), cwd=tmp_path, timeout_s=1200)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "[demo] study: synthetic CT+PET phantom (--synthetic; 48 CT + 24 PET instances)" in out
    assert "[demo] job 1: done" in out and "fused series back in Orthanc" in out
    assert out.rstrip().endswith("[demo] stopped the node and Orthanc")
    demo = tmp_path / "var" / "demo"
    instances = {kind.name: sorted(kind.glob("*.dcm")) for kind in (demo / "instances").iterdir()}
    # The default method (chroma) writes the contribution map and no network saliency map.
    assert {k: len(v) for k, v in instances.items()} == {"fused": 48, "heatmap": 1}
    for png in ("fused_preview.png", "heatmap_preview.png", "fused_montage.png"):
        assert (demo / png).read_bytes()[:4] == b"\x89PNG"
    # What came back from the PACS is the node's output in the study that was sent.
    study_uid = pydicom.dcmread(sorted((demo / "input" / "CT").glob("*.dcm"))[0], stop_before_pixels=True).StudyInstanceUID
    fused = pydicom.dcmread(instances["fused"][0])
    assert fused.StudyInstanceUID == study_uid and fused.PhotometricInterpretation == "RGB"
    require(find_dciodvfy() is not None, "dciodvfy is not installed (dicom3tools)")
    for kind in ("fused", "heatmap"):
        report = validate_file(instances[kind][0])
        assert report.ok, f"{kind}: {report.errors}"
