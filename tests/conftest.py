"""Shared fixtures. Real data lives in ../shared/data beside the checkout (CI has it).

A test that needs an absent resource (shared data, a DCMTK tool, Orthanc, PostgreSQL) skips with
the reason on a user's clone; with DICOMNODE_REQUIRE_PEERS=1 (set by .ci/run) it fails instead,
so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DICOMNODE_SHARED_DATA", REPO.parent / "shared" / "data"))


def require(condition: bool, reason: str) -> None:
    """Skip (user's clone) or fail (CI) when a needed resource is missing."""
    if condition:
        return
    if os.environ.get("DICOMNODE_REQUIRE_PEERS"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    require(path is not None, f"{name} is not installed (make install installs it)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    require(SHARED_DATA.is_dir(), f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sts_dir(shared_data: Path) -> Path:
    """The real CT + PET + MR patient (one frame of reference)."""
    return shared_data / "dicom" / "sts" / "STS_002"


@pytest.fixture(scope="session")
def aanlib_dir(shared_data: Path) -> Path:
    return shared_data / "aanlib"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
