"""The monitor's I/O: one daemon thread running an asyncio loop, one watch per endpoint.

Why one thread with its own loop, for sync and async pools alike: a process gets one prober
per endpoint whatever mix of sync and async pools it has, the monitor outlives short-lived
event loops (``asyncio.run`` per test, Django's ``async_to_sync``), and a sync application
gets exactly one extra thread. Decisions live in :mod:`pgfailover.monitor.model`; this
module only looks (connect, one query, wait on the socket) and tells the members.

A member (a pgfailover pool) talks to the monitor through :class:`Member`: the monitor calls
its ``_pgf_endpoint_lost`` and ``_pgf_endpoint_back`` from the monitor's thread (the pool
hands the work to its own workers), and the pool's :class:`~pgfailover._state.FailoverState`
calls :meth:`Monitor.suspect` when its requests meet a failure the watch has not seen yet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import waiting
from psycopg.abc import PQGen
from psycopg.generators import notifies

from .._secrets import scrub, secret_candidates
from .._state import FailoverState, finding
from ..classify import Kind, Phase, classify, read_only_hosts
from ..probe import _probe_gen
from .model import (
    INTERVAL,
    OUTAGE_INTERVAL,
    Change,
    Endpoint,
    EndpointWatch,
    Health,
    Status,
    spread,
    standbys_finding,
)

logger = logging.getLogger("pgfailover.monitor")

#: Seconds the watch waits for its role query (through a pooler the query waits for a
#: server: the look ends, the connection is closed and the next look reconnects).
PROBE_TIMEOUT = 1.0
#: Seconds a watch connection attempt may take (libpq's ``connect_timeout``, at least 2).
CONNECT_TIMEOUT = 2.0
#: Seconds between two wake-ups of a wait on the watch connection's socket with no event.
WAKE_INTERVAL = 1.0

T = TypeVar("T")

#: Connection keyword arguments of a pool that the watch connection does not take.
_NOT_FOR_THE_WATCH = frozenset({"row_factory", "cursor_factory", "context"})

#: Every Monitor made and not yet collected (read by :func:`monitors`, e.g. for metrics).
_monitors: weakref.WeakSet[Monitor] = weakref.WeakSet()
_monitors_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """How the watch connects to an endpoint: the member's own conninfo and keyword
    arguments (``autocommit`` is forced on; ``connect_timeout`` is added when absent).
    The repr shows the endpoint only: the conninfo may hold a password."""

    endpoint: Endpoint
    conninfo: str = field(repr=False)
    kwargs: dict[str, Any] = field(repr=False, default_factory=dict)

    def _new_watch(self, monitor: Monitor) -> _Watch:
        """The watch that looks at this target (a topology's target follows its leader)."""
        return _Watch(monitor, self)


class Member(Protocol):
    """What registers with the monitor (a pgfailover pool)."""

    @property
    def failover_state(self) -> FailoverState: ...

    def _pgf_watch_target(self) -> WatchTarget | None:
        """Where the pool connects (a ``TopologyTarget`` when it follows a topology's
        leader), or None when the monitor cannot watch it (a callable conninfo: the pool
        then keeps probing by itself)."""

    def _pgf_endpoint_lost(self, endpoint: str, finding: str) -> None:
        """No writable primary there any more (called from the monitor's thread)."""

    def _pgf_endpoint_back(self) -> None:
        """A writable primary is there again (called from the monitor's thread)."""


class Monitor:
    """One process monitor: watches each endpoint its members use with one connection.

    ``interval``: seconds between two role checks of a healthy endpoint (with +/-20 %
    jitter); ``outage_interval``: seconds between two looks while no writable primary is
    found (one query, or one connection attempt when the watch connection is lost);
    ``probe_timeout``: seconds a role query may take; ``connect_timeout``: seconds a watch
    connection attempt may take (libpq's minimum, 2, applies). The thread starts with the
    first member and runs until :meth:`close` (a daemon: it never holds the process).

    Use :func:`process_monitor` for the shared one; make your own only to change the timings
    (or in tests).
    """

    def __init__(
        self,
        *,
        interval: float = INTERVAL,
        outage_interval: float = OUTAGE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        for name, value in (
            ("interval", interval),
            ("outage_interval", outage_interval),
            ("probe_timeout", probe_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        self.interval = float(interval)
        self.outage_interval = float(outage_interval)
        self.probe_timeout = float(probe_timeout)
        self.connect_timeout = max(float(connect_timeout), 2.0)
        self._lock = threading.Lock()
        self._members: dict[Endpoint, weakref.WeakSet[Any]] = {}
        self._unwatched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._watches: dict[Endpoint, _Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._rng = random.Random()  # noqa: S311 - jitter, not security
        with _monitors_lock:
            _monitors.add(self)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} endpoints={[str(e) for e in self.endpoints()]} "
            f"interval={self.interval} outage_interval={self.outage_interval}>"
        )

    # -- members
    def register(self, member: Member) -> bool:
        """Watch ``member``'s endpoint (once per endpoint). True if watched; False when the
        member cannot be watched (see :meth:`Member._pgf_watch_target`); it is still known
        to :meth:`health`. Raises ``RuntimeError`` after :meth:`close`."""
        target = member._pgf_watch_target()
        state = member.failover_state
        with self._lock:
            if self._closed:
                raise RuntimeError("this monitor is closed")
            if target is None:
                self._unwatched.add(member)
                return False
            members = self._members.setdefault(target.endpoint, weakref.WeakSet())
            members.add(member)
            start = target.endpoint not in self._watches
            if start:
                self._watches[target.endpoint] = target._new_watch(self)
        endpoint = target.endpoint
        state.on_suspect = lambda: self.suspect(endpoint)
        state.monitored = True
        watch = self._watches[endpoint]
        if start:
            self._submit(watch.run())
        elif watch.state.status in (Status.DOWN, Status.READ_ONLY):
            # joining during an outage: hold too. Not when the watch's own login was
            # refused (its credentials are the first member's): that is no outage, and
            # nothing would release a pool held for it
            _call(member._pgf_endpoint_lost, endpoint.address, watch.state.finding)
        return True

    def unregister(self, member: Member, timeout: float = 2.0) -> None:
        """Forget ``member``; the last member of an endpoint ends its watch (its connection
        is closed within ``timeout`` seconds: this call waits for it, so that a database can
        be dropped right after its last pool closed). Unknown members are ignored."""
        state = member.failover_state
        state.monitored = False
        state.on_suspect = None
        ending: _Watch | None = None
        with self._lock:
            self._unwatched.discard(member)
            for endpoint, members in list(self._members.items()):
                if member in members:
                    members.discard(member)
                    if not members:
                        del self._members[endpoint]
                        ending = self._watches.pop(endpoint, None)
        if ending is not None:
            self._stop_watch(ending, timeout)

    def members(self, endpoint: Endpoint) -> list[Member]:
        """The live members of ``endpoint``."""
        with self._lock:
            return list(self._members.get(endpoint, ()))

    def endpoints(self) -> list[Endpoint]:
        """The endpoints watched now."""
        with self._lock:
            return list(self._watches)

    # -- what the monitor knows
    def health(self, member: Member) -> Health | None:
        """The readiness of ``member``'s endpoint as last seen, None when the monitor does
        not watch it. No I/O."""
        with self._lock:
            for endpoint, members in self._members.items():
                if member in members:
                    return self._watches[endpoint].state.health()
        return None

    def watch_of(self, endpoint: Endpoint) -> EndpointWatch | None:
        """The watch state of ``endpoint`` (read-only use), None if not watched."""
        with self._lock:
            watch = self._watches.get(endpoint)
        return None if watch is None else watch.state

    def stats(self) -> dict[str, int]:
        """Counters summed over the endpoints: ``checks`` (looks), ``connects`` (watch
        connection attempts), ``endpoints`` (watched now)."""
        with self._lock:
            watches = list(self._watches.values())
        return {
            "endpoints": len(watches),
            "checks": sum(w.state.checks for w in watches),
            "connects": sum(w.state.connects for w in watches),
        }

    def suspect(self, endpoint: Endpoint) -> None:
        """A member met a failure at ``endpoint``: look now. Thread-safe; no I/O here."""
        with self._lock:
            watch = self._watches.get(endpoint)
            loop = self._loop
        if watch is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to wake
                loop.call_soon_threadsafe(watch.poke)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every watch, close their connections and end the thread (waiting up to
        ``timeout`` seconds). Members keep working on their own. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches.values())
            self._watches.clear()
            members = [m for ms in self._members.values() for m in ms]
            self._members.clear()
            loop, thread = self._loop, self._thread
        for member in members:
            member.failover_state.monitored = False
            member.failover_state.on_suspect = None
        for watch in watches:
            self._stop_watch(watch, timeout)
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def _forget_if_unused(self, watch: _Watch) -> bool:
        """End ``watch`` if its endpoint has no member left (all collected without
        unregistering). True if it must stop."""
        with self._lock:
            if self._members.get(watch.endpoint):
                return False
            if self._watches.get(watch.endpoint) is watch:
                del self._watches[watch.endpoint]
                self._members.pop(watch.endpoint, None)
            return True

    # -- the thread
    def _submit(self, coro: Coroutine[Any, Any, None]) -> concurrent.futures.Future[None]:
        loop = self._ensure_thread()
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def _stop_watch(self, watch: _Watch, timeout: float) -> None:
        loop = self._loop
        if loop is None or not self._thread or not self._thread.is_alive():
            return
        if threading.current_thread() is self._thread:
            loop.create_task(watch.stop())
            return
        future = asyncio.run_coroutine_threadsafe(watch.stop(), loop)
        try:
            future.result(timeout)
        except (concurrent.futures.TimeoutError, TimeoutError):
            logger.warning("the watch of %s did not end within %.3g s", watch.endpoint, timeout)

    def _ensure_thread(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:  # end what is left (a watch stopped past close()'s timeout)
                    left = asyncio.all_tasks(loop)
                    for task in left:
                        task.cancel()
                    loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                    loop.close()

            thread = threading.Thread(target=run, name="pgfailover-monitor", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        ready.wait(5.0)
        return loop

    def _act(self, endpoint: Endpoint, change: Change | None, watch: EndpointWatch) -> None:
        """Tell the members what changed (in the monitor's thread)."""
        members = self.members(endpoint)
        if watch.status is Status.MISCONFIGURED:
            return  # the pools' own attempts give their callers the driver's error at once
        if watch.status is not Status.WRITABLE:
            if change is Change.LOST or watch.news:  # purge once; keep the finding current
                for member in members:
                    _call(member._pgf_endpoint_lost, endpoint.address, watch.finding)
            return
        # back, or still writable after a member's suspicion: release held pools (a pool
        # that knows of no outage ignores it), spread so that they do not stampede
        waiting = [m for m in members if m.failover_state.outage_since is not None]
        if change is not Change.BACK and not waiting:
            return
        loop = self._loop
        assert loop is not None
        targets = members if change is Change.BACK else waiting
        for member, offset in zip(targets, spread(len(targets), self._rng), strict=True):
            if offset == 0.0:
                _call(member._pgf_endpoint_back)
            else:
                loop.call_later(offset, _call, member._pgf_endpoint_back)


def _call(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a member's failure must not end the watch
        logger.exception("pgfailover monitor: %r failed", fn)


class _Watch:
    """The loop that looks at one endpoint (runs in the monitor's thread)."""

    def __init__(self, monitor: Monitor, target: WatchTarget) -> None:
        self.monitor = monitor
        self.target = target
        self.endpoint = target.endpoint
        self.state = EndpointWatch(
            target.endpoint,
            interval=monitor.interval,
            outage_interval=monitor.outage_interval,
        )
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._secrets = secret_candidates(target.conninfo) + [
            str(target.kwargs[key]) for key in ("password", "sslpassword") if target.kwargs.get(key)
        ]

    def poke(self) -> None:
        """Look now (a member suspects a failure)."""
        self.state.suspect()
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        # the flag as well as the cancel: asyncio.wait_for may swallow a cancel that comes
        # just as the connection attempt it waits for fails (Python 3.11)
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:  # ended as asked
                pass
            except Exception:  # run() logs its own failures: this is one it could not
                logger.exception("pgfailover monitor: the watch of %s ended badly", self.endpoint)
        await self._close()

    async def run(self) -> None:
        self._task = asyncio.current_task()
        self._wake = asyncio.Event()
        rng = random.Random()  # noqa: S311 - jitter, not security
        try:
            while not self._stopping:
                try:
                    await self._look()
                    if self._stopping or self.monitor._forget_if_unused(self):
                        break
                    await self._pause(self.state.next_delay(rng))
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let the watch die: log, wait, go on
                    logger.exception("pgfailover monitor: watch of %s failed", self.endpoint)
                    await self._close()
                    await asyncio.sleep(self.monitor.interval)
        finally:
            await self._close()

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds, less when poked or when the watch connection hears
        something (a lost connection, a ParameterStatus change, a notice)."""
        assert self._wake is not None
        if delay <= 0:
            self._wake.clear()
            return
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        conn = self.conn
        if conn is not None and not conn.closed:
            waits.append(asyncio.ensure_future(_waited(notifies(conn.pgconn), conn.pgconn.socket)))
        try:
            done, _ = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waited in waits:
                waited.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        self._wake.clear()
        if len(waits) > 1 and waits[1] in done and waits[1].exception() is not None:
            # the session died (a direct server went away; through a pooler in session
            # mode, its server did): so did the pools' sessions there, whatever the look
            # that follows (it reconnects) finds
            await self._close()
            self._record(Status.DOWN, "down: the watch's session was lost")

    async def _look(self) -> None:
        self._record(*await self._check())

    def _record(self, status: Status, found: str) -> None:
        change = self.state.observe(status, found, time.monotonic(), time.time())
        if change is Change.LOST:
            logger.warning("pgfailover monitor: %s: %s", self.endpoint, found)
        elif change is Change.BACK:
            logger.warning("pgfailover monitor: %s: writable primary again", self.endpoint)
        self.monitor._act(self.endpoint, change, self.state)

    async def _check(self) -> tuple[Status, str]:
        phase = Phase.CONNECT
        try:
            if self.conn is None or self.conn.closed:
                self.state.connects += 1
                self.conn = await asyncio.wait_for(
                    self._connect(), self.monitor.connect_timeout + 1.0
                )
            phase = Phase.AUTOCOMMIT
            conn = self.conn
            report = await asyncio.wait_for(
                _waited(_probe_gen(conn), conn.pgconn.socket),
                self.monitor.probe_timeout,
            )
        except (asyncio.TimeoutError, TimeoutError):
            await self._close()
            what = "connection" if phase is Phase.CONNECT else "role query"
            limit = (
                self.monitor.connect_timeout
                if phase is Phase.CONNECT
                else self.monitor.probe_timeout
            )
            return Status.DOWN, f"down: no answer to the {what} within {limit:.3g} s"
        except psycopg.Error as ex:
            await self._close()
            verdict = classify(ex, phase=phase)
            message = scrub(verdict.message, self._secrets)
            if verdict.kind is Kind.CONFIGURATION:
                return Status.MISCONFIGURED, f"auth or configuration failure: {message}"
            if (standbys := read_only_hosts(str(ex))) is not None:
                return Status.READ_ONLY, standbys_finding(standbys)
            return Status.DOWN, f"down: {message}"
        if report.writable:
            return Status.WRITABLE, "primary"
        # the next look comes as a new client: a pooler in session mode, or a TCP forwarder
        # (HAProxy, a virtual IP, a Kubernetes Service), keeps this session on the same
        # server even once it leads elsewhere
        await self._close()
        return Status.READ_ONLY, finding(report)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        # the pool's connection options, less what shapes cursors and adaptation (a sync
        # pool's cursor_factory would not suit this async connection; the probe needs none)
        kwargs = {k: v for k, v in self.target.kwargs.items() if k not in _NOT_FOR_THE_WATCH}
        kwargs["autocommit"] = True
        if "connect_timeout" not in kwargs and "connect_timeout" not in self.target.conninfo:
            kwargs["connect_timeout"] = int(self.monitor.connect_timeout)
        return await psycopg.AsyncConnection.connect(self.target.conninfo, **kwargs)

    async def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            try:
                await conn.close()
            except Exception:  # already broken: nothing to release
                logger.debug("closing the watch connection failed", exc_info=True)


def _waited(gen: PQGen[T], fileno: int) -> Coroutine[Any, Any, T]:
    """Drive ``gen`` on the socket; bounded by the caller (``asyncio.wait_for``). The wake-up
    interval is given: psycopg's default (0 in recent versions) would make every wait a
    busy loop."""
    return waiting.wait_async(gen, fileno, interval=WAKE_INTERVAL)


_process_monitor: Monitor | None = None
_process_lock = threading.Lock()


def process_monitor() -> Monitor:
    """The process's shared monitor (made on first use, with the default timings).

    Pools and engines made with ``monitor=True`` register with it."""
    global _process_monitor  # noqa: PLW0603 - one per process, made lazily
    with _process_lock:
        if _process_monitor is None or _process_monitor._closed:
            _process_monitor = Monitor()
        return _process_monitor


def monitors() -> list[Monitor]:
    """The live monitors of the process: made, not collected, not closed (no order)."""
    with _monitors_lock:
        found = list(_monitors)
    return [monitor for monitor in found if not monitor._closed]
