"""The retry runner on a real cluster, sync-only scenarios: checker workloads across
failovers and crashes (never duplicated, never lost), the record's cost and server
tracking, errors. The tests written once for sync and async are in test_runner_async.py."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import psycopg
import psycopg_pool
import pytest

import pgfailover
from pgfailover import _runner, transaction
from pgfailover.events import RetryEvent
from pgfailover.outcome import ServerIdentity, parse_record, record_sql
from pgfailover.pool import ConnectionPool
from pgfailover.retry import run_transaction
from pgfailover.testing import LocalCluster
from pgfailover.testing.trace import round_trips

from .support import count_key


def _insert(table: str) -> Any:
    def work(conn: psycopg.Connection[Any], key: str) -> str:
        conn.execute(f"INSERT INTO {table} (k) VALUES (%s)", [key])
        return key

    return work


def _ainsert(table: str) -> Any:
    async def work(conn: psycopg.AsyncConnection[Any], key: str) -> str:
        await conn.execute(f"INSERT INTO {table} (k) VALUES (%s)", [key])
        return key

    return work


# ------------------------------------------------------------------ psycopg pools


def test_application_error_propagates_unchanged_and_is_not_retried(
    pgfailover_cluster: LocalCluster, keys_table: str, retry_events: list[RetryEvent]
) -> None:
    """A unique violation is the program's business: raised as is, after one attempt."""
    key = uuid.uuid4().hex
    with ConnectionPool[Any](pgfailover_cluster.primary.dsn(), min_size=1) as pool:
        run_transaction(pool, _insert(keys_table), key)
        with pytest.raises(psycopg.errors.UniqueViolation):
            run_transaction(pool, _insert(keys_table), key)
    assert [e.action for e in retry_events] == ["give up"]


def test_decorator_retries_a_standby_error_until_the_deadline_then_raises_it(
    pgfailover_cluster: LocalCluster, keys_table: str, retry_events: list[RetryEvent]
) -> None:
    """On a node that stays a standby, the decorated function retries with backoff until its
    timeout, then raises the driver's own 25006 with a note of the attempts made."""
    cluster = pgfailover_cluster
    old = cluster.primary
    cluster.failover()
    dsn = old.dsn()  # now a standby

    with psycopg.connect(dsn, autocommit=True) as conn:  # a plain pool would hand this out
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    with psycopg_pool.ConnectionPool(dsn, min_size=1) as pool:

        @transaction(pool, timeout=1.0, wait_max=0.2)
        def write(conn: psycopg.Connection[Any], key: str) -> None:
            conn.execute(f"INSERT INTO {keys_table} (k) VALUES (%s)", [key])

        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
            write("k1")
    assert len(retry_events) >= 3
    assert retry_events[-1].action == "give up"
    assert all(e.action == "retry" for e in retry_events[:-1])
    assert any("gave up after" in note for note in getattr(info.value, "__notes__", []))


def test_wrong_target_type_is_a_clear_type_error() -> None:
    """Anything but a pool, engine or sessionmaker is refused with what to pass instead."""
    with pytest.raises(TypeError, match="psycopg_pool pool"):
        run_transaction("postgresql://", lambda conn: None)


# ------------------------------------------------------------------ the checker workload


@pytest.fixture(scope="module")
def sync_cluster(pgfailover_cluster_factory: Any) -> LocalCluster:
    """Primary + standby with synchronous replication: an acknowledged commit survives any
    failover (with asynchronous replication an immediate stop may lose acknowledged ones)."""
    cluster: LocalCluster = pgfailover_cluster_factory(standbys=1, pgbouncer=None, synchronous=True)
    return cluster


class Checker:
    """Workers inserting unique keys through the runner, and what each was told."""

    def __init__(
        self, pool: ConnectionPool[Any], table: str, workers: int = 4, *, check: bool = True
    ) -> None:
        self.pool = pool
        self.check = check
        self.table = table
        self.acked: set[str] = set()
        self.unknown: set[str] = set()
        self.failed: dict[str, str] = {}
        self.committed_after_loss = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(w,)) for w in range(workers)]

    def _work(self, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            key = f"{worker}-{i}"
            try:
                pgfailover.TransactionRunner(
                    self.pool,
                    timeout=30,
                    check_committed=(
                        functools.partial(self._exists, key=key) if self.check else None
                    ),
                )(self._insert, key)
                self.acked.add(key)
            except pgfailover.CommitOutcomeUnknown:
                self.unknown.add(key)
            except Exception as ex:
                self.failed[key] = f"{type(ex).__name__}: {ex}"

    def _insert(self, conn: psycopg.Connection[Any], key: str) -> None:
        conn.execute(f"INSERT INTO {self.table} (k) VALUES (%s)", [key])

    def _exists(self, conn: psycopg.Connection[Any], key: str) -> bool:
        row = conn.execute(f"SELECT count(*) FROM {self.table} WHERE k = %s", [key]).fetchone()
        return row is not None and row[0] > 0

    def __enter__(self) -> Checker:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def verify(self, cluster: LocalCluster) -> dict[str, int]:
        """Every acknowledged key exists exactly once; no key reported failed exists."""
        with cluster.primary.connect(superuser=False) as conn:
            rows = conn.execute(f"SELECT k, count(*) FROM {self.table} GROUP BY k").fetchall()
        counts: dict[str, int] = dict(rows)
        duplicated = {k: n for k, n in counts.items() if n > 1}
        assert not duplicated, f"keys written twice: {duplicated}"
        lost = self.acked - counts.keys()
        assert not lost, f"acknowledged keys missing: {sorted(lost)[:10]}"
        phantom = self.failed.keys() & counts.keys()
        assert not phantom, f"keys reported failed (not unknown) that exist: {sorted(phantom)}"
        return {"acked": len(self.acked), "rows": len(counts), "unknown": len(self.unknown)}


def _eventually_more(checker: Checker, n: int, timeout: float = 20.0) -> None:
    target = len(checker.acked) + n
    deadline = time.monotonic() + timeout
    while len(checker.acked) < target:
        assert time.monotonic() < deadline, f"no progress: {checker.failed or checker.unknown}"
        time.sleep(0.02)


def test_checker_workload_survives_fast_failovers_with_no_failure(
    sync_cluster: LocalCluster, retry_events: list[RetryEvent]
) -> None:
    """4 workers insert unique keys through the runner across three fast failovers: no worker
    sees a failure, every acknowledged key exists exactly once, and no key is duplicated."""
    cluster = sync_cluster
    cluster.reset()
    name = f"c_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, k text NOT NULL)")
    dsn = cluster.multihost_dsn(connect_timeout=2)
    with (
        ConnectionPool[Any](dsn, min_size=4, max_size=8, timeout=30) as pool,
        Checker(pool, name) as checker,
    ):
        for _ in range(3):
            _eventually_more(checker, 30)
            cluster.failover("fast")
        _eventually_more(checker, 30)
    summary = checker.verify(cluster)
    assert not checker.failed, checker.failed
    assert not checker.unknown, checker.unknown
    assert summary["acked"] == summary["rows"] >= 120
    assert any(e.action == "retry" for e in retry_events), "no failover reached a worker"
    print(f"fast failovers: {summary}, retry_events: {Counter(e.action for e in retry_events)}")


def test_checker_workload_never_loses_or_duplicates_across_crashes(
    sync_cluster: LocalCluster, retry_events: list[RetryEvent]
) -> None:
    """The same workload across an immediate-stop failover and a kill + promote, without
    ``check_committed``: every acknowledged key exists exactly once, a key reported failed
    never exists, and no commit outcome is left unknown (synchronous replication: the WAL
    marker lets the new primary settle every lost COMMIT)."""
    cluster = sync_cluster
    cluster.reset()
    name = f"c_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, k text NOT NULL)")
    dsn = cluster.multihost_dsn(connect_timeout=2)
    with (
        ConnectionPool[Any](dsn, min_size=4, max_size=8, timeout=30) as pool,
        Checker(pool, name, check=False) as checker,
    ):
        _eventually_more(checker, 30)
        cluster.failover("immediate")
        _eventually_more(checker, 30)
        old, new = cluster.primary, cluster.standbys[0]
        cluster.kill(old)
        cluster.promote(new)
        cluster.rejoin(old, new)
        _eventually_more(checker, 30)
    summary = checker.verify(cluster)
    assert summary["acked"] >= 90
    assert not checker.unknown, checker.unknown
    assert any(e.action == "retry" for e in retry_events), "no crash reached a worker"
    failed = Counter(v.split(":")[0] for v in checker.failed.values())
    actions = Counter(e.action for e in retry_events)
    print(f"crashes: {summary}, retry events: {actions}, failed: {failed}")


# ------------------------------------------------------------------ happy-path cost


def test_outcome_tracking_adds_no_round_trip_per_transaction(
    pgfailover_cluster: LocalCluster, keys_table: str, tmp_path: Any
) -> None:
    """Per transaction, the runner with commit-outcome tracking makes as many round trips as
    a bare transaction (BEGIN, INSERT, COMMIT): the record rides in BEGIN's round trip."""
    work = _insert(keys_table)
    counts = {}
    with ConnectionPool[Any](pgfailover_cluster.primary.dsn(), min_size=1, max_size=1) as pool:
        for name in ("bare", "runner"):
            path = tmp_path / f"{name}.trace"
            with path.open("w") as f:
                with pool.connection() as conn:
                    conn.pgconn.trace(f.fileno())
                for _ in range(20):
                    key = uuid.uuid4().hex
                    if name == "bare":
                        with pool.connection() as conn:
                            work(conn, key)
                    else:
                        run_transaction(pool, work, key)
                with pool.connection() as conn:
                    conn.pgconn.untrace()
            counts[name] = round_trips(path.read_text())
    assert counts["bare"] >= 60  # BEGIN, INSERT, COMMIT for each of 20
    assert 60 <= counts["runner"] <= counts["bare"], counts  # 3 per transaction each


def test_record_reads_the_control_file_only_when_the_server_is_new(
    pgfailover_cluster: LocalCluster,
) -> None:
    """The record reads the server's identity (and so the control file) for an unknown
    server only: with the identity of the server it runs on, the identity column is NULL
    (CASE never evaluates the read); with another server's, it is read and names this one."""
    with pgfailover_cluster.primary.connect(superuser=False) as conn:
        row = conn.execute(record_sql()).fetchone()
        assert row is not None
        _, identity = parse_record(list(row))
        conn.rollback()
        stranger = ServerIdentity(identity.started_at - timedelta(seconds=1), identity.system_id)
        same = conn.execute(record_sql(identity)).fetchone()
        conn.rollback()
        other = conn.execute(record_sql(stranger)).fetchone()
        conn.rollback()
        started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert same is not None
    assert same[4] is None
    assert parse_record(list(same), identity)[1] is identity
    assert other is not None
    assert other[4] is not None
    assert parse_record(list(other), stranger)[1] == identity
    assert started is not None
    assert identity.started_at == started[0]


def test_record_follows_the_server_behind_pgbouncer_after_a_repoint(
    pgfailover_cluster: LocalCluster, keys_table: str
) -> None:
    """Through PgBouncer the same client connection reaches another server after a
    failover and repoint: the record notices the new postmaster and reads its identity
    again, and the runner keeps writing."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    work = _insert(keys_table)
    seen: list[datetime] = []

    def record_and_insert(conn: psycopg.Connection[Any], key: str) -> str:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        assert row is not None
        seen.append(row[0])
        return str(work(conn, key))

    dsn = cluster.pgbouncer.dsn(prepare_threshold=None)
    with ConnectionPool[Any](dsn, min_size=1, max_size=1) as pool:
        run_transaction(pool, record_and_insert, "before")
        with pool.connection() as conn:
            first = _runner.identities[conn]
        cluster.failover("fast")
        cluster.repoint_pgbouncer(cluster.primary)
        pgfailover.TransactionRunner(pool, timeout=10)(record_and_insert, "after")
        with pool.connection() as conn:
            second = _runner.identities.get(conn)
    assert second is not None
    assert first.started_at == seen[0]
    assert second.started_at == seen[-1] != seen[0]
    assert second.system_id == first.system_id  # a standby promoted: the same system
    assert count_key(cluster, keys_table, "before") == count_key(cluster, keys_table, "after") == 1
