"""Audit-database writes of the receive path: associations, stored instances and their series, rejections.

The SCP decides what happened; this module only records it. The instance row is written after
the spool write has been fsynced, and the SCP answers success only after the row is committed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.sql.expression import Executable

from dicomnode.audit.db import READ_ONLY, AuditDB
from dicomnode.audit.models import Association, Instance, Rejection, Series, SeriesState
from dicomnode.identity import Identity, identity_differences
from dicomnode.log import event as log_event
from dicomnode.net.validate import STATUS_DATASET_MISMATCH, STATUS_DB_UNAVAILABLE, InstanceInfo, RejectedInstance
from dicomnode.store.series import SeriesProgress

log = logging.getLogger(__name__)


def _db_unavailable(exc: SQLAlchemyError) -> RejectedInstance:
    return RejectedInstance(STATUS_DB_UNAVAILABLE, f"audit database unavailable: {type(exc).__name__}")


@dataclass(frozen=True)
class StoreStatements:
    """The C-STORE path's SQL, built once: constructing Core statements per call costs more than running them."""

    exists: Executable
    series_id: Executable
    insert_series: Executable
    bump_series: Executable
    bump_series_expected: Executable
    insert_instance: Executable
    flag_series: Executable
    reopen_series: Executable

    @classmethod
    def build(cls) -> StoreStatements:
        bump = update(Series).where(Series.id == bindparam("series_pk"))
        counted = {"received_count": Series.received_count + 1, "last_received_at": bindparam("now")}
        # The grown series' progress comes back from the same statement: completion needs no second read.
        progress = (Series.state, Series.received_count, Series.expected_count)
        return cls(
            exists=select(Instance.id).where(Instance.sop_instance_uid == bindparam("sop")),
            series_id=select(Series.id, Series.state, Series.study_uid, Series.patient_id, Series.patient_name,
                             Series.birth_date).where(Series.series_uid == bindparam("uid")),
            insert_series=insert(Series),
            bump_series=bump.values(**counted).returning(*progress),
            bump_series_expected=bump.values(**counted, expected_count=bindparam("expected")).returning(*progress),
            insert_instance=insert(Instance),
            flag_series=update(Series)
            .where(Series.id == bindparam("series_pk"), Series.identity_conflict.is_(None))
            .values(identity_conflict=bindparam("conflict")),
            reopen_series=update(Series)
            .where(Series.id == bindparam("series_pk"), Series.state == SeriesState.complete)
            .values(state=SeriesState.receiving, revision=Series.revision + 1, completed_at=None, completion_reason=None),
        )


@dataclass(frozen=True)
class Recorded:
    """What recording one instance did: ``stored`` or ``duplicate``, and its series' progress after it
    (None for a duplicate), read in the instance's own write transaction."""

    outcome: str
    progress: SeriesProgress | None = None


def identity_conflict(series_row, info: InstanceInfo) -> str | None:
    """Why an instance cannot join its series (keywords, never values), or None when it belongs.

    A series is one patient's in one study: a SeriesInstanceUID reused in another study, or an
    instance of another patient under the same SeriesInstanceUID, is refused (PS3.3 C.7.3.1:
    the UID identifies one series of one study).
    """
    series = Identity(series_row.study_uid, info.series_uid, series_row.patient_id or "", series_row.patient_name or "",
                      series_row.birth_date or "")
    instance = Identity(info.study_uid, info.series_uid, info.patient_id, info.patient_name, info.birth_date)
    differ = identity_differences(series, instance)
    if not differ:
        return None
    log_event(log, "series_identity_conflict", logging.WARNING, series=info.series_uid, sop=info.sop_instance_uid,
              mismatch=",".join(differ))
    return (f"identity conflict: {', '.join(differ)} of instance {info.sop_instance_uid} differ from series "
            f"{info.series_uid} (first received instance); the series will not be paired")


class ReceiveRecorder:
    """Writes the receive path's audit rows; a failed association or rejection write is logged, not raised."""

    def __init__(self, db: AuditDB):
        self.db = db
        self._sql = StoreStatements.build()

    # -- associations ----------------------------------------------------------------------
    def association(
        self, calling_ae: str, called_ae: str, peer_host: str, peer_port: int, accepted: bool, reason: str | None
    ) -> int | None:
        """Insert an association row; its id, or None when the database could not be written."""
        now = datetime.now(timezone.utc)
        row = Association(
            calling_ae=calling_ae[:16],
            called_ae=called_ae[:16],
            peer_host=peer_host[:64],
            peer_port=peer_port,
            accepted=accepted,
            reason=reason,
            started_at=now,
            ended_at=None if accepted else now,
        )
        try:
            with self.db.session() as session:
                session.add(row)
                session.flush()
                return row.id
        except SQLAlchemyError as exc:
            log_event(log, "audit_write_failed", logging.ERROR, what="association", error=type(exc).__name__)
            return None

    def association_ended(self, assoc_id: int, outcome: str) -> None:
        """Stamp the end time; ``reason`` keeps the outcome unless the association was released."""
        try:
            with self.db.session() as session:
                session.execute(
                    update(Association)
                    .where(Association.id == assoc_id)
                    .values(ended_at=datetime.now(timezone.utc), reason=None if outcome == "released" else outcome)
                )
        except SQLAlchemyError as exc:
            log_event(log, "audit_write_failed", logging.ERROR, what="association_end", error=type(exc).__name__)

    # -- instances -------------------------------------------------------------------------
    def connect(self) -> Connection:
        """A pooled connection for one C-STORE; RejectedInstance (0xA7xx) when the database is down."""
        try:
            return self.db.engine.connect()
        except SQLAlchemyError as exc:
            raise _db_unavailable(exc) from exc

    def is_duplicate(self, conn: Connection, sop_instance_uid: str) -> bool:
        """Whether the instance is already recorded (read-only check, before the spool write)."""
        try:
            conn.execution_options(**READ_ONLY)
            duplicate = conn.execute(self._sql.exists, {"sop": sop_instance_uid}).first() is not None
            conn.commit()
        except SQLAlchemyError as exc:
            raise _db_unavailable(exc) from exc
        return duplicate

    def instance(
        self, conn: Connection, info: InstanceInfo, spool_path: Path, size: int, sha256: str, assoc_id: int | None, calling: str
    ) -> Recorded:
        """Record a spooled instance and grow its series in one short transaction (``Recorded``).

        Raises RejectedInstance when the row cannot be written, or (0xA900) when the instance's
        patient or study identity differs from its series (the series is then flagged, in the same
        transaction, so it is never paired); the caller removes the spool file, since no row will
        point at it.
        """
        sql = self._sql
        conn.execution_options(dicomnode_read_only=False)
        for attempt in range(2):
            try:
                with conn.begin():
                    if conn.execute(sql.exists, {"sop": info.sop_instance_uid}).first() is not None:
                        return Recorded("duplicate")  # another association stored it meanwhile
                    series_id, conflict, progress = self._upsert_series(conn, info, calling)
                    if conflict is not None:
                        conn.execute(sql.flag_series, {"series_pk": series_id, "conflict": conflict})
                    else:
                        conn.execute(
                            sql.insert_instance,
                            {
                                "sop_instance_uid": info.sop_instance_uid,
                                "sop_class_uid": info.sop_class_uid,
                                "series_id": series_id,
                                "association_id": assoc_id,
                                "transfer_syntax_uid": info.transfer_syntax_uid,
                                "size_bytes": size,
                                "sha256": sha256,
                                "spool_path": str(spool_path),
                                "received_at": datetime.now(timezone.utc),
                            },
                        )
                if conflict is not None:
                    raise RejectedInstance(STATUS_DATASET_MISMATCH, conflict)
                return Recorded("stored", progress)
            except IntegrityError:
                if attempt == 0:
                    continue  # a concurrent association created the series or instance row first
                raise RejectedInstance(STATUS_DB_UNAVAILABLE, "audit database conflict persisted after a retry") from None
            except SQLAlchemyError as exc:
                raise _db_unavailable(exc) from exc
        return Recorded("stored")  # unreachable; keeps type checkers content

    def _upsert_series(self, conn: Connection, info: InstanceInfo, calling: str
                       ) -> tuple[int, str | None, SeriesProgress | None]:
        """The series row's id, created or grown; with the reason when the instance does not belong to it,
        and the grown series' progress."""
        sql = self._sql
        now = datetime.now(timezone.utc)
        row = conn.execute(sql.series_id, {"uid": info.series_uid}).first()
        if row is None:
            result = conn.execute(
                sql.insert_series,
                {
                    "series_uid": info.series_uid,
                    "study_uid": info.study_uid,
                    "patient_id": info.patient_id,
                    "patient_name": info.patient_name,
                    "birth_date": info.birth_date,
                    "study_date": info.study_date,
                    "modality": info.modality,
                    "frame_of_reference_uid": info.frame_of_reference_uid,
                    "calling_ae": calling[:16],
                    "expected_count": info.expected_count,
                    "received_count": 1,
                    "first_received_at": now,
                    "last_received_at": now,
                    "state": SeriesState.receiving,
                },
            )
            log_event(log, "series_started", series=info.series_uid, modality=info.modality, calling_ae=calling, expected=info.expected_count)
            return (int(result.inserted_primary_key[0]), None,
                    SeriesProgress(SeriesState.receiving, 1, info.expected_count))
        series_id = int(row.id)
        conflict = identity_conflict(row, info)
        if conflict is not None:
            return series_id, conflict, None
        if row.state == SeriesState.complete:
            # A late instance: the series grows again and completes anew, so it is fused as a new
            # job (its revision) instead of being silently left out of the one already made.
            conn.execute(sql.reopen_series, {"series_pk": series_id})
            log_event(log, "series_reopened", logging.WARNING, series=info.series_uid, sop=info.sop_instance_uid,
                      note="instance arrived after the series completed")
        if info.expected_count is None:
            grown = conn.execute(sql.bump_series, {"series_pk": series_id, "now": now}).one()
        else:
            grown = conn.execute(sql.bump_series_expected,
                                 {"series_pk": series_id, "now": now, "expected": info.expected_count}).one()
        return series_id, None, SeriesProgress(SeriesState(grown.state), grown.received_count, grown.expected_count)

    # -- rejections ------------------------------------------------------------------------
    def rejection(
        self,
        assoc_id: int | None,
        calling: str,
        sop_class: str,
        sop_uid: str,
        status: int | None,
        reason: str,
        quarantine_path: str | None,
    ) -> None:
        """Insert a rejection row (instance or association level; ``status`` None for the latter)."""
        try:
            with self.db.session() as session:
                session.add(
                    Rejection(
                        association_id=assoc_id,
                        calling_ae=calling[:16],
                        sop_instance_uid=sop_uid[:64],
                        sop_class_uid=sop_class[:64],
                        status=status,
                        reason=reason,
                        quarantine_path=quarantine_path,
                    )
                )
        except SQLAlchemyError as exc:
            log_event(log, "audit_write_failed", logging.ERROR, what="rejection", error=type(exc).__name__)
