"""Instrumented SQLAlchemy engines registered with the process monitor, on a real cluster.

Each failover test uses a private :class:`Monitor` with a short healthy interval, an engine
through PgBouncer in transaction mode (psycopg sync and async, psycopg2, asyncpg) and counts
the engine's own connection attempts by wrapping its dialect's ``connect``: that is every
attempt the engine makes, whichever listener asks for it. The tests without a failover need
no server.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import pgfailover.sqlalchemy as pgsa
from pgfailover.monitor import Endpoint, Monitor, Status
from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory

from .support import bouncer_cluster, eventually_async, table

#: Engine kinds: (dialect driver, async?)
KINDS = {
    "psycopg": ("psycopg", False),
    "psycopg-async": ("psycopg", True),
    "psycopg2": ("psycopg2", False),
    "asyncpg": ("asyncpg", True),
}

URL = "postgresql+psycopg://app:secret@127.0.0.1:1/app"  # never connected to


def _engine(cluster: LocalCluster, kind: str) -> Engine | AsyncEngine:
    """An engine of ``kind`` through PgBouncer (transaction mode), two pooled connections."""
    driver, is_async = KINDS[kind]
    assert cluster.pgbouncer is not None
    url = sa.make_url(cluster.pgbouncer.url(driver))
    connect_args: dict[str, Any] = {}
    if driver == "psycopg":
        connect_args["prepare_threshold"] = None
    elif driver == "asyncpg":
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__pgf_{uuid.uuid4().hex}__"
        url = url.update_query_dict({"prepared_statement_cache_size": "0"})
    if is_async:
        return create_async_engine(
            url, connect_args=connect_args, pool_size=2, max_overflow=0, pool_timeout=20
        )
    return sa.create_engine(
        url, connect_args=connect_args, pool_size=2, max_overflow=0, pool_timeout=20
    )


def _count_attempts(engine: Engine | AsyncEngine) -> Callable[[], int]:
    """Count every connection attempt of ``engine``'s driver from now on."""
    dialect = engine.dialect
    connect = dialect.connect
    count = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        return connect(*args, **kwargs)

    dialect.connect = counted  # type: ignore[method-assign]
    return lambda: count


async def _warm(engine: Engine | AsyncEngine) -> None:
    """Fill the pool: two connections open at once, then both checked in."""
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as a, engine.connect() as b:
            await a.execute(sa.text("SELECT 1"))
            await b.execute(sa.text("SELECT 1"))
    else:

        def both() -> None:
            with engine.connect() as a, engine.connect() as b:
                a.execute(sa.text("SELECT 1"))
                b.execute(sa.text("SELECT 1"))

        await asyncio.to_thread(both)


async def _insert(engine: Engine | AsyncEngine, name: str) -> None:
    """One write in its own transaction (a thread for a sync engine)."""
    statement = sa.text(f"INSERT INTO {name} (writer) VALUES (1)")
    if isinstance(engine, AsyncEngine):
        async with engine.begin() as conn:
            await conn.execute(statement)
    else:

        def write() -> None:
            with engine.begin() as conn:
                conn.execute(statement)

        await asyncio.to_thread(write)


async def _dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


def _status(monitor: Monitor, endpoint: Endpoint) -> Status | None:
    watch = monitor.watch_of(endpoint)
    return None if watch is None else watch.status


async def _outage_watched(
    monitor: Monitor, endpoint: Endpoint, instrumentation: pgsa.Instrumentation
) -> None:
    """Wait until the monitor saw the failover and purged the engine, then for five more
    looks of the watch during the outage (a window to count attempts in)."""
    state = instrumentation.failover_state
    await eventually_async(
        lambda: state.outage_since is not None and state.counters["generations_purged"] == 1,
        timeout=15.0,
    )
    looks = monitor.stats()["checks"]
    await eventually_async(lambda: monitor.stats()["checks"] >= looks + 5, timeout=15.0)
    assert _status(monitor, endpoint) in (Status.READ_ONLY, Status.DOWN)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_idle_engine_is_purged_by_the_monitor_and_its_next_request_succeeds_at_once(
    pgfailover_cluster_factory: ClusterFactory, kind: str
) -> None:
    """An engine with no request in flight during a failover and PgBouncer's repoint: the
    monitor purges its pool before any request meets the demoted node, the engine makes no
    connection attempt during the outage, and its first request afterwards succeeds at its
    first attempt (one new connection, no failover error, no connection to a standby)."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "transaction")
    name = table(cluster)
    monitor = Monitor(interval=0.2)
    engine = _engine(cluster, kind)
    try:
        instrumentation = pgsa.instrument(engine, monitor=monitor)
        assert instrumentation._pgf_monitor is monitor
        assert instrumentation.failover_state.monitored
        (endpoint,) = monitor.endpoints()
        await _warm(engine)
        attempts = _count_attempts(engine)
        await asyncio.to_thread(cluster.failover)
        await _outage_watched(monitor, endpoint, instrumentation)
        assert attempts() == 0  # the watch is the only prober
        await asyncio.to_thread(cluster.repoint_pgbouncer, cluster.primary)
        await eventually_async(lambda: _status(monitor, endpoint) is Status.WRITABLE, 15.0)
        # the monitor ends the outage of an idle engine: nothing else would until a request
        await eventually_async(lambda: instrumentation.failover_state.outage_since is None, 5.0)
        assert attempts() == 0
        await _insert(engine, name)
        stats = instrumentation.stats()
        assert attempts() == 1, stats  # the stale connection replaced once, at checkout
        assert stats["connections_poisoned"] == 0, stats  # no request met the failure
        assert stats["connections_rejected"] == 0, stats  # no connection reached a standby
        assert stats["failovers_detected"] == 1, stats
        assert stats["generations_purged"] == 1, stats
    finally:
        await _dispose(engine)
        pgsa.uninstrument(engine)
        monitor.close()


@pytest.mark.parametrize("kind", ["psycopg", "psycopg-async"])
async def test_a_request_during_the_outage_waits_for_the_monitor_and_is_woken(
    pgfailover_cluster_factory: ClusterFactory, kind: str
) -> None:
    """A request that needs a new connection while the monitor watches an outage makes no
    attempt of its own, however long the outage lasts; once the monitor sees the primary
    back, the request is woken, connects once and writes."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "transaction")
    name = table(cluster)
    monitor = Monitor(interval=0.2)
    engine = _engine(cluster, kind)
    try:
        instrumentation = pgsa.instrument(engine, monitor=monitor, timeout=30)
        (endpoint,) = monitor.endpoints()
        await _warm(engine)
        attempts = _count_attempts(engine)
        await asyncio.to_thread(cluster.failover)
        await _outage_watched(monitor, endpoint, instrumentation)
        request = asyncio.ensure_future(_insert(engine, name))
        looks = monitor.stats()["checks"]
        await eventually_async(lambda: monitor.stats()["checks"] >= looks + 10, timeout=15.0)
        assert not request.done()
        assert attempts() == 0  # held: the watch alone looks during the outage
        await asyncio.to_thread(cluster.repoint_pgbouncer, cluster.primary)
        await asyncio.wait_for(request, 15.0)  # raises what the request raised, if anything
        stats = instrumentation.stats()
        assert attempts() == 1, stats
        assert stats["connections_poisoned"] == 0, stats
        assert stats["connections_rejected"] == 0, stats
    finally:
        await _dispose(engine)
        pgsa.uninstrument(engine)
        monitor.close()


async def test_dispose_and_uninstrument_leave_the_monitor_and_monitor_false_never_joins(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """monitor=False keeps the engine off any monitor; with a Monitor, the engine's endpoint
    is watched until dispose(), which ends the watch (its last member) until the engine's
    next connection joins again, and until uninstrument(), which hands probing back to the
    engine for good."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "transaction")
    monitor = Monitor(interval=0.2)
    engine = _engine(cluster, "psycopg")
    try:
        alone = pgsa.instrument(engine, monitor=False)
        assert alone._pgf_monitor is None
        assert not alone.failover_state.monitored
        pgsa.uninstrument(engine)
        watched = pgsa.instrument(engine, monitor=monitor)
        assert watched.failover_state.monitored
        (endpoint,) = monitor.endpoints()
        await eventually_async(lambda: _status(monitor, endpoint) is Status.WRITABLE, 15.0)
        bouncer = cluster.pgbouncer
        assert bouncer is not None
        assert str(endpoint) == f"{bouncer.host}:{bouncer.port}/{engine.url.database}"
        await _dispose(engine)
        assert monitor.endpoints() == []
        assert watched._pgf_monitor is None
        assert not watched.failover_state.monitored
        await _warm(engine)  # used again: its first connection joins the monitor again
        assert watched._pgf_monitor is monitor
        assert watched.failover_state.monitored
        assert monitor.endpoints() == [endpoint]
        assert pgsa.uninstrument(engine)
        assert monitor.endpoints() == []
        assert watched._pgf_monitor is None
        assert not watched.failover_state.monitored
        assert watched.failover_state.on_suspect is None
    finally:
        await _dispose(engine)
        pgsa.uninstrument(engine)
        monitor.close()


# ------------------------------------------------------------------ no server needed


def test_a_bad_monitor_argument_is_a_type_error_and_nothing_is_installed() -> None:
    """monitor= must be a bool or a Monitor: anything else is a TypeError naming the
    choices; a closed Monitor is a RuntimeError; neither leaves the engine instrumented."""
    engine = sa.create_engine(URL)
    with pytest.raises(TypeError, match="monitor must be True"):
        pgsa.instrument(engine, monitor="yes")  # type: ignore[arg-type]
    closed = Monitor()
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        pgsa.instrument(engine, monitor=closed)
    assert pgsa.instrumentation_of(engine) is None


def test_a_second_instrument_with_another_monitor_is_refused() -> None:
    """The monitor is one of the options: instrument() again with the same one returns the
    same instrumentation, with another one raises ValueError."""
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: None)  # no watch
    monitor = Monitor()
    try:
        first = pgsa.instrument(engine, monitor=monitor)
        assert pgsa.instrument(engine, monitor=monitor) is first
        with pytest.raises(ValueError, match="uninstrument"):
            pgsa.instrument(engine, monitor=False)
    finally:
        pgsa.uninstrument(engine)
        monitor.close()


def test_engines_with_their_own_creator_are_not_watched() -> None:
    """An engine made with creator= or async_creator= (only the creator knows where it
    connects) joins the monitor without a watch: it keeps probing by itself."""
    monitor = Monitor()
    engines: list[Engine | AsyncEngine] = [
        sa.create_engine("postgresql+psycopg://", creator=lambda: None),
        create_async_engine("postgresql+asyncpg://", async_creator=lambda: None),
    ]
    try:
        for engine in engines:
            instrumentation = pgsa.instrument(engine, monitor=monitor)
            assert instrumentation._pgf_watch_target() is None
            assert not instrumentation.failover_state.monitored
        assert monitor.endpoints() == []
    finally:
        for engine in engines:
            pgsa.uninstrument(engine)
        monitor.close()


def test_the_watch_conninfo_is_what_the_driver_is_given_in_libpq_terms() -> None:
    """The watch's conninfo holds the URL's hosts, ports, database, user, password and
    libpq options and the engine's connect_args, without the drivers' own options: a host
    list asks for read-write; asyncpg's database and ssl become dbname and sslmode, an
    SSLContext (which libpq cannot reproduce) leaves the engine unwatched. The target's
    repr shows no password."""
    psycopg_engine = sa.create_engine(
        "postgresql+psycopg://app:s%20cret@/app?host=db1:5433&host=db2:5434&sslmode=require",
        connect_args={"prepare_threshold": None, "application_name": "web"},
    )
    asyncpg_engine = create_async_engine(
        "postgresql+asyncpg://app:secret@db1:5433/app?ssl=verify-full"
        "&prepared_statement_cache_size=0",
        connect_args={"statement_cache_size": 0},
    )
    context_engine = create_async_engine(
        "postgresql+asyncpg://app:secret@db1/app",
        connect_args={"ssl": ssl.create_default_context()},
    )
    try:
        target = pgsa.instrument(psycopg_engine, monitor=False)._pgf_watch_target()
        assert target is not None
        assert target.endpoint == Endpoint("db1,db2", "5433,5434", "app")
        params = _params(target.conninfo)
        assert params == {
            "host": "db1,db2",
            "port": "5433,5434",
            "dbname": "app",
            "user": "app",
            "password": "s cret",
            "sslmode": "require",
            "application_name": "web",
            "target_session_attrs": "read-write",
        }
        assert "cret" not in repr(target)
        target = pgsa.instrument(asyncpg_engine, monitor=False)._pgf_watch_target()
        assert target is not None
        assert _params(target.conninfo) == {
            "host": "db1",
            "port": "5433",
            "dbname": "app",
            "user": "app",
            "password": "secret",
            "sslmode": "verify-full",
        }
        assert pgsa.instrument(context_engine, monitor=False)._pgf_watch_target() is None
    finally:
        for engine in (psycopg_engine, asyncpg_engine, context_engine):
            pgsa.uninstrument(engine)


def _params(conninfo: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - only these tests parse

    return {key: str(value) for key, value in conninfo_to_dict(conninfo).items()}


def test_waiting_connects_are_woken_at_once_by_the_primary_s_return() -> None:
    """The connect loop's backoff wait ends as soon as the monitor reports the primary back,
    in a thread and in an event loop, and a wake-up that came before the wait began is not
    lost (the wait returns at once)."""
    wakeup = pgsa._Wakeup()
    seen = wakeup.count
    done = threading.Event()

    def wait() -> None:
        wakeup.wait(60.0, seen)
        done.set()

    thread = threading.Thread(target=wait)
    thread.start()

    async def wait_async() -> None:
        await wakeup.wait_async(60.0, seen)

    async def main() -> None:
        waiter = asyncio.ensure_future(wait_async())
        await asyncio.sleep(0)  # let it start waiting
        await asyncio.to_thread(wakeup.wake)
        await asyncio.wait_for(waiter, 10.0)

    asyncio.run(main())
    assert done.wait(10.0)
    thread.join(10.0)
    started = time.monotonic()
    wakeup.wait(60.0, seen)  # the count moved on: no wait at all
    asyncio.run(wakeup.wait_async(60.0, seen))
    assert time.monotonic() - started < 30.0
