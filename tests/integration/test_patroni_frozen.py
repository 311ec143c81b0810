"""A frozen Patroni leader under pgfailover's pools (sync and async) with a Patroni topology.

SIGSTOP of every process of the leader: a hung machine. Its kernel still accepts
connections and acknowledges bytes, so nothing fails by itself: statements in flight wait,
and new connection attempts wait for a startup answer that never comes. Patroni names
another leader once the frozen one's lease runs out (about ``ttl``).

One freeze serves both pools (each freeze costs about ``ttl`` and a heal), written once:
the same writers drive a sync pool from threads and an async pool from tasks on an event
loop of their own. The pools set no ``connect_timeout`` and keep the default watchdog, so
the bounds are pgfailover's documented defaults (docs/patroni.md). Timings live in
``benchmarks/patroni_failover.py --faults freeze``, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgfailover
from pgfailover.testing import PatroniCluster
from pgfailover.testing.patroni import PatroniNode
from pgfailover.testing.plugin import PatroniFactory


def _hang_bound() -> float:
    """The watchdog's documented bound on a statement in flight on a frozen server, with
    pgfailover's defaults: ``silence_limit + 2 * probe_timeout`` (11 s)."""
    limit = pgfailover.Connection.silence_limit
    assert limit is not None
    return limit + 2 * pgfailover.Connection.probe_timeout


#: The pools' wait for a connection (seconds).
POOL_TIMEOUT = 2.0
#: The longest a bare call may block while the leader is frozen: the pool's wait plus the
#: watchdog's bound, plus 3 s for a loaded machine.
CALL_BOUND = POOL_TIMEOUT + _hang_bound() + 3.0
#: Seconds the writers go on writing once the new leader took the first write: the
#: freeze then outlasts CALL_BOUND, so a call that only a thaw would end is caught.
KEEP_FROZEN = 7.0
WRITERS = 2  # per pool


@dataclass
class Call:
    """One write as the application saw it (``time.monotonic()`` instants)."""

    flavour: str
    key: str
    start: float
    end: float | None = None
    ok: bool = False


class Calls:
    """Every call of every writer, in flight or ended (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.all: list[Call] = []

    def begin(self, flavour: str, key: str) -> Call:
        call = Call(flavour, key, time.monotonic())
        with self._lock:
            self.all.append(call)
        return call

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.all)

    def acked_after(self, flavour: str, at: float) -> bool:
        return any(c.ok and c.flavour == flavour and c.start >= at for c in self.snapshot())


def _app_conninfo(leader: PatroniNode) -> str:
    """The application's conninfo without host and port (the topology supplies them), and
    without connect_timeout (pgfailover's default bound applies)."""
    params = conninfo_to_dict(leader.dsn())
    for key in ("host", "port", "connect_timeout"):
        params.pop(key, None)
    return make_conninfo("", **params)


@pytest.fixture(scope="module")
def synchronous(pgfailover_patroni_factory: PatroniFactory) -> PatroniCluster:
    """A Patroni cluster of its own with ``synchronous_mode`` on (an acknowledged commit is
    on the standby Patroni may promote). Its own: a frozen leader thawed under Patroni
    3.0.2 may retake its key and leave a member that cannot be healed, which must not reach
    the session cluster the other Patroni tests share."""
    cluster = pgfailover_patroni_factory(nodes=3, synchronous_mode=True)
    deadline = time.monotonic() + 60
    while not any(m.role == "sync_standby" for m in cluster.members()):
        assert time.monotonic() < deadline, "no synchronous standby appeared"
        time.sleep(0.1)
    return cluster


def _sync_writers(
    pool: pgfailover.ConnectionPool[Any], sql: str, calls: Calls, stop: threading.Event
) -> list[threading.Thread]:
    def run(worker: int) -> None:
        for i in range(1_000_000):
            if stop.is_set():
                return
            call = calls.begin("sync", f"s{worker}-{i}")
            try:
                with pool.connection() as conn:
                    conn.execute(sql, [call.key])
                call.ok = True
            except psycopg.Error:  # what the application sees during the outage
                pass
            finally:
                call.end = time.monotonic()
            stop.wait(0.01)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(WRITERS)]
    for t in threads:
        t.start()
    return threads


def _async_writers(
    cluster: PatroniCluster, base: str, sql: str, calls: Calls, stop: threading.Event
) -> threading.Thread:
    """An event loop in a thread of its own: an async pool and its writer tasks."""

    async def write(pool: pgfailover.AsyncConnectionPool[Any], worker: int) -> None:
        for i in range(1_000_000):
            if stop.is_set():
                return
            call = calls.begin("async", f"a{worker}-{i}")
            try:
                async with pool.connection() as conn:
                    await conn.execute(sql, [call.key])
                call.ok = True
            except psycopg.Error:  # what the application sees during the outage
                pass
            finally:
                call.end = time.monotonic()
            await asyncio.sleep(0.01)

    async def main() -> None:
        topology = pgfailover.AsyncPatroniTopology([n.rest_url for n in cluster.nodes])
        async with pgfailover.AsyncConnectionPool[Any](
            base, topology=topology, min_size=WRITERS, max_size=WRITERS, timeout=POOL_TIMEOUT
        ) as pool:
            await asyncio.gather(*(write(pool, w) for w in range(WRITERS)))

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    return thread


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.02)
    return found


def _keys(node: PatroniNode, table: str) -> set[str]:
    with node.connect(superuser=False) as conn:
        return {str(k) for (k,) in conn.execute(f"SELECT k FROM {table}")}


def test_frozen_leader_bounded_calls_and_resumed_writes(synchronous: PatroniCluster) -> None:
    """A sync and an async pool with a Patroni topology write through a freeze of the
    leader: no call blocks past the documented bound while the node stays frozen (a call
    that only the thaw would end is caught), both pools write again once Patroni's new
    leader takes writes, and every acknowledged key is on the new leader."""
    cluster = synchronous
    old = cluster.wait_leader()
    table = f"f_{uuid.uuid4().hex[:10]}"
    with old.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {table} (k text PRIMARY KEY)")
    sql = f"INSERT INTO {table} (k) VALUES (%s)"
    base = _app_conninfo(old)
    calls, stop = Calls(), threading.Event()
    topology = pgfailover.PatroniTopology([n.rest_url for n in cluster.nodes])
    threads: list[threading.Thread] = []
    thawed = False
    try:
        with pgfailover.ConnectionPool[Any](
            base, topology=topology, min_size=WRITERS, max_size=WRITERS, timeout=POOL_TIMEOUT
        ) as pool:
            threads = _sync_writers(pool, sql, calls, stop)
            threads.append(_async_writers(cluster, base, sql, calls, stop))
            started = time.monotonic()
            for flavour in ("sync", "async"):
                _wait(f"{flavour} writes", lambda f=flavour: calls.acked_after(f, started), 30)

            frozen_at = time.monotonic()
            cluster.freeze(old)
            new = _wait(
                "Patroni to name another leader",
                lambda: (leader := cluster.leader()) is not old and leader,
                60,
            )
            _wait(f"{new.name} to take writes", lambda: cluster.writable(new), 30)
            writable = time.monotonic()
            for flavour in ("sync", "async"):
                _wait(
                    f"the {flavour} pool to write again",
                    lambda f=flavour: calls.acked_after(f, writable),
                    CALL_BOUND,
                )
            time.sleep(KEEP_FROZEN)  # the freeze must outlast CALL_BOUND: see KEEP_FROZEN
            now = time.monotonic()
            stuck = [c for c in calls.snapshot() if c.end is None and now - c.start > CALL_BOUND]
            stop.set()
            for t in threads:
                t.join(CALL_BOUND + 5)
            assert not [t for t in threads if t.is_alive()], "a writer never returned"
            on_new = _keys(new, table)  # before the thaw: see PatroniCluster.thaw
            assert now - frozen_at > CALL_BOUND  # the check below had time to bite
            cluster.thaw(old)
            thawed = True
    finally:
        stop.set()
        if not thawed and old.frozen:
            with contextlib.suppress(Exception):
                cluster.thaw(old)
    assert not stuck, f"calls still blocked after {CALL_BOUND} s on a frozen leader: {stuck}"
    slow = [c for c in calls.all if c.end is not None and c.end - c.start > CALL_BOUND]
    assert not slow, f"calls that blocked longer than {CALL_BOUND} s: {slow}"
    acked = {c.key for c in calls.all if c.ok}
    assert acked <= on_new, f"acknowledged keys missing on {new.name}: {sorted(acked - on_new)}"
    for flavour in ("sync", "async"):
        assert any(c.ok and c.flavour == flavour and c.start >= writable for c in calls.all)
