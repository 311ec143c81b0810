# pgfailover: generate-sync
"""pgfailover's pools with ``topology=``, on the real session cluster: connections go to
the leader the topology names, follow it across a failover with a bounded number of
refreshes, and purge what was made before when the topology names another leader (a
split brain). Wrong arguments: tests/unit/test_pool_topology_options.py.

Written once, async; ``tools/async_to_sync.py`` generates ``test_pool_topology.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.retry_async import AsyncTransactionRunner
from pgfailover.testing import LocalCluster
from pgfailover.topology.hosts_async import AsyncHostListTopology

from .support import count_key

TIMEOUT = 1.0


def _app_conninfo(cluster: LocalCluster) -> str:
    """The application's own conninfo without host and port."""
    params = conninfo_to_dict(cluster.primary.dsn())
    del params["host"], params["port"]
    return make_conninfo("", **params)


async def _blocking(fn: Any, *args: Any) -> Any:
    """Run a blocking harness operation."""
    if True:  # ASYNC
        return await asyncio.to_thread(fn, *args)
    else:
        return fn(*args)


async def _insert(conn: psycopg.AsyncConnection[Any], table: str, key: str) -> int:
    """Insert ``key``; return the port of the server that took it."""
    await conn.execute(f"INSERT INTO {table} (k) VALUES (%s)", [key])
    cur = await conn.execute("SELECT inet_server_port()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_pool_follows_the_topology_leader_across_a_failover(
    pgfailover_cluster: LocalCluster, keys_table: str
) -> None:
    """With a host-less conninfo and a host-list topology, the pool's connections reach the
    primary; after a failover the next transactions (under the runner) land on the new
    primary, the old generation is purged, and the topology was refreshed a handful of
    times, not once per connection or request."""
    cluster = pgfailover_cluster
    old, new = cluster.primary, cluster.standbys[0]
    source = AsyncHostListTopology(cluster.multihost_dsn(), timeout=TIMEOUT)
    async with AsyncConnectionPool[Any](
        _app_conninfo(cluster), topology=source, min_size=2, max_size=4, timeout=20
    ) as pool:
        assert await _insert_via(pool, keys_table, "before") == old.port
        refreshes_before = source._refreshes
        await _blocking(cluster.failover)
        ports = [await _insert_via(pool, keys_table, f"after-{i}") for i in range(10)]
        assert set(ports) == {new.port}
        stats = pool.get_stats()
    assert stats["generations_purged"] >= 1
    assert source._refreshes - refreshes_before <= 5, source._refreshes
    for key in ("before", *(f"after-{i}" for i in range(10))):
        assert count_key(cluster, keys_table, key) == 1


async def _insert_via(pool: AsyncConnectionPool[Any], table: str, key: str) -> int:
    return int(await AsyncTransactionRunner(pool, timeout=20)(_insert, table, key))


async def test_pool_purges_connections_to_a_former_leader_once_the_topology_moves(
    pgfailover_cluster: LocalCluster, keys_table: str
) -> None:
    """A split brain: the standby is promoted while the old primary still accepts writes.
    Connections made before keep answering as a writable primary, but once the shared
    topology is refreshed (by anyone) and names the new node, the pool purges them at the
    next checkout and the next write lands on the node the topology names."""
    cluster = pgfailover_cluster
    old, new = cluster.primary, cluster.standbys[0]
    source = AsyncHostListTopology(cluster.multihost_dsn(), timeout=TIMEOUT)
    async with AsyncConnectionPool[Any](
        _app_conninfo(cluster), topology=source, min_size=1, max_size=2, timeout=20
    ) as pool:
        assert await _insert_via(pool, keys_table, "one") == old.port
        await _blocking(cluster.promote, new)  # the old primary keeps running: two primaries
        assert await _insert_via(pool, keys_table, "stale") == old.port  # nothing told it yet
        topology = await source.refresh()
        assert topology.leader == new.address  # the higher timeline wins
        assert await _insert_via(pool, keys_table, "two") == new.port
        assert pool.get_stats()["generations_purged"] == 1
