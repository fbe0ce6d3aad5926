"""Series completion: when a received series counts as complete; lookups of a series' rows and files.

A series is complete once no instance arrived for ``completion.stable_age_s`` seconds, or at
once when its expected instance count (e.g. NumberOfSlices of PET/NM) is known and reached.
The state lives in the ``Series`` rows (receiving -> complete), so a restarted node resumes
the check from the database; nothing is kept in memory between checks. Stable age counts node
up-time only: it runs from the later of the last instance and the node's start, so a series
half-received before an outage gets its full ``stable_age_s`` after the restart for the rest
to arrive. A late instance reopens a complete series (``net/records.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicomnode.audit.models import Instance, Series, SeriesState
from dicomnode.config import CompletionConfig
from dicomnode.log import event
from dicomnode.routing import SeriesRef

log = logging.getLogger(__name__)

STABLE_AGE = "stable_age"
EXPECTED_COUNT = "expected_count"


@dataclass(frozen=True)
class CompletedSeries:
    """A series that has just moved to ``complete``."""

    series_uid: str
    study_uid: str
    modality: str
    received_count: int
    reason: str  # STABLE_AGE | EXPECTED_COUNT


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns; they were written in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def completion_reason(series: Series, config: CompletionConfig, now: datetime,
                      up_since: datetime | None = None) -> str | None:
    """Why ``series`` is complete at ``now``, or None while it is still receiving.

    ``up_since``: when the node started; stable age is never counted from before it.
    """
    if series.state != SeriesState.receiving:
        return None
    if config.use_expected_count and series.expected_count and series.received_count >= series.expected_count:
        return EXPECTED_COUNT
    quiet_since = as_utc(series.last_received_at)
    if up_since is not None:
        quiet_since = max(quiet_since, as_utc(up_since))
    if now - quiet_since >= timedelta(seconds=config.stable_age_s):
        return STABLE_AGE
    return None


def mark_complete(session: Session, series: Series, reason: str, now: datetime) -> CompletedSeries | None:
    """Move one series to ``complete`` in ``session`` (the caller commits); None if already complete.

    The update is conditional on the row still being ``receiving``, so two checkers racing on
    one series (the per-instance check and the timer) complete it once.
    """
    result = session.execute(
        update(Series)
        .where(Series.id == series.id, Series.state == SeriesState.receiving)
        .values(state=SeriesState.complete, completed_at=now, completion_reason=reason)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    session.refresh(series)
    event(log, "series_complete", series_uid=series.series_uid, modality=series.modality,
          instances=series.received_count, reason=reason)
    return CompletedSeries(series.series_uid, series.study_uid, series.modality, series.received_count, reason)


def complete_due_series(
    session: Session,
    config: CompletionConfig,
    now: datetime | None = None,
    on_complete: Callable[[Session, CompletedSeries], None] | None = None,
    up_since: datetime | None = None,
) -> list[CompletedSeries]:
    """Complete every receiving series that is due; ``on_complete`` runs for each in the same session.

    ``up_since``: the node's start time (see ``completion_reason``).

    Series are completed one after the other, oldest first, so a pairing step run by
    ``on_complete`` sees the earlier ones as complete and each pair is considered exactly once.
    """
    now = now or datetime.now(timezone.utc)
    rows = session.scalars(
        select(Series).where(Series.state == SeriesState.receiving).order_by(Series.last_received_at, Series.id)
    ).all()
    done: list[CompletedSeries] = []
    for series in rows:
        reason = completion_reason(series, config, now, up_since)
        if reason is None:
            continue
        completed = mark_complete(session, series, reason, now)
        if completed is None:
            continue
        if on_complete is not None:
            on_complete(session, completed)
        done.append(completed)
    return done


@dataclass(frozen=True)
class SeriesProgress:
    """Where one series stands, read without locking anything but its row."""

    state: SeriesState
    received_count: int
    expected_count: int | None

    @property
    def expected_reached(self) -> bool:
        return bool(self.expected_count) and self.received_count >= self.expected_count


def series_progress(session: Session, series_uid: str) -> SeriesProgress | None:
    """State and counts of one series (one indexed read, no write); None when unknown."""
    row = session.execute(
        select(Series.state, Series.received_count, Series.expected_count).where(Series.series_uid == series_uid)
    ).first()
    return None if row is None else SeriesProgress(row.state, row.received_count, row.expected_count)


def complete_if_expected(
    session: Session,
    series_uid: str,
    config: CompletionConfig,
    now: datetime | None = None,
    on_complete: Callable[[Session, CompletedSeries], None] | None = None,
) -> CompletedSeries | None:
    """Complete one series right away when its expected count has arrived (cheap per-instance check)."""
    if not config.use_expected_count:
        return None
    series = session.scalars(select(Series).where(Series.series_uid == series_uid)).one_or_none()
    if series is None or series.state != SeriesState.receiving or not series.expected_count:
        return None
    if series.received_count < series.expected_count:
        return None
    completed = mark_complete(session, series, EXPECTED_COUNT, now or datetime.now(timezone.utc))
    if completed is not None and on_complete is not None:
        on_complete(session, completed)
    return completed


class InputsUnusable(Exception):
    """A job's input series cannot be used (identity conflict, files deleted by retention)."""


def series_files(session: Session, spool_root: Path, series_uid: str) -> list[Path]:
    """Spool paths of the received images of one series (relative paths are under the spool).

    Non-image objects filed under the same series (raw data, spectroscopy) are left out. Raises
    InputsUnusable when retention has deleted some of them: a partial series is never fused.
    """
    from dicomnode.net.validate import STORAGE_SOP_CLASSES

    rows = session.execute(
        select(Instance.spool_path, Instance.purged_at).join(Series, Instance.series_id == Series.id)
        .where(Series.series_uid == series_uid, Instance.sop_class_uid.in_(list(STORAGE_SOP_CLASSES)))
    ).all()
    purged = [r.purged_at for r in rows if r.purged_at is not None]
    if purged:
        raise InputsUnusable(f"{len(purged)} of {len(rows)} instances of series {series_uid} were deleted by "
                             f"spool retention (first on {min(purged):%Y-%m-%d}); send the series again")
    return sorted(_spool_file(Path(r.spool_path), spool_root) for r in rows)


def _spool_file(path: Path, spool_root: Path) -> Path:
    # Rows hold absolute paths; a relative one is tried from the working directory, then the spool.
    if path.is_absolute() or path.exists():
        return path
    return spool_root / path


def series_ref(session: Session, series_uid: str) -> SeriesRef:
    """The pairing view of one series (its row must exist)."""
    return SeriesRef.of(session.scalars(select(Series).where(Series.series_uid == series_uid)).one())
