"""Series completion: stable age, expected count, persistence across a reopened database."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from dicomnode.audit.db import AuditDB
from tests.backends import BACKENDS, open_test_db
from dicomnode.audit.models import Series, SeriesState
from dicomnode.config import CompletionConfig
from dicomnode.store.series import (
    EXPECTED_COUNT,
    STABLE_AGE,
    complete_due_series,
    complete_if_expected,
    series_progress,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    with open_test_db(request.param, tmp_path) as database:
        yield database


def add_series(db, uid, *, modality="CT", count=10, expected=None, last=T0, study="1.2.3"):
    with db.session() as s:
        s.add(Series(series_uid=uid, study_uid=study, modality=modality, received_count=count, expected_count=expected,
                     first_received_at=last - timedelta(seconds=5), last_received_at=last))


def state_of(db, uid):
    with db.session() as s:
        row = s.scalars(select(Series).where(Series.series_uid == uid)).one()
        return row.state, row.completion_reason, row.completed_at


def test_series_completes_only_after_stable_age(db):
    cfg = CompletionConfig(stable_age_s=30)
    add_series(db, "1.1")
    with db.session() as s:
        assert complete_due_series(s, cfg, now=T0 + timedelta(seconds=29.9)) == []
    assert state_of(db, "1.1")[0] == SeriesState.receiving
    with db.session() as s:
        done = complete_due_series(s, cfg, now=T0 + timedelta(seconds=30))
    assert [(c.series_uid, c.reason, c.received_count) for c in done] == [("1.1", STABLE_AGE, 10)]
    state, reason, completed_at = state_of(db, "1.1")
    assert state == SeriesState.complete and reason == STABLE_AGE and completed_at is not None


def test_expected_count_completes_at_once_and_only_when_reached(db):
    cfg = CompletionConfig(stable_age_s=300)
    add_series(db, "2.1", modality="PT", count=47, expected=48)
    add_series(db, "2.2", modality="PT", count=48, expected=48)
    with db.session() as s:
        assert complete_if_expected(s, "2.1", cfg, now=T0) is None
        done = complete_due_series(s, cfg, now=T0 + timedelta(seconds=1))
    assert [(c.series_uid, c.reason) for c in done] == [("2.2", EXPECTED_COUNT)]
    assert state_of(db, "2.1")[0] == SeriesState.receiving


def test_expected_count_ignored_when_disabled(db):
    cfg = CompletionConfig(stable_age_s=300, use_expected_count=False)
    add_series(db, "3.1", modality="PT", count=48, expected=48)
    with db.session() as s:
        assert complete_if_expected(s, "3.1", cfg, now=T0) is None
        assert complete_due_series(s, cfg, now=T0 + timedelta(seconds=1)) == []


def test_state_survives_reopening_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    cfg = CompletionConfig(stable_age_s=30)
    first = AuditDB.open(url)
    add_series(first, "4.1", last=T0)
    add_series(first, "4.2", last=T0 + timedelta(seconds=20))
    with first.session() as s:
        assert [c.series_uid for c in complete_due_series(s, cfg, now=T0 + timedelta(seconds=31))] == ["4.1"]
    first.close()
    # A "restarted" node: a new engine on the same file continues the timers from the rows.
    second = AuditDB.open(url)
    with second.session() as s:
        assert complete_due_series(s, cfg, now=T0 + timedelta(seconds=49)) == []
        assert [c.series_uid for c in complete_due_series(s, cfg, now=T0 + timedelta(seconds=50))] == ["4.2"]
        assert complete_due_series(s, cfg, now=T0 + timedelta(seconds=500)) == []  # complete is final
    second.close()


def test_on_complete_runs_in_order_and_sees_earlier_series_complete(db):
    cfg = CompletionConfig(stable_age_s=1)
    add_series(db, "5.1", last=T0)
    add_series(db, "5.2", modality="PT", last=T0 + timedelta(seconds=1))
    seen = []

    def on_complete(session, completed):
        complete = session.scalars(select(Series.series_uid).where(Series.state == SeriesState.complete)).all()
        seen.append((completed.series_uid, sorted(complete)))

    with db.session() as s:
        complete_due_series(s, cfg, now=T0 + timedelta(seconds=10), on_complete=on_complete)
    assert seen == [("5.1", ["5.1"]), ("5.2", ["5.1", "5.2"])]


def test_racing_checkers_complete_a_series_once(db):
    cfg = CompletionConfig(stable_age_s=1)
    add_series(db, "6.1", modality="PT", count=5, expected=5)
    results = []
    barrier = threading.Barrier(4)

    def check(i):
        barrier.wait()
        with db.session() as s:
            if i % 2:
                results.extend(complete_due_series(s, cfg, now=T0 + timedelta(seconds=10)))
            else:
                done = complete_if_expected(s, "6.1", cfg, now=T0)
                results.extend([done] if done else [])

    threads = [threading.Thread(target=check, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1


def test_series_progress_is_a_read_only_check(db):
    add_series(db, "7.1", modality="PT", count=3, expected=4)
    add_series(db, "7.2", modality="PT", count=4, expected=4)
    add_series(db, "7.3", count=400)
    with db.session() as s:
        progress = [series_progress(s, uid) for uid in ("7.1", "7.2", "7.3")]
        assert series_progress(s, "absent") is None
    assert [p.expected_reached for p in progress] == [False, True, False]
    assert {p.state for p in progress} == {SeriesState.receiving}
    assert state_of(db, "7.2")[0] == SeriesState.receiving


def test_stable_age_counts_from_the_node_start_after_an_outage(db):
    cfg = CompletionConfig(stable_age_s=30)
    add_series(db, "1.1", last=T0)  # half received, then the node was down for an hour
    restart = T0 + timedelta(hours=1)
    with db.session() as s:
        assert complete_due_series(s, cfg, now=restart + timedelta(seconds=29), up_since=restart) == []
    with db.session() as s:
        (done,) = complete_due_series(s, cfg, now=restart + timedelta(seconds=30), up_since=restart)
    assert done.reason == STABLE_AGE
