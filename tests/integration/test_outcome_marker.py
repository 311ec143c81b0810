"""The WAL marker that settles a lost COMMIT after a crash, on real servers.

The record's marker (``pg_logical_emit_message`` inside the transaction) is a WAL record
carrying the xid. These tests check the server behaviour the rule in
:mod:`pgfailover.outcome` rests on, and the rule's answers, across a real crash of the
primary and the promotion of its synchronous standby:

- a commit the standby has, whose acknowledgement the client never read, resolves to
  COMMITTED from the new primary alone (no ``check_committed``);
- a transaction cut before its COMMIT, whose marker the standby replayed, keeps its
  number: the promoted standby gives out only later xids, and the answer is
  NOT_COMMITTED however many transactions run there first.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy

import pgfailover
import pgfailover.sqlalchemy
from pgfailover import _runner
from pgfailover.outcome import (
    CommitRecord,
    Observation,
    Outcome,
    ServerIdentity,
    lsn_value,
    parse_record,
    record_sql,
    resolve,
)
from pgfailover.pool import ConnectionPool
from pgfailover.testing import LocalCluster

Recorded = tuple[CommitRecord, ServerIdentity]

OBSERVE = (
    "SELECT (SELECT system_identifier FROM pg_catalog.pg_control_system())::text, "
    "pg_catalog.pg_is_in_recovery(), "
    "pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn()), "
    "pg_catalog.pg_last_wal_replay_lsn()::text, pg_catalog.pg_postmaster_start_time(), "
    "pg_catalog.pg_xact_status(%(xid)s::text::xid8)"
)


@pytest.fixture(scope="module")
def sync_cluster(pgfailover_cluster_factory: Any) -> LocalCluster:
    """Primary + one synchronous standby, no PgBouncer."""
    cluster: LocalCluster = pgfailover_cluster_factory(standbys=1, pgbouncer=None, synchronous=True)
    return cluster


def _record(
    conn: psycopg.Connection[Any],
    known: ServerIdentity | None = None,
    *,
    marker: bool | None = None,
) -> Recorded:
    row = conn.execute(record_sql(known, marker=marker)).fetchone()
    assert row is not None
    return parse_record([None if v is None else str(v) for v in row], known)


def _begin_and_record(conn: psycopg.Connection[Any]) -> CommitRecord:
    record, identity = _record(conn)
    assert identity.marker, "the application role may write the marker by default"
    assert record.marked
    return record


def _wait_replayed(cluster: LocalCluster, lsn: str, timeout: float = 20.0) -> None:
    standby = cluster.standbys[0]
    deadline = time.monotonic() + timeout
    with standby.connect() as conn:
        conn.autocommit = True
        while True:
            row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
            if row and row[0] and lsn_value(row[0]) >= lsn_value(lsn):
                return
            assert time.monotonic() < deadline, f"the standby did not replay {lsn}"
            time.sleep(0.02)


def _crash_and_promote(cluster: LocalCluster) -> None:
    old, new = cluster.primary, cluster.standbys[0]
    cluster.kill(old)
    cluster.promote(new)


def _observe(cluster: LocalCluster, xid: str) -> Observation:
    with cluster.primary.connect(superuser=False) as conn:
        row = conn.execute(OBSERVE, {"xid": xid}).fetchone()
        conn.rollback()
    assert row is not None
    return Observation.from_row(tuple(row))


def test_a_replicated_commit_whose_reply_was_lost_is_committed_after_a_crash(
    sync_cluster: LocalCluster,
) -> None:
    """Synchronous replication: the COMMIT returned (so the standby flushed it), the
    primary is killed and the standby promoted. Pretending the reply was lost, the new
    primary alone settles it: COMMITTED, because its history holds the marker (an
    unmarked record with the same facts is UNKNOWN: the old rule's answer)."""
    cluster = sync_cluster
    cluster.reset()
    with cluster.primary.connect(superuser=False, autocommit=False) as conn:
        record = _begin_and_record(conn)
        conn.execute("CREATE TEMP TABLE t (k int)")  # some work of the transaction
        conn.commit()
    _crash_and_promote(cluster)
    seen = _observe(cluster, record.xid)
    assert seen.timeline == record.timeline + 1
    outcome, reason = resolve(record, seen)
    assert outcome is Outcome.COMMITTED, reason
    unmarked = dataclasses.replace(record, marked=False)
    assert resolve(unmarked, seen)[0] is Outcome.UNKNOWN


def test_a_cut_transaction_keeps_its_number_once_its_marker_is_replayed(
    sync_cluster: LocalCluster,
) -> None:
    """A transaction whose marker reached the standby but whose COMMIT was never sent: after
    the crash and promotion the new primary hands out only xids after it (checked over
    several transactions), its status stays 'aborted', and the answer is NOT_COMMITTED."""
    cluster = sync_cluster
    cluster.reset()
    conn = cluster.primary.connect(superuser=False, autocommit=False)
    try:
        record = _begin_and_record(conn)
        # Nothing flushes an open transaction's WAL by itself. A WAL switch does, and
        # carries no xid (a commit elsewhere would carry a later xid, which alone would
        # move the standby's next xid past ours: not the marker's doing).
        with cluster.primary.connect() as admin:
            admin.execute("SELECT pg_switch_wal()")
        _wait_replayed(cluster, record.start_lsn)
        _crash_and_promote(cluster)
    finally:
        conn.close()
    with cluster.primary.connect(superuser=False) as new:
        new.autocommit = True
        given = [
            int(str(row[0]))
            for row in (
                new.execute("SELECT pg_current_xact_id()::text").fetchone() for _ in range(5)
            )
            if row is not None
        ]
    assert len(given) == 5
    assert min(given) > int(record.xid), (given, record.xid)
    seen = _observe(cluster, record.xid)
    assert seen.status == "aborted"
    outcome, reason = resolve(record, seen)
    assert outcome is Outcome.NOT_COMMITTED, reason


def test_a_role_that_may_not_write_the_marker_is_recorded_without_it(
    sync_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """With EXECUTE on pg_logical_emit_message revoked from PUBLIC, the marked record fails
    with the server's permission error (checked when the statement starts, even in a CASE
    branch never taken). The runner then records without the marker, on psycopg pools and
    SQLAlchemy engines alike: the work runs once and commits, the connection remembers
    the refusal (later transactions send no marker), and one warning says what to grant."""
    cluster = sync_cluster
    cluster.reset()
    _runner._warn_unmarked.cache_clear()  # once per process: start this test afresh
    caplog.set_level(logging.WARNING, logger="pgfailover")
    function = "pg_logical_emit_message(boolean, text, text)"
    # Function privileges live in each database's catalog: revoke in the application's.
    with psycopg.connect(cluster.primary.dsn(user="postgres"), autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS marker_keys (k text PRIMARY KEY)")
        admin.execute("GRANT ALL ON marker_keys TO PUBLIC")
        admin.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
        try:
            with cluster.primary.connect(superuser=False, autocommit=False) as conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(record_sql())
                conn.rollback()
                record, identity = _record(conn, None, marker=False)
                assert not identity.marker
                assert not record.marked

            def insert(conn: Any, key: str) -> None:
                conn.execute("INSERT INTO marker_keys (k) VALUES (%s)", [key])

            with ConnectionPool[Any](cluster.primary.dsn(), min_size=1, max_size=1) as pool:
                for key in ("pool-1", "pool-2"):
                    pgfailover.run_transaction(pool, insert, key)
                with pool.connection() as conn:
                    assert not _runner.identities[conn].marker
            engine = sqlalchemy.create_engine(cluster.primary.url("psycopg"))
            try:
                pgfailover.sqlalchemy.instrument(engine)

                def insert_sa(conn: Any, key: str) -> None:
                    conn.exec_driver_sql("INSERT INTO marker_keys (k) VALUES (%(k)s)", {"k": key})

                for key in ("engine-1", "engine-2"):
                    pgfailover.run_transaction(engine, insert_sa, key)
            finally:
                engine.dispose()
        finally:
            admin.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")
        keys = admin.execute("SELECT k FROM marker_keys ORDER BY k").fetchall()
        admin.execute("DROP TABLE marker_keys")
    assert [k for (k,) in keys] == ["engine-1", "engine-2", "pool-1", "pool-2"]
    warnings = [r for r in caplog.records if "pg_logical_emit_message" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "grant EXECUTE" in warnings[0].getMessage()
