"""The node's commands: serve until SIGTERM, fail fast on unusable fusion settings, check-config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import REPO, free_port
from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.node import Node, StartupError


def write_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nport = {port}\n\n[storage]\nspool_dir = "{tmp_path / "spool"}"\n'
        f'database_url = "sqlite:///{tmp_path / "audit.db"}"\n\n[logging]\nlevel = "INFO"\n{extra}'
    )
    return path


def echo(port: int) -> int | None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo().Status
    assoc.release()
    return status


def test_serve_answers_echo_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config", str(config)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        status = None
        while status is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                status = echo(port)
            except (OSError, RuntimeError):
                status = None
            if status is None:
                time.sleep(0.3)
        assert status == 0x0000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "event=node_started" in log and "event=signal signal=SIGTERM" in log and "event=node_stopped" in log
    assert (tmp_path / "audit.db").exists()


def test_missing_network_weights_fail_fast(tmp_path):
    cfg = load_config(overrides={
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
        "fusion": {"default_method": "network", "weights": str(tmp_path / "absent.pt")},
    })
    with pytest.raises(StartupError, match="fusion method 'network' cannot run"):
        Node(cfg)


def test_unknown_rule_method_fails_fast(tmp_path):
    cfg = load_config(overrides={
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
        "pairing": [{"fixed": "CT", "moving": "PT", "method": "no-such-method"}],
    })
    with pytest.raises(StartupError, match="no-such-method"):
        Node(cfg)


def test_serve_reports_config_problems_with_key_paths(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[completion]\nstable_age_s = -1\n[[destinations]]\nname = "x"\n')
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "completion.stable_age_s" in err and "destinations.0.ae_title" in err


def test_check_config_prints_summary(tmp_path, capsys):
    config = write_config(tmp_path, 11112, '\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.2"\nport = 104\n')
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and "destinations: pacs=PACS@10.0.0.2:104" in out and "rule PT->CT" in out


def test_port_in_use_is_a_clear_startup_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = load_config(overrides={
            "node": {"port": port},
            "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
        })
        node = Node(cfg, process=lambda inputs: None)
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            node.start()
        node.db.close()


def test_spool_retention_purges_old_files_only(tmp_path):
    cfg = load_config(overrides={
        "node": {"port": free_port()},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
        "retention": {"spool_days": 7},
    })
    node = Node(cfg, process=lambda inputs: None)
    old = node.spool.outbox / "1" / "old.dcm"
    new = node.spool.outbox / "2" / "new.dcm"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    eight_days_ago = time.time() - 8 * 86400
    os.utime(old, (eight_days_ago, eight_days_ago))
    node.purge_spool()
    node.db.close()
    assert not old.exists() and new.exists()


def test_audit_retention_deletes_old_finished_jobs(tmp_path, caplog):
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import select

    from dicomnode.audit.models import Job, JobState

    cfg = load_config(overrides={
        "node": {"port": free_port()},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
        "retention": {"audit_days": 30},
    })
    node = Node(cfg, process=lambda inputs: None)
    long_ago = datetime.now(timezone.utc) - timedelta(days=31)
    with node.db.session() as s:
        for state, at in ((JobState.done, long_ago), (JobState.processing, long_ago),
                          (JobState.done, datetime.now(timezone.utc))):
            s.add(Job(rule="r", fixed_series_uid=f"1.{len(s.new)}", moving_series_uid="2", study_uid="3",
                      method="alpha", state=state, updated_at=at))
    with caplog.at_level("INFO", logger="dicomnode.node"):
        node.apply_retention()
    with node.db.session() as s:
        left = sorted(state.value for state in s.scalars(select(Job.state)))
    node.db.close()
    assert left == ["done", "processing"]
    assert "event=audit_purge days=30 jobs=1" in caplog.text


def test_relative_spool_dir_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides={"storage": {"spool_dir": "var/spool", "database_url": "sqlite:///var/a.db"}})
    node = Node(cfg, process=lambda inputs: None)
    node.db.close()
    assert node.spool.root == tmp_path / "var" / "spool" and node.spool.root.is_absolute()


def test_retention_runs_at_the_configured_interval(tmp_path):
    # retention.every_h (default 6): the purge timer of a started node uses it.
    config = load_config(write_config(tmp_path, free_port()), {"retention": {"every_h": 0.5}})
    with Node(config) as node:
        trigger = node._scheduler.get_job("retention").trigger
        assert trigger.interval.total_seconds() == 0.5 * 3600
