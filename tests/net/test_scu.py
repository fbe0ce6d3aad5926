"""send_files against the node's own StoreSCP and scripted pynetdicom SCPs on 127.0.0.1 (no external tools)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicomnode.audit.models import Instance
from dicomnode.config import Destination
from dicomnode.net import scu
from dicomnode.net.scu import SendFailed, send_files

from tests.net.conftest import free_port, make_ct
from tests.net.scripted_scp import ScriptedSCP


def write_series(folder: Path, count: int, **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = "1.2.826.0.1.3680043.8.498.1"
    paths = []
    for i in range(1, count + 1):
        ds = make_ct(series_uid=series_uid, study_uid="1.2.826.0.1.3680043.8.498.2", index=i, **kwargs)
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dest_for(node, name: str = "pacs") -> Destination:
    return Destination(name=name, ae_title=node.config.node.ae_title, host="127.0.0.1", port=node.port)


def test_send_files_delivers_all(node, tmp_path):
    files = write_series(tmp_path / "out", 4)
    report = send_files(dest_for(node), files, calling_ae="SENDER", timeout_s=10)
    assert report.sent == 4 and set(report.statuses.values()) == {0}
    with node.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4


def test_send_files_raises_on_failure_status(node, tmp_path):
    files = write_series(tmp_path / "out", 2)
    from pydicom import dcmread

    broken = dcmread(files[1])
    del broken.PixelData
    broken.save_as(files[1])
    with pytest.raises(SendFailed, match="0xA900"):
        send_files(dest_for(node), files, calling_ae="SENDER", timeout_s=10)


def test_send_files_raises_when_no_peer(tmp_path):
    files = write_series(tmp_path / "out", 1)
    with pytest.raises(SendFailed, match="unreachable"):
        send_files(Destination(name="x", ae_title="NOBODY", host="127.0.0.1", port=free_port()), files, calling_ae="S", timeout_s=3)


def scripted_dest(peer: ScriptedSCP) -> Destination:
    return Destination(name="peer", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port)


def test_send_files_counts_warning_statuses_as_stored(tmp_path):
    """0xB000/0xB006/0xB007 mean the peer stored the instance (PS3.4 B.2.3): delivered, not retried."""
    files = write_series(tmp_path / "out", 4)
    answers = [0xB000, 0xB006, 0xB007, 0x0000]
    seen: list[tuple[int, int]] = []
    with ScriptedSCP(lambda n, uid: answers[n]) as peer:
        report = send_files(scripted_dest(peer), files, calling_ae="SENDER", timeout_s=10,
                            on_stored=lambda index, uid, status: seen.append((index, status)))
    assert report.sent == 4 and list(report.statuses.values()) == answers
    assert seen == list(enumerate(answers))
    assert sorted(peer.counts().values()) == [1, 1, 1, 1]


def test_every_warning_status_counts_as_stored(tmp_path):
    """Warnings beyond the three storage ones (PS3.7 C: 0x0001, 0x0107, 0x0116, 0xBxxx) mean stored too."""
    files = write_series(tmp_path / "out", 4)
    answers = [0x0001, 0x0107, 0x0116, 0xB0FF]
    with ScriptedSCP(lambda n, uid: answers[n]) as peer:
        report = send_files(scripted_dest(peer), files, calling_ae="SENDER", timeout_s=10)
    assert report.sent == 4 and list(report.statuses.values()) == answers and report.skipped == ()
    assert sorted(peer.counts().values()) == [1, 1, 1, 1]


@pytest.mark.parametrize("status", [0xA700, 0xA900, 0xC000])
def test_send_files_stops_at_a_failure_status(tmp_path, status):
    """A failure status is not delivered: the send fails there and nothing after it is sent."""
    files = write_series(tmp_path / "out", 4)
    seen: list[int] = []
    with ScriptedSCP(lambda n, uid: status if n == 1 else 0x0000) as peer:
        with pytest.raises(SendFailed, match=rf"0x{status:04X} \(Failure: [^)]+\) for 002.dcm"):
            send_files(scripted_dest(peer), files, calling_ae="SENDER", timeout_s=10,
                       on_stored=lambda index, uid, s: seen.append(index))
    assert seen == [0] and peer.requests == 2 and len(peer.stored) == 1


def test_send_files_response_wait_is_not_the_connect_timeout(tmp_path):
    """A peer slower to answer than the connect timeout still gets the whole series once."""
    files = write_series(tmp_path / "out", 3)
    with ScriptedSCP(lambda n, uid: (time.sleep(6), 0x0000)[1] if n == 1 else 0x0000) as peer:
        report = send_files(scripted_dest(peer), files, calling_ae="SENDER", timeout_s=3, response_timeout_s=30)
    assert report.sent == 3 and sorted(peer.counts().values()) == [1, 1, 1]


class LateReactor(threading.Event):
    """pynetdicom's reactor checkpoint, with the reactor thread descheduled (as under CPU load)
    after it passes the checkpoint until a response is on the DIMSE queue."""

    def __init__(self, assoc):
        super().__init__()
        self.set()
        self.assoc = assoc

    def wait(self, timeout=None):
        passed = super().wait(timeout)
        if threading.current_thread() is self.assoc:  # the reactor runs on the association's thread
            deadline = time.monotonic() + 0.5
            while not self.assoc.dimse.msg_queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.0002)
        return passed


def _late_reactor(monkeypatch, keep_responses: bool) -> None:
    original = scu._keep_responses_for_the_sender

    def install(assoc):
        assoc._reactor_checkpoint = LateReactor(assoc)
        if keep_responses:
            original(assoc)

    monkeypatch.setattr(scu, "_keep_responses_for_the_sender", install)


def test_a_response_the_reactor_takes_still_reaches_the_sender(tmp_path, monkeypatch):
    """Issue 16 item 5: under load pynetdicom's reactor took C-STORE responses; the send timed out and resent."""
    files = write_series(tmp_path / "out", 10)
    _late_reactor(monkeypatch, keep_responses=True)
    with ScriptedSCP(lambda n, uid: (time.sleep(0.02), 0x0000)[1]) as peer:
        report = send_files(scripted_dest(peer), files, calling_ae="SENDER", timeout_s=5)
    assert report.sent == 10 and peer.requests == 10 and sorted(peer.counts().values()) == [1] * 10


def test_pynetdicom_still_drops_responses_without_the_workaround(tmp_path, monkeypatch, caplog):
    """The library race itself: when this fails after a pynetdicom upgrade, the workaround can go."""
    files = write_series(tmp_path / "out", 10)
    _late_reactor(monkeypatch, keep_responses=False)
    with ScriptedSCP(lambda n, uid: (time.sleep(0.02), 0x0000)[1]) as peer:
        with pytest.raises(SendFailed, match="no C-STORE response"):
            send_files(scripted_dest(peer), files, calling_ae="SENDER", timeout_s=3)
    assert "Received unexpected C-STORE service message" in caplog.text
    assert len(peer.stored) == peer.requests  # the peer stored the instance whose answer was dropped


def test_a_large_file_is_sent_from_disk_not_decoded_whole(tmp_path):
    """A whole-body Parametric Map is hundreds of MB: it was decoded and encoded whole to be sent (three
    times its size traced); now pynetdicom reads it from its file a PDU at a time. What stays is the
    P-DATA pynetdicom queues ahead of the socket (it does not wait for the socket), under the file's size."""
    import tracemalloc

    import numpy as np
    from pydicom import dcmread

    from tests.conftest import require_tool
    from tests.e2e.dcmtk_peers import StoreSCPPeer

    storescp = require_tool("storescp")
    (path,) = write_series(tmp_path / "out", 1)
    ds = dcmread(path)
    pixels = np.random.default_rng(0).integers(0, 4000, (96, 256, 256), dtype=np.uint16)  # 12 MiB of frames
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = 96, pixels.shape[1:]
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    with StoreSCPPeer(storescp, tmp_path / "peer") as peer:
        dest = Destination(name="peer", ae_title=peer.ae_title, host="127.0.0.1", port=peer.port)
        send_files(dest, [path], calling_ae="TEST", timeout_s=10)  # imports and first-use caches
        tracemalloc.start()
        try:
            report = send_files(dest, [path], calling_ae="TEST", timeout_s=10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        received = peer.files()
    assert report.sent == 1 and len(received) == 2
    assert dcmread(received[-1]).PixelData == pixels.tobytes()
    assert peak < pixels.nbytes, f"{peak / 2**20:.1f} MiB traced while sending {pixels.nbytes / 2**20:.0f} MiB"
