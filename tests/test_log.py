"""One line per event: key=value with quoting, or JSON."""

from __future__ import annotations

import json
import logging

from dicomnode.config import LoggingConfig, load_config
from dicomnode.log import event, format_fields, setup_logging


def test_format_quotes_values_with_spaces():
    line = format_fields("stored", {"series": "1.2.3", "reason": 'no pixel "data"', "n": 3, "ok": True, "empty": ""})
    assert line == 'event=stored series=1.2.3 reason="no pixel \\"data\\"" n=3 ok=true empty=""'


def test_kv_and_json_output(capsys):
    logger = logging.getLogger("dicomnode.test_log")
    setup_logging(LoggingConfig(level="INFO", format="kv"))
    event(logger, "instance_rejected", logging.WARNING, status="0xA900", reason="no pixel data")
    event(logger, "hidden", logging.DEBUG, x=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    ts, level, name, rest = err[0].split(" ", 3)
    assert ts.endswith("Z") and level == "WARNING" and name == "dicomnode.test_log"
    assert rest == 'event=instance_rejected status=0xA900 reason="no pixel data"'

    setup_logging(LoggingConfig(level="DEBUG", format="json"))
    event(logger, "stored", size=12, series="1.2")
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1
    record = json.loads(line[0])
    assert record["event"] == "stored" and record["size"] == 12 and record["level"] == "INFO"
    setup_logging(LoggingConfig())
    assert sum(h.get_name() == "dicomnode-stderr" for h in logging.getLogger().handlers) == 1


def test_pydicom_vr_warnings_stay_quiet_even_when_pydicom_is_imported_later():
    # A fresh interpreter: pydicom's first import resets its logger level, which must not undo ours.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dicomnode.config import LoggingConfig\n"
        "from dicomnode.log import setup_logging\n"
        "assert 'pydicom' not in sys.modules\n"
        "setup_logging(LoggingConfig(level='INFO'))\n"
        "from pydicom.dataset import Dataset\n"
        "ds = Dataset()\n"
        "ds.StudyID = 'X' * 18\n"
        "print('set', ds.StudyID)\n"
    )
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "set " + "X" * 18
    assert "exceeds the maximum length" not in run.stderr


def test_highdicom_narration_is_debug_only():
    # A real output build (fresh interpreter): at INFO its "copy ...-related attributes" lines are
    # gone; at DEBUG they are shown, so the check would see them if the demotion were missing.
    import subprocess
    import sys

    code = (
        "import sys, tempfile, numpy as np\n"
        "from pathlib import Path\n"
        "from dicomnode.config import LoggingConfig\n"
        "from dicomnode.log import setup_logging\n"
        "from dicomnode.dicomio.parametric_map import build_parametric_map\n"
        "from dicomnode.imaging.volume import load_series\n"
        "from dicomnode.testing.study import write_synthetic_study\n"
        "setup_logging(LoggingConfig(level=sys.argv[1]))\n"
        "files = write_synthetic_study(Path(tempfile.mkdtemp()), modalities=('CT',), shape=(4, 16, 16))['CT']\n"
        "ct = load_series(files)\n"
        "build_parametric_map(ct, np.zeros((4, 16, 16)), quantity='contribution', series_number=9002,\n"
        "                     series_description='test', sources=[ct])\n"
        "print('built')\n"
    )
    runs = {level: subprocess.run([sys.executable, "-c", code, level], capture_output=True, text=True, timeout=120)
            for level in ("INFO", "DEBUG")}
    for run in runs.values():
        assert run.returncode == 0 and run.stdout.strip() == "built", run.stderr
    assert "highdicom" in runs["DEBUG"].stderr and "attributes" in runs["DEBUG"].stderr
    assert "highdicom" not in runs["INFO"].stderr


def test_admin_guide_log_lines_are_lines_the_node_writes():
    # Each example line names the module that logs it and an event that module emits; instances
    # are logged at DEBUG only, so an INFO instance_stored line would be a made-up example.
    import re

    from tests.conftest import REPO

    guide = (REPO / "docs" / "admin-guide.md").read_text()
    block = guide.split("## Run and observe", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) >= 10
    for line in lines:
        ts, level, logger_name, message = line.split(" ", 3)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts) and level in ("INFO", "WARNING", "ERROR")
        name = re.match(r"event=(\w+)", message).group(1)
        source = (REPO / (logger_name.replace(".", "/") + ".py")).read_text()
        assert f'"event={name} ' in source or f'"{name}"' in source, line
        assert name != "instance_stored", line


def test_every_event_goes_through_the_one_helper():
    # A hand-written "event=..." message has no structured fields, so JSON lines would lose them.
    import re

    from tests.conftest import REPO

    written = []
    for path in sorted((REPO / "dicomnode").rglob("*.py")):
        if path.name == "log.py" and path.parent.name == "dicomnode":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["']event=""", line):
                written.append(f"{path.relative_to(REPO)}:{number}")
    assert written == []


def test_an_event_with_its_exception_keeps_fields_and_traceback_in_both_formats(capsys):
    logger = logging.getLogger("dicomnode.test.exc")
    for fmt in ("kv", "json"):
        setup_logging(LoggingConfig(format=fmt, level="INFO"))
        try:
            raise OSError("disk gone")
        except OSError:
            event(logger, "send_worker_error", logging.ERROR, exc_info=True, destination="pacs")
        line = capsys.readouterr().err.strip().splitlines()
        assert len(line) == 1, line  # one line per event, traceback folded in
        if fmt == "json":
            record = json.loads(line[0])
            assert record["event"] == "send_worker_error" and record["destination"] == "pacs"
            assert "OSError: disk gone" in record["exc"]
        else:
            assert "event=send_worker_error destination=pacs exc=" in line[0] and "OSError: disk gone" in line[0]
    setup_logging(LoggingConfig())


def test_timer_overlap_is_not_a_warning(tmp_path, caplog):
    """A completion check still running when the next is due is skipped by design: DEBUG, not WARNING."""
    import time

    from dicomnode.node import Node
    from tests.conftest import free_port

    class SlowCheckNode(Node):
        def check_completion(self):
            time.sleep(0.3)  # a busy machine: each run outlasts the 0.05 s interval
            return super().check_completion()

    cfg = load_config(overrides={
        "node": {"port": free_port()},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'a.db'}"},
        "completion": {"check_interval_s": 0.05},
    })
    caplog.set_level(logging.DEBUG)  # the demoted lines are kept (and seen here) only when DEBUG is on
    node = SlowCheckNode(cfg, process=lambda inputs: None)
    node.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                "maximum number of running instances" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    finally:
        node.stop()
    overlaps = [r for r in caplog.records if "maximum number of running instances" in r.getMessage()]
    assert overlaps, "the slow check never overlapped: the test did not exercise anything"
    assert {r.levelno for r in overlaps} == {logging.DEBUG}
