"""``dicomnode send``: what the peer refuses is skipped, one line per file, and the exit code says so."""

from __future__ import annotations

import shutil
import subprocess
import sys

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import free_port
from dicomnode.testing.study import write_synthetic_study


def test_send_skips_refused_files_and_exits_non_zero(tmp_path, sts_dir):
    folder = tmp_path / "study"
    ct = write_synthetic_study(folder / "ct", modalities=("CT",), shape=(4, 16, 16))["CT"]
    rtstruct = folder / "rs.dcm"
    shutil.copy(sts_dir / "CT" / "dicom" / "mask" / "RS.dcm", rtstruct)
    refused_uid = str(dcmread(ct[1], stop_before_pixels=True).SOPInstanceUID)
    received: list[str] = []

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == refused_uid:
            return 0xA700  # this peer is out of resources for one instance
        received.append(uid)
        return 0x0000

    # A real peer that stores CT only: the RT Structure Set's context is rejected.
    peer = AE(ae_title="CTONLY")
    peer.add_supported_context(CTImageStorage)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dicomnode", "send", str(folder), "--port", str(port), "--ae", "CTONLY"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        server.shutdown()
    lines = done.stdout.splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert len(skipped) == 2
    assert any(str(rtstruct) in line and "RT Structure Set Storage" in line for line in skipped)
    assert any(str(ct[1]) in line and "0xA700" in line for line in skipped)
    assert f"sent {len(ct) - 1} instances to CTONLY@127.0.0.1:{port}" in done.stdout
    assert "2 files skipped" in lines[-1]
    assert len(received) == len(ct) - 1


def test_send_of_accepted_files_exits_zero(tmp_path):
    ct = write_synthetic_study(tmp_path / "ct", modalities=("CT",), shape=(2, 16, 16))["CT"]
    peer = AE(ae_title="CTONLY")
    peer.add_supported_context(CTImageStorage)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dicomnode", "send", str(tmp_path / "ct"), "--port", str(port), "--ae", "CTONLY"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith("skipped ")]
    assert f"sent {len(ct)} instances" in done.stdout
