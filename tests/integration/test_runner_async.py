# pgfailover: generate-sync
"""The transaction runner on a real cluster, written once for the async runner;
``tools/async_to_sync.py`` generates ``test_runner.py``, the same tests for the sync one.

Lost COMMITs are resolved, never guessed; read-only transactions record nothing; the
record compares the server only where a pooler can change it; the connection's own
transaction settings survive the runner's BEGIN.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import pgfailover
import pgfailover.sqlalchemy as pgsa
from pgfailover import _runner
from pgfailover.events import RetryEvent
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.retry_async import arun_transaction
from pgfailover.testing import LocalCluster
from pgfailover.testing.proxy import FaultProxy

from .support import count_key, reset_statements

if True:  # ASYNC
    from sqlalchemy.ext.asyncio import async_sessionmaker as sessions
    from sqlalchemy.ext.asyncio import create_async_engine as create_engine

    #: The drivers of SQLAlchemy engines of this kind (psycopg's, and the other one).
    ENGINE_DRIVERS = ["psycopg", "asyncpg"]
else:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker as sessions

    ENGINE_DRIVERS = ["psycopg", "psycopg2"]

WHEN_COMMITTED = ("after_forward", "after_reply")  # the COMMIT reached the server


def _insert(table: str) -> Any:
    async def work(conn: psycopg.AsyncConnection[Any], key: str) -> str:
        await conn.execute(f"INSERT INTO {table} (k) VALUES (%s)", [key])
        return key

    return work


async def _settings(conn: psycopg.AsyncConnection[Any]) -> tuple[str, str]:
    cur = await conn.execute(
        "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')"
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def _url(cluster: LocalCluster, proxy: FaultProxy, driver: str) -> sa.URL:
    return sa.URL.create(
        f"postgresql+{driver}",
        username=cluster.user,
        password=cluster.password,
        host=proxy.host,
        port=proxy.port,
        database=cluster.dbname,
        query={"sslmode": "disable"} if driver != "asyncpg" else {},
    )


# ------------------------------------------------------------------ psycopg pools


@pytest.mark.parametrize("when", [*WHEN_COMMITTED, "before"])
async def test_lost_commit_is_resolved_and_the_row_exists_once(
    pgfailover_cluster: LocalCluster,
    proxy: FaultProxy,
    keys_table: str,
    retry_events: list[RetryEvent],
    when: str,
) -> None:
    """The connection dies around COMMIT: if the COMMIT reached the server the runner
    reports success once (the outcome is looked up, not guessed); if it did not, the work is
    retried. Either way the row exists exactly once, and the event says which outcome."""
    key = uuid.uuid4().hex
    proxy.drop_on(when)  # type: ignore[arg-type]
    dsn = proxy.dsn_for(pgfailover_cluster.primary)
    async with AsyncConnectionPool[Any](dsn, min_size=1) as pool:
        runner = pgfailover.AsyncTransactionRunner(pool, timeout=10)
        assert await runner(_insert(keys_table), key) == key
    assert proxy.faults, "the fault never fired"
    assert count_key(pgfailover_cluster, keys_table, key) == 1
    actions = [e.action for e in retry_events]
    assert actions == (["committed"] if when in WHEN_COMMITTED else ["retry"])
    assert retry_events[0].cause.retry is pgfailover.RetryCondition.OUTCOME_UNKNOWN
    assert retry_events[0].outcome is (
        pgfailover.Outcome.COMMITTED if when in WHEN_COMMITTED else pgfailover.Outcome.NOT_COMMITTED
    )


def _record_statements(cluster: LocalCluster) -> dict[str, int]:
    """The record statements run on the primary since the last reset: text -> calls."""
    with psycopg.connect(cluster.primary.dsn(user="postgres"), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query, calls FROM pg_stat_statements WHERE query LIKE %s",
            ["%pg_current_xact_id()::text%"],
        ).fetchall()
    return {str(query): int(calls) for query, calls in rows}


@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
async def test_record_compares_the_server_only_where_a_pooler_can_change_it(
    pgfailover_cluster: LocalCluster, keys_table: str, route: str
) -> None:
    """On a direct pgfailover connection the server cannot change, so after the first
    record the identity column is a plain NULL; through PgBouncer every record compares
    the postmaster's start time."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    dsn = cluster.primary.dsn() if route == "direct" else cluster.pgbouncer.dsn()
    work = _insert(keys_table)
    async with AsyncConnectionPool[Any](
        dsn, min_size=1, max_size=1, kwargs={"prepare_threshold": None}
    ) as pool:
        await arun_transaction(pool, work, uuid.uuid4().hex)  # reads the identity
        reset_statements(cluster)
        for _ in range(5):
            await arun_transaction(pool, work, uuid.uuid4().hex)
    seen = _record_statements(cluster)
    assert sum(seen.values()) == 5, seen
    compared = sum(
        calls for query, calls in seen.items() if "pg_postmaster_start_time() =" in query
    )
    assert compared == (0 if route == "direct" else 5), seen


@pytest.mark.parametrize("autocommit", [False, True])
async def test_the_runner_keeps_the_connections_transaction_settings(
    pgfailover_cluster: LocalCluster, autocommit: bool
) -> None:
    """The BEGIN the runner sends with the record is psycopg's own: the pool's isolation
    level survives (serializable stays serializable), autocommit connections too; the
    fallback BEGIN builder says what psycopg itself would send."""

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)

    dsn = pgfailover_cluster.primary.dsn()
    async with AsyncConnectionPool[Any](
        dsn, min_size=1, max_size=1, kwargs={"autocommit": autocommit}, configure=configure
    ) as pool:
        assert await arun_transaction(pool, _settings) == ("serializable", "off")
        async with pool.connection() as conn:
            assert conn.isolation_level is psycopg.IsolationLevel.SERIALIZABLE
            for read_only, deferrable in ((None, None), (True, True), (False, False)):
                await conn.set_read_only(read_only)
                await conn.set_deferrable(deferrable)
                assert _runner.build_tx_start(
                    conn.isolation_level, read_only, deferrable
                ) == _runner.tx_start(conn)


async def test_read_only_transactions_run_and_a_lost_commit_of_one_is_simply_retried(
    pgfailover_cluster: LocalCluster, proxy: FaultProxy, retry_events: list[RetryEvent]
) -> None:
    """On a read-only connection the runner records nothing (no xid can be assigned) and
    the transaction is read-only; when its COMMIT is lost nothing was written, so it is run
    again without looking up an outcome."""

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_read_only(True)

    dsn = proxy.dsn_for(pgfailover_cluster.primary)
    async with AsyncConnectionPool[Any](dsn, min_size=1, max_size=1, configure=configure) as pool:
        runner = pgfailover.AsyncTransactionRunner(pool, timeout=10)
        assert await runner(_settings) == ("read committed", "on")
        proxy.drop_on("after_reply")
        assert await runner(_settings) == ("read committed", "on")
    assert proxy.faults, "the fault never fired"
    assert [e.action for e in retry_events] == ["retry"]
    assert retry_events[0].cause.retry is pgfailover.RetryCondition.OUTCOME_UNKNOWN


# ------------------------------------------------------------------ SQLAlchemy


@pytest.mark.parametrize("when", ["after_reply", "before"])
@pytest.mark.parametrize("driver", ENGINE_DRIVERS)
async def test_engine_and_session_lost_commit_is_resolved(
    pgfailover_cluster: LocalCluster,
    proxy: FaultProxy,
    keys_table: str,
    driver: str,
    when: str,
) -> None:
    """Engine and sessionmaker targets: a COMMIT lost after reaching the server is reported
    committed, one lost before is retried; the rows exist once each."""
    engine = create_engine(_url(pgfailover_cluster, proxy, driver))
    pgsa.instrument(engine)
    keys = [uuid.uuid4().hex, uuid.uuid4().hex]
    insert = sa.text(f"INSERT INTO {keys_table} (k) VALUES (:k)")

    async def by_connection(conn: Any, key: str) -> str:
        await conn.execute(insert, {"k": key})
        return key

    async def by_session(session: Any, key: str) -> str:
        await session.execute(insert, {"k": key})
        return key

    try:
        proxy.drop_on(when)  # type: ignore[arg-type]
        by_engine = pgfailover.AsyncTransactionRunner(engine, timeout=10)
        assert await by_engine(by_connection, keys[0]) == keys[0]
        proxy.drop_on(when)  # type: ignore[arg-type]
        by_sessions = pgfailover.AsyncTransactionRunner(sessions(engine), timeout=10)
        assert await by_sessions(by_session, keys[1]) == keys[1]
    finally:
        await engine.dispose()
    assert len(proxy.faults) == 2
    assert [count_key(pgfailover_cluster, keys_table, k) for k in keys] == [1, 1]


@pytest.mark.parametrize("driver", ENGINE_DRIVERS)
async def test_engine_read_only_transactions_record_nothing_and_retry_a_lost_commit(
    pgfailover_cluster: LocalCluster, proxy: FaultProxy, retry_events: list[RetryEvent], driver: str
) -> None:
    """An engine with postgresql_readonly runs read-only transactions through the runner
    (no record: no xid can be assigned there); a lost COMMIT of one is run again."""
    engine = create_engine(
        _url(pgfailover_cluster, proxy, driver),
        execution_options={"postgresql_readonly": True},
    )
    pgsa.instrument(engine)

    async def read_only(conn: Any) -> str:
        return str((await conn.execute(sa.text("SHOW transaction_read_only"))).scalar_one())

    try:
        runner = pgfailover.AsyncTransactionRunner(engine, timeout=10)
        assert await runner(read_only) == "on"
        proxy.drop_on("after_reply")
        assert await runner(read_only) == "on"
    finally:
        await engine.dispose()
    assert proxy.faults, "the fault never fired"
    assert [e.action for e in retry_events] == ["retry"]
