"""A non-editable install (``pip install .``, as a deployment does) runs with the default configuration.

The package is installed into a fresh venv without its dependencies (no torch download); those
come from the test's own environment on PYTHONPATH. The installed copy must be the one imported,
and ``dicomnode serve`` must find the shipped fusion weights away from the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def copy_sources(dest: Path) -> Path:
    """What ``pip install .`` reads, copied (links kept as links), so the build leaves the checkout clean."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dicomnode", "models"):
        shutil.copytree(REPO / name, dest / name, symlinks=True, ignore=skip)
    return dest


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def test_non_editable_install_serves_with_the_shipped_weights(tmp_path):
    src = copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    deps = os.pathsep.join(site.getsitepackages())  # the dependencies, torch included
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The test environment's pip and setuptools (on PYTHONPATH) build the wheel and install it into
    # the fresh venv; --no-deps: nothing is downloaded; --ignore-installed: the test environment's
    # own (editable) dicomnode is neither looked at nor uninstalled.
    build = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--ignore-installed", str(src)], timeout=300, capture_output=True, text=True,
                           env=dict(env, PYTHONPATH=deps, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert build.returncode == 0, build.stderr[-3000:]
    installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    weights = installed / "dicomnode" / "models" / "fusion_net.pt"
    assert weights.is_file() and not weights.is_symlink()
    assert weights.read_bytes() == (REPO / "models" / "fusion_net.pt").read_bytes()
    assert not (installed / "torch").exists()

    run = tmp_path / "run"  # not the source tree: relative defaults (spool, database) land here
    run.mkdir()
    env = dict(env, PYTHONPATH=deps, PYTHONUNBUFFERED="1")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import dicomnode; print(dicomnode.__file__)"],
                           cwd=run, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed)

    node_port, http_port = free_port(), free_port()
    # Only the ports differ from the defaults: the fusion method is the default network with its
    # default (relative) weights path.
    config = run / "node.toml"
    config.write_text(f"[node]\nport = {node_port}\n\n[http]\nenabled = true\nport = {http_port}\n")
    proc = subprocess.Popen([str(venv / "bin" / "dicomnode"), "serve", "--config", str(config)], cwd=run, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        status = None
        while status != 200 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            status = health(http_port)
            time.sleep(0.5)
        assert status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as reply:
            assert json.load(reply)["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "event=node_started" in log and "event=node_stopped" in log
    assert (run / "var" / "dicomnode.db").is_file()


def test_systemd_unit_paths_match_the_admin_guide_install_steps():
    unit = (REPO / "systemd" / "dicomnode.service").read_text()
    guide = (REPO / "docs" / "admin-guide.md").read_text()
    steps = guide.split("## Install", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    keys: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    program, *args = keys["ExecStart"][0].split()
    venv = program.rsplit("/bin/", 1)[0]
    assert program == f"{venv}/bin/dicomnode" and keys["ExecStartPre"][0].startswith(f"{program} check-config ")
    # The venv the unit runs is the one the steps create and install the package into (not editable).
    assert f"python3 -m venv {venv}\n" in steps and f"{venv}/bin/pip install '.[" in steps and " -e " not in steps
    config = args[args.index("--config") + 1]
    assert keys["ExecStartPre"][0].endswith(f" {config}") and f" {config}" in steps
    user, home = keys["User"][0], keys["WorkingDirectory"][0]
    assert f"useradd --system --home {home} {user}" in steps
    assert f"install -d -o {user} -g {keys['Group'][0]} {home}" in steps and keys["ReadWritePaths"] == [home]
    doc = keys["Documentation"][0].removeprefix("file://")
    assert f"docs/{Path(doc).name} {Path(doc).parent}/" in steps
