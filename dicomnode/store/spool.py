"""The spool: received instances, quarantined input and outgoing series as files, written atomically.

Layout under ``root``::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    quarantine/<YYYYMMDD>/<uuid>.dcm  +  <uuid>.reason.txt
    outbox/<job_id>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Every write goes to a temporary file in the target directory, is flushed and fsynced, renamed over
the final name and the directory is fsynced, so a crash leaves either the whole file or none.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

from pydicom import Dataset

# UIDs are digits and dots; anything else (a broken sender) is replaced so a value can never
# escape its directory.
_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
_TMP_PREFIX = ".tmp-"


class SpoolError(OSError):
    """A spool file could not be written (disk full, permissions): the node is out of resources."""


def safe_name(uid: str) -> str:
    """A UID as a file-name component: unsafe characters replaced, never empty or dot-only."""
    name = _UNSAFE.sub("_", uid.strip())[:128]
    return name if name.strip(".") else "_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdirs(path: Path) -> None:
    """Create ``path`` and fsync each new directory's parent so the new entries are durable."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # another association thread made it first
        _fsync_dir(directory.parent)


def atomic_write(path: Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` so readers see all of it or nothing, durable when this returns."""
    path = Path(path)
    try:
        _mkdirs(path.parent)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise SpoolError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


@dataclass(frozen=True)
class PurgeReport:
    files: int
    bytes: int


class Spool:
    """Files of the node under one root directory (see the module docstring for the layout)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.quarantine_dir = self.root / "quarantine"
        self.outbox = self.root / "outbox"
        for directory in (self.incoming, self.quarantine_dir, self.outbox):
            _mkdirs(directory)

    def incoming_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where a received instance lives (whether or not it exists yet)."""
        return self.incoming / safe_name(study_uid) / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"

    def write_incoming(self, data: bytes | memoryview, *, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Store one received instance (a complete Part 10 file as bytes) atomically; returns its path."""
        return atomic_write(self.incoming_path(study_uid, series_uid, sop_uid), data)

    def quarantine(self, raw: bytes | memoryview, reason: str) -> Path:
        """Keep refused input for inspection: ``<uuid>.dcm`` with ``<uuid>.reason.txt`` beside it."""
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        name = uuid.uuid4().hex
        target = self.quarantine_dir / day / f"{name}.dcm"
        atomic_write(target.with_name(f"{name}.reason.txt"), (reason.rstrip("\n") + "\n").encode())
        return atomic_write(target, raw)

    def outbox_dir(self, job_id: int, series_uid: str) -> Path:
        """The (created) folder for one output series of one job."""
        path = self.outbox / str(int(job_id)) / safe_name(series_uid)
        _mkdirs(path)
        return path

    def write_dataset(self, ds: Dataset, path: Path) -> Path:
        """Encode ``ds`` as a Part 10 file (with file meta) and write it atomically to ``path``."""
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return atomic_write(Path(path), buffer.getbuffer())

    def purge_older_than(self, days: float, now: float | None = None) -> PurgeReport:
        """Delete spool files last modified more than ``days`` ago, then empty folders; 0 = keep all.

        The caller decides which areas are safe to purge (retention counts from the end of a job;
        files of a job still running are younger than any sensible retention).
        """
        if days <= 0:
            return PurgeReport(0, 0)
        cutoff = (time.time() if now is None else now) - days * 86400.0
        files = size = 0
        for area in (self.incoming, self.quarantine_dir, self.outbox):
            emptied: set[Path] = set()
            for path in sorted(area.rglob("*"), reverse=True):  # children before their folder
                try:
                    if path.is_file():
                        if path.stat().st_mtime < cutoff:
                            size += path.stat().st_size
                            path.unlink()
                            files += 1
                            emptied.add(path.parent)
                    elif (path in emptied or path.stat().st_mtime < cutoff) and not any(path.iterdir()):
                        # A fresh empty folder is left alone: a writer may be about to use it.
                        path.rmdir()
                        emptied.add(path.parent)
                except FileNotFoundError:
                    continue
        return PurgeReport(files, size)

    def remove_tree(self, path: Path) -> None:
        """Remove a folder inside the spool (e.g. a finished job's outbox)."""
        path = Path(path).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"{path} is outside the spool")
        shutil.rmtree(path, ignore_errors=True)
