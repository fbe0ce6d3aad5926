"""The audit database on both backends: SQLite in a temp dir, PostgreSQL on the local server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dicomnode.audit.db import AuditDB
from tests.backends import BACKENDS, open_test_db


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path) -> Iterator[AuditDB]:
    # A folder that does not exist yet: opening the database creates it.
    with open_test_db(request.param, tmp_path / "sub") as database:
        yield database
