# pgfailover: generate-sync
"""Bounded hangs on a real server: a statement in flight on a blackholed server ends, a slow
statement on a live one does not, and the runner's deadline covers the statement in flight.

Written once; ``tools/async_to_sync.py`` generates ``test_watchdog.py`` (the sync twin).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

import pgfailover
from pgfailover._watchdog import WATCHDOG
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing.proxy import FaultProxy

#: What the tests configure: ask after 0.5 s of silence, 2 s per side step (libpq's
#: minimum connect_timeout). The bound the docs state is silence + 2 x probe + a tick.
SILENCE, PROBE = 0.5, 2.0
BOUND = SILENCE + 2 * PROBE + 1.0


async def _connect(dsn: str) -> pgfailover.AsyncConnection[Any]:
    conn = await pgfailover.AsyncConnection.connect(dsn, autocommit=True)
    conn.silence_limit, conn.probe_timeout = SILENCE, PROBE
    return conn


async def test_a_statement_on_a_blackholed_server_ends_within_the_bound(
    pgfailover_cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """The network to the server goes silent mid-session: the next statement fails with
    the driver's connection error within silence + 2 x probe timeout (not the outage's
    length), the connection is poisoned as lost, and the error says the watchdog cut it."""
    conn = await _connect(proxy.dsn_for(pgfailover_cluster.primary))
    cuts = WATCHDOG.cuts
    try:
        await conn.execute("SELECT 1")
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            await conn.execute("SELECT 1")
        waited = time.monotonic() - started
    finally:
        proxy.restore()
        await conn.close()
    assert waited < BOUND, f"the statement hung {waited:.1f} s (bound {BOUND:.1f} s)"
    assert conn.poisoned is not None
    assert conn.poisoned.kind is pgfailover.Kind.CONNECTION_LOST
    assert any("watchdog cut" in note for note in getattr(info.value, "__notes__", []))
    assert WATCHDOG.cuts > cuts


async def test_a_slow_statement_on_a_live_server_is_left_alone(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A statement silent for longer than the silence limit on a live server: the watchdog
    asks the server (it answers on a side connection) and lets the statement finish."""
    conn = await _connect(pgfailover_cluster.primary.dsn())
    probes = WATCHDOG.probes_run
    try:
        cur = await conn.execute("SELECT pg_sleep(%s), 42", [SILENCE * 5])
        row = await cur.fetchone()
    finally:
        await conn.close()
    assert row is not None
    assert row[1] == 42
    assert conn.poisoned is None
    assert WATCHDOG.probes_run > probes, "the watchdog never looked: nothing was tested"


async def test_the_runners_deadline_covers_the_statement_in_flight(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A transaction runner with a 1.5 s timeout whose work runs a 60 s statement: the
    statement is cut at the deadline and the driver's error is raised with the runner's
    note; the pool discards the connection."""

    async def work(conn: pgfailover.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT pg_sleep(60)")

    dsn = pgfailover_cluster.primary.dsn()
    async with AsyncConnectionPool[Any](dsn, min_size=1, max_size=1) as pool:
        runner = pgfailover.AsyncTransactionRunner(pool, timeout=1.5)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as info:
            await runner(work)
        waited = time.monotonic() - started
        stats = pool.get_stats()
    assert waited < 1.5 + 2.0, f"the runner ran {waited:.1f} s past a 1.5 s deadline"
    notes = getattr(info.value, "__notes__", [])
    assert any("gave up after" in note for note in notes), notes
    assert any("outlived its deadline" in note for note in notes), notes
    assert stats["connections_poisoned"] >= 1
