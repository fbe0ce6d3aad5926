"""Check a DICOM object against its IOD with dicom3tools' ``dciodvfy``; errors and warnings apart."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode.log import event

log = logging.getLogger(__name__)


class ValidatorUnavailable(RuntimeError):
    """dciodvfy is not installed (Debian/Ubuntu package: dicom3tools)."""


@dataclass(frozen=True)
class IODReport:
    """What dciodvfy said about one object. ``errors`` empty means it conforms."""

    iod: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Lines that are neither (e.g. the IOD name, module notes), kept for diagnosis.
    other: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def find_dciodvfy() -> str | None:
    return shutil.which("dciodvfy")


def parse_dciodvfy_output(text: str) -> IODReport:
    """Split dciodvfy output into error and warning messages (prefix removed)."""
    errors, warnings, other = [], [], []
    iod = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("Error - "):
            errors.append(line[len("Error - "):])
        elif line.startswith("Warning - "):
            warnings.append(line[len("Warning - "):])
        elif line.startswith(("Error", "Fatal")):
            errors.append(line)
        elif line.startswith("Warning"):
            warnings.append(line)
        else:
            if not iod and not line.startswith("("):
                iod = line
            other.append(line)
    return IODReport(iod=iod, errors=errors, warnings=warnings, other=other)


def validate_file(path: Path, *, timeout_s: float = 60.0) -> IODReport:
    """Run dciodvfy on a Part 10 file."""
    exe = find_dciodvfy()
    if exe is None:
        raise ValidatorUnavailable("dciodvfy not found on PATH; install dicom3tools")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    report = parse_dciodvfy_output(proc.stdout + "\n" + proc.stderr)
    event(log, "iod_validated", logging.DEBUG, file=path.name, iod=report.iod, errors=len(report.errors),
          warnings=len(report.warnings))
    return report


def validate_dataset(ds: Dataset, *, timeout_s: float = 60.0) -> IODReport:
    """Write the dataset to a temporary Part 10 file and run dciodvfy on it."""
    with tempfile.TemporaryDirectory(prefix="dn-iod-") as tmp:
        path = Path(tmp) / "object.dcm"
        ds.save_as(path, enforce_file_format=True)
        return validate_file(path, timeout_s=timeout_s)
