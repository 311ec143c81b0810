"""pgfailover pools on a real cluster: recovery after failover, clear errors, no extra cost."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

import pgfailover
from pgfailover.errors import NoPrimaryAvailable
from pgfailover.pool import ConnectionPool
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory

from .support import (
    WRITERS,
    Workload,
    bouncer_cluster,
    eventually,
    eventually_async,
    no_server_left_on,
    reset_statements,
    statement_calls,
    table,
)


def _run_writers(pool: ConnectionPool[Any], table: str, stop: threading.Event) -> Workload:
    work = Workload()

    def writer(i: int) -> None:
        while not stop.is_set():
            try:
                with pool.connection() as conn:
                    conn.execute(f"INSERT INTO {table} (writer) VALUES (%s)", [i])
                work.ok.append(time.monotonic())
            except (psycopg.Error, psycopg_pool.PoolTimeout) as ex:
                work.failed.append((time.monotonic(), type(ex).__name__))

    work.threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in work.threads:
        t.start()
    return work


async def _async_writer(
    pool: AsyncConnectionPool[Any], table: str, i: int, stop: asyncio.Event, work: Workload
) -> None:
    while not stop.is_set():
        try:
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} (writer) VALUES (%s)", [i])
            work.ok.append(time.monotonic())
        except (psycopg.Error, psycopg_pool.PoolTimeout) as ex:
            work.failed.append((time.monotonic(), type(ex).__name__))


POOL_KWARGS: dict[str, Any] = {
    "kwargs": {"prepare_threshold": None, "autocommit": True},
    "min_size": 4,
    "max_size": 8,
    "timeout": 15,
}


@pytest.fixture
def pool_events() -> Iterator[list[pgfailover.PoolEvent]]:
    """PoolEvents delivered to a subscribed hook during the test."""
    seen: list[pgfailover.PoolEvent] = []

    def hook(event: pgfailover.Event) -> None:
        if isinstance(event, pgfailover.PoolEvent):
            seen.append(event)

    unsubscribe = pgfailover.subscribe(hook)
    yield seen
    unsubscribe()


def _check_pool_events(
    events: list[pgfailover.PoolEvent], pool: str, stats: dict[str, int]
) -> None:
    mine = [e for e in events if e.pool == pool]
    purged = [e for e in mine if e.action == "generation purged"]
    recovered = [e for e in mine if e.action == "primary reached again"]
    assert len(purged) == stats["generations_purged"], mine
    assert all(e.reason for e in purged), purged
    assert recovered, mine
    assert recovered[-1].recovery is not None
    assert int(recovered[-1].recovery * 1000) == stats["recovery_ms_last"]


def _check_recovery(
    cluster: LocalCluster,
    old_primary: Any,
    work: Workload,
    repointed_at: float,
    stats: dict[str, int],
) -> None:
    """What a recovery through PgBouncer must show, sync and async alike."""
    assert work.first_ok_after(repointed_at) < 0.5
    assert stats["generations_purged"] >= 1
    assert stats["probes_run"] < 60, stats  # bounded by time, not by failing requests
    assert len(work.failed) <= 2 * WRITERS + stats["pool_max"], work.failed
    eventually(no_server_left_on(cluster, old_primary.port))
    with old_primary.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [cluster.user]
        ).fetchone()
        assert row == (0,)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_pool_recovers_through_pgbouncer_after_repoint(
    pgfailover_cluster_factory: ClusterFactory,
    mode: str,
    pool_events: list[pgfailover.PoolEvent],
) -> None:
    """Concurrent writers through PgBouncer; failover; repoint 1 s later: the pool recovers
    without restart, the first write lands within 0.5 s of the repoint, no server connection
    to the standby survives, the probes are bounded, and the pool's purge and recovery
    reach event hooks as PoolEvents naming the pool."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, mode)
    assert cluster.pgbouncer is not None
    name = table(cluster)
    old_primary = cluster.primary
    stop = threading.Event()
    with ConnectionPool[Any](cluster.pgbouncer.dsn(), name="orders", **POOL_KWARGS) as pool:
        pool.wait()
        work = _run_writers(pool, name, stop)
        try:
            eventually(lambda: len(work.ok) > 20)
            cluster.failover()
            eventually(lambda: pool.get_stats()["failovers_detected"] == 1)
            time.sleep(1.0)  # the outage an operator or HA tool takes to repoint
            repointed_at = cluster.repoint_pgbouncer(cluster.primary).ended_at["reload"]
            eventually(lambda: any(t > repointed_at for t in work.ok))
            eventually(lambda: len([t for t in work.ok if t > repointed_at]) > 50)
        finally:
            stop.set()
            for t in work.threads:
                t.join()
        stats = pool.get_stats()
    _check_recovery(cluster, old_primary, work, repointed_at, stats)
    _check_pool_events(pool_events, "orders", stats)


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_async_pool_recovers_through_pgbouncer_after_repoint(
    pgfailover_cluster_factory: ClusterFactory,
    mode: str,
    pool_events: list[pgfailover.PoolEvent],
) -> None:
    """The async pool, under the same workload and checks as the sync one: it recovers
    within 0.5 s of the repoint, purges, bounds its probes and failures, leaves no session
    on the old primary, and reports its purge and recovery as PoolEvents."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, mode)
    assert cluster.pgbouncer is not None
    name = table(cluster)
    old_primary = cluster.primary
    stop = asyncio.Event()
    work = Workload()
    async with AsyncConnectionPool[Any](
        cluster.pgbouncer.dsn(), name="orders-async", **POOL_KWARGS
    ) as pool:
        await pool.wait()
        tasks = [
            asyncio.create_task(_async_writer(pool, name, i, stop, work)) for i in range(WRITERS)
        ]
        try:
            await eventually_async(lambda: len(work.ok) > 20)
            await asyncio.to_thread(cluster.failover)
            await eventually_async(lambda: pool.get_stats()["failovers_detected"] > 0)
            await asyncio.sleep(1.0)
            timings = await asyncio.to_thread(cluster.repoint_pgbouncer, cluster.primary)
            repointed_at = timings.ended_at["reload"]
            await eventually_async(lambda: len([t for t in work.ok if t > repointed_at]) > 50)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        stats = pool.get_stats()
    _check_recovery(cluster, old_primary, work, repointed_at, stats)
    _check_pool_events(pool_events, "orders-async", stats)


def test_multihost_pool_writes_to_new_primary_soon_after_it_is_writable(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Direct multi-host DSN: after failover() the pool writes to the new primary within 0.5 s
    of the promoted node accepting writes."""
    cluster = pgfailover_cluster
    name = table(cluster)
    stop = threading.Event()
    kwargs = {**POOL_KWARGS, "kwargs": {"autocommit": True}}
    with ConnectionPool[Any](cluster.multihost_dsn(connect_timeout=2), **kwargs) as pool:
        pool.wait()
        work = _run_writers(pool, name, stop)
        try:
            eventually(lambda: len(work.ok) > 20)
            timings = cluster.failover()
            writable_at = timings.ended_at["promote"]
            eventually(lambda: len([t for t in work.ok if t > writable_at]) > 50)
        finally:
            stop.set()
            for t in work.threads:
                t.join()
    assert work.first_ok_after(writable_at) < 0.5


async def test_async_multihost_pool_follows_the_new_primary(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Async twin of the multi-host recovery test."""
    cluster = pgfailover_cluster
    name = table(cluster)
    stop = asyncio.Event()
    work = Workload()
    kwargs = {**POOL_KWARGS, "kwargs": {"autocommit": True}}
    async with AsyncConnectionPool[Any](cluster.multihost_dsn(connect_timeout=2), **kwargs) as pool:
        await pool.wait()
        tasks = [
            asyncio.create_task(_async_writer(pool, name, i, stop, work)) for i in range(WRITERS)
        ]
        try:
            await eventually_async(lambda: len(work.ok) > 20)
            timings = await asyncio.to_thread(cluster.failover)
            writable_at = timings.ended_at["promote"]
            await eventually_async(lambda: len([t for t in work.ok if t > writable_at]) > 50)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    assert work.first_ok_after(writable_at) < 0.5


def test_pool_pinned_to_the_demoted_node_names_it_as_standby(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A single-host DSN on the old primary: after the timeout the error names it a standby."""
    cluster = pgfailover_cluster
    old_primary = cluster.primary
    with ConnectionPool[Any](old_primary.dsn(), min_size=2, timeout=1.5) as pool:
        pool.wait()
        cluster.failover()
        # The fast stop ended the idle connections: each fails once at its first use (57P01)
        # and is discarded; after that, requests wait for a primary and time out clearly.
        lost = 0
        while True:
            t0 = time.monotonic()
            try:
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            except NoPrimaryAvailable as ex:
                error = ex
                break
            except psycopg.OperationalError:
                lost += 1
                assert lost <= 2, "more lost connections than the pool held"
        assert 1.4 < time.monotonic() - t0 < 3.0
    assert isinstance(error, psycopg_pool.PoolTimeout)
    info = pytest.ExceptionInfo.from_exception(error)
    assert info.value.hosts == {old_primary.address: "standby"}
    assert old_primary.address in str(info.value)
    assert cluster.password not in str(info.value)


async def test_async_pool_pinned_to_the_demoted_node_names_it_as_standby(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Async twin of the pinned-node test."""
    cluster = pgfailover_cluster
    old_primary = cluster.primary
    async with AsyncConnectionPool[Any](old_primary.dsn(), min_size=2, timeout=1.5) as pool:
        await pool.wait()
        await asyncio.to_thread(cluster.failover)
        lost = 0
        while True:
            try:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            except NoPrimaryAvailable as ex:
                error = ex
                break
            except psycopg.OperationalError:
                lost += 1
                assert lost <= 2, "more lost connections than the pool held"
    info = pytest.ExceptionInfo.from_exception(error)
    assert info.value.hosts == {old_primary.address: "standby"}


def test_wrong_password_fails_fast_with_the_auth_error(pgfailover_cluster: LocalCluster) -> None:
    """A wrong password raises the driver's auth error well before the request timeout."""
    dsn = pgfailover_cluster.primary.dsn(password="wrong-password")
    with ConnectionPool[Any](dsn, min_size=1, timeout=20) as pool:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            pool.getconn()
        assert time.monotonic() - t0 < 3.0
    assert pgfailover.classify(info.value).kind is pgfailover.Kind.CONFIGURATION
    assert "password authentication failed" in str(info.value)


async def test_async_wrong_password_fails_fast(pgfailover_cluster: LocalCluster) -> None:
    """Async twin: the auth error arrives well before the request timeout."""
    dsn = pgfailover_cluster.primary.dsn(password="wrong-password")
    async with AsyncConnectionPool[Any](dsn, min_size=1, timeout=20) as pool:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            await pool.getconn()
        assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
def test_happy_path_costs_no_extra_round_trip_per_checkout(
    pgfailover_cluster: LocalCluster, through: str
) -> None:
    """On a healthy cluster, server-side statement counts for 300 checkouts are those of
    psycopg_pool plus one probe (BEGIN, query, ROLLBACK) per connection the pool opened:
    nothing per checkout."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    dsn = cluster.primary.dsn() if through == "direct" else cluster.pgbouncer.dsn()
    kwargs: dict[str, Any] = {"kwargs": {"prepare_threshold": None}, "min_size": 2, "max_size": 2}
    counts = {}
    opened = 0
    for name, cls in (
        ("psycopg_pool", psycopg_pool.ConnectionPool),
        ("pgfailover", ConnectionPool),
    ):
        reset_statements(cluster)
        with cls(dsn, **kwargs) as pool:
            pool.wait()
            for _ in range(300):
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            opened = pool.get_stats().get("connections_num", 0)
        counts[name] = statement_calls(cluster)
    assert counts["psycopg_pool"] >= 600  # SELECT 1 and COMMIT per checkout
    assert counts["pgfailover"] - counts["psycopg_pool"] <= 3 * opened


def test_pool_rejects_a_plain_connection_class() -> None:
    """connection_class must be pgfailover.Connection or a subclass: a clear TypeError."""
    with pytest.raises(TypeError, match=r"pgfailover\.Connection"):
        ConnectionPool("", connection_class=psycopg.Connection, open=False)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="recheck_interval"):
        ConnectionPool("", recheck_interval=-1, open=False)
