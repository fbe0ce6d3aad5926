"""The audit database schema (SQLAlchemy 2). Alembic migrations in ``migrations/`` follow it.

Timestamps are timezone-aware UTC. Patient identifiers are stored (the audit trail must be able to
answer "what happened to this patient's study"), but never logged above DEBUG.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)  # naive values are taken as UTC
        return value.astimezone(timezone.utc)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict: JSON, list: JSON}


UID = String(64)


class SeriesState(str, enum.Enum):
    receiving = "receiving"
    complete = "complete"


class JobState(str, enum.Enum):
    """received -> complete -> paired -> processing -> encoded -> sending -> done | failed."""

    paired = "paired"
    processing = "processing"
    encoded = "encoded"
    sending = "sending"
    done = "done"
    failed = "failed"


class SendState(str, enum.Enum):
    pending = "pending"
    sent = "sent"
    failed = "failed"


class Association(Base):
    __tablename__ = "associations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[bool]
    reason: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    modality: Mapped[str] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str] = mapped_column(UID, default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    expected_count: Mapped[int | None]
    received_count: Mapped[int] = mapped_column(default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[SeriesState] = mapped_column(Enum(SeriesState, native_enum=False), default=SeriesState.receiving)
    completed_at: Mapped[datetime | None]
    completion_reason: Mapped[str | None] = mapped_column(String(32))
    # Times a late instance reopened the complete series; jobs record the revision they fused.
    revision: Mapped[int] = mapped_column(default=0, server_default="0")
    # Why the series must never be paired: an instance disagreed with it on patient or study
    # identity (DICOM keywords and the refused SOP Instance UID; never the values).
    identity_conflict: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When retention deleted the spool file: the row stays as history but points at nothing.
    purged_at: Mapped[datetime | None]
    series: Mapped[Series] = relationship(back_populates="instances")


class Rejection(Base):
    """An instance or association the node refused, with the DIMSE status it answered."""

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    status: Mapped[int | None]
    reason: Mapped[str] = mapped_column(Text)
    quarantine_path: Mapped[str | None] = mapped_column(Text)


class Job(Base):
    """One fusion of a moving series onto a fixed series under a pairing rule."""

    __tablename__ = "jobs"
    # One job per pair and per revision of each series: a series that grew after completing
    # (late instances reopen it) is fused again as a new job; the old job keeps its history.
    __table_args__ = (UniqueConstraint("rule", "fixed_series_uid", "moving_series_uid", "fixed_revision",
                                       "moving_revision", name="uq_jobs_pair_revision"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(String(64))
    fixed_series_uid: Mapped[str] = mapped_column(UID)
    moving_series_uid: Mapped[str] = mapped_column(UID)
    fixed_revision: Mapped[int] = mapped_column(default=0, server_default="0")
    moving_revision: Mapped[int] = mapped_column(default=0, server_default="0")
    study_uid: Mapped[str] = mapped_column(UID)
    method: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False), default=JobState.paired, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Per-stage seconds, registration report, output series UIDs; free-form but documented.
    timings: Mapped[dict] = mapped_column(default=dict)
    registration: Mapped[dict] = mapped_column(default=dict)
    outputs: Mapped[dict] = mapped_column(default=dict)
    quality_flag: Mapped[str | None] = mapped_column(Text)
    # The claim of a worker (``worker.py``): who holds the job and until when. Renewed while the
    # worker processes; a job whose lease ran out is claimable again by any worker.
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    job: Mapped[Job] = relationship(back_populates="events")


class Metric(Base):
    """A fusion quality value for one fused slice (slice_index set) or the whole series (None)."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    slice_index: Mapped[int | None]
    name: Mapped[str] = mapped_column(String(32))
    value: Mapped[float] = mapped_column(Float)


class Send(Base):
    """One output series to one destination; persisted so pending sends survive a restart."""

    __tablename__ = "sends"
    __table_args__ = (UniqueConstraint("job_id", "series_uid", "destination"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    destination: Mapped[str] = mapped_column(String(64))
    # Files of the output series in the spool's outbox, in send order.
    files: Mapped[list] = mapped_column(default=list)
    state: Mapped[SendState] = mapped_column(Enum(SendState, native_enum=False), default=SendState.pending, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    # Files (a prefix of ``files``) the destination answered with success or warning; committed
    # while the series is sent (every ACK_COMMIT_EVERY_S) and when an attempt ends, so a retry or
    # restart sends only ``files[acked_count:]``.
    acked_count: Mapped[int] = mapped_column(default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
