"""Patient and study identity at receive, from a real SCU: a series never mixes patients or studies.

One SeriesInstanceUID whose later instances carry another patient, or that is reused in another
study, must not pull those instances into a fusion: they are refused with 0xA900, quarantined and
audited, the series is flagged, and a flagged series is never paired.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import select

from dicomnode.audit.models import Instance, Job, Rejection, Series, SeriesState
from dicomnode.config import load_config
from dicomnode.net.scp import StoreSCP
from dicomnode.node import Node
from dicomnode.store.spool import Spool
from tests.backends import BACKENDS, open_test_db
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.e2e

OTHER_ID, OTHER_NAME = "DN-H-CANARY", "Canary^Other"


def send(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    """C-STORE each data set over one association; the statuses in order."""
    ae = AE(ae_title="MODALITY1")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()



def other_patient(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = OTHER_ID, OTHER_NAME, "19991231"
    return ds


def test_second_half_of_a_series_from_another_patient_is_refused_and_never_fused(tmp_path, caplog):
    from dicomnode.testing.study import synthetic_datasets

    study = synthetic_datasets(modalities=("CT", "PT"), shape=(16, 32, 32), seed=3)
    ct, pt = study["CT"], study["PT"]
    half = len(ct) // 2
    ct = ct[:half] + [other_patient(ds) for ds in ct[half:]]
    processed: list[int] = []
    port = free_port()
    cfg = load_config(overrides={
        "node": {"port": port},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "completion": {"stable_age_s": 1.0, "check_interval_s": 0.25},
        "destinations": [{"name": "back", "ae_title": "MODALITY1", "host": "127.0.0.1", "port": free_port()}],
    })
    node = Node(cfg, process=lambda inputs: processed.append(inputs.job_id))
    node.start()
    try:
        with caplog.at_level(logging.INFO):
            statuses = send(port, ct + pt)
            assert statuses[:half] == [0x0000] * half
            assert statuses[half:len(ct)] == [0xA900] * (len(ct) - half)
            assert statuses[len(ct):] == [0x0000] * len(pt)

            def settled():
                with node.db.session() as s:
                    done = {r.state for r in s.scalars(select(Series))} == {SeriesState.complete}
                    refused = s.scalars(select(Rejection).where(Rejection.status.is_(None))).all()
                return done and refused

            (refusal,) = wait_for(settled)
            time.sleep(1.0)  # a job, if one were wrongly made, would be queued by now
        assert "identity conflict" in refusal.reason and "pairing refused" in refusal.reason
        with node.db.session() as s:
            ct_row = s.scalars(select(Series).where(Series.modality == "CT")).one()
            assert ct_row.identity_conflict and "PatientID" in ct_row.identity_conflict
            assert "PatientName" in ct_row.identity_conflict and "PatientBirthDate" in ct_row.identity_conflict
            assert OTHER_ID not in ct_row.identity_conflict and "Canary" not in ct_row.identity_conflict
            assert ct_row.received_count == half == s.query(Instance).filter(Instance.series_id == ct_row.id).count()
            refused = s.scalars(select(Rejection).where(Rejection.status == 0xA900)).all()
            assert sorted(r.sop_instance_uid for r in refused) == sorted(str(ds.SOPInstanceUID) for ds in ct[half:])
            for row in refused:  # quarantined with the reason beside the bytes
                assert Path(row.quarantine_path).is_file()
                assert "identity conflict" in Path(row.quarantine_path).with_suffix(".reason.txt").read_text()
            assert s.query(Job).count() == 0
        assert processed == []
        # Nothing of the other patient's instances is left in the incoming spool.
        spooled = {f.stem for f in (tmp_path / "spool" / "incoming").rglob("*.dcm")}
        assert not spooled & {str(ds.SOPInstanceUID) for ds in ct[half:]}
        lines = [r.getMessage() for r in caplog.records if "series_identity_conflict" in r.getMessage()]
        assert lines and all(OTHER_ID not in line and "Canary" not in line for line in lines)
        assert all(OTHER_ID not in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    finally:
        node.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_series_uid_reused_in_another_study_is_refused(tmp_path, backend):
    from dicomnode.testing.study import synthetic_datasets

    first = synthetic_datasets(modalities=("CT",), shape=(6, 16, 16), seed=4)["CT"]
    foreign = synthetic_datasets(modalities=("CT",), shape=(10, 16, 16), seed=5)["CT"]
    for ds in foreign:  # same patient, another study, the first study's SeriesInstanceUID
        ds.SeriesInstanceUID = first[0].SeriesInstanceUID
        ds.SOPInstanceUID = generate_uid()
    assert foreign[0].StudyInstanceUID != first[0].StudyInstanceUID
    with open_test_db(backend, tmp_path) as db:
        cfg = load_config(overrides={"node": {"port": free_port()}})
        scp = StoreSCP(cfg, db, Spool(tmp_path / "spool"))
        scp.start()
        try:
            assert send(scp.port, first) == [0x0000] * len(first)
            assert send(scp.port, foreign) == [0xA900] * len(foreign)
        finally:
            scp.stop()
        with db.session() as s:
            (row,) = s.scalars(select(Series)).all()
            assert row.study_uid == str(first[0].StudyInstanceUID)
            assert row.identity_conflict and "StudyInstanceUID" in row.identity_conflict
            assert "PatientID" not in row.identity_conflict
            assert s.query(Instance).count() == row.received_count == len(first)
            rejections = s.scalars(select(Rejection)).all()
            assert len(rejections) == len(foreign) and {r.status for r in rejections} == {0xA900}
            assert all("StudyInstanceUID" in r.reason for r in rejections)
        other_study = tmp_path / "spool" / "incoming" / str(foreign[0].StudyInstanceUID)
        assert not any(p.is_file() for p in other_study.rglob("*"))
