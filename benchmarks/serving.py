"""What the benchmarks that drive the node as deployed share: ports, DCMTK peers, ``dicomnode serve``.

Imported by the scripts beside it (``python benchmarks/NAME.py`` puts this folder on the path).
DCMTK's tools get ``TCP_NODELAY=1``: with Nagle's algorithm on they send ~20 instances/s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TCP_NODELAY="1")


def node_config(folder: Path, port: int, peer_port: int, method: str, moving: tuple[str, ...] = ("PT",),
                extra: str = "") -> Path:
    """``folder``/dicomnode.toml for a node on ``port`` that fuses each ``moving`` modality onto CT with
    ``method`` and sends the outputs to a peer ``PEER`` on ``peer_port``: SQLite audit and spool in
    ``folder``, stable age 3 s, warnings only in the log. ``extra``: more TOML sections."""
    pairing = "".join(f'\n[[pairing]]\nfixed = "CT"\nmoving = "{m}"\ndestinations = ["peer"]\n' for m in moving)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dicomnode.toml"
    path.write_text(f"""
[node]
ae_title = "DICOMNODE"
host = "127.0.0.1"
port = {port}

[storage]
spool_dir = "{folder / 'spool'}"
database_url = "sqlite:///{folder / 'audit.db'}"

[completion]
stable_age_s = 3.0
check_interval_s = 0.5

[[destinations]]
name = "peer"
ae_title = "PEER"
host = "127.0.0.1"
port = {peer_port}
{pairing}
[fusion]
default_method = "{method}"

[logging]
level = "WARNING"
{extra}""")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.2):
    """``condition()``'s first true value, polled every ``every_s``; SystemExit naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise SystemExit(f"timed out after {timeout_s:g} s: {what}")


def wait_port(port: int, proc: subprocess.Popen | None = None, what: str = "listener", timeout_s: float = 60.0) -> None:
    """Until something accepts on 127.0.0.1:``port``; RuntimeError if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s:g} s")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_bytes(pid: int) -> int:
    """The process's own peak resident set so far (VmHWM).

    Not ``ru_maxrss``: a child started by vfork + exec (Python's subprocess) inherits its
    parent's high-water mark there, so a parent that once held 5 GB makes every child "peak" at 5 GB.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def wait_idle(pid: int, timeout: float = 120.0) -> None:
    """Until the process stops using CPU (the node's start-up imports and warm-up are done)."""
    deadline = time.monotonic() + timeout
    last = process_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = process_cpu_s(pid)
        if now - last < 0.05:
            return
        last = now


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def dicomnode_serve(config: Path, port: int, log: Path | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """``dicomnode serve --config CONFIG`` in its own process, listening on ``port``; stopped on leaving."""
    env = dict(ENV, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config", str(config)], cwd=cwd, env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, "dicomnode serve", timeout_s=120.0)
        yield proc
    finally:
        _stop(proc)
        if log is not None:
            out.close()


@contextmanager
def storescp(folder: Path, port: int, ae_title: str = "PEER", extra: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """A DCMTK storescp peer writing what it receives to ``folder``; stopped on leaving."""
    tool = shutil.which("storescp")
    if tool is None:
        raise SystemExit("DCMTK storescp is needed (make install installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([tool, "--aetitle", ae_title, "--output-directory", str(folder), *extra, str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "storescp")
        yield proc
    finally:
        _stop(proc, 10.0)


def storescu(files: list[Path], port: int, called: str, calling: str = "MODALITY", associations: int = 1,
             max_pdu: int | None = None) -> float:
    """Seconds until ``associations`` concurrent DCMTK storescu processes have sent all ``files`` between them."""
    tool = shutil.which("storescu")
    if tool is None:
        raise SystemExit("DCMTK storescu is needed (make install installs it)")
    share = -(-len(files) // associations)
    chunks = [files[i : i + share] for i in range(0, len(files), share)]
    pdu = ["--max-pdu", str(max_pdu)] if max_pdu else []
    cmds = [[tool, "-aet", calling, "-aec", called, *pdu, "127.0.0.1", str(port), *map(str, c)] for c in chunks]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - start
    failed = [e for p, e in zip(procs, errors) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-1000:]}")
    return seconds
