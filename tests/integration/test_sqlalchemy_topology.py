"""Instrumented SQLAlchemy engines with ``topology=``, on the real session cluster, for
every driver the integration supports (psycopg, psycopg async, psycopg2, asyncpg):
connections go to the leader the topology names, follow it across a failover, and are all
replaced when the topology names another leader (a split brain); a topology of the wrong
kind is a TypeError."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import pgfailover
import pgfailover.sqlalchemy
from pgfailover.testing import LocalCluster
from pgfailover.topology import AsyncHostListTopology, HostListTopology

from .support import count_key

KINDS = {
    "psycopg": ("psycopg", False),
    "psycopg-async": ("psycopg", True),
    "psycopg2": ("psycopg2", False),
    "asyncpg": ("asyncpg", True),
}


def _engine(cluster: LocalCluster, kind: str) -> tuple[Engine | AsyncEngine, Any]:
    """An instrumented engine of ``kind`` whose URL names the standby (the topology must
    send it to the leader anyway), and its topology."""
    driver, is_async = KINDS[kind]
    url = sa.make_url(cluster.standbys[0].url(driver))
    dsn = cluster.multihost_dsn()
    engine: Engine | AsyncEngine
    topology: Any
    if is_async:
        engine, topology = create_async_engine(url), AsyncHostListTopology(dsn, timeout=1.0)
    else:
        engine, topology = sa.create_engine(url), HostListTopology(dsn, timeout=1.0)
    pgfailover.sqlalchemy.instrument(engine, timeout=20, topology=topology)
    return engine, topology


async def _write(engine: Engine | AsyncEngine, table: str, key: str) -> int:
    """Insert ``key`` under the retry runner; the port of the server that took it."""

    def work(conn: Any) -> int:
        conn.execute(sa.text(f"INSERT INTO {table} (k) VALUES (:k)"), {"k": key})
        return int(conn.execute(sa.text("SELECT inet_server_port()")).scalar_one())

    if isinstance(engine, AsyncEngine):

        async def awork(conn: Any) -> int:
            return int(await conn.run_sync(work))

        return int(await pgfailover.AsyncTransactionRunner(engine, timeout=20)(awork))
    return int(pgfailover.TransactionRunner(engine, timeout=20)(work))


async def _dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


@pytest.mark.parametrize("kind", KINDS)
async def test_engine_follows_the_topology_leader_across_a_failover(
    pgfailover_cluster: LocalCluster, keys_table: str, kind: str
) -> None:
    """The URL names the standby, yet writes land on the primary the topology names; after
    a failover they land on the new primary, each key once."""
    cluster = pgfailover_cluster
    old, new = cluster.primary, cluster.standbys[0]
    engine, _ = _engine(cluster, kind)
    try:
        assert await _write(engine, keys_table, "before") == old.port
        cluster.failover()
        ports = {await _write(engine, keys_table, f"after-{i}") for i in range(5)}
        assert ports == {new.port}
    finally:
        await _dispose(engine)
    for key in ("before", *(f"after-{i}" for i in range(5))):
        assert count_key(cluster, keys_table, key) == 1


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_engine_replaces_connections_to_a_former_leader_once_the_topology_moves(
    pgfailover_cluster: LocalCluster, keys_table: str, kind: str
) -> None:
    """A split brain: the standby is promoted while the old primary still accepts writes.
    Pooled connections keep writing to the old one until the topology is refreshed; then
    the next checkout replaces them and writes land on the node it names."""
    cluster = pgfailover_cluster
    old, new = cluster.primary, cluster.standbys[0]
    engine, topology = _engine(cluster, kind)
    try:
        assert await _write(engine, keys_table, "one") == old.port
        cluster.promote(new)  # the old primary keeps running: two primaries
        assert await _write(engine, keys_table, "stale") == old.port  # nothing told it yet
        if isinstance(topology, AsyncHostListTopology):
            refreshed = await topology.refresh()
        else:
            refreshed = topology.refresh()
        assert refreshed.leader == new.address  # the higher timeline wins
        assert await _write(engine, keys_table, "two") == new.port
    finally:
        await _dispose(engine)


async def test_a_topology_of_the_wrong_kind_is_a_type_error(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A sync source for an AsyncEngine, or the reverse, or anything else, is refused with
    a TypeError naming the expected class."""
    url = pgfailover_cluster.primary.url("psycopg")
    dsn = pgfailover_cluster.multihost_dsn()
    sync_engine, async_engine = sa.create_engine(url), create_async_engine(url)
    try:
        with pytest.raises(TypeError, match="must be a TopologySource"):
            pgfailover.sqlalchemy.instrument(sync_engine, topology=AsyncHostListTopology(dsn))
        with pytest.raises(TypeError, match="must be an AsyncTopologySource"):
            pgfailover.sqlalchemy.instrument(async_engine, topology=HostListTopology(dsn))
        with pytest.raises(TypeError, match="must be a TopologySource"):
            pgfailover.sqlalchemy.instrument(sync_engine, topology="db1,db2")  # type: ignore[arg-type]
    finally:
        sync_engine.dispose()
        await async_engine.dispose()
