"""Two-phase commit on pgfailover connections: a lost COMMIT PREPARED has an unknown outcome."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from pgfailover import AsyncConnection, Connection, Kind, RetryCondition
from pgfailover.testing import FaultProxy, LocalCluster
from pgfailover.testing.plugin import ClusterFactory
from pgfailover.testing.proxy import query_matches


@pytest.fixture(scope="module")
def tpc_cluster(pgfailover_cluster_factory: ClusterFactory) -> Iterator[LocalCluster]:
    """A lone primary that accepts prepared transactions, closed at the end of the module."""
    cluster = pgfailover_cluster_factory(
        standbys=0, pgbouncer=None, pg_settings={"max_prepared_transactions": "10"}
    )
    yield cluster
    cluster.close()


@pytest.fixture
def proxy(tpc_cluster: LocalCluster) -> Iterator[FaultProxy]:
    """A proxy to the primary; closing it raises if anything failed inside."""
    with FaultProxy(tpc_cluster.primary) as p:
        yield p
    assert not p.errors


@pytest.fixture
def table(tpc_cluster: LocalCluster) -> Iterator[str]:
    """A fresh table; prepared transactions left behind by the test are rolled back."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with tpc_cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    yield name
    with tpc_cluster.primary.connect(superuser=False) as conn:  # the database it ran in
        for gid in _prepared(tpc_cluster):
            conn.execute(psycopg.sql.SQL("ROLLBACK PREPARED {}").format(gid))


def _prepared(cluster: LocalCluster) -> list[str]:
    with cluster.primary.connect() as admin:
        return [r[0] for r in admin.execute("SELECT gid FROM pg_prepared_xacts")]


def _prepare(conn: Connection[tuple[object, ...]], table: str) -> str:
    gid = f"pgf-{uuid.uuid4().hex[:10]}"
    conn.tpc_begin(gid)
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.tpc_prepare()
    return gid


async def _aprepare(conn: AsyncConnection[tuple[object, ...]], table: str) -> str:
    gid = f"pgf-{uuid.uuid4().hex[:10]}"
    await conn.tpc_begin(gid)
    await conn.execute(f"INSERT INTO {table} VALUES (1)")
    await conn.tpc_prepare()
    return gid


@pytest.mark.parametrize("recovering", [False, True], ids=["same-session", "recovery"])
def test_lost_commit_prepared_is_outcome_unknown(
    tpc_cluster: LocalCluster, proxy: FaultProxy, table: str, recovering: bool
) -> None:
    """A connection lost while tpc_commit() sends COMMIT PREPARED: outcome unknown."""
    dsn = proxy.dsn_for(tpc_cluster.primary, connect_timeout=5)
    conn = Connection.connect(dsn)
    gid = _prepare(conn, table)
    if recovering:  # tpc_commit(xid) from a session that did not prepare it
        conn.close()
        conn = Connection.connect(dsn)
    with conn:
        proxy.drop_on("before", query_matches("^COMMIT PREPARED"))
        with pytest.raises(psycopg.OperationalError):
            conn.tpc_commit(gid if recovering else None)
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is RetryCondition.OUTCOME_UNKNOWN
    assert [f.query for f in proxy.wait_faults(1)] == [f"COMMIT PREPARED '{gid}'"]
    assert _prepared(tpc_cluster) == [gid], "the COMMIT PREPARED never reached the server"


async def test_async_lost_commit_prepared_is_outcome_unknown(
    tpc_cluster: LocalCluster, proxy: FaultProxy, table: str
) -> None:
    """Async: a connection lost while tpc_commit() sends COMMIT PREPARED: outcome unknown."""
    dsn = proxy.dsn_for(tpc_cluster.primary, connect_timeout=5)
    async with await AsyncConnection.connect(dsn) as conn:
        gid = await _aprepare(conn, table)
        proxy.drop_on("after_forward", query_matches("^COMMIT PREPARED"))
        with pytest.raises(psycopg.OperationalError):
            await conn.tpc_commit()
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is RetryCondition.OUTCOME_UNKNOWN
    assert [f.query for f in proxy.wait_faults(1)] == [f"COMMIT PREPARED '{gid}'"]


def test_lost_rollback_prepared_is_not_a_commit(
    tpc_cluster: LocalCluster, proxy: FaultProxy, table: str
) -> None:
    """A connection lost while tpc_rollback() sends ROLLBACK PREPARED is not a lost COMMIT."""
    with Connection.connect(proxy.dsn_for(tpc_cluster.primary, connect_timeout=5)) as conn:
        gid = _prepare(conn, table)
        proxy.drop_on("before", query_matches("^ROLLBACK PREPARED"))
        with pytest.raises(psycopg.OperationalError):
            conn.tpc_rollback()
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is not RetryCondition.OUTCOME_UNKNOWN
    assert [f.query for f in proxy.wait_faults(1)] == [f"ROLLBACK PREPARED '{gid}'"]


async def test_async_lost_rollback_prepared_is_not_a_commit(
    tpc_cluster: LocalCluster, proxy: FaultProxy, table: str
) -> None:
    """Async: a connection lost during ROLLBACK PREPARED is not a lost COMMIT."""
    dsn = proxy.dsn_for(tpc_cluster.primary, connect_timeout=5)
    async with await AsyncConnection.connect(dsn) as conn:
        gid = await _aprepare(conn, table)
        proxy.drop_on("before", query_matches("^ROLLBACK PREPARED"))
        with pytest.raises(psycopg.OperationalError):
            await conn.tpc_rollback()
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is not RetryCondition.OUTCOME_UNKNOWN
    assert [f.query for f in proxy.wait_faults(1)] == [f"ROLLBACK PREPARED '{gid}'"]


def test_lost_prepare_transaction_is_outcome_unknown(
    tpc_cluster: LocalCluster, proxy: FaultProxy, table: str
) -> None:
    """A connection lost while tpc_prepare() sends PREPARE TRANSACTION: outcome unknown (the
    server may have prepared the transaction durably)."""
    with Connection.connect(proxy.dsn_for(tpc_cluster.primary, connect_timeout=5)) as conn:
        conn.tpc_begin(f"pgf-{uuid.uuid4().hex[:10]}")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.drop_on("after_forward", query_matches("^PREPARE TRANSACTION"))
        with pytest.raises(psycopg.OperationalError):
            conn.tpc_prepare()
        assert conn.poisoned is not None
        assert conn.poisoned.retry is RetryCondition.OUTCOME_UNKNOWN
    assert len(proxy.wait_faults(1)) == 1


def test_two_phase_commit_and_recovery_work_unchanged(
    tpc_cluster: LocalCluster, table: str
) -> None:
    """Two-phase commit, recovery by xid and a closed connection behave as with psycopg."""
    dsn = tpc_cluster.primary.dsn()
    conn = Connection.connect(dsn)
    gid = _prepare(conn, table)
    conn.tpc_commit()
    conn.tpc_begin(conn.xid(1, "pgf-second", "branch"))
    conn.execute(f"INSERT INTO {table} VALUES (2)")
    conn.tpc_prepare()
    conn.close()  # leaves the second one prepared
    with pytest.raises(psycopg.OperationalError, match="the connection is closed"):
        conn.tpc_commit(gid)
    with Connection.connect(dsn, autocommit=True) as conn:
        xid = next(x for x in conn.tpc_recover() if x.gtrid == "pgf-second")
        conn.tpc_rollback(xid)
        assert [r[0] for r in conn.execute(f"SELECT id FROM {table}")] == [1]
        assert conn.poisoned is None
    assert _prepared(tpc_cluster) == []
