"""SQLAlchemy engines behind an L4 endpoint that keeps existing connections when it switches.

A virtual IP, a Kubernetes Service or HAProxy in TCP mode sends *new* connections to the new
primary after a failover but leaves the connections already open where they were. The test
harness's :class:`~pgfailover.testing.proxy.FaultProxy` does the same with ``switch()``.

The scenario, per engine kind: the proxy points at node0 (the primary) and the engine is
created on the proxy's address (``pool_size=4, max_overflow=0``). ``failover()`` promotes
node1 and brings node0 back as its standby, while the proxy still points at node0. Four
connections to that standby are then opened at once, and the proxy is switched to the new
primary: those connections stay on the standby. Four writers then run.

How the engine gets connections to the standby: they are opened *before* ``instrument()``.
Once an engine is instrumented, ``do_connect`` probes every new connection and refuses a
standby, so an instrumented engine cannot open one through the endpoint. The other way would
be ``instrument(engine, recheck_interval=None)`` with a pool filled before the failover, but
that does not give connections to the standby: ``failover()`` stops node0, which ends every
connection opened to it while it was the primary, so the pool would hold dead connections
instead. Opening the connections with the plain engine and instrumenting afterwards also
matches instrumenting an application that is already running (``instrument()`` only adds
listeners).

Two variants of the instrumented engine: ``pooled``, the four connections wait in the pool
at the switch (connections opened before ``instrument()`` carry no generation, so each is
role-probed at its next checkout and replaced before any write is sent); ``held``, each
writer holds its connection across the switch (as a long-lived ``Connection`` or ``Session``
would), so its first write reaches the standby, fails with 25006 and must not be followed by
another failure.

With ``instrument`` the writers recover within 0.5 s of the switch, every pooled connection
then leads to the primary, and no connection of the application is left on the standby.
Without it (plain engine, ``pool_pre_ping=True``) every write fails with 25006 and the same
four connections stay on the standby: that is the bug pgfailover fixes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

import pgfailover
import pgfailover.sqlalchemy as pgsa
from pgfailover.errors import NoPrimaryAvailable
from pgfailover.testing import LocalCluster, Node
from pgfailover.testing.proxy import FaultProxy

from .support import WRITERS, Workload, eventually, eventually_async, table

#: Engine kinds: (dialect driver, async?)
KINDS = {
    "psycopg": ("psycopg", False),
    "psycopg-async": ("psycopg", True),
    "psycopg2": ("psycopg2", False),
    "asyncpg": ("asyncpg", True),
}

#: The longest time allowed from the switch to the first successful write.
RECOVERY = 0.5
#: How long the plain engine's writers run after the switch.
STUCK_FOR = 1.5

#: A pooled connection's server: (in recovery?, server port, backend PID).
Where: TypeAlias = tuple[bool, int, int]
_WHERE = sa.text("SELECT pg_is_in_recovery(), inet_server_port(), pg_backend_pid()")


@dataclass
class Outcome:
    """What a scenario saw: where the connections opened before the switch led, when the
    proxy switched, the writers' outcomes, where the pool's connections led afterwards, and
    the instrumentation's counters (None for a plain engine)."""

    before: list[Where]
    switched_at: float
    work: Workload
    after: list[Where]
    stats: dict[str, int] | None


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


def _engine(url: sa.URL, kind: str, **kwargs: Any) -> Engine | AsyncEngine:
    """A plain engine of ``kind`` whose pool holds exactly one connection per writer."""
    if KINDS[kind][1]:
        return create_async_engine(url, pool_size=WRITERS, max_overflow=0, **kwargs)
    return sa.create_engine(url, pool_size=WRITERS, max_overflow=0, **kwargs)


def _insert(name: str) -> sa.TextClause:
    return sa.text(f"INSERT INTO {name} (writer) VALUES (:w)")


def _code(ex: BaseException) -> str:
    """What a workload records of a failure: the SQLSTATE, else the exception type."""
    if isinstance(ex, NoPrimaryAvailable):
        return "NoPrimaryAvailable"
    return pgfailover.sqlstate_of(ex) or type(getattr(ex, "orig", None) or ex).__name__


def _app_backends(cluster: LocalCluster, node: Node) -> set[int]:
    """PIDs of the application user's client backends on ``node``."""
    with node.connect() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE usename = %s AND backend_type = 'client backend'",
            [cluster.user],
        ).fetchall()
    return {int(row[0]) for row in rows}


def _setup(cluster: LocalCluster) -> tuple[str, FaultProxy]:
    """A replicated table on the primary, and a proxy pointing at the primary."""
    name = table(cluster)
    cluster.wait_replicated()
    return name, FaultProxy(cluster.primary).start()


# ------------------------------------------------------------------------- sync engines


def _where_of(conn: sa.Connection) -> Where:
    row = conn.execute(_WHERE).one()
    conn.rollback()
    return (bool(row[0]), int(row[1]), int(row[2]))


def _where(engine: Engine) -> list[Where]:
    """Where the pool's connections lead: WRITERS checkouts held at once."""
    conns = [engine.connect() for _ in range(WRITERS)]
    try:
        return [_where_of(conn) for conn in conns]
    finally:
        for conn in conns:
            conn.close()


def _sync_writers(
    engine: Engine, name: str, held: list[sa.Connection] | None, until: Callable[[Workload], None]
) -> Workload:
    """Run WRITERS threads, each on a pooled connection per transaction or on its held one,
    until ``until(work)`` returns."""
    work = Workload()
    stop = threading.Event()

    def write(i: int) -> None:
        if held is None:
            with engine.begin() as conn:
                conn.execute(_insert(name), {"w": i})
        else:
            with held[i].begin():
                held[i].execute(_insert(name), {"w": i})

    def writer(i: int) -> None:
        while not stop.is_set():
            try:
                write(i)
                work.ok.append(time.monotonic())
            except (sa.exc.SQLAlchemyError, psycopg.Error) as ex:
                work.failed.append((time.monotonic(), _code(ex)))
                time.sleep(0.005)  # an application's pause before it tries again

    work.threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in work.threads:
        t.start()
    try:
        until(work)
    finally:
        stop.set()
        for t in work.threads:
            t.join()
    return work


def _sync_scenario(
    engine: Engine, cluster: LocalCluster, proxy: FaultProxy, name: str, mode: str
) -> Outcome:
    cluster.failover()
    conns = [engine.connect() for _ in range(WRITERS)]  # opened to the standby, at once
    held = conns if mode == "held" else None
    try:
        before = [_where_of(conn) for conn in conns]
        if held is None:
            for conn in conns:
                conn.close()
        stats = pgsa.instrument(engine, monitor=False).stats if mode != "plain" else None
        switched_at = time.monotonic()
        proxy.switch(cluster.primary)

        def until(work: Workload) -> None:
            if stats is None:
                time.sleep(STUCK_FOR)  # let the writers run against the standby
            else:
                eventually(lambda: work.oks_after(switched_at) >= 10 * WRITERS)

        work = _sync_writers(engine, name, held, until)
    finally:
        for conn in conns:
            conn.close()
    return Outcome(before, switched_at, work, _where(engine), stats() if stats else None)


# ------------------------------------------------------------------------ async engines


async def _awhere_of(conn: AsyncConnection) -> Where:
    row = (await conn.execute(_WHERE)).one()
    await conn.rollback()
    return (bool(row[0]), int(row[1]), int(row[2]))


async def _awhere(engine: AsyncEngine) -> list[Where]:
    """Async twin of :func:`_where`."""
    conns = [await engine.connect() for _ in range(WRITERS)]
    try:
        return [await _awhere_of(conn) for conn in conns]
    finally:
        for conn in conns:
            await conn.close()


async def _awriter(
    engine: AsyncEngine,
    name: str,
    i: int,
    *,
    held: list[AsyncConnection] | None,
    stop: asyncio.Event,
    work: Workload,
) -> None:
    while not stop.is_set():
        try:
            if held is None:
                async with engine.begin() as conn:
                    await conn.execute(_insert(name), {"w": i})
            else:
                async with held[i].begin():
                    await held[i].execute(_insert(name), {"w": i})
            work.ok.append(time.monotonic())
        except (sa.exc.SQLAlchemyError, psycopg.Error) as ex:
            work.failed.append((time.monotonic(), _code(ex)))
            await asyncio.sleep(0.005)  # an application's pause before it tries again
        await asyncio.sleep(0)


async def _async_scenario(
    engine: AsyncEngine, cluster: LocalCluster, proxy: FaultProxy, name: str, mode: str
) -> Outcome:
    await asyncio.to_thread(cluster.failover)
    conns = [await engine.connect() for _ in range(WRITERS)]  # opened to the standby, at once
    held = conns if mode == "held" else None
    try:
        before = [await _awhere_of(conn) for conn in conns]
        if held is None:
            for conn in conns:
                await conn.close()
        stats = pgsa.instrument(engine, monitor=False).stats if mode != "plain" else None
        switched_at = time.monotonic()
        proxy.switch(cluster.primary)
        stop = asyncio.Event()
        work = Workload()
        tasks = [
            asyncio.create_task(_awriter(engine, name, i, held=held, stop=stop, work=work))
            for i in range(WRITERS)
        ]
        try:
            if stats is None:
                await asyncio.sleep(STUCK_FOR)  # let the writers run against the standby
            else:
                await eventually_async(lambda: work.oks_after(switched_at) >= 10 * WRITERS)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        for conn in conns:
            await conn.close()
    return Outcome(before, switched_at, work, await _awhere(engine), stats() if stats else None)


async def _scenario(
    engine: Engine | AsyncEngine, cluster: LocalCluster, proxy: FaultProxy, name: str, mode: str
) -> Outcome:
    """Fail over, fill the pool (or the writers' hands, ``mode`` "held") with connections to
    the standby, instrument the engine unless ``mode`` is "plain", switch the proxy to the
    new primary, run the writers."""
    if isinstance(engine, AsyncEngine):
        return await _async_scenario(engine, cluster, proxy, name, mode)
    return await asyncio.to_thread(_sync_scenario, engine, cluster, proxy, name, mode)


async def _dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


def _on_standby(outcome: Outcome, standby: Node) -> None:
    """The writers started with WRITERS distinct connections to ``standby``."""
    assert len({pid for _, _, pid in outcome.before}) == WRITERS, outcome.before
    assert all(in_recovery and port == standby.port for in_recovery, port, _ in outcome.before), (
        outcome.before
    )


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("where", ["pooled", "held"])
@pytest.mark.parametrize("kind", list(KINDS))
async def test_instrumented_engine_recovers_after_an_l4_switch(
    pgfailover_cluster: LocalCluster, kind: str, where: str, request: pytest.FixtureRequest
) -> None:
    """Connections an L4 switch left on the standby are replaced; writes recover within 0.5 s.
    About the engine's own role checks (``monitor=False``): the process monitor would see the
    failover first and change which connections meet the standby."""
    # where="pooled": the connections wait in the pool at the switch; "held": each writer
    # holds its own across the switch, so its first write does reach the standby.
    cluster = pgfailover_cluster
    old_primary = cluster.primary
    name, proxy = _setup(cluster)
    try:
        engine = _engine(_url(cluster, proxy, KINDS[kind][0]), kind)
        try:
            outcome = await _scenario(engine, cluster, proxy, name, where)
            # the engine is still open: its connections to the standby must be closed already
            await asyncio.to_thread(eventually, lambda: not _app_backends(cluster, old_primary))
        finally:
            await _dispose(engine)
    finally:
        proxy.close()
    new_primary = cluster.primary
    assert new_primary is not old_primary
    _on_standby(outcome, old_primary)
    work, stats = outcome.work, outcome.stats
    assert stats is not None
    codes = Counter(code for _, code in work.failed)
    recovery = work.first_ok_after(outcome.switched_at)
    request.node.user_properties += [
        ("recovery_s", round(recovery, 4)),
        ("failed_writes", dict(codes)),
        ("stats", stats),
    ]
    assert recovery < RECOVERY, (recovery, codes, stats)
    # no connection to the standby survives its first failed write
    assert len(work.failed) <= WRITERS, codes
    if where == "held":  # a write on a standby cannot succeed: each fails once, not more
        assert codes == Counter({"25006": WRITERS}), codes
    assert set(codes) <= {"25006"}, codes
    assert stats["failovers_detected"] == 1, stats
    assert stats["connections_rejected"] + stats["connections_poisoned"] >= WRITERS, stats
    assert all(
        not in_recovery and port == new_primary.port for in_recovery, port, _ in outcome.after
    ), outcome.after


@pytest.mark.parametrize("kind", list(KINDS))
async def test_plain_engine_stays_stuck_after_an_l4_switch(
    pgfailover_cluster: LocalCluster, kind: str, request: pytest.FixtureRequest
) -> None:
    """Documents the bug: without instrument(), every write fails (25006), the pool stays put."""
    # A plain engine with pool_pre_ping=True: 25006 is no disconnect for SQLAlchemy, and the
    # ping (";") passes on a standby, so the same connections are handed out again and again.
    cluster = pgfailover_cluster
    old_primary = cluster.primary
    name, proxy = _setup(cluster)
    try:
        engine = _engine(_url(cluster, proxy, KINDS[kind][0]), kind, pool_pre_ping=True)
        try:
            outcome = await _scenario(engine, cluster, proxy, name, "plain")
            left = await asyncio.to_thread(_app_backends, cluster, old_primary)
        finally:
            await _dispose(engine)
    finally:
        proxy.close()
    _on_standby(outcome, old_primary)
    work = outcome.work
    codes = Counter(code for _, code in work.failed)
    request.node.user_properties.append(("failed_writes", dict(codes)))
    assert not work.ok, f"{len(work.ok)} writes succeeded"
    assert set(codes) == {"25006"}, codes
    assert codes["25006"] >= 10 * WRITERS, codes  # the writers kept trying
    assert max(at for at, _ in work.failed) - outcome.switched_at > STUCK_FOR - 0.2
    # the same connections, still on the standby and still open there
    assert sorted(outcome.after) == sorted(outcome.before), outcome.after
    assert left == {pid for _, _, pid in outcome.before}, left
