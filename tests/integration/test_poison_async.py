# pgfailover: generate-sync
"""Connection poisoning on a real cluster: what marks a connection as a failover casualty,
what must not, how its role is probed, and that it still behaves as psycopg's.

Written once, async, for ``pgfailover.AsyncConnection``; ``tools/async_to_sync.py``
generates ``test_poison.py``, the same tests for ``pgfailover.Connection``, so both are
held to exactly the same checks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row

import pgfailover
from pgfailover import AsyncConnection, FailoverEvent, Kind, RetryCondition, Role
from pgfailover.testing import LocalCluster
from pgfailover.testing.simulate import araise_recovery_error

#: How a write meets a demoted node, and the error each way gets: a plain INSERT in
#: autocommit (25006), or a transaction opened with BEGIN READ WRITE (0A000).
SHAPES = {
    "plain-insert-25006": errors.ReadOnlySqlTransaction,
    "begin-read-write-0A000": errors.FeatureNotSupported,
}
IDLE = psycopg.pq.TransactionStatus.IDLE


# ------------------------------------------------------------------ what differs


async def _blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking harness operation (a failover, a repoint, an admin statement)."""
    if True:  # ASYNC
        return await asyncio.to_thread(fn, *args)
    else:
        return fn(*args)


# ------------------------------------------------------------------ helpers


@pytest.fixture
def events() -> Iterator[list[FailoverEvent]]:
    """Every FailoverEvent emitted during the test."""
    seen: list[FailoverEvent] = []

    def hook(event: pgfailover.Event) -> None:
        if isinstance(event, FailoverEvent):
            seen.append(event)

    unsubscribe = pgfailover.subscribe(hook)
    yield seen
    unsubscribe()


def _table(cluster: LocalCluster) -> str:
    """A new table ``(id serial, note text)`` owned by the application user, replicated."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, note text)")
    cluster.wait_replicated()
    return name


def _event_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pgfailover.events"]


def _terminate(cluster: LocalCluster, pid: int) -> None:
    """End the primary's backend ``pid`` (57P01), waiting until it has exited."""
    with cluster.primary.connect() as admin:
        row = admin.execute("SELECT pg_terminate_backend(%s, 10000)", [pid]).fetchone()
        assert row == (True,), "the backend did not exit in time"


async def _in_transaction_block(conn: AsyncConnection[Any], sql: str) -> None:
    """Run ``sql`` in a ``transaction()`` block of ``conn``."""
    async with conn.transaction():
        await conn.execute(sql)


async def _connect(dsn: str, *, autocommit: bool) -> AsyncConnection[Any]:
    """A connection that a pooler in transaction mode can serve: no prepared statements."""
    return await AsyncConnection.connect(dsn, prepare_threshold=None, autocommit=autocommit)


async def _use_shape(conn: AsyncConnection[Any], shape: str) -> None:
    """Set ``conn`` up so that its next INSERT meets a standby the way ``shape`` says."""
    read_write = shape == "begin-read-write-0A000"
    await conn.set_autocommit(not read_write)
    await conn.set_read_only(False if read_write else None)


# ------------------------------------------------------------------ failover through PgBouncer


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_first_failing_write_after_failover_poisons_the_connection(
    pgfailover_cluster: LocalCluster,
    events: list[FailoverEvent],
    caplog: pytest.LogCaptureFixture,
    shape: str,
) -> None:
    """Through PgBouncer after a failover, the first failing write (25006 or 0A000) marks the
    connection poisoned with a READ_ONLY verdict, leaves it open, and logs one warning event
    naming the standby and the SQLSTATE; later failing writes on it, of either shape, are
    not new incidents."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    table = _table(cluster)
    old_primary = cluster.primary
    async with await _connect(cluster.pgbouncer.dsn(), autocommit=True) as conn:
        report = await pgfailover.aprobe(conn)
        assert report.via_pooler is True
        assert report.server_address == old_primary.address
        await _blocking(cluster.failover)
        await _use_shape(conn, shape)
        caplog.set_level(logging.WARNING, logger="pgfailover")
        with pytest.raises(SHAPES[shape]):
            await conn.execute(f"INSERT INTO {table} (note) VALUES ('x')")
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.READ_ONLY
        assert conn.poisoned.retry is RetryCondition.ROLLED_BACK
        assert conn.poisoned.purge_generation
        assert not conn.closed, "the error is the driver's: the connection is left to its owner"
        # later failures on the same connection are not further incidents
        for later, error in SHAPES.items():
            await conn.rollback()
            await _use_shape(conn, later)
            with pytest.raises(error):
                await conn.execute(f"INSERT INTO {table} (note) VALUES ('y')")
    assert len(events) == 1
    event = events[0]
    assert event.verdict.sqlstate == ("0A000" if "0A000" in shape else "25006")
    assert event.node.server == old_primary.address  # the standby now
    assert event.node.via_pooler is True
    assert Path(__file__).name in event.stack
    records = _event_records(caplog)
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert old_primary.address in records[0].getMessage()
    assert event.verdict.sqlstate in records[0].getMessage()


# ------------------------------------------------------------------ simulation on a healthy primary


async def test_simulation_helper_poisons_like_the_real_error(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """The server-raised 0A000 recovery error on a healthy primary poisons the connection as
    READ_ONLY, with one event."""
    async with await AsyncConnection.connect(pgfailover_cluster.primary.dsn()) as conn:
        with pytest.raises(errors.FeatureNotSupported):
            await araise_recovery_error(conn)
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.READ_ONLY
    assert len(events) == 1


async def test_simulate_recovery_flag_fails_every_statement_until_cleared_or_replaced(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """With simulate_recovery(), reads, writes and the BEGIN of a transaction() block fail
    with the real 0A000 and ROLLBACK works; the connection is poisoned once. Clearing the
    flag makes statements work again, and a new connection is healthy."""
    table = _table(pgfailover_cluster)
    async with await AsyncConnection.connect(pgfailover_cluster.primary.dsn()) as conn:
        conn.simulate_recovery()
        for sql in ("SELECT 1", f"INSERT INTO {table} (note) VALUES ('x')"):
            with pytest.raises(errors.FeatureNotSupported) as info:
                await conn.execute(sql)
            assert info.value.diag.message_primary == pgfailover.RECOVERY_MESSAGE
            await conn.rollback()
        with pytest.raises(errors.FeatureNotSupported):
            await _in_transaction_block(conn, "SELECT 1")
        assert conn.poisoned is not None
        conn.simulate_recovery(False)
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    assert len(events) == 1
    async with await AsyncConnection.connect(
        pgfailover_cluster.primary.dsn(), autocommit=True
    ) as fresh:
        await fresh.execute(f"INSERT INTO {table} (note) VALUES ('ok')")
        assert fresh.poisoned is None
    assert len(events) == 1


# ------------------------------------------------------------------ what must NOT poison


async def test_read_only_session_hitting_25006_is_not_poisoned(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """A connection that asked for read-only and writes gets 25006 from the primary: that is
    the application's error, not a failover; once read-only is unset, it writes."""
    table = _table(pgfailover_cluster)
    async with await AsyncConnection.connect(pgfailover_cluster.primary.dsn()) as conn:
        await conn.set_read_only(True)
        with pytest.raises(errors.ReadOnlySqlTransaction):
            await conn.execute(f"INSERT INTO {table} (note) VALUES ('x')")
        assert conn.poisoned is None
        await conn.rollback()
        await conn.set_read_only(None)
        await conn.execute(f"INSERT INTO {table} (note) VALUES ('ok')")
        await conn.commit()
        assert conn.poisoned is None
    assert events == []


async def test_application_errors_are_not_poisoned(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """Unique violations and syntax errors leave the connection healthy, with no event."""
    table = _table(pgfailover_cluster)
    async with await AsyncConnection.connect(
        pgfailover_cluster.primary.dsn(), autocommit=True
    ) as conn:
        await conn.execute(f"INSERT INTO {table} (id, note) VALUES (1, 'x')")
        with pytest.raises(errors.UniqueViolation):
            await conn.execute(f"INSERT INTO {table} (id, note) VALUES (1, 'x')")
        with pytest.raises(errors.SyntaxError):
            await conn.execute("SELEC 1")
        assert conn.poisoned is None
    assert events == []


# ------------------------------------------------------------------ lost connections


@pytest.mark.parametrize("ending", ["commit", "transaction-block-exit"])
async def test_terminated_backend_at_commit_is_outcome_unknown(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent], ending: str
) -> None:
    """A backend terminated inside a transaction fails at its COMMIT, sent by commit() or by
    the exit of a transaction() block: the failure happens while COMMIT is in flight, so the
    connection is poisoned as CONNECTION_LOST and the verdict says the outcome is unknown
    (never retried blindly)."""
    cluster = pgfailover_cluster
    async with await AsyncConnection.connect(cluster.primary.dsn()) as conn:
        if ending == "commit":
            commit: Callable[[], Awaitable[object]] = conn.commit
        else:
            block = conn.transaction()
            await block.__aenter__()
            commit = functools.partial(block.__aexit__, None, None, None)  # the block's COMMIT
        await conn.execute("SELECT 1")  # opens the transaction if no block did
        await _blocking(_terminate, cluster, conn.info.backend_pid)
        with pytest.raises(psycopg.OperationalError):
            await commit()
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is RetryCondition.OUTCOME_UNKNOWN
    assert len(events) == 1


# ------------------------------------------------------------------ role probes


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transactional"])
async def test_probe_direct_queries_once_then_reads_parameter_status(
    pgfailover_cluster: LocalCluster, autocommit: bool
) -> None:
    """Direct: the first probe queries and detects no pooler; later probes read
    ParameterStatus without a round trip and still tell primary from standby. No probe
    leaves a transaction open."""
    cluster = pgfailover_cluster
    for node, role in ((cluster.primary, Role.PRIMARY), (cluster.standbys[0], Role.STANDBY)):
        async with await _connect(node.dsn(), autocommit=autocommit) as conn:
            first = await pgfailover.aprobe(conn)
            assert (first.role, first.source, first.via_pooler) == (role, "query", False)
            assert first.server_address == node.address
            assert first.writable is (role is Role.PRIMARY)
            assert conn.info.transaction_status == IDLE
            second = await pgfailover.aprobe(conn)
            assert (second.role, second.source) == (role, "parameter_status")
            assert conn.info.transaction_status == IDLE


async def test_probe_through_pgbouncer_always_queries_and_sees_through_stale_parameters(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Through PgBouncer the probe detects the pooler and always queries, leaving no
    transaction open: after a failover it reports the standby although ParameterStatus says
    in_hot_standby=off, and right after the repoint it reports the primary."""
    cluster = pgfailover_cluster
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    for autocommit in (True, False):
        async with await _connect(bouncer.dsn(), autocommit=autocommit) as conn:
            report = await pgfailover.aprobe(conn)
            assert (report.role, report.via_pooler, report.source) == (
                Role.PRIMARY,
                True,
                "query",
            )
            assert conn.info.transaction_status == IDLE
    await _blocking(cluster.failover)
    dsn = bouncer.dsn()
    async with (
        await _connect(dsn, autocommit=True) as auto,
        await _connect(dsn, autocommit=False) as transactional,
    ):
        for conn in (auto, transactional):
            assert conn.info.parameter_status("in_hot_standby") == "off"  # stale
            report = await pgfailover.aprobe(conn)
            assert (report.role, report.writable, report.source) == (
                Role.STANDBY,
                False,
                "query",
            )
            assert conn.info.transaction_status == IDLE
        await _blocking(cluster.repoint_pgbouncer, cluster.primary)
        for conn in (auto, transactional):
            report = await pgfailover.aprobe(conn)
            assert (report.role, report.writable) == (Role.PRIMARY, True)
            assert report.server_address == cluster.primary.address
            assert conn.info.transaction_status == IDLE


# ------------------------------------------------------------------ psycopg behaviour is kept


async def test_subclass_keeps_psycopg_behaviour(pgfailover_cluster: LocalCluster) -> None:
    """isinstance, execute, cursors (client and server side), row factories, transaction(),
    pipeline, COPY and read-only behave exactly as with psycopg, and nothing is poisoned."""
    table = _table(pgfailover_cluster)
    async with await AsyncConnection.connect(
        pgfailover_cluster.primary.dsn(), row_factory=dict_row
    ) as conn:
        assert isinstance(conn, psycopg.AsyncConnection)
        cur = await conn.execute("SELECT 1 AS one")
        assert await cur.fetchone() == {"one": 1}
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} (note) VALUES (%s)", ["tx"])
        async with conn.pipeline(), conn.cursor() as cur:
            await cur.executemany(f"INSERT INTO {table} (note) VALUES (%s)", [["p1"], ["p2"]])
        async with conn.cursor() as cur, cur.copy(f"COPY {table} (note) FROM STDIN") as copy:
            await copy.write_row(["copied"])
        await conn.commit()
        expected = ["tx", "p1", "p2", "copied"]
        client = await conn.execute(f"SELECT note FROM {table} ORDER BY id")
        assert [r["note"] for r in await client.fetchall()] == expected
        async with conn.cursor(name="server_side") as server:
            await server.execute(f"SELECT note FROM {table} ORDER BY id")
            assert [r["note"] async for r in server] == expected
        await conn.rollback()
        await conn.set_read_only(True)
        cur = await conn.execute("SHOW transaction_read_only")
        assert await cur.fetchone() == {"transaction_read_only": "on"}
        assert conn.poisoned is None
