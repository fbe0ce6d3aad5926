"""Audit databases for unit tests: SQLite in a temp folder, or a throw-away PostgreSQL schema.

The PostgreSQL variant skips with the reason when no server answers (and fails in CI, see
``require``); each test gets its own schema so concurrent runs on one server stay apart.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

from dicomnode.audit.db import AuditDB
from tests.conftest import require

POSTGRES_URL = os.environ.get("DICOMNODE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test")
BACKENDS = ["sqlite", "postgresql"]


@contextmanager
def open_test_db(backend: str, tmp_path: Path) -> Iterator[AuditDB]:
    if backend == "sqlite":
        db = AuditDB.open(f"sqlite:///{tmp_path / 'audit.db'}")
        try:
            yield db
        finally:
            db.close()
        return
    with _postgres_schema() as schema:
        db = AuditDB.open(POSTGRES_URL, schema=schema)
        try:
            yield db
        finally:
            db.close()


@contextmanager
def _postgres_schema() -> Iterator[str]:
    """A throw-away schema on the test server (skip or CI failure when no server answers)."""
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # any failure means "no server here"
        admin.dispose()
        require(False, f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A throw-away schema on the test server as a URL whose connections use it (for other processes)."""
    from urllib.parse import quote

    with _postgres_schema() as schema:
        sep = "&" if "?" in POSTGRES_URL else "?"
        yield f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
