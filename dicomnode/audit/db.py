"""The audit database: engine, sessions and schema migrations (Alembic, run at open).

SQLite (default) is opened in WAL mode with a busy timeout, because every association thread
writes to it at once; PostgreSQL is reached through psycopg 3 (``postgresql+psycopg://``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# How long a SQLite writer waits for another thread's transaction before failing (ms).
SQLITE_BUSY_TIMEOUT_MS = 30_000


class AuditDBError(RuntimeError):
    """The audit database cannot be opened or migrated."""


def _normalise_url(url: str) -> str:
    # Plain postgresql:// would pick psycopg2, which is not a dependency; psycopg 3 is.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a crash of the process; a power loss may drop the last
    # commits but never corrupts the file. Received files are fsynced before success regardless.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


# Execution option marking a connection that only reads: its transaction needs no write lock.
READ_ONLY = {"dicomnode_read_only": True}


def _sqlite_begin_immediate(conn) -> None:
    # Take the write lock at BEGIN: a deferred transaction that reads then writes can fail with
    # SQLITE_BUSY without waiting for the busy timeout when another thread committed in between.
    read_only = conn.get_execution_options().get("dicomnode_read_only", False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_engine(url: str, schema: str | None = None) -> Engine:
    """An engine for ``url`` with pool settings for concurrent association threads."""
    url = _normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "isolation_level": None},
            pool_size=20,
            max_overflow=20,
            pool_pre_ping=False,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    kwargs: dict = {"pool_size": 10, "max_overflow": 20, "pool_pre_ping": True}
    if schema:
        kwargs["connect_args"] = {"options": f"-csearch_path={schema}"}
    return create_engine(url, **kwargs)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with the packaged Alembic scripts (no alembic.ini needed)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


class AuditDB:
    """The audit database of one node; thread-safe (one session per unit of work)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, schema: str | None = None) -> AuditDB:
        """Connect to ``url`` (creating a SQLite file's folder) and migrate the schema to head.

        ``schema``: PostgreSQL schema to use (search_path), e.g. to isolate test runs.
        """
        engine = make_engine(url, schema)
        try:
            upgrade(engine)
        except Exception as exc:
            engine.dispose()
            safe_url = make_url(_normalise_url(url)).render_as_string(hide_password=True)
            raise AuditDBError(f"cannot open audit database {safe_url}: {exc}") from exc
        return cls(engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block succeeds and rolls back when it raises."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def close(self) -> None:
        self.engine.dispose()
