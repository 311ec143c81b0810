# pgfailover: generate-sync
"""The process monitor with pools that follow a topology, on real clusters: one watch per
topology source follows the leader, purges idle pools before their next request when the
leader goes, and wakes them when a writable leader is named; and a direct multi-host
endpoint whose hosts are all standbys is reported read-only, naming them.

Written once, async; ``tools/async_to_sync.py`` generates ``test_monitor_topology.py``
(the sync pool with the sync sources, which the monitor reads in a thread).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgfailover
from pgfailover.classify import Kind, Phase, classify, read_only_hosts
from pgfailover.monitor import Monitor, Status
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster, PatroniCluster
from pgfailover.testing.proxy import FaultProxy
from pgfailover.topology import AsyncHostListTopology, AsyncPatroniTopology

from .support import eventually, eventually_async, table

KWARGS: dict[str, Any] = {"prepare_threshold": None, "autocommit": True}


async def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
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


def _hostless(dsn: str) -> str:
    """``dsn`` without host and port (the topology supplies them)."""
    params = conninfo_to_dict(dsn)
    del params["host"], params["port"]
    return make_conninfo("", **params, connect_timeout=2)


async def _write(pool: AsyncConnectionPool[Any], name: str) -> int:
    """Insert a row; the port of the server that took it."""
    async with pool.connection() as conn:
        await conn.execute(f"INSERT INTO {name} (writer) VALUES (1)")
        cur = await conn.execute("SELECT inet_server_port()")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


def _refilled(pool: AsyncConnectionPool[Any], size: int) -> Callable[[], bool]:
    """A check: the monitor says writable, the outage is over, ``size`` connections wait."""

    def check() -> bool:
        health = pgfailover.health(pool)
        return (
            health.writable
            and pool.failover_state.outage_since is None
            and pool.get_stats().get("pool_available", 0) >= size
        )

    return check


def _outage_seen(pool: AsyncConnectionPool[Any]) -> Callable[[], bool]:
    """A check: the monitor says not writable and the pool was purged."""

    def check() -> bool:
        health = pgfailover.health(pool)
        return (
            not health.writable
            and health.monitored
            and pool.get_stats().get("generations_purged", 0) >= 1
        )

    return check


class _Sampler:
    """Samples ``pgfailover.health(pool)`` every 10 ms in a thread while a blocking
    harness operation runs (the sync twin cannot poll meanwhile): ``seen`` holds
    ``(monitored, writable)`` of each sample."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool
        self.seen: list[tuple[bool, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            health = pgfailover.health(self.pool)
            self.seen.append((health.monitored, health.writable))

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def test_idle_pool_following_a_host_list_is_purged_and_refilled_by_the_monitor(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A pool with ``topology=`` (a host list) and no request in flight, its primary
    stopped and a standby promoted: the monitor's watch of the topology reports the pool
    monitored and not writable during the outage, purges the idle connections, and once the
    new leader is named and writable refills the pool, so that the next request lands on
    the new primary at its first attempt (no poisoned connection)."""
    cluster = pgfailover_cluster
    old, new = cluster.primary, cluster.standbys[0]
    name = table(cluster)
    source = AsyncHostListTopology(cluster.multihost_dsn(), timeout=1.0)
    monitor = Monitor(interval=0.2)
    try:
        async with AsyncConnectionPool[Any](
            _hostless(cluster.primary.dsn()),
            topology=source,
            min_size=2,
            max_size=4,
            timeout=10,
            kwargs=KWARGS,
            monitor=monitor,
        ) as pool:
            await pool.wait()
            await _wait_for(_refilled(pool, 2))
            health = pgfailover.health(pool)
            assert health.monitored
            assert health.endpoint == source.description
            assert len(monitor.endpoints()) == 1
            assert await _write(pool, name) == old.port

            await _blocking(cluster.stop, old)
            await _wait_for(_outage_seen(pool))
            assert pgfailover.health(pool).role in (Status.DOWN.value, Status.READ_ONLY.value)
            await _blocking(cluster.promote, new)
            await _wait_for(_refilled(pool, 2))
            assert pgfailover.health(pool).monitored

            assert await _write(pool, name) == new.port
            stats = pool.get_stats()
        assert stats["connections_poisoned"] == 0, stats  # no request met the failure
    finally:
        monitor.close()


async def test_pools_sharing_a_topology_share_one_watch(pgfailover_cluster: LocalCluster) -> None:
    """Two pools given the same topology object: the monitor keeps one watch for both
    (one endpoint, named by the source), each pool's health is the watch's; closing both
    ends it."""
    cluster = pgfailover_cluster
    source = AsyncHostListTopology(cluster.multihost_dsn(), timeout=1.0)
    monitor = Monitor(interval=0.2)
    conninfo = _hostless(cluster.primary.dsn())
    try:
        async with (
            AsyncConnectionPool[Any](
                conninfo, topology=source, min_size=1, kwargs=KWARGS, monitor=monitor
            ) as one,
            AsyncConnectionPool[Any](
                conninfo, topology=source, min_size=1, kwargs=KWARGS, monitor=monitor
            ) as two,
        ):
            await _wait_for(lambda: pgfailover.health(one).writable)
            assert [str(e) for e in monitor.endpoints()] == [source.description]
            assert pgfailover.health(two) == pgfailover.health(one)
        assert monitor.endpoints() == []
    finally:
        monitor.close()


async def test_a_multi_host_endpoint_of_standbys_only_is_read_only(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A direct multi-host conninfo whose hosts are all standbys (the standby, directly and
    through a proxy): libpq's real error (``target_session_attrs=read-write``) is classified
    READ_ONLY and names both hosts; the monitor reports the endpoint read-only (not down),
    naming them, and a request's NoPrimaryAvailable calls them standbys."""
    cluster = pgfailover_cluster
    standby = cluster.standbys[0]
    with FaultProxy(standby) as proxy:
        hosts = [(standby.host, standby.port), (proxy.host, proxy.port)]
        dsn = cluster.multihost_dsn()
        params = conninfo_to_dict(dsn)
        params["host"] = ",".join(h for h, _ in hosts)
        params["port"] = ",".join(str(p) for _, p in hosts)
        dsn = make_conninfo("", **params, connect_timeout=2)
        addresses = [f"{h}:{p}" for h, p in hosts]

        with pytest.raises(psycopg.OperationalError) as caught:
            await psycopg.AsyncConnection.connect(dsn, target_session_attrs="read-write")
        assert classify(caught.value, phase=Phase.CONNECT).kind is Kind.READ_ONLY
        found = read_only_hosts(str(caught.value))
        assert found is not None
        assert sorted(found) == sorted(addresses)

        monitor = Monitor(interval=0.2)
        try:
            async with AsyncConnectionPool[Any](
                dsn, min_size=1, timeout=1.0, kwargs=KWARGS, monitor=monitor, open=False
            ) as pool:
                await pool.open(wait=False)

                def read_only() -> bool:
                    return pgfailover.health(pool).role == Status.READ_ONLY.value

                await _wait_for(read_only)
                health = pgfailover.health(pool)
                assert not health.writable
                assert health.monitored
                for address in addresses:
                    assert address in health.reason
                with pytest.raises(pgfailover.NoPrimaryAvailable) as timed_out:
                    await pool.getconn()
                message = str(timed_out.value)
                assert "standby" in message
                for address in addresses:
                    assert address in message
        finally:
            monitor.close()


async def test_idle_pool_following_patroni_is_purged_and_refilled_across_a_switchover(
    pgfailover_patroni_cluster: PatroniCluster,
) -> None:
    """A pool with ``topology=`` (Patroni's REST API) and no request in flight across a
    Patroni switchover: the monitor reports it monitored and not writable while the leader
    changes, purges its connections to the former leader and, once Patroni names the new
    leader and it takes writes, refills the pool and reports it writable; the next request
    lands on the new leader at its first attempt."""
    cluster = pgfailover_patroni_cluster
    leader = cluster.wait_leader()
    source = AsyncPatroniTopology([n.rest_url for n in cluster.nodes], timeout=1.0)
    monitor = Monitor(interval=0.2)
    try:
        async with AsyncConnectionPool[Any](
            _hostless(leader.dsn()),
            topology=source,
            min_size=2,
            max_size=4,
            timeout=10,
            kwargs=KWARGS,
            monitor=monitor,
        ) as pool:
            await pool.wait()
            await _wait_for(_refilled(pool, 2))
            async with pool.connection() as conn:
                await conn.execute("CREATE TABLE IF NOT EXISTS monitor_topology (writer int)")
            assert await _write(pool, "monitor_topology") == leader.port

            with _Sampler(pool) as sampler:
                await _blocking(cluster.switchover)
                new = cluster.wait_leader()
                assert new is not leader
                await _wait_for(lambda: pool.get_stats().get("generations_purged", 0) >= 1, 60)
                await _wait_for(_refilled(pool, 2), 60)
            assert (True, False) in sampler.seen  # monitored, not writable during the switch
            assert sampler.seen[-1] == (True, True)

            assert await _write(pool, "monitor_topology") == new.port
            stats = pool.get_stats()
        assert stats["connections_poisoned"] == 0, stats
    finally:
        monitor.close()
