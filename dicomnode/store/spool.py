"""The spool: received instances, quarantined input and outgoing series as files, written atomically.

Layout under ``root``::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    quarantine/<YYYYMMDD>/<uuid>.dcm  +  <uuid>.reason.txt
    outbox/<job_id>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Every write goes to a temporary file in the target directory, is flushed and fsynced, renamed over
the final name and the directory is fsynced, so a crash leaves either the whole file or none.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset

# UIDs are digits and dots; anything else (a broken sender) is escaped so a value can never
# escape its directory, and two values never share a file.
_PLAIN = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.-")
_MAX_NAME = 128
_TMP_PREFIX = ".tmp-"

Chunks = bytes | memoryview | Sequence[bytes | memoryview]


class SpoolError(OSError):
    """A spool file could not be written (disk full, permissions): the node is out of resources."""


def safe_name(uid: str) -> str:
    """A UID as one file-name component; injective (distinct UIDs never share a name).

    Characters other than letters, digits, ``.`` and ``-`` (and a leading ``.``, which would hide
    the file or clash with ``.tmp-``) become ``_XX`` per UTF-8 byte; ``_`` itself is escaped, so
    ``1.2/3`` and ``1.2_3`` stay apart. Names over 128 characters keep a prefix and a SHA-256
    after ``~``, which escaping never produces.
    """
    name = "".join(
        c if c in _PLAIN and not (i == 0 and c == ".") else "".join(f"_{b:02X}" for b in c.encode())
        for i, c in enumerate(uid)
    )
    if not name:
        return "_"  # escaping never yields a lone underscore
    if len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 65]}~{hashlib.sha256(uid.encode()).hexdigest()}"
    return name


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


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    # Explicit VR little endian; OB has a 4-byte length after two reserved bytes (PS3.5 7.1.2).
    if vr == b"OB":
        return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _even(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, implementation_uid: str, implementation_version: str
) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for a data set encoded as received.

    Encoded by hand because this runs once per received instance and pydicom's general writer
    costs about as much as the rest of the receive path's Python work.
    """
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _even(sop_class_uid, b"\0")),
            _element(0x00020003, b"UI", _even(sop_instance_uid, b"\0")),
            _element(0x00020010, b"UI", _even(transfer_syntax_uid, b"\0")),
            _element(0x00020012, b"UI", _even(implementation_uid, b"\0")),
            _element(0x00020013, b"SH", _even(implementation_version, b" ")),
        )
    )
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<L", len(body))) + body


def _write_all(fd: int, data: Chunks) -> None:
    views = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else [memoryview(c) for c in data]
    for view in views:
        while view:
            written = os.write(fd, view)
            view = view[written:]


def atomic_write(path: Path, data: Chunks | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` to ``path`` atomically: bytes, a sequence of chunks written in order, or a
    function that writes to the open file (an encoder streaming a large object, never held whole).

    Readers see all of it or nothing; it is durable when this returns.
    """
    path = Path(path)
    try:
        _mkdirs(path.parent)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            try:
                if callable(data):
                    with os.fdopen(fd, "wb", closefd=False) as out:
                        data(out)
                else:
                    _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:  # a failed write or encoder leaves no partial file behind
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


@dataclass(frozen=True)
class LeftoverReport:
    """What ``clean_leftovers`` removed: temporary files, and files of outbox folders no job needs."""

    tmp_files: int
    outbox_files: int


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

    def write_incoming(self, data: Chunks, *, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Store one received instance (a complete Part 10 file, whole or in chunks) atomically; returns its path."""
        return atomic_write(self.incoming_path(study_uid, series_uid, sop_uid), data)

    def quarantine(self, raw: Chunks, reason: str) -> Path:
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
        # Encoded straight into the file: a whole-body Parametric Map is not held a second time.
        return atomic_write(Path(path), lambda out: ds.save_as(out, enforce_file_format=True))

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

    def clean_leftovers(self, keep_jobs: set[int], tmp_older_than_s: float = 0.0) -> LeftoverReport:
        """Remove what a killed process left behind; call before anything writes to the spool.

        ``.tmp-`` files are writes that never reached their rename (only those older than
        ``tmp_older_than_s``: another process may be writing a younger one). An outbox folder whose
        job is not in ``keep_jobs`` (the jobs whose outputs are still wanted) holds a half-written
        run: the job is processed again from its inputs.
        """
        tmp_files = 0
        cutoff = time.time() - tmp_older_than_s
        for path in self.root.rglob(f"{_TMP_PREFIX}*"):
            if path.is_file() and (tmp_older_than_s <= 0 or path.stat().st_mtime < cutoff):
                path.unlink(missing_ok=True)
                tmp_files += 1
        outbox_files = 0
        for folder in self.outbox.iterdir():
            if folder.is_dir() and not (folder.name.isdigit() and int(folder.name) in keep_jobs):
                outbox_files += sum(1 for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        return LeftoverReport(tmp_files, outbox_files)

    def remove_tree(self, path: Path) -> None:
        """Remove a folder inside the spool (e.g. a finished job's outbox)."""
        path = Path(path).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"{path} is outside the spool")
        shutil.rmtree(path, ignore_errors=True)
