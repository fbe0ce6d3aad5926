"""Leftovers of a killed node (kill -9 mid-write): removed at start, counted in one log line."""

from __future__ import annotations

import logging
import os
import time

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import free_port
from dicomnode.config import load_config
from dicomnode.node import Node
from dicomnode.store.spool import Spool


def test_start_removes_temporary_files_and_stale_outbox(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spool = Spool(tmp_path / "spool")
    kept = spool.write_incoming(b"instance", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4")
    leftovers = [
        kept.parent / ".tmp-0123abcd",  # a receive cut before its rename
        spool.quarantine_dir / "20260101" / ".tmp-feedbeef",
        spool.outbox / "7" / "1.2.9" / ".tmp-cafe",
    ]
    stale = [spool.outbox / "7" / "1.2.9" / "1.dcm", spool.outbox / "7" / "1.2.9" / "2.dcm"]  # job 7 does not exist
    an_hour_ago = time.time() - 3600
    for path in leftovers + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        os.utime(path, (an_hour_ago, an_hour_ago))
    # A worker process sharing the spool may be writing right now: a young temporary file stays.
    young = kept.parent / ".tmp-5eedf00d"
    young.write_bytes(b"being written")
    port = free_port()
    cfg = load_config(overrides={
        "node": {"port": port},
        "storage": {"spool_dir": str(spool.root), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
    })
    node = Node(cfg, process=lambda inputs: None)
    node.start()
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        node.stop()
    assert kept.read_bytes() == b"instance" and young.exists()
    assert not any(p.exists() for p in leftovers + stale) and not (spool.outbox / "7").exists()
    lines = [r.getMessage() for r in caplog.records if "event=spool_leftovers_removed" in r.getMessage()]
    # The outbox .tmp- file is counted as a temporary file, the two finished ones as outbox files.
    assert lines == ["event=spool_leftovers_removed tmp_files=3 outbox_files=2"]


def test_outbox_of_jobs_still_wanted_is_kept(tmp_path):
    spool = Spool(tmp_path)
    wanted = spool.outbox_dir(5, "1.2.5") / "1.dcm"
    unwanted = spool.outbox_dir(6, "1.2.6") / "1.dcm"
    for path in (wanted, unwanted):
        path.write_bytes(b"x")
    report = spool.clean_leftovers(keep_jobs={5})
    assert (report.tmp_files, report.outbox_files) == (0, 1)
    assert wanted.exists() and not unwanted.parent.exists()
