"""Bounded hangs for instrumented SQLAlchemy engines (psycopg sync and async, psycopg2,
asyncpg): a statement or COMMIT in flight on a blackholed server, or a statement on a
frozen primary, ends within the watchdog's bound, the engine invalidates the connection and
works again once the server is reachable, and a slow statement on a live server is left
alone."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import pgfailover
import pgfailover.sqlalchemy as pgsa
from pgfailover._watchdog import WATCHDOG, conninfo_of
from pgfailover.testing import LocalCluster
from pgfailover.testing.proxy import FaultProxy

#: Engine kinds: (dialect driver, async?)
KINDS = {
    "psycopg": ("psycopg", False),
    "psycopg-async": ("psycopg", True),
    "psycopg2": ("psycopg2", False),
    "asyncpg": ("asyncpg", True),
}

#: What the tests configure: ask after 0.5 s of silence, 2 s per side step (libpq's
#: minimum connect_timeout). The bound the docs state is silence + 2 x probe + a tick.
SILENCE, PROBE = 0.5, 2.0
BOUND = SILENCE + 2 * PROBE + 1.0


def _engine(url: str | sa.URL, kind: str, **options: Any) -> Engine | AsyncEngine:
    """An engine of ``kind`` with one pooled connection, instrumented with the test's small
    watchdog bounds (``options`` override them)."""
    options = {"silence_limit": SILENCE, "probe_timeout": PROBE, **options}
    if KINDS[kind][1]:
        engine: Engine | AsyncEngine = create_async_engine(url, pool_size=1, max_overflow=0)
    else:
        engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    pgsa.instrument(engine, **options)
    return engine


def _proxied_url(cluster: LocalCluster, proxy: FaultProxy, kind: str) -> sa.URL:
    url = sa.make_url(cluster.primary.url(KINDS[kind][0]))
    return url.set(host=proxy.host, port=proxy.port)


async def _scalar(engine: Engine | AsyncEngine, sql: str) -> Any:
    """The first column of the first row of ``sql``, on a connection of ``engine``."""
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as aconn:
            return (await aconn.execute(sa.text(sql))).scalar()
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar()


async def _silenced(
    engine: Engine | AsyncEngine, silence: Callable[[], object], at: str
) -> tuple[sa.exc.DBAPIError, float]:
    """Call ``silence`` (blackhole, freeze) right before a statement (``at="statement"``)
    or a COMMIT (``at="commit"``) on a connection of ``engine``; the error that step raised
    and how long it took."""
    select = sa.text("SELECT 1")
    started = 0.0
    try:
        if isinstance(engine, AsyncEngine):
            async with engine.connect() as aconn:
                await aconn.execute(select)
                if at == "statement":
                    await aconn.commit()
                silence()
                started = time.monotonic()
                if at == "statement":
                    await aconn.execute(select)
                await aconn.commit()
        else:
            with engine.connect() as conn:
                conn.execute(select)
                if at == "statement":
                    conn.commit()
                silence()
                started = time.monotonic()
                if at == "statement":
                    conn.execute(select)
                conn.commit()
    except sa.exc.DBAPIError as ex:
        return ex, time.monotonic() - started
    pytest.fail(f"the {at} succeeded on a blackholed server")


async def _record_info(engine: Engine | AsyncEngine) -> dict[Any, Any]:
    """The ``info`` of the pooled connection a checkout of ``engine`` gets."""
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as aconn:
            return (await aconn.get_raw_connection()).info
    with engine.connect() as conn:
        return conn.connection.info


async def _dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


@pytest.mark.parametrize("at", ["statement", "commit"])
@pytest.mark.parametrize("kind", list(KINDS))
async def test_an_operation_in_flight_on_a_blackholed_server_ends_within_the_bound(
    pgfailover_cluster: LocalCluster, proxy: FaultProxy, kind: str, at: str
) -> None:
    """The network goes silent right before a statement or a COMMIT: it fails with the
    driver's connection error (wrapped by SQLAlchemy) within silence + 2 x probe timeout,
    with a note that the watchdog cut it; the engine invalidates the connection, counts it
    poisoned as lost and records the outage (a COMMIT is never declared safe to repeat),
    and the next checkout after the network heals works."""
    engine = _engine(_proxied_url(pgfailover_cluster, proxy, kind), kind)
    cuts = WATCHDOG.cuts
    try:
        try:
            error, waited = await _silenced(engine, proxy.blackhole, at)
        finally:
            proxy.restore()
        after = await _scalar(engine, "SELECT 42")
        stats = pgsa.instrumentation_of(engine).stats()  # type: ignore[union-attr]
    finally:
        await _dispose(engine)
    assert waited < BOUND, f"the {at} hung {waited:.1f} s (bound {BOUND:.1f} s)"
    assert error.connection_invalidated
    verdict = pgfailover.classify(error)
    assert verdict.kind is pgfailover.Kind.CONNECTION_LOST
    if at == "commit":
        assert verdict.retry in (
            pgfailover.RetryCondition.OUTCOME_UNKNOWN,
            pgfailover.RetryCondition.IF_IDEMPOTENT,
        )
    if sys.version_info >= (3, 11):
        notes = getattr(error.orig, "__notes__", [])
        assert any("watchdog cut" in note for note in notes), notes
    assert WATCHDOG.cuts > cuts
    assert stats["connections_poisoned"] >= 1
    assert stats["failovers_detected"] >= 1
    assert after == 42


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_statement_in_flight_on_a_frozen_primary_ends_within_the_bound(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """The primary freezes (SIGSTOP of its processes) right before a statement: it fails
    with the driver's connection error within silence + 2 x probe timeout, the engine
    invalidates the connection as lost, and once the primary is thawed the next checkout
    works."""
    node = pgfailover_cluster.primary
    engine = _engine(node.url(KINDS[kind][0]), kind)
    try:
        try:
            error, waited = await _silenced(
                engine, lambda: pgfailover_cluster.freeze(node), "statement"
            )
        finally:
            pgfailover_cluster.thaw(node)
        after = await _scalar(engine, "SELECT 42")
        stats = pgsa.instrumentation_of(engine).stats()  # type: ignore[union-attr]
    finally:
        await _dispose(engine)
    assert waited < BOUND, f"the statement hung {waited:.1f} s (bound {BOUND:.1f} s)"
    assert error.connection_invalidated
    assert pgfailover.classify(error).kind is pgfailover.Kind.CONNECTION_LOST
    assert stats["connections_poisoned"] >= 1
    assert after == 42


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_slow_statement_on_a_live_server_is_left_alone(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """A statement silent for several silence limits on a live server: the watchdog asks
    the server (it answers on a side connection) and lets the statement finish."""
    engine = _engine(pgfailover_cluster.primary.url(KINDS[kind][0]), kind)
    probes = WATCHDOG.probes_run
    try:
        value = await _scalar(engine, f"SELECT 42 FROM pg_sleep({SILENCE * 4})")
        stats = pgsa.instrumentation_of(engine).stats()  # type: ignore[union-attr]
    finally:
        await _dispose(engine)
    assert value == 42
    assert WATCHDOG.probes_run > probes, "the watchdog never looked: nothing was tested"
    assert stats["connections_poisoned"] == 0


@pytest.mark.parametrize("kind", list(KINDS))
async def test_the_runners_deadline_cuts_a_statement_in_flight_on_an_engine(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """Under the retry runner with timeout=1.5, a 60 s statement on a live server (never
    silent long enough for the watchdog to ask) is cut at the runner's deadline: the call
    ends with a lost connection well before the statement would have."""
    engine = _engine(pgfailover_cluster.primary.url(KINDS[kind][0]), kind, silence_limit=60.0)

    def work(conn: Any) -> None:
        conn.execute(sa.text("SELECT pg_sleep(60)"))

    async def awork(conn: Any) -> None:
        await conn.run_sync(work)

    async def run() -> None:
        if isinstance(engine, AsyncEngine):
            await pgfailover.AsyncTransactionRunner(engine, timeout=1.5)(awork)
        else:
            pgfailover.TransactionRunner(engine, timeout=1.5)(work)

    started = time.monotonic()
    try:
        with pytest.raises(sa.exc.DBAPIError) as info:
            await run()
        elapsed = time.monotonic() - started
    finally:
        await _dispose(engine)
    # only a cut ends a 60 s statement on a live server this early: its socket was shut
    # down, which the driver reports as a lost connection
    assert elapsed < 30, f"the statement was not cut at the deadline ({elapsed:.1f} s)"
    assert info.value.connection_invalidated


@pytest.mark.parametrize("kind", list(KINDS))
async def test_the_side_probe_reaches_the_same_server_with_the_connections_credentials(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """What the watchdog builds from each driver's connection for its side probe opens a
    psycopg connection to the same endpoint as the same user (an authentication failure
    would be judged alive and hide a dead server)."""
    node = pgfailover_cluster.primary
    engine = _engine(node.url(KINDS[kind][0]), kind)
    try:
        watched = (await _record_info(engine))["pgfailover.watched"]
        endpoint, conninfo = watched.endpoint(), watched.conninfo()
    finally:
        await _dispose(engine)
    assert endpoint == node.address
    with psycopg.connect(conninfo, connect_timeout=5) as side:
        row = side.execute("SELECT current_user, current_database()").fetchone()
    assert row == (pgfailover_cluster.user, pgfailover_cluster.dbname)


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_silence_limit_none_leaves_the_engines_connections_unwatched(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """instrument(silence_limit=None) turns the watchdog off for the engine: its DBAPI
    connections are not registered; by default they are."""
    url = pgfailover_cluster.primary.url(KINDS[kind][0])
    watched = []
    for silence_limit in (None, SILENCE):
        engine = _engine(url, kind, silence_limit=silence_limit)
        try:
            info = await _record_info(engine)
        finally:
            await _dispose(engine)
        watched.append(info.get("pgfailover.watched") is not None)
    assert watched == [False, True]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"silence_limit": 0}, ValueError),
        ({"silence_limit": -1.0}, ValueError),
        ({"silence_limit": float("inf")}, ValueError),
        ({"silence_limit": "5"}, TypeError),
        ({"silence_limit": True}, TypeError),
        ({"probe_timeout": None}, TypeError),
        ({"probe_timeout": 0.0}, ValueError),
        ({"probe_timeout": float("nan")}, ValueError),
    ],
)
def test_bad_watchdog_options_raise_a_typed_error_naming_the_option(
    options: dict[str, Any], error: type[Exception]
) -> None:
    """instrument() rejects a silence_limit or probe_timeout that is not a positive finite
    number of seconds (None is allowed for silence_limit only: it turns the watchdog off)
    with TypeError or ValueError naming the option; nothing is installed."""
    engine = sa.create_engine("postgresql+psycopg://app@localhost/app")
    with pytest.raises(error, match=next(iter(options))):
        pgsa.instrument(engine, **options)
    assert pgsa.instrumentation_of(engine) is None


def test_a_side_conninfo_keeps_only_what_psycopgs_libpq_knows_and_may_copy() -> None:
    """The side probe's conninfo for another driver's connection keeps the libpq keywords
    psycopg's libpq knows, less routing and bounds a side connection must not copy, and
    skips values that are None."""
    conninfo = conninfo_of(
        {
            "host": "db",
            "port": 5432,
            "user": "app",
            "password": "s p",
            "dbname": None,
            "not_a_libpq_keyword": "x",
            "target_session_attrs": "read-write",
            "connect_timeout": "30",
            "sslmode": "prefer",
        }
    )
    assert conninfo_to_dict(conninfo) == {
        "host": "db",
        "port": "5432",
        "user": "app",
        "password": "s p",
        "sslmode": "prefer",
    }
