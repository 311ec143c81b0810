# pgfailover: generate-sync
"""pgfailover pools on a real cluster: recovery after failover and clear errors.

Written once, async; ``tools/async_to_sync.py`` generates ``test_pool.py``,
the same tests for the sync pool, so both are held to exactly the same checks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

import pgfailover
from pgfailover.errors import NoPrimaryAvailable
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
    table,
)

POOL_KWARGS: dict[str, Any] = {
    "kwargs": {"prepare_threshold": None, "autocommit": True},
    "min_size": 4,
    "max_size": 8,
    "timeout": 15,
}


# ------------------------------------------------------------------ what differs


async def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` until it is true, failing the test after ``timeout`` seconds."""
    if True:  # ASYNC
        await eventually_async(check, timeout)
    else:
        eventually(check, timeout)


async def _blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking harness operation (a failover, a repoint) without blocking the
    writers."""
    if True:  # ASYNC
        return await asyncio.to_thread(fn, *args)
    else:
        return fn(*args)


async def _writer(
    pool: AsyncConnectionPool[Any], table: str, i: int, stop: asyncio.Event, work: Workload
) -> None:
    while not stop.is_set():
        try:
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} (writer) VALUES (%s)", [i])
            work.ok.append(time.monotonic())
        except (psycopg.Error, psycopg_pool.PoolTimeout) as ex:
            work.failed.append((time.monotonic(), type(ex).__name__))


async def _start_writers(
    pool: AsyncConnectionPool[Any], table: str, stop: asyncio.Event, work: Workload
) -> list[Any]:
    if True:  # ASYNC
        return [asyncio.create_task(_writer(pool, table, i, stop, work)) for i in range(WRITERS)]
    else:
        threads = [
            threading.Thread(target=_writer, args=(pool, table, i, stop, work))
            for i in range(WRITERS)
        ]
        for thread in threads:
            thread.start()
        return threads


async def _join(workers: list[Any]) -> None:
    if True:  # ASYNC
        await asyncio.gather(*workers)
    else:
        for thread in workers:
            thread.join()


# ------------------------------------------------------------------ the tests


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


@pytest.mark.parametrize("mode", ["transaction", "session"])
async def test_pool_recovers_through_pgbouncer_after_repoint(
    pgfailover_cluster_factory: ClusterFactory,
    mode: str,
    pool_events: list[pgfailover.PoolEvent],
) -> None:
    """Concurrent writers through PgBouncer; failover; repoint 1 s later: the pool recovers
    without restart, the first write lands within 0.5 s of the repoint, the generation is
    purged, failures and probes are bounded, no session is left on the old primary, and the
    purge and recovery reach event hooks as PoolEvents naming the pool. About the pool's own
    recovery (``monitor=False``): the monitor's is pinned in test_monitor_async.py."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, mode)
    assert cluster.pgbouncer is not None
    name = table(cluster)
    old_primary = cluster.primary
    stop = asyncio.Event()
    work = Workload()
    async with AsyncConnectionPool[Any](
        cluster.pgbouncer.dsn(), name="orders", monitor=False, **POOL_KWARGS
    ) as pool:
        await pool.wait()
        workers = await _start_writers(pool, name, stop, work)
        try:
            await _wait_for(lambda: len(work.ok) > 20)
            await _blocking(cluster.failover)
            await _wait_for(lambda: pool.get_stats()["failovers_detected"] > 0)
            await asyncio.sleep(1.0)  # the outage an operator or HA tool takes to repoint
            timings = await _blocking(cluster.repoint_pgbouncer, cluster.primary)
            repointed_at = timings.ended_at["reload"]
            await _wait_for(lambda: len([t for t in work.ok if t > repointed_at]) > 50)
        finally:
            stop.set()
            await _join(workers)
        stats = pool.get_stats()
    assert work.first_ok_after(repointed_at) < 0.5
    assert stats["generations_purged"] >= 1
    assert stats["probes_run"] < 60, stats  # bounded by time, not by failing requests
    assert len(work.failed) <= 2 * WRITERS + stats["pool_max"], work.failed
    _check_pool_events(pool_events, "orders", stats)
    eventually(no_server_left_on(cluster, old_primary.port))
    with old_primary.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [cluster.user]
        ).fetchone()
        assert row == (0,)


async def test_multihost_pool_writes_to_new_primary_soon_after_it_is_writable(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A multi-host DSN without a pooler: after a failover the first write lands on the new
    primary within 0.5 s of its promotion."""
    cluster = pgfailover_cluster
    name = table(cluster)
    stop = asyncio.Event()
    work = Workload()
    kwargs = {**POOL_KWARGS, "kwargs": {"autocommit": True}}
    async with AsyncConnectionPool[Any](cluster.multihost_dsn(connect_timeout=2), **kwargs) as pool:
        await pool.wait()
        workers = await _start_writers(pool, name, stop, work)
        try:
            await _wait_for(lambda: len(work.ok) > 20)
            timings = await _blocking(cluster.failover)
            writable_at = timings.ended_at["promote"]
            await _wait_for(lambda: len([t for t in work.ok if t > writable_at]) > 50)
        finally:
            stop.set()
            await _join(workers)
    assert work.first_ok_after(writable_at) < 0.5


async def test_pool_pinned_to_the_demoted_node_names_it_as_standby(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A single-host DSN on the old primary: after the request timeout the error is a
    PoolTimeout naming the host a standby, without the password."""
    cluster = pgfailover_cluster
    old_primary = cluster.primary
    async with AsyncConnectionPool[Any](old_primary.dsn(), min_size=2, timeout=1.5) as pool:
        await pool.wait()
        await _blocking(cluster.failover)
        # The fast stop ended the idle connections: each fails once at its first use (57P01)
        # and is discarded; after that, requests wait for a primary and time out clearly.
        lost = 0
        while True:
            t0 = time.monotonic()
            try:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            except NoPrimaryAvailable as ex:
                error = ex
                break
            except psycopg.OperationalError:
                lost += 1
                assert lost <= 2, "more lost connections than the pool held"
        waited = time.monotonic() - t0
    assert 1.4 < waited < 3.0  # the request's own timeout, not a hang
    assert isinstance(error, psycopg_pool.PoolTimeout)
    assert error.hosts == {old_primary.address: "standby"}
    assert old_primary.address in str(error)
    assert cluster.password not in str(error)


async def test_wrong_password_fails_fast_with_the_auth_error(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A wrong password raises the driver's auth error well before the request timeout."""
    dsn = pgfailover_cluster.primary.dsn(password="wrong-password")
    async with AsyncConnectionPool[Any](dsn, min_size=1, timeout=20) as pool:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            await pool.getconn()
        assert time.monotonic() - t0 < 3.0
    assert pgfailover.classify(info.value).kind is pgfailover.Kind.CONFIGURATION
    assert "password authentication failed" in str(info.value)


class AppConnection(psycopg.AsyncConnection[Any]):
    """An application's own connection class: it counts its closes."""

    closes = 0

    async def close(self) -> None:
        AppConnection.closes += 1
        await super().close()


async def test_a_users_own_connection_class_is_kept_and_made_failover_aware(
    pgfailover_cluster: LocalCluster,
) -> None:
    """``connection_class=`` a plain psycopg subclass: connections are instances of it (its
    overrides run) and of pgfailover's class, and they poison themselves like any other."""
    dsn = pgfailover_cluster.primary.dsn()
    async with AsyncConnectionPool[Any](
        dsn, connection_class=AppConnection, min_size=1, max_size=1
    ) as pool:
        async with pool.connection() as conn:
            assert isinstance(conn, AppConnection)
            assert isinstance(conn, pgfailover.AsyncConnection)
            conn.simulate_recovery()
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                await conn.execute("SELECT 1")
            assert conn.poisoned is not None
        stats = pool.get_stats()
    assert stats["connections_poisoned"] == 1
    assert AppConnection.closes >= 1  # the poisoned connection was closed through the override


async def test_returning_a_stranger_connection_raises_the_pools_own_error(
    pgfailover_cluster: LocalCluster,
) -> None:
    """putconn() of a connection the pool did not give out raises psycopg_pool's
    ValueError, as psycopg_pool's own pool does."""
    dsn = pgfailover_cluster.primary.dsn()
    async with AsyncConnectionPool[Any](dsn, min_size=1, max_size=1) as pool:
        stranger = await psycopg.AsyncConnection.connect(dsn)
        try:
            with pytest.raises(ValueError, match="doesn't come from any pool"):
                await pool.putconn(stranger)
        finally:
            await stranger.close()


class CountingConnection(pgfailover.AsyncConnection[Any]):
    """Counts the connection attempts a pool makes."""

    attempts = 0

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.attempts += 1
        return await super().connect(*args, **kwargs)


async def test_a_wrong_password_reconnects_no_faster_than_psycopg_pools_schedule(
    pgfailover_cluster: LocalCluster,
) -> None:
    """With a wrong password the pool retries on psycopg_pool's own schedule (1 s, doubling:
    at most 3 attempts per missing connection in 3.5 s), not the failover schedule, and a
    request fails at once with the driver's error."""
    dsn = pgfailover_cluster.primary.dsn(password="wrong-password")
    CountingConnection.attempts = 0
    async with AsyncConnectionPool[Any](
        dsn, connection_class=CountingConnection, min_size=2, max_size=2, timeout=20
    ) as pool:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await pool.getconn()
        assert time.monotonic() - started < 5.0  # not the request's 20 s timeout
        await asyncio.sleep(3.5)  # the window whose attempts are counted
        attempts = CountingConnection.attempts
    assert 2 <= attempts <= 3 * 2, attempts


@pytest.mark.parametrize(
    "conninfo",
    [
        "host=127.0.0.1 port=abc dbname=app",
        "host=no-such-host.invalid dbname=app",
    ],
    ids=["bad-port", "unresolvable-host"],
)
async def test_configuration_errors_reach_the_caller_at_once(conninfo: str) -> None:
    """A value libpq cannot use or a host name that does not resolve is a configuration
    error: the request fails with the driver's error long before its timeout, instead of
    waiting for a primary that cannot appear."""
    async with AsyncConnectionPool[Any](conninfo, min_size=1, timeout=20) as pool:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            await pool.getconn()
        waited = time.monotonic() - started
    assert waited < 5.0, f"waited {waited:.1f} s for a configuration error"
    assert pgfailover.classify(info.value).kind is pgfailover.Kind.CONFIGURATION


async def test_a_parametrized_connection_class_is_accepted(
    pgfailover_cluster: LocalCluster,
) -> None:
    """``connection_class=Class[Row]`` (a generic alias, as psycopg_pool accepts) works for
    pgfailover's class and for a user's own; the connections are failover-aware."""
    dsn = pgfailover_cluster.primary.dsn()
    for cls in (pgfailover.AsyncConnection[Any], AppConnection):
        async with (
            AsyncConnectionPool[Any](dsn, connection_class=cls, min_size=1, max_size=1) as pool,
            pool.connection() as conn,
        ):
            assert isinstance(conn, pgfailover.AsyncConnection)
            await conn.execute("SELECT 1")


class ForeignConnection(pgfailover.AsyncConnection[Any]):
    """A connection class whose ``connect`` hands out a plain psycopg connection, as a
    wrapped or patched ``connect`` can."""

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> Any:
        return await psycopg.AsyncConnection.connect(*args, **kwargs)


async def test_a_plain_connection_given_out_still_goes_back_to_the_pool(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A connection that is not failover-aware after all (a wrapped ``connect``) is used
    and returned like any other: putconn never strands it."""
    dsn = pgfailover_cluster.primary.dsn()
    async with AsyncConnectionPool[Any](
        dsn, connection_class=ForeignConnection, min_size=1, max_size=1, timeout=5
    ) as pool:
        for _ in range(3):  # with max_size=1, a stranded connection would time out here
            async with pool.connection() as conn:
                assert not isinstance(conn, pgfailover.AsyncConnection)
                await conn.execute("SELECT 1")


async def test_a_poisoned_connection_returned_to_the_wrong_pool_leaves_that_pool_alone(
    pgfailover_cluster: LocalCluster,
) -> None:
    """putconn() of another pool's poisoned connection raises psycopg_pool's ValueError
    before anything else: the wrong pool neither closes it nor purges itself."""
    dsn = pgfailover_cluster.primary.dsn()
    async with (
        AsyncConnectionPool[Any](dsn, min_size=1, max_size=1, name="owner") as owner,
        AsyncConnectionPool[Any](dsn, min_size=1, max_size=1, name="other") as other,
    ):
        conn = await owner.getconn()
        conn.simulate_recovery()
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            await conn.execute("SELECT 1")
        assert conn.poisoned is not None
        with pytest.raises(ValueError, match="it comes from pool 'owner'"):
            await other.putconn(conn)
        assert not conn.closed
        assert other.get_stats()["generations_purged"] == 0
        assert other.get_stats()["connections_poisoned"] == 0
        await owner.putconn(conn)
