# pgfailover: generate-sync
"""The process monitor on a real cluster: purge before requests, one prober, wake-ups.

Written once, async; ``tools/async_to_sync.py`` generates ``test_monitor.py``, the same
tests for the sync pool. Each test uses a private :class:`Monitor` with short timings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest

from pgfailover import _pool_common
from pgfailover.monitor import Monitor, Status
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory
from pgfailover.testing.proxy import FaultProxy

from .support import bouncer_cluster, eventually, eventually_async, table

KWARGS: dict[str, Any] = {"prepare_threshold": None, "autocommit": True}


async def _wait_for(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``check`` until it is true, failing the test after ``timeout`` seconds."""
    if True:  # ASYNC
        await eventually_async(check, timeout)
    else:
        eventually(check, timeout)


async def _blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking harness operation without blocking the event loop."""
    if True:  # ASYNC
        return await asyncio.to_thread(fn, *args)
    else:
        return fn(*args)


async def _insert(pool: AsyncConnectionPool[Any], name: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(f"INSERT INTO {name} (writer) VALUES (1)")


def _cluster_and_dsn(factory: ClusterFactory, through: str) -> tuple[LocalCluster, str]:
    """A reset cluster and the DSN to reach it: PgBouncer in ``through`` mode, or the
    nodes' multi-host list (``direct``, on the transaction-mode cluster)."""
    if through == "direct":
        cluster = bouncer_cluster(factory, "transaction")
        return cluster, cluster.multihost_dsn(connect_timeout=2)
    cluster = bouncer_cluster(factory, through)
    assert cluster.pgbouncer is not None
    return cluster, cluster.pgbouncer.dsn()


async def _failover(cluster: LocalCluster, through: str, monitor: Monitor) -> None:
    """Fail over; behind PgBouncer, repoint once the watch has seen the outage (as an HA
    tool's delay would let it: a failover and a repoint both done between two looks leave
    PgBouncer's clients nothing to notice in transaction mode)."""
    await _blocking(cluster.failover)
    if through != "direct":
        (endpoint,) = monitor.endpoints()

        def seen() -> bool:
            watch = monitor.watch_of(endpoint)
            return watch is not None and watch.outage_since is not None

        await _wait_for(seen)
        await _blocking(cluster.repoint_pgbouncer, cluster.primary)


@pytest.mark.parametrize("through", ["transaction", "session", "direct"])
async def test_idle_pool_is_purged_and_refilled_before_its_next_request(
    pgfailover_cluster_factory: ClusterFactory, through: str
) -> None:
    """A pool with no request in flight during a failover: the monitor purges its stale
    connections and refills it once the primary is writable, so that the first request
    after the failover succeeds at its first attempt (no poisoned connection, no retry)."""
    cluster, dsn = _cluster_and_dsn(pgfailover_cluster_factory, through)
    name = table(cluster)
    monitor = Monitor(interval=0.2)
    try:
        async with AsyncConnectionPool[Any](
            dsn, min_size=2, max_size=4, timeout=10, kwargs=KWARGS, monitor=monitor
        ) as pool:
            await pool.wait()
            (endpoint,) = monitor.endpoints()
            await _failover(cluster, through, monitor)

            def refilled() -> bool:
                watch = monitor.watch_of(endpoint)
                stats = pool.get_stats()
                return (
                    watch is not None
                    and watch.status is Status.WRITABLE
                    and stats["generations_purged"] >= 1
                    and stats.get("pool_available", 0) >= 2
                    and pool.failover_state.outage_since is None
                )

            await _wait_for(refilled)
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {name} (writer) VALUES (1)")
                cur = await conn.execute("SELECT pg_is_in_recovery()")
                assert await cur.fetchone() == (False,)
            stats = pool.get_stats()
        assert stats["connections_poisoned"] == 0, stats  # no request met the failure
        assert stats["failovers_detected"] == 1, stats
    finally:
        monitor.close()


async def test_pools_of_one_endpoint_share_one_watch_and_hold_their_attempts(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """Three pools on one PgBouncer endpoint: the monitor keeps one watch; while no primary
    is reachable the pools make no connection attempt but those the monitor grants, one at
    a time (the endpoint's one prober, and it keeps looking, also once a pool it granted
    attempts to is closed); after the repoint every pool left is woken and writes."""
    cluster, dsn = _cluster_and_dsn(pgfailover_cluster_factory, "transaction")
    name = table(cluster)
    monitor = Monitor(interval=0.2)
    pools = [
        AsyncConnectionPool[Any](
            dsn, min_size=1, max_size=2, timeout=10, kwargs=KWARGS, monitor=monitor, open=False
        )
        for _ in range(3)
    ]
    try:
        for pool in pools:
            await pool.open(wait=True)
        assert len(monitor.endpoints()) == 1
        await _blocking(cluster.failover)  # no repoint yet: PgBouncer leads to a standby
        await _wait_for(lambda: all(p.failover_state.outage_since is not None for p in pools))
        attempts = sum(p.get_stats().get("connections_num", 0) for p in pools)
        before = monitor.stats()
        await asyncio.sleep(1.0)  # a window of outage to count attempts in
        after = monitor.stats()
        made = sum(p.get_stats().get("connections_num", 0) for p in pools) - attempts
        # every attempt was granted (one may have begun in the window, its grant not ended)
        assert made <= after["grants"] - before["grants"] + 1
        assert after["checks"] - before["checks"] >= 2  # it keeps looking (50 ms apart)
        await pools.pop(0).close()  # a grant it holds is withdrawn: the watch goes on
        looks = monitor.stats()["checks"]
        await _wait_for(lambda: monitor.stats()["checks"] >= looks + 2)
        await _blocking(cluster.repoint_pgbouncer, cluster.primary)
        for i, pool in enumerate(pools):
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {name} (writer) VALUES (%s)", [i])
        await _wait_for(lambda: all(p.failover_state.outage_since is None for p in pools))
    finally:
        for pool in pools:
            await pool.close()
        monitor.close()


class _AttemptsPool(AsyncConnectionPool[Any]):
    """The pool, plus ``(start, end, ok)`` of each connection attempt (monotonic)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.attempts: list[tuple[float, float, bool]] = []
        super().__init__(*args, **kwargs)

    async def _connect(self, timeout: float | None = None) -> Any:
        start = time.monotonic()
        try:
            conn = await super()._connect(timeout)
        except BaseException:
            self.attempts.append((start, time.monotonic(), False))
            raise
        self.attempts.append((start, time.monotonic(), True))
        return conn


async def test_one_attempt_at_a_time_until_the_first_connects_after_the_outage(
    pgfailover_cluster_factory: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool holding several connection attempts during an outage: they go one at a time
    (each one the monitor's granted look) until one connects to the new primary, and the
    pool fills up again after it. (Once the outage is over a retry psycopg_pool scheduled
    for an attempt that failed may run beside the next held one: not asserted.)"""
    monkeypatch.setattr(_pool_common, "PARK_RECHECK", 60.0)  # no recheck lets one slip out
    cluster, dsn = _cluster_and_dsn(pgfailover_cluster_factory, "transaction")
    monitor = Monitor(interval=0.2)
    try:
        async with _AttemptsPool(
            dsn, min_size=3, max_size=3, timeout=10, kwargs=KWARGS, monitor=monitor
        ) as pool:
            await pool.wait()
            await _blocking(cluster.failover)

            def holding() -> bool:  # attempts held, none under way (one from before the
                # monitor's purge would not be gated)
                made = pool.get_stats().get("connections_num", 0)
                return len(pool._pgf_parked) >= 2 and made == len(pool.attempts)

            await _wait_for(holding)
            since = time.monotonic()  # single flight from here
            await _blocking(cluster.repoint_pgbouncer, cluster.primary)
            await _wait_for(lambda: pool.get_stats().get("pool_available", 0) >= 3)
            attempts = sorted(a for a in pool.attempts if a[0] >= since)
        first_ok = next(i for i, a in enumerate(attempts) if a[2])
        for before, after in itertools.pairwise(attempts[: first_ok + 1]):
            assert after[0] >= before[1], attempts  # never two at once until one connected
        assert sum(1 for a in attempts if a[2]) >= 3, attempts  # refilled by new connections
    finally:
        monitor.close()


@pytest.mark.parametrize("link", ["loopback", "slow"])
async def test_after_an_outage_a_pool_logs_in_only_for_what_waits(
    pgfailover_cluster_factory: ClusterFactory, monkeypatch: pytest.MonkeyPatch, link: str
) -> None:
    """A pool (min_size 1, max_size 2) purged by the monitor, with a request waiting
    through the outage, holds two connection attempts (the refill to min_size and the
    growth for that request): after the repoint one new connection serves the request, the
    other attempt, needed by no one then, is dropped: one login, and the pool is back at
    min_size with nothing held. Also through a slow link (a proxy adding 50 ms each way,
    so a login takes several times the held attempts' 0.1 s recheck here): the rechecks
    wait their turn behind the login under way."""
    slow = link == "slow"
    # loopback: no recheck lets one slip out; slow: rechecks during the login
    monkeypatch.setattr(_pool_common, "PARK_RECHECK", 0.1 if slow else 60.0)
    cluster, dsn = _cluster_and_dsn(pgfailover_cluster_factory, "transaction")
    name = table(cluster)
    monitor = Monitor(interval=0.2)
    assert cluster.pgbouncer is not None
    proxy = FaultProxy(cluster.pgbouncer) if slow else None
    try:
        if proxy is not None:
            proxy.start()
            proxy.latency(0.05)
            dsn = proxy.dsn_for(dsn)
        async with _AttemptsPool(
            dsn, min_size=1, max_size=2, timeout=15, kwargs=KWARGS, monitor=monitor
        ) as pool:
            await pool.wait()
            await _blocking(cluster.failover)
            await _wait_for(lambda: pool.failover_state.outage_since is not None)
            if True:  # ASYNC
                request = asyncio.create_task(_insert(pool, name))
            else:
                request = concurrent.futures.ThreadPoolExecutor(1).submit(_insert, pool, name)
            await _wait_for(lambda: len(pool._pgf_parked) == 2)  # refill and growth held
            since = time.monotonic()
            await _blocking(cluster.repoint_pgbouncer, cluster.primary)
            if True:  # ASYNC
                await asyncio.wait_for(request, 15)
            else:
                request.result(15)
            # quiet: no attempt held for its turn, none under way (a needless login
            # would be one of those, or already counted in the attempts)
            await _wait_for(lambda: not pool._pgf_parked and not pool._pgf_under_way)
            logins = [a for a in pool.attempts if a[0] >= since and a[2]]
            assert len(logins) == 1, pool.attempts
            assert pool.get_stats()["pool_size"] == 1
    finally:
        monitor.close()
        if proxy is not None:
            proxy.close()


async def test_a_request_that_meets_the_failover_makes_the_watch_look_at_once(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """With a watch interval of a minute, a pool whose request fails on the demoted node
    makes the monitor look at once: the watch sees the standby within seconds."""
    cluster, dsn = _cluster_and_dsn(pgfailover_cluster_factory, "transaction")
    name = table(cluster)
    monitor = Monitor(interval=60.0)
    try:
        async with AsyncConnectionPool[Any](
            dsn, min_size=1, max_size=2, timeout=3, kwargs=KWARGS, monitor=monitor
        ) as pool:
            await pool.wait()
            (endpoint,) = monitor.endpoints()
            await _blocking(cluster.failover)
            with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the failover gives
                await _insert(pool, name)

            def seen() -> bool:
                watch = monitor.watch_of(endpoint)
                return watch is not None and watch.status in (Status.READ_ONLY, Status.DOWN)

            await _wait_for(seen, timeout=10.0)
    finally:
        monitor.close()


async def test_direct_watch_notices_a_lost_session_at_once(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """On a direct connection the watch waits on its session's socket: with a one-minute
    interval, the primary's shutdown is noticed and the idle pool purged within seconds."""
    cluster, _ = _cluster_and_dsn(pgfailover_cluster_factory, "direct")
    monitor = Monitor(interval=60.0)
    try:
        async with AsyncConnectionPool[Any](
            cluster.primary.dsn(connect_timeout=2),
            min_size=1,
            max_size=2,
            kwargs=KWARGS,
            monitor=monitor,
        ) as pool:
            await pool.wait()
            await _blocking(cluster.failover)
            await _wait_for(lambda: pool.get_stats()["generations_purged"] >= 1, timeout=10.0)
            assert pool.get_stats()["connections_poisoned"] == 0
    finally:
        monitor.close()


async def test_closing_the_last_pool_ends_the_watch_and_monitor_false_opts_out(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """A pool made with monitor=False is not watched; closing the last watched pool of an
    endpoint ends its watch (no endpoint left) before close() returns."""
    _, dsn = _cluster_and_dsn(pgfailover_cluster_factory, "transaction")
    monitor = Monitor(interval=0.2)
    try:
        async with AsyncConnectionPool[Any](dsn, min_size=1, kwargs=KWARGS, monitor=False) as pool:
            await pool.wait()
            assert not pool.failover_state.monitored
        async with AsyncConnectionPool[Any](
            dsn, min_size=1, kwargs=KWARGS, monitor=monitor
        ) as pool:
            await pool.wait()
            assert pool.failover_state.monitored
            assert len(monitor.endpoints()) == 1
        assert monitor.endpoints() == []
        assert not pool.failover_state.monitored
    finally:
        monitor.close()


async def test_a_pool_joining_a_watch_refused_its_login_is_not_held(
    pgfailover_cluster: LocalCluster,
) -> None:
    """The watch of an endpoint logs in with its first pool's credentials; when the server
    refuses them (a wrong password), that is no outage: a second pool with good
    credentials joining the endpoint connects at once instead of waiting for the watch to
    see a primary it cannot see."""
    node = pgfailover_cluster.primary
    monitor = Monitor(interval=0.2)
    try:
        async with AsyncConnectionPool[Any](
            node.dsn(password="not-the-password"), min_size=0, max_size=1, monitor=monitor
        ):
            (endpoint,) = monitor.endpoints()

            def refused() -> bool:
                watch = monitor.watch_of(endpoint)
                return watch is not None and watch.status is Status.MISCONFIGURED

            await _wait_for(refused)
            async with AsyncConnectionPool[Any](
                node.dsn(), min_size=1, timeout=10, monitor=monitor
            ) as good:
                assert monitor.endpoints() == [endpoint]
                async with good.connection() as conn:
                    await conn.execute("SELECT 1")
                assert good.failover_state.outage_since is None
    finally:
        monitor.close()
