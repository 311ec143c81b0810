# pgfailover: generate-sync
"""Bounded hangs on a frozen primary (SIGSTOP of its processes, ``LocalCluster.freeze``):
a statement in flight through a pool ends within the watchdog's bound and poisons its
connection as lost, the transaction runner retries a statement cut there once the server
is back, and a COMMIT cut there is looked up, not guessed.

Written once; ``tools/async_to_sync.py`` generates ``test_hang_frozen.py`` (the sync twin).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

import pgfailover
from pgfailover.events import RetryEvent
from pgfailover.policy import CONNECT_ATTEMPT_BOUND
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster, Node

from .support import count_key

#: What the tests configure: ask after 0.5 s of silence, 2 s per side step (libpq's
#: minimum connect_timeout). The bound the docs state is silence + 2 x probe + a tick.
SILENCE, PROBE = 0.5, 2.0
BOUND = SILENCE + 2 * PROBE + 1.0


async def _quick(conn: pgfailover.AsyncConnection[Any]) -> None:
    """The pools' ``configure``: the test's small watchdog bounds."""
    conn.silence_limit, conn.probe_timeout = SILENCE, PROBE


def _dsn(node: Node) -> str:
    """``node``'s conninfo; a new connection to a frozen node gives up after 2 s."""
    return node.dsn(connect_timeout=2)


@pytest.fixture
def thaw_on_cut(pgfailover_cluster: LocalCluster) -> Iterator[list[pgfailover.FailoverEvent]]:
    """Thaw every frozen node as soon as a connection is poisoned (the watchdog's cut has
    been classified), as a hung machine that comes back would; the events seen."""
    seen: list[pgfailover.FailoverEvent] = []

    def hook(event: Any) -> None:
        if isinstance(event, pgfailover.FailoverEvent):
            seen.append(event)
            for node in pgfailover_cluster.nodes:
                pgfailover_cluster.thaw(node)

    unsubscribe = pgfailover.subscribe(hook)
    try:
        yield seen
    finally:
        unsubscribe()
        for node in pgfailover_cluster.nodes:
            pgfailover_cluster.thaw(node)


async def test_a_statement_in_flight_on_a_frozen_primary_ends_within_the_bound(
    pgfailover_cluster: LocalCluster,
) -> None:
    """The primary freezes under a checked-out pool connection: its next statement fails
    with the driver's connection error within silence + 2 x probe timeout, the connection
    is poisoned as lost with a note that the watchdog cut it, and the pool records the
    outage (a poisoned connection, a failover detected)."""
    node = pgfailover_cluster.primary
    async with AsyncConnectionPool[Any](
        _dsn(node), min_size=1, max_size=2, configure=_quick
    ) as pool:
        try:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                pgfailover_cluster.freeze(node)
                started = time.monotonic()
                with pytest.raises(psycopg.OperationalError) as info:
                    await conn.execute("SELECT 1")
                waited = time.monotonic() - started
        finally:
            pgfailover_cluster.thaw(node)
        stats = pool.get_stats()
    assert waited < BOUND, f"the statement hung {waited:.1f} s (bound {BOUND:.1f} s)"
    assert conn.poisoned is not None
    assert conn.poisoned.kind is pgfailover.Kind.CONNECTION_LOST
    assert any("watchdog cut" in note for note in getattr(info.value, "__notes__", []))
    assert stats["connections_poisoned"] >= 1
    assert stats["failovers_detected"] >= 1


async def test_the_runner_retries_a_statement_cut_on_a_frozen_primary_once_it_is_back(
    pgfailover_cluster: LocalCluster,
    keys_table: str,
    thaw_on_cut: list[pgfailover.FailoverEvent],
    retry_events: list[RetryEvent],
) -> None:
    """The primary freezes while the work's INSERT is in flight: the watchdog cuts it
    within the bound, the runner sees a transaction rolled back (nothing was committed)
    and runs the work again once the server answers: the key is written exactly once."""
    node, key, attempts = pgfailover_cluster.primary, uuid.uuid4().hex, []

    async def work(conn: pgfailover.AsyncConnection[Any]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            pgfailover_cluster.freeze(node)
        await conn.execute(f"INSERT INTO {keys_table} (k) VALUES (%s)", [key])

    async with AsyncConnectionPool[Any](
        _dsn(node), min_size=1, max_size=2, configure=_quick
    ) as pool:
        runner = pgfailover.AsyncTransactionRunner(pool, timeout=30)
        await runner(work)
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] < BOUND + 5.0, "the cut came too late"
    assert [e.verdict.kind for e in thaw_on_cut][:1] == [pgfailover.Kind.CONNECTION_LOST]
    assert [(e.cause.retry, e.action) for e in retry_events] == [
        (pgfailover.RetryCondition.ROLLED_BACK, "retry")
    ]
    assert count_key(pgfailover_cluster, keys_table, key) == 1


async def test_a_commit_cut_on_a_frozen_primary_is_looked_up_not_guessed(
    pgfailover_cluster: LocalCluster,
    keys_table: str,
    thaw_on_cut: list[pgfailover.FailoverEvent],
    retry_events: list[RetryEvent],
) -> None:
    """The primary freezes right before the runner's COMMIT: the watchdog cuts it within
    the bound, the outcome is unknown, and the runner asks the server once it is back
    instead of guessing. The thawed server executes the COMMIT it had received, so the
    runner reports it committed and does not run the work again: one row."""
    node, key, attempts = pgfailover_cluster.primary, uuid.uuid4().hex, []

    async def work(conn: pgfailover.AsyncConnection[Any]) -> str:
        attempts.append(time.monotonic())
        await conn.execute(f"INSERT INTO {keys_table} (k) VALUES (%s)", [key])
        if len(attempts) == 1:
            pgfailover_cluster.freeze(node)  # the COMMIT is next
        return key

    async with AsyncConnectionPool[Any](
        _dsn(node), min_size=1, max_size=2, configure=_quick
    ) as pool:
        runner = pgfailover.AsyncTransactionRunner(pool, timeout=30)
        started = time.monotonic()
        assert await runner(work) == key
        elapsed = time.monotonic() - started
    assert len(attempts) == 1, "the work ran again after a COMMIT that committed"
    assert [e.verdict.retry for e in thaw_on_cut][:1] == [pgfailover.RetryCondition.OUTCOME_UNKNOWN]
    assert [(e.cause.retry, e.action) for e in retry_events] == [
        (pgfailover.RetryCondition.OUTCOME_UNKNOWN, "committed")
    ]
    assert elapsed < BOUND + 10.0, f"the runner took {elapsed:.1f} s"
    assert count_key(pgfailover_cluster, keys_table, key) == 1


async def test_a_new_connection_to_a_frozen_server_gives_up_within_the_connect_bound(
    pgfailover_cluster: LocalCluster,
) -> None:
    """With no connect_timeout of the caller's, each of the pool's connection attempts to a
    frozen server (TCP accepted, nothing answered) ends within CONNECT_ATTEMPT_BOUND and
    counts as an error, so the pool keeps trying (and could reach another node) instead of
    waiting for ever in one attempt; the request times out with the pool's own error."""
    node = pgfailover_cluster.primary
    pgfailover_cluster.freeze(node)
    try:
        async with AsyncConnectionPool[Any](node.dsn(), min_size=0, max_size=1, open=False) as pool:
            await pool.open()
            with pytest.raises((psycopg_pool.PoolTimeout, pgfailover.NoPrimaryAvailable)):
                await pool.getconn(timeout=2 * CONNECT_ATTEMPT_BOUND + 3)
            errors = pool.get_stats().get("connections_errors", 0)
    finally:
        pgfailover_cluster.thaw(node)
    assert errors >= 1, "no connection attempt ended: one hung on the frozen server"
