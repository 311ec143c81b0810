"""The checker workload: unique keys written through every protected stack, sync and async,
and what each caller was told, checked against the final primary.

Stacks (:data:`STACK_KINDS` x :data:`FLAVOURS`): ``pool`` (a pgfailover pool, one insert
per checkout), ``pool + runner`` (the same under the transaction runner), ``engine`` (an
instrumented SQLAlchemy engine, one insert per ``engine.begin()``), ``engine + runner``;
each in a sync flavour (worker threads) and an async one (tasks on one event loop in its
own thread). Every call inserts one unique key ``"<stack>-<worker>-<i>"`` into a table
without a unique constraint, so that a duplicate can be counted.

What a caller was told is kept per worker in an anonymous ``mmap`` indexed by ``i`` (one
byte per call; pages are touched only as calls are made), so that the checker's own
bookkeeping does not show up as memory growth of the process being measured.
"""

from __future__ import annotations

import asyncio
import inspect
import mmap
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import pgfailover
import pgfailover.sqlalchemy
from pgfailover.drill.stacks import Endpoint, error_code
from pgfailover.pool import ConnectionPool
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster

#: The stack kinds, in report order.
STACK_KINDS: tuple[str, ...] = ("pool", "pool + runner", "engine", "engine + runner")
#: The flavours every kind runs in.
FLAVOURS: tuple[str, ...] = ("sync", "async")

#: What a call's byte in the outcome map means.
NOT_CALLED, IN_FLIGHT, OK, FAILED, UNKNOWN = 0, 1, 2, 3, 4
#: Calls one worker can record (virtual size of its map; only touched pages cost memory).
CAPACITY = 1 << 22


@dataclass(frozen=True)
class Settings:
    """How the stacks are built and paced. Times are in seconds.

    ``workers``: concurrent callers per stack (threads or tasks), also the pool size.
    ``rate``: calls per second per worker (0: back to back). ``runner_timeout``: the
    runner's deadline per call. ``pool_timeout``: how long a bare stack waits for a pooled
    connection (``pool_timeout`` of the engine too). ``connect_timeout``: libpq's, per host.
    ``silence_limit`` / ``probe_timeout``: the watchdog settings of every pgfailover
    connection (None: the watchdog never asks); the stated bound of a statement in flight
    on a silent server is ``silence_limit + 2 * probe_timeout``.
    """

    workers: int = 2
    rate: float = 20.0
    runner_timeout: float = 30.0
    pool_timeout: float = 5.0
    connect_timeout: int = 2
    silence_limit: float | None = 5.0
    probe_timeout: float = 3.0

    @property
    def hang_bound(self) -> float:
        """The stated bound of a statement in flight on a silent server (seconds)."""
        return (self.silence_limit or 0.0) + 2 * self.probe_timeout

    def call_bound(self, kind: str) -> float:
        """Seconds a call of a ``kind`` stack may take before it counts as stuck: the
        runner's deadline plus the statement in flight for runner stacks, the pool wait
        plus the statement in flight for bare ones, one second of grace each."""
        if kind.endswith("runner"):
            return self.runner_timeout + self.hang_bound + 1.0
        return self.pool_timeout + self.hang_bound + 1.0


def stack_names(
    kinds: Sequence[str] = STACK_KINDS, flavours: Sequence[str] = FLAVOURS
) -> list[str]:
    """``"<kind> (<flavour>)"`` for every kind and flavour, in report order."""
    return [f"{kind} ({flavour})" for flavour in flavours for kind in kinds]


def create_table(cluster: LocalCluster, name: str) -> None:
    """Create the checker's table ``name`` on the primary (no unique key on ``k``)."""
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(
            f"CREATE TABLE {name} (id bigserial PRIMARY KEY, k text NOT NULL, stack text NOT NULL)"
        )


def direct_endpoint(cluster: LocalCluster) -> Endpoint:
    """Every node of ``cluster`` as one multi-host endpoint (libpq tries them in order)."""
    return Endpoint(
        hosts=[(n.host, n.port) for n in cluster.nodes],
        dbname=cluster.dbname,
        user=cluster.user,
        password=cluster.password,
    )


#: Whether :func:`pgfailover.sqlalchemy.instrument` watches the engine's connections (it
#: takes ``silence_limit``): then an instrumented engine has the pools' hang bound too.
ENGINE_WATCHDOG = "silence_limit" in inspect.signature(pgfailover.sqlalchemy.instrument).parameters


def _instrument(engine: Any, settings: Settings) -> None:
    """Instrument ``engine`` with the settings' watchdog bounds when it takes them."""
    options: dict[str, Any] = {}
    if ENGINE_WATCHDOG:
        options = {"silence_limit": settings.silence_limit, "probe_timeout": settings.probe_timeout}
    pgfailover.sqlalchemy.instrument(engine, **options)


# ------------------------------------------------------------------ per-worker records


class Record:
    """What one worker's callers were told: a byte per call, counters, the slowest call."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.outcomes = mmap.mmap(-1, CAPACITY)
        self._ends_map = mmap.mmap(-1, CAPACITY * 8)
        #: When each call ended (monotonic seconds), by call number.
        self.ends = memoryview(self._ends_map).cast("d")
        self.calls = 0
        self.errors: Counter[str] = Counter()
        self.stuck = 0
        self.slowest = 0.0
        #: The longest wait of a call during a fault (:meth:`Workload.fault`): from the
        #: fault's start, or the call's if later, to the call's end.
        self.fault_to_end = 0.0
        #: Calls in flight at the instant a fault began.
        self.caught = 0
        self.in_flight_since: float | None = None

    def begin(self) -> tuple[int, float] | None:
        """Start call number ``calls``; None when the map is full."""
        i = self.calls
        if i >= CAPACITY:
            return None
        self.calls += 1
        self.outcomes[i] = IN_FLIGHT
        started = time.monotonic()
        self.in_flight_since = started
        return i, started

    def end(self, i: int, started: float, outcome: int, fault: tuple[float, float] | None) -> None:
        """Record how call ``i`` ended; ``fault``: the window ``(start, end)`` of the last
        fault (monotonic; ``end`` infinite while it lasts), or None."""
        ended = time.monotonic()
        self.in_flight_since = None
        self.outcomes[i] = outcome
        self.ends[i] = ended
        took = ended - started
        self.slowest = max(self.slowest, took)
        if took > self.bound:
            self.stuck += 1
        if fault is not None and started < fault[1] and ended > fault[0]:
            self.fault_to_end = max(self.fault_to_end, ended - max(started, fault[0]))
            self.caught += started <= fault[0]

    def keys(self, prefix: str, outcome: int) -> set[str]:
        """Keys of the calls that ended with ``outcome``."""
        data = self.outcomes[: self.calls]
        return {f"{prefix}-{i}" for i, b in enumerate(data) if b == outcome}

    def close(self) -> None:
        """Release the maps."""
        self.ends.release()
        self._ends_map.close()
        self.outcomes.close()


# ------------------------------------------------------------------ the stacks


def _sql(table: str) -> str:
    return f"INSERT INTO {table} (k, stack) VALUES (%s, %s)"


class SyncStack:
    """One sync stack: :meth:`write` a key or raise what the application sees."""

    def __init__(self, kind: str, endpoint: Endpoint, table: str, settings: Settings) -> None:
        self.kind = kind
        self.name = f"{kind} (sync)"
        size = settings.workers
        sql = _sql(table)
        statement = sa.text(f"INSERT INTO {table} (k, stack) VALUES (:k, :s)")
        self.pool: ConnectionPool[Any] | None = None
        self.engine: sa.Engine | None = None
        silence, probe = settings.silence_limit, settings.probe_timeout

        def configure(conn: pgfailover.Connection[Any]) -> None:
            conn.silence_limit, conn.probe_timeout = silence, probe

        if kind.startswith("pool"):
            self.pool = ConnectionPool[Any](
                endpoint.conninfo(),
                min_size=size,
                max_size=size,
                timeout=settings.pool_timeout,
                configure=configure,
                open=True,
            )
            target: Any = self.pool

            def work(conn: Any, key: str) -> None:
                conn.execute(sql, (key, self.name))
        else:
            self.engine = sa.create_engine(
                endpoint.url(), pool_size=size, max_overflow=0, pool_timeout=settings.pool_timeout
            )
            _instrument(self.engine, settings)
            target = self.engine

            def work(conn: Any, key: str) -> None:
                conn.execute(statement, {"k": key, "s": self.name})

        self._work = work
        self._runner = (
            pgfailover.TransactionRunner(target, timeout=settings.runner_timeout)
            if kind.endswith("runner")
            else None
        )

    def write(self, key: str) -> None:
        """Insert ``key`` in one transaction."""
        if self._runner is not None:
            self._runner(self._work, key)
        elif self.pool is not None:
            with self.pool.connection() as conn:
                self._work(conn, key)
        else:
            assert self.engine is not None
            with self.engine.begin() as conn:
                self._work(conn, key)

    def close(self) -> None:
        """Close the stack's pool (connections to a server that is gone are dropped)."""
        if self.pool is not None:
            self.pool.close(timeout=2.0)
        if self.engine is not None:
            self.engine.dispose()


class AsyncStack:
    """One async stack: the twin of :class:`SyncStack` on an asyncio loop."""

    def __init__(self, kind: str, endpoint: Endpoint, table: str, settings: Settings) -> None:
        self.kind = kind
        self.name = f"{kind} (async)"
        self._endpoint = endpoint
        self._table = table
        self._settings = settings
        self.pool: AsyncConnectionPool[Any] | None = None
        self.engine: Any = None
        self._runner: pgfailover.AsyncTransactionRunner | None = None

    async def open(self) -> None:
        """Open the pool or engine (the pool waits for its connections)."""
        settings, size = self._settings, self._settings.workers
        silence, probe = settings.silence_limit, settings.probe_timeout

        async def configure(conn: pgfailover.AsyncConnection[Any]) -> None:
            conn.silence_limit, conn.probe_timeout = silence, probe

        if self.kind.startswith("pool"):
            self.pool = AsyncConnectionPool[Any](
                self._endpoint.conninfo(),
                min_size=size,
                max_size=size,
                timeout=settings.pool_timeout,
                configure=configure,
                open=False,
            )
            await self.pool.open(wait=True, timeout=30)
            target: Any = self.pool
        else:
            url = self._endpoint.url().set(drivername="postgresql+psycopg_async")
            self.engine = create_async_engine(
                url, pool_size=size, max_overflow=0, pool_timeout=settings.pool_timeout
            )
            _instrument(self.engine, settings)
            target = self.engine
        if self.kind.endswith("runner"):
            self._runner = pgfailover.AsyncTransactionRunner(
                target, timeout=settings.runner_timeout
            )

    async def _work(self, conn: Any, key: str) -> None:
        if self.pool is not None:
            await conn.execute(_sql(self._table), (key, self.name))
        else:
            statement = sa.text(f"INSERT INTO {self._table} (k, stack) VALUES (:k, :s)")
            await conn.execute(statement, {"k": key, "s": self.name})

    async def write(self, key: str) -> None:
        """Insert ``key`` in one transaction."""
        if self._runner is not None:
            await self._runner(self._work, key)
        elif self.pool is not None:
            async with self.pool.connection() as conn:
                await self._work(conn, key)
        else:
            async with self.engine.begin() as conn:
                await self._work(conn, key)

    async def close(self) -> None:
        """Close the stack's pool or dispose of the engine."""
        if self.pool is not None:
            await self.pool.close(timeout=2.0)
        if self.engine is not None:
            await self.engine.dispose()


# ------------------------------------------------------------------ the workload


@dataclass
class StackRun:
    """One stack's workers and their records during a workload."""

    name: str
    kind: str
    flavour: str
    records: list[Record] = field(default_factory=list)

    def acked(self) -> int:
        """Calls that returned success so far (read while the workers run)."""
        return sum(r.outcomes[: r.calls].count(OK) for r in self.records)


class Workload:
    """Every requested stack writing unique keys until the context exits.

    ``endpoint_for(stack_name)`` says where each stack connects (one multi-host endpoint
    for all, or a proxy per stack). On exit the workers stop after their call in
    progress; a call that does not end within its bound (:meth:`Settings.call_bound`) plus
    ``grace`` is left running and counted stuck. A scenario marks each fault with
    :meth:`fault`: each record keeps the longest wait of a call during a fault.
    """

    def __init__(
        self,
        endpoint_for: Callable[[str], Endpoint],
        table: str,
        settings: Settings,
        *,
        kinds: Sequence[str] = STACK_KINDS,
        flavours: Sequence[str] = FLAVOURS,
        grace: float = 5.0,
    ) -> None:
        self.endpoint_for = endpoint_for
        self.table = table
        self.settings = settings
        self.kinds = list(kinds)
        self.flavours = list(flavours)
        self.grace = grace
        #: The last fault's window ``(start, end)``, monotonic; set by :meth:`fault`.
        self.fault_window: tuple[float, float] | None = None
        #: Every fault's window ``(start, end)`` (monotonic), in order.
        self.fault_windows: list[tuple[float, float]] = []
        self.runs: dict[str, StackRun] = {}
        self.left_running = 0
        self.close_errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sync_stacks: list[SyncStack] = []
        self._loop_thread: threading.Thread | None = None
        self._loop_ready = threading.Event()
        self._loop_done = threading.Event()
        self._loop_error: BaseException | None = None

    # -- lifecycle
    def __enter__(self) -> Workload:
        try:
            self._start()
        except BaseException:
            self._finish()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def _start(self) -> None:
        for name in stack_names(self.kinds, self.flavours):
            kind, flavour = name.rsplit(" (", 1)
            self.runs[name] = StackRun(name, kind, flavour.rstrip(")"))
        if "sync" in self.flavours:
            for kind in self.kinds:
                name = f"{kind} (sync)"
                stack = SyncStack(kind, self.endpoint_for(name), self.table, self.settings)
                self._sync_stacks.append(stack)
                for w in range(self.settings.workers):
                    record = Record(self.settings.call_bound(kind))
                    self.runs[name].records.append(record)
                    t = threading.Thread(
                        target=self._sync_worker,
                        args=(stack, record, f"{name}-{w}"),
                        name=f"checker-{name}-{w}",
                        daemon=True,
                    )
                    self._threads.append(t)
        if "async" in self.flavours:
            self._loop_thread = threading.Thread(
                target=self._loop_main, name="checker-async", daemon=True
            )
            self._loop_thread.start()
            if not self._loop_ready.wait(60):
                raise RuntimeError("the async stacks did not open within 60 s")
            if self._loop_error is not None:
                raise RuntimeError("the async stacks failed to open") from self._loop_error
        for t in self._threads:
            t.start()

    def _finish(self) -> None:
        self._stop.set()
        bound = max(self.settings.call_bound(k) for k in self.kinds)
        deadline = time.monotonic() + bound + self.grace
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            self.left_running += t.is_alive()
        if self._loop_thread is not None:
            self._loop_done.wait(max(0.0, deadline - time.monotonic()) + 10.0)
        for stack in self._sync_stacks:
            try:
                stack.close()
            except Exception as ex:
                self.close_errors.append(f"{stack.name}: {type(ex).__name__}: {ex}")

    # -- workers
    def _pause(self, started: float) -> float:
        rate = self.settings.rate
        return max(0.0, 1.0 / rate - (time.monotonic() - started)) if rate > 0 else 0.0

    def _sync_worker(self, stack: SyncStack, record: Record, prefix: str) -> None:
        while not self._stop.is_set():
            begun = record.begin()
            if begun is None:
                return
            i, started = begun
            try:
                stack.write(f"{prefix}-{i}")
            except pgfailover.CommitOutcomeUnknown:
                record.end(i, started, UNKNOWN, self.fault_window)
            except Exception as ex:
                record.end(i, started, FAILED, self.fault_window)
                record.errors[error_code(ex)[0]] += 1
            else:
                record.end(i, started, OK, self.fault_window)
            self._stop.wait(self._pause(started))

    async def _async_worker(self, stack: AsyncStack, record: Record, prefix: str) -> None:
        while not self._stop.is_set():
            begun = record.begin()
            if begun is None:
                return
            i, started = begun
            try:
                await stack.write(f"{prefix}-{i}")
            except pgfailover.CommitOutcomeUnknown:
                record.end(i, started, UNKNOWN, self.fault_window)
            except Exception as ex:
                record.end(i, started, FAILED, self.fault_window)
                record.errors[error_code(ex)[0]] += 1
            else:
                record.end(i, started, OK, self.fault_window)
            await asyncio.sleep(self._pause(started))

    def _loop_main(self) -> None:
        try:
            asyncio.run(self._async_main())
        except BaseException as ex:  # reported by _start or the scenario
            self._loop_error = ex
            self._loop_ready.set()
        finally:
            self._loop_done.set()

    async def _async_main(self) -> None:
        stacks: list[AsyncStack] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            for kind in self.kinds:
                name = f"{kind} (async)"
                stack = AsyncStack(kind, self.endpoint_for(name), self.table, self.settings)
                stacks.append(stack)
                await stack.open()
                for w in range(self.settings.workers):
                    record = Record(self.settings.call_bound(kind))
                    self.runs[name].records.append(record)
                    tasks.append(
                        asyncio.create_task(self._async_worker(stack, record, f"{name}-{w}"))
                    )
            self._loop_ready.set()
            await asyncio.to_thread(self._stop.wait)
            bound = max(self.settings.call_bound(k) for k in self.kinds) + self.grace
            _, pending = await asyncio.wait(tasks, timeout=bound) if tasks else (set(), set())
            self.left_running += len(pending)
            for task in pending:
                task.cancel()
        finally:
            for stack in stacks:
                try:
                    await stack.close()
                except Exception as ex:
                    self.close_errors.append(f"{stack.name}: {type(ex).__name__}: {ex}")

    # -- faults and progress
    def fault(self, start: float, end: float = float("inf")) -> None:
        """Mark a fault from ``start`` to ``end`` (monotonic; call again with the end when it
        is over): each record keeps the longest wait of a call during a fault."""
        if self.fault_windows and self.fault_windows[-1][0] == start:
            self.fault_windows[-1] = (start, end)
        else:
            self.fault_windows.append((start, end))
        self.fault_window = (start, end)

    def acked(self) -> dict[str, int]:
        """Acknowledged calls so far, per stack."""
        return {name: run.acked() for name, run in self.runs.items()}

    def wait_progress(self, more: int, timeout: float) -> list[str]:
        """Wait until every stack has ``more`` acknowledged calls than now, at most
        ``timeout`` seconds; returns the stacks that did not get there (empty: all did)."""
        if self._loop_error is not None:
            raise RuntimeError("the async stacks failed") from self._loop_error
        target = {name: n + more for name, n in self.acked().items()}
        deadline = time.monotonic() + timeout
        while True:
            now = self.acked()
            behind = [name for name, n in now.items() if n < target[name]]
            if not behind or time.monotonic() >= deadline:
                return behind
            time.sleep(0.02)


# ------------------------------------------------------------------ verification


@dataclass
class StackResult:
    """What one stack's callers were told, checked against the final primary.

    ``lost``: acknowledged keys missing on the final primary. ``duplicated``: keys present
    more than once. ``phantom_failed`` / ``phantom_unknown``: keys present although the call
    failed / raised CommitOutcomeUnknown (allowed: the outcome was not a success).
    ``phantom_unexplained``: present but never the subject of a call that ended (a call
    still in flight at the end). ``caught``: calls in flight at the instant a fault began
    (how many the faults really hit). ``stuck``: calls that took longer than their bound, or never
    ended. ``slowest_s``: the longest call. ``fault_to_end_s``: the longest time from a
    fault's start to the end of a call in flight then (0 when no fault was marked).
    """

    stack: str
    calls: int = 0
    acked: int = 0
    failed: int = 0
    unknown: int = 0
    lost: int = 0
    duplicated: int = 0
    phantom_failed: int = 0
    phantom_unknown: int = 0
    phantom_unexplained: int = 0
    caught: int = 0
    stuck: int = 0
    slowest_s: float = 0.0
    fault_to_end_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    lost_keys: list[str] = field(default_factory=list)
    #: For the lost keys: the longest time from a lost call's acknowledgement to the start
    #: of the fault that lost it (the first fault not over when the call ended; 0 when the
    #: call ended during it). None: nothing lost; -1.0: a lost call ended after every
    #: fault was over. The replication window of an asynchronous standby shows as a short
    #: time.
    lost_before_fault_s: float | None = None


def final_counts(cluster: LocalCluster, table: str) -> dict[str, int]:
    """``{key: rows}`` of ``table`` on the current primary."""
    with cluster.primary.connect(superuser=False) as conn:
        rows = conn.execute(f"SELECT k, count(*) FROM {table} GROUP BY k").fetchall()
    return {str(k): int(n) for k, n in rows}


def verify(workload: Workload, counts: dict[str, int]) -> list[StackResult]:
    """Each stack's tally against ``counts`` (from :func:`final_counts`)."""
    results = []
    by_stack: dict[str, set[str]] = {}
    for key in counts:
        by_stack.setdefault(key.rsplit("-", 2)[0], set()).add(key)
    for name, run in workload.runs.items():
        res = StackResult(name)
        acked: set[str] = set()
        failed: set[str] = set()
        unknown: set[str] = set()
        errors: Counter[str] = Counter()
        for w, record in enumerate(run.records):
            prefix = f"{name}-{w}"
            acked |= record.keys(prefix, OK)
            failed |= record.keys(prefix, FAILED)
            unknown |= record.keys(prefix, UNKNOWN)
            res.calls += record.calls
            res.caught += record.caught
            res.stuck += record.stuck + (record.in_flight_since is not None)
            res.slowest_s = max(res.slowest_s, record.slowest)
            res.fault_to_end_s = max(res.fault_to_end_s, record.fault_to_end)
            errors.update(record.errors)
        present = by_stack.get(name, set())
        res.acked, res.failed, res.unknown = len(acked), len(failed), len(unknown)
        lost = acked - present
        res.lost, res.lost_keys = len(lost), sorted(lost)[:20]
        if lost:
            res.lost_before_fault_s = _before_fault(run, lost, workload.fault_windows)
        res.duplicated = sum(1 for k in present if counts[k] > 1)
        res.phantom_failed = len(present & failed)
        res.phantom_unknown = len(present & unknown)
        res.phantom_unexplained = len(present - acked - failed - unknown)
        res.errors = dict(errors.most_common())
        results.append(res)
    return results


def _before_fault(run: StackRun, lost: set[str], windows: Sequence[tuple[float, float]]) -> float:
    """See :attr:`StackResult.lost_before_fault_s`."""
    longest = 0.0
    for key in lost:
        _, w, i = key.rsplit("-", 2)
        ended = run.records[int(w)].ends[int(i)]
        start = next((a for a, b in windows if b >= ended), None)
        if start is None:
            return -1.0
        longest = max(longest, start - ended)
    return longest


# ------------------------------------------------------------------ the process and the servers


_SESSIONS = (
    "SELECT pid, application_name, client_port, state,"
    " coalesce(wait_event_type || ':' || wait_event, ''), left(query, 60),"
    " round(extract(epoch FROM now() - backend_start)::numeric, 1)"
    " FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'"
    " AND application_name <> 'pgfailover-watchdog'"
)


def app_sessions(cluster: LocalCluster) -> list[str]:
    """The application user's client sessions on every running node, one line each
    (node, pid, application name, client port, state, wait event, query, age in seconds);
    the watchdog's short-lived side
    probes excluded."""
    out = []
    for node in cluster.nodes:
        if not node.running or cluster.frozen(node):
            continue
        try:
            with node.connect() as conn:
                rows = conn.execute(_SESSIONS, [cluster.user]).fetchall()
        except psycopg.OperationalError:
            continue  # starting up or shutting down: it holds no session of ours
        out += [f"{node.name} " + " | ".join(str(c) for c in row) for row in rows]
    return out


def app_backends(cluster: LocalCluster) -> int:
    """How many sessions :func:`app_sessions` lists."""
    return len(app_sessions(cluster))


def leaked_backends(cluster: LocalCluster, baseline: int, timeout: float = 15.0) -> list[str]:
    """The application sessions (:func:`app_sessions`) left once they had ``timeout``
    seconds to go, when there are more than ``baseline``; empty as soon as the count is
    back to the baseline (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        sessions = app_sessions(cluster)
        if len(sessions) <= baseline:
            return []
        if time.monotonic() >= deadline:
            return sessions
        time.sleep(0.1)


#: Threads not counted: the process's one watchdog thread (started with the first
#: pgfailover connection, kept for the life of the process, so not a leak of any stack)
#: and its short-lived side probes.
WATCHDOG_THREADS = ("pgfailover-watchdog", "pgfailover-watchdog-probe")


def threads() -> int:
    """Live threads of this process, :data:`WATCHDOG_THREADS` excluded."""
    return sum(1 for t in threading.enumerate() if t.name not in WATCHDOG_THREADS)


def settled_threads(expected: int, timeout: float = 10.0) -> int:
    """:func:`threads`, polled until it is at most ``expected`` or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        n = threads()
        if n <= expected or time.monotonic() >= deadline:
            return n
        time.sleep(0.05)


def rss_kib() -> int:
    """Resident set size of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")
