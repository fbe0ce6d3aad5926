"""Pairing: which complete series are fused onto which, by the configured rules.

When a series completes, its partners are looked up among the complete series: same
StudyInstanceUID (rule ``match = "study"``) or same PatientID with study dates at most
``max_days`` apart (``match = "patient"``). Partners must agree on patient identity: PatientID
always, PatientName and PatientBirthDate when both series carry them. A disagreement is refused
(a ``Rejection`` row and one log line, no job): the node never fuses across patients. So is a
series flagged at receive with an identity conflict (an instance of another patient or study
under its SeriesInstanceUID), whichever side of the pair it is on. Only series holding images of
the classes the node fuses are paired: a non-image object that claims an image modality (Raw
Data or MR Spectroscopy with Modality CT/MR, say) is stored and audited, never fused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from dicomnode.audit.models import Instance, Rejection, Series, SeriesState
from dicomnode.config import Config, PairingRule
from dicomnode.identity import normalise_name
from dicomnode.log import event
from dicomnode.net.validate import STORAGE_SOP_CLASSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesRef:
    """What pairing and processing need to know about one received series."""

    series_uid: str
    study_uid: str
    modality: str
    patient_id: str
    patient_name: str
    birth_date: str
    study_date: str
    frame_of_reference_uid: str
    calling_ae: str
    revision: int = 0
    identity_conflict: str = ""  # set at receive: the series must never be paired

    @classmethod
    def of(cls, row: Series) -> SeriesRef:
        return cls(
            series_uid=row.series_uid,
            study_uid=row.study_uid,
            modality=row.modality,
            patient_id=row.patient_id or "",
            patient_name=row.patient_name or "",
            birth_date=row.birth_date or "",
            study_date=row.study_date or "",
            frame_of_reference_uid=row.frame_of_reference_uid or "",
            calling_ae=row.calling_ae or "",
            revision=row.revision or 0,
            identity_conflict=row.identity_conflict or "",
        )


@dataclass(frozen=True)
class Pairing:
    """A moving series to be resampled and fused onto a fixed series under ``rule``."""

    fixed: SeriesRef
    moving: SeriesRef
    rule: PairingRule


@dataclass(frozen=True)
class Refusal:
    """A candidate pair refused because the two series disagree on patient identity."""

    fixed: SeriesRef
    moving: SeriesRef
    rule: PairingRule
    mismatch: tuple[str, ...]  # DICOM keywords that differ, e.g. ("PatientID",)

    @property
    def reason(self) -> str:
        flagged = [s.series_uid for s in (self.fixed, self.moving) if s.identity_conflict]
        if flagged:
            return (
                f"pairing refused (rule {self.rule.label}): series {', '.join(flagged)} has an identity conflict "
                f"between its instances (fixed series {self.fixed.series_uid}, moving series {self.moving.series_uid})"
            )
        return (
            f"pairing refused (rule {self.rule.label}): {', '.join(self.mismatch)} differ between "
            f"fixed series {self.fixed.series_uid} and moving series {self.moving.series_uid}"
        )


def identity_mismatch(a: SeriesRef, b: SeriesRef) -> list[str]:
    """Names of the patient attributes on which ``a`` and ``b`` disagree (values never returned)."""
    problems = []
    if a.identity_conflict or b.identity_conflict:
        problems.append("identity_conflict")
    if a.patient_id.strip() != b.patient_id.strip():
        problems.append("PatientID")
    if a.patient_name and b.patient_name and normalise_name(a.patient_name) != normalise_name(b.patient_name):
        problems.append("PatientName")
    if a.birth_date and b.birth_date and a.birth_date.strip() != b.birth_date.strip():
        problems.append("PatientBirthDate")
    return problems


def _parse_da(value: str) -> date | None:
    try:
        return date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError):
        return None


def _within_days(a: str, b: str, max_days: int) -> bool:
    da, db = _parse_da(a), _parse_da(b)
    if da is None or db is None:
        # Without study dates the "within N days" promise cannot be checked: only the same day string.
        return a == b and max_days >= 0
    return abs((da - db).days) <= max_days


def _holds_no_images():
    """SQL condition on Series: it has instances, none of a fused image SOP class."""
    any_instance = exists().where(Instance.series_id == Series.id)
    image = exists().where(Instance.series_id == Series.id, Instance.sop_class_uid.in_(list(STORAGE_SOP_CLASSES)))
    return any_instance & ~image


def _pairable(session: Session, series: Series) -> bool:
    return not session.scalar(select(_holds_no_images()).where(Series.id == series.id))


def _candidates(session: Session, series: Series, rule: PairingRule, partner_modality: str) -> list[Series]:
    query = select(Series).where(
        Series.state == SeriesState.complete,
        Series.modality == partner_modality,
        Series.id != series.id,
        ~_holds_no_images(),
    )
    if rule.match == "study":
        query = query.where(Series.study_uid == series.study_uid)
        return list(session.scalars(query.order_by(Series.id)))
    # Patient match: same PatientID is the candidate key; identity is then checked on the rest.
    # Without an ID there is no patient to match on (two anonymous studies are not one patient).
    if not (series.patient_id or "").strip():
        return []
    query = query.where(Series.patient_id == series.patient_id)
    return [s for s in session.scalars(query.order_by(Series.id)) if _within_days(s.study_date, series.study_date, rule.max_days)]


def find_pairings(session: Session, series_uid: str, rules: tuple[PairingRule, ...]) -> tuple[list[Pairing], list[Refusal]]:
    """Pairs (and refusals) that the newly complete series ``series_uid`` forms with complete partners."""
    series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
    pairings: list[Pairing] = []
    refusals: list[Refusal] = []
    if not _pairable(session, series):
        return pairings, refusals
    me = SeriesRef.of(series)
    for rule in rules:
        if series.modality not in (rule.fixed, rule.moving):
            continue
        partner_modality = rule.moving if series.modality == rule.fixed else rule.fixed
        for partner in _candidates(session, series, rule, partner_modality):
            other = SeriesRef.of(partner)
            fixed, moving = (me, other) if series.modality == rule.fixed else (other, me)
            problems = identity_mismatch(fixed, moving)
            if problems:
                refusals.append(Refusal(fixed, moving, rule, tuple(problems)))
            else:
                pairings.append(Pairing(fixed, moving, rule))
    return pairings, refusals


def record_refusal(session: Session, refusal: Refusal) -> bool:
    """Write the refusal as a ``Rejection`` row and log it once; False if it was already recorded."""
    exists = session.scalars(select(Rejection.id).where(Rejection.reason == refusal.reason)).first()
    if exists is not None:
        return False
    session.add(Rejection(calling_ae=refusal.moving.calling_ae, status=None, reason=refusal.reason))
    session.flush()
    event(log, "pairing_refused", logging.WARNING, rule=refusal.rule.label, fixed_series=refusal.fixed.series_uid,
          moving_series=refusal.moving.series_uid, study_uid=refusal.fixed.study_uid, mismatch=",".join(refusal.mismatch))
    return True


class NoDestination(Exception):
    """A job has nowhere to send its output; the message names what to configure."""


def rule_for(config: Config, label: str) -> PairingRule:
    for rule in config.pairing:
        if rule.label == label:
            return rule
    raise LookupError(f"pairing rule {label!r} is no longer in the configuration")


def destinations_for(config: Config, rule: PairingRule, fixed_calling_ae: str) -> tuple[str, ...]:
    """Destination names for a job: the rule's, else the one whose AE title sent the fixed series."""
    if rule.destinations:
        return rule.destinations
    dest = config.destination_for_ae(fixed_calling_ae)
    if dest is None:
        raise NoDestination(
            f"no destination: rule {rule.label} names none and no [[destinations]] entry has the "
            f"AE title {fixed_calling_ae!r} that sent the fixed series"
        )
    return (dest.name,)
