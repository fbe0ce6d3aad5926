"""A running StoreSCP on a free loopback port with its own spool and SQLite audit DB."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.conftest import free_port

from dicomnode.audit.db import AuditDB
from dicomnode.config import Config, load_config
from dicomnode.net.scp import StoreSCP
from dicomnode.store.spool import Spool


@dataclass
class Node:
    config: Config
    db: AuditDB
    spool: Spool
    scp: StoreSCP
    nudges: list[str] = field(default_factory=list)
    progress: list = field(default_factory=list)  # the SeriesProgress each nudge carried

    @property
    def port(self) -> int:
        return self.scp.port


def start_node(tmp_path: Path, db: AuditDB | None = None, **overrides) -> Node:
    """``db``: an open audit database (e.g. a PostgreSQL test schema); default SQLite in ``tmp_path``."""
    overrides.setdefault("node", {})
    overrides["node"] = {"port": free_port(), **overrides["node"]}
    config = load_config(None, overrides)
    db = db or AuditDB.open(f"sqlite:///{tmp_path / 'audit.db'}")
    spool = Spool(tmp_path / "spool")
    nudges: list[str] = []
    progress: list = []

    def nudge(series_uid, series_progress) -> None:
        nudges.append(series_uid)
        progress.append(series_progress)

    scp = StoreSCP(config, db, spool, on_instance=nudge)
    scp.start()
    return Node(config, db, spool, scp, nudges, progress)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    running = start_node(tmp_path)
    yield running
    running.scp.stop()
    running.db.close()


def make_ct(rows: int = 16, cols: int = 16, *, series_uid: str | None = None, study_uid: str | None = None, index: int = 1) -> Dataset:
    """A small valid CT Image Storage data set with int16 pixels (for tests that need no real data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "TEST001"
    ds.PatientName = "Test^Patient"
    ds.InstanceNumber = index
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = (np.arange(rows * cols, dtype=np.int16) % 2000 - 1000).tobytes()
    return ds
