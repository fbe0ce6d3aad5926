"""Pairing rules: partners by study or patient window, identity checks, audited refusals."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select

from tests.backends import BACKENDS, open_test_db
from dicomnode.audit.models import Rejection, Series, SeriesState
from dicomnode.config import PairingRule
from dicomnode.routing import SeriesRef, find_pairings, identity_mismatch, record_refusal

CT_PT = PairingRule(fixed="CT", moving="PT")


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    with open_test_db(request.param, tmp_path) as database:
        yield database


def add(db, uid, modality, *, study="1.9", pid="P1", name="DOE^JANE", birth="19700101", date="20240501",
        state=SeriesState.complete, ae="PACS"):
    with db.session() as s:
        s.add(Series(series_uid=uid, study_uid=study, modality=modality, patient_id=pid, patient_name=name,
                     birth_date=birth, study_date=date, state=state, calling_ae=ae))


def ref(**kw):
    base = dict(series_uid="1", study_uid="9", modality="CT", patient_id="P1", patient_name="DOE^JANE",
                birth_date="19700101", study_date="20240501", frame_of_reference_uid="", calling_ae="")
    base.update(kw)
    return SeriesRef(**base)


def test_identity_rules():
    assert identity_mismatch(ref(), ref()) == []
    assert identity_mismatch(ref(), ref(patient_id="P2")) == ["PatientID"]
    assert identity_mismatch(ref(), ref(patient_name="doe^jane^^")) == []
    assert identity_mismatch(ref(), ref(patient_name="ROE^JOHN", birth_date="19800101")) == ["PatientName", "PatientBirthDate"]
    # Name and birth date are compared only when both series carry them.
    assert identity_mismatch(ref(), ref(patient_name="", birth_date="")) == []


def test_pairs_within_a_study_with_fixed_and_moving_by_rule(db):
    add(db, "ct", "CT")
    add(db, "pt", "PT")
    add(db, "other-study-pt", "PT", study="2.9")
    add(db, "still-receiving-pt", "PT", state=SeriesState.receiving)
    with db.session() as s:
        pairings, refusals = find_pairings(s, "ct", (CT_PT,))
    assert refusals == []
    assert [(p.fixed.series_uid, p.moving.series_uid, p.rule.label) for p in pairings] == [("ct", "pt", "PT->CT")]
    # The same pair is found from the moving side, with roles kept.
    with db.session() as s:
        pairings, _ = find_pairings(s, "pt", (CT_PT,))
    assert [(p.fixed.modality, p.moving.modality) for p in pairings] == [("CT", "PT")]


def test_no_rule_no_pair(db):
    add(db, "ct", "CT")
    add(db, "mr", "MR")
    with db.session() as s:
        assert find_pairings(s, "ct", (CT_PT,)) == ([], [])


def test_patient_rule_respects_day_window_and_never_crosses_patients(db):
    rule = PairingRule(fixed="CT", moving="PT", match="patient", max_days=3)
    add(db, "ct", "CT", study="1", date="20240501")
    add(db, "pt-near", "PT", study="2", date="20240504")
    add(db, "pt-far", "PT", study="3", date="20240505")
    add(db, "pt-other-patient", "PT", study="4", date="20240501", pid="P2")
    with db.session() as s:
        pairings, refusals = find_pairings(s, "ct", (rule,))
    assert [p.moving.series_uid for p in pairings] == ["pt-near"]
    assert refusals == []


def test_patient_mismatch_in_one_study_is_refused_and_audited_once(db, caplog):
    add(db, "ct", "CT", pid="P1")
    add(db, "pt", "PT", pid="P2", ae="MODALITY")
    with db.session() as s:
        pairings, refusals = find_pairings(s, "pt", (CT_PT,))
    assert pairings == []
    assert len(refusals) == 1 and refusals[0].mismatch == ("PatientID",)
    with caplog.at_level(logging.WARNING, logger="dicomnode.routing"), db.session() as s:
        assert record_refusal(s, refusals[0]) is True
        assert record_refusal(s, refusals[0]) is False  # idempotent: found again after a restart
    with db.session() as s:
        rows = s.scalars(select(Rejection)).all()
    assert len(rows) == 1
    assert "PatientID differ" in rows[0].reason and "ct" in rows[0].reason and rows[0].calling_ae == "MODALITY"
    lines = [r.getMessage() for r in caplog.records if "pairing_refused" in r.getMessage()]
    assert len(lines) == 1 and "mismatch=PatientID" in lines[0]
    assert "P1" not in lines[0] and "P2" not in lines[0]  # identifiers never logged above DEBUG


def test_name_mismatch_with_same_id_is_refused(db):
    add(db, "ct", "CT", name="DOE^JANE")
    add(db, "pt", "PT", name="ROE^JOHN")
    with db.session() as s:
        pairings, refusals = find_pairings(s, "ct", (CT_PT,))
    assert pairings == [] and refusals[0].mismatch == ("PatientName",)


def test_patient_rule_never_matches_on_an_empty_patient_id(db):
    rule = PairingRule(fixed="CT", moving="PT", match="patient", max_days=30)
    add(db, "ct", "CT", study="1", pid="", name="", birth="")
    add(db, "pt", "PT", study="2", pid="", name="", birth="")
    with db.session() as s:
        assert find_pairings(s, "pt", (rule,)) == ([], [])


def test_a_series_flagged_with_an_identity_conflict_is_never_paired(db):
    add(db, "ct", "CT")
    add(db, "pt", "PT")
    with db.session() as s:
        s.scalars(select(Series).where(Series.series_uid == "ct")).one().identity_conflict = "identity conflict: PatientID"
    for completed in ("pt", "ct"):  # whichever side completes last
        with db.session() as s:
            pairings, refusals = find_pairings(s, completed, (CT_PT,))
        assert pairings == [] and len(refusals) == 1
        assert refusals[0].mismatch == ("identity_conflict",)
        assert "series ct has an identity conflict" in refusals[0].reason


def test_a_series_of_non_image_objects_is_never_paired(db):
    """Raw Data (or MR Spectroscopy) objects may carry Modality CT/MR: stored and audited, never fused."""
    from dicomnode.audit.models import Instance

    raw_data, ct_image = "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.2"
    add(db, "raw", "CT")
    add(db, "ct", "CT")
    add(db, "pt", "PT")
    with db.session() as s:
        ids = {r.series_uid: r.id for r in s.scalars(select(Series))}
        for n, (series, sop_class) in enumerate([("raw", raw_data), ("ct", ct_image), ("ct", raw_data), ("pt", "1.2.840.10008.5.1.4.1.1.128")]):
            s.add(Instance(sop_instance_uid=f"9.{n}", sop_class_uid=sop_class, series_id=ids[series],
                           transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, sha256="0" * 64, spool_path=f"/x/{n}"))
    with db.session() as s:
        assert find_pairings(s, "raw", (CT_PT,)) == ([], [])
        pairings, refusals = find_pairings(s, "pt", (CT_PT,))
    # The CT series that holds an image (beside a raw data object) pairs; the raw-data-only one does not.
    assert refusals == [] and [(p.fixed.series_uid, p.moving.series_uid) for p in pairings] == [("ct", "pt")]
