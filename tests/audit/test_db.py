"""AuditDB on SQLite and PostgreSQL: Alembic upgrade to head matches the models, sessions, time zones."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text

from dicomnode.audit.db import AuditDB
from dicomnode.audit.models import Association, Base, Job, Series


def test_upgrade_creates_the_model_schema(db):
    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        version = conn.execute(text("select version_num from alembic_version")).scalar_one()
    assert diffs == []
    assert version == _head_revision()


def _head_revision() -> str:
    # The newest migration script, whichever it is: the database must be at the one head.
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from dicomnode.audit.db import MIGRATIONS_DIR

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_session_commits_and_rolls_back(db):
    with db.session() as s:
        s.add(Association(calling_ae="A", called_ae="B", peer_host="127.0.0.1", peer_port=1, accepted=True))
    with pytest.raises(RuntimeError):
        with db.session() as s:
            s.add(Association(calling_ae="C", called_ae="B", peer_host="127.0.0.1", peer_port=2, accepted=True))
            s.flush()
            raise RuntimeError("boom")
    with db.session() as s:
        assert s.scalars(select(Association.calling_ae)).all() == ["A"]


def test_timestamps_come_back_utc_aware(db):
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    with db.session() as s:
        s.add(Association(calling_ae="A", called_ae="B", peer_host="h", peer_port=1, accepted=True, started_at=local))
    with db.session() as s:
        row = s.scalars(select(Association)).one()
        assert row.started_at == local and row.started_at.utcoffset() == timedelta(0)
        assert s.scalar(select(func.count()).where(Association.started_at < datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc))) == 1


def test_concurrent_writers_from_threads(db):
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                with db.session() as s:
                    s.add(Series(series_uid=f"1.2.{n}.{i}", study_uid="1.2", modality="CT"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Series)) == 60


def test_reopen_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    first = AuditDB.open(url)
    with first.session() as s:
        s.add(Job(rule="PT->CT", fixed_series_uid="1", moving_series_uid="2", study_uid="3", method="alpha"))
    first.close()
    second = AuditDB.open(url)
    with second.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
    second.close()
