# pgfailover: generate-sync
"""What every topology source does: cache, single-flight refresh, the leader's conninfo,
in-band checks and fencing.

:class:`AsyncTopologySource` is the base of
:class:`~pgfailover.topology.patroni_async.AsyncPatroniTopology` and
:class:`~pgfailover.topology.hosts_async.AsyncHostListTopology`; a subclass only says how to
discover the cluster (``_discover``). ``source_async.py`` is the source;
``tools/async_to_sync.py`` generates ``source.py`` (``TopologySource``, the same with
threads and a ``threading.Lock``).

The contract a pool (or an engine) relies on:

- :meth:`~AsyncTopologySource.current` returns the cached :class:`~.model.Topology` without
  I/O (None before the first refresh);
- :meth:`~AsyncTopologySource.refresh` discovers the cluster again. Concurrent callers share
  one refresh (per source object): a caller that arrives while one is under way waits for it
  and gets its result instead of starting another. ``newer_than`` skips the I/O when the
  cached topology was observed at or after that ``time.monotonic()`` instant;
- :meth:`~AsyncTopologySource.invalidate` marks the cache out of date without I/O: the next
  :meth:`~AsyncTopologySource.conninfo_for_leader` refreshes it (once, shared);
  :meth:`~AsyncTopologySource.stale` says whether it would;
- :meth:`~AsyncTopologySource.conninfo_for_leader` returns the caller's conninfo with the
  leader's host and port, refreshing first when the cache is missing, invalidated, older than
  ``max_age``, or has no leader (then at most every :data:`NO_LEADER_RETRY` seconds); raises
  :class:`~.model.NoLeader` when there is none;
- :meth:`~AsyncTopologySource.validate` checks a new connection in-band (one query: role,
  timeline) and returns the :func:`~.model.fence` verdict; a writable primary that is refused
  is reported once as a :class:`~pgfailover.events.TopologyEvent` (``fenced``);
- :meth:`~AsyncTopologySource.follow` runs a connection attempt and follows the leader while
  it is pending: every ``follow_interval`` seconds (0.1 for Patroni's REST API, 1 for a host
  list, whose refresh connects to every host) it refreshes the topology (shared, single
  flight) and, when a refresh names another leader than the one the attempt was
  given, abandons the attempt and starts one to the new leader. Pools use it during an
  outage: an attempt to a frozen leader (the kernel accepts the connection, nothing
  answers) would otherwise hold the pool until its ``connect_timeout`` after Patroni has
  named another leader.

Every refresh is bounded: in-band checks connect with ``connect_timeout`` =
max(2, ceil(``timeout``)) (libpq's minimum is 2 s) and wait at most ``timeout`` for the
query; the checks of several members run concurrently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg

from .._secrets import secret_candidates
from ..events import TopologyEvent, _emit
from ..survey import error_info
from . import _io
from .model import (
    Fence,
    LeaderMoved,
    Member,
    NoLeader,
    Observation,
    Topology,
    TopologyError,
    TopologyUnavailable,
    attempt_outdated,
    check_timeout,
    conninfo_for,
    fence,
)

T = TypeVar("T")

logger = logging.getLogger("pgfailover.topology")

#: Seconds between two refreshes asked by :meth:`AsyncTopologySource.conninfo_for_leader`
#: while the cached topology names no leader.
NO_LEADER_RETRY = 0.25
#: Seconds a sync in-band check may run past its own bounds before it is given up.
GRACE = 0.5
#: Seconds between two refreshes while :meth:`AsyncTopologySource.follow` waits for a
#: connection attempt (none while the attempt takes less: a healthy one takes milliseconds).
FOLLOW_INTERVAL = 0.1
#: Attempts :meth:`AsyncTopologySource.follow` abandons for a new leader before it gives up.
FOLLOW_RESTARTS = 3


@dataclass
class _Attempt:
    """What :meth:`AsyncTopologySource.conninfo_for_leader` gave the attempt under way in
    this context (see :meth:`AsyncTopologySource.follow`)."""

    target: Member | None = None


#: The attempt :meth:`AsyncTopologySource.follow` runs in this context (task or thread).
_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "pgfailover_topology_attempt", default=None
)


class AsyncTopologySource:
    """The shared machinery of a topology source (see the module docstring).

    ``conninfo`` is used to check members in-band (its host and port are replaced by each
    member's): a libpq conninfo string with the user, database and password, or "" (then
    the base conninfo last given to :meth:`conninfo_for_leader` or :meth:`refresh` is
    used). ``timeout`` (seconds, > 0) bounds each phase of a refresh (see the module
    docstring). ``max_age`` (seconds, > 0, or None) is how old the cached topology may get
    before :meth:`conninfo_for_leader` refreshes it; None: only when invalidated or
    leaderless.
    """

    #: Seconds between two refreshes while :meth:`follow` waits for an attempt (a
    #: subclass whose refresh costs more than a REST call asks less often).
    follow_interval: float = FOLLOW_INTERVAL

    def __init__(self, *, conninfo: str = "", timeout: float = 2.0, max_age: float | None) -> None:
        if not isinstance(conninfo, str):
            raise TypeError(f"conninfo must be a string, got {type(conninfo).__name__}")
        self.timeout = check_timeout("timeout", timeout)
        self.max_age = None if max_age is None else check_timeout("max_age", max_age)
        self._conninfo = conninfo
        self._topology: Topology | None = None
        self._lock = asyncio.Lock()
        self._refreshes = 0
        self._last_error: TopologyUnavailable | None = None
        self._invalid_after = -math.inf
        self._reported: set[str] = set()
        self._report_lock = threading.Lock()

    # -- what a subclass provides
    @property
    def description(self) -> str:
        """What the source is, for events and errors (no password)."""
        return type(self).__name__

    async def _discover(self, previous: Topology | None) -> Topology:
        """Discover the cluster (bounded in time); ``TopologyUnavailable`` when impossible."""
        raise NotImplementedError

    # -- the cache
    def current(self) -> Topology | None:
        """The last topology seen, without I/O; None before the first refresh."""
        return self._topology

    def invalidate(self) -> None:
        """Mark the cached topology out of date (no I/O): the next
        :meth:`conninfo_for_leader` refreshes it, once for all its concurrent callers."""
        self._invalid_after = time.monotonic()

    def stale(self, now: float | None = None) -> bool:
        """Whether :meth:`conninfo_for_leader` would refresh before answering: no topology
        yet, invalidated since it was observed, older than ``max_age``, or naming no leader
        for :data:`NO_LEADER_RETRY` seconds. No I/O. ``now``: a ``time.monotonic()``
        instant (None: now)."""
        return not self._fresh(self._topology, time.monotonic() if now is None else now)

    def _fresh(self, topology: Topology | None, now: float) -> bool:
        if topology is None or topology.observed_at < self._invalid_after:
            return False
        if topology.write_target is None:
            return topology.age(now) < NO_LEADER_RETRY
        return self.max_age is None or topology.age(now) < self.max_age

    # -- refreshing
    async def refresh(
        self, *, newer_than: float | None = None, conninfo: str | None = None
    ) -> Topology:
        """Discover the cluster again and return what was seen (see the module docstring).

        ``newer_than`` (a ``time.monotonic()`` instant): return the cached topology without
        I/O when it was observed at or after it. ``conninfo``: the base conninfo for in-band
        checks from now on (None keeps the current one). Raises
        :class:`~.model.TopologyUnavailable` when nothing could be learnt.
        """
        if conninfo is not None:
            self._conninfo = conninfo
        seen = self._refreshes
        async with self._lock:
            current = self._topology
            if self._refreshes != seen:  # another caller refreshed while this one waited
                if self._last_error is not None:
                    raise TopologyUnavailable(self._last_error.reason, self._last_error.errors)
                if current is not None:
                    return current
            if newer_than is not None and current is not None and current.observed_at >= newer_than:
                return current
            try:
                topology = await self._discover(current)
            except TopologyUnavailable as ex:
                self._last_error = ex
                raise
            finally:
                self._refreshes += 1
            self._last_error = None
            self._topology = topology
        self._report(topology)
        return topology

    async def conninfo_for_leader(self, base_conninfo: str) -> str:
        """``base_conninfo`` with host and port set to the current leader's, every other
        parameter untouched (``hostaddr``, ``target_session_attrs`` and
        ``load_balance_hosts`` are dropped).

        Uses the cache, refreshing it first when it is missing, invalidated, older than
        ``max_age`` or leaderless. ``base_conninfo`` is remembered for in-band checks when
        the source was given no ``conninfo``. Raises :class:`~.model.NoLeader` when the
        cluster has no leader right now, :class:`~.model.TopologyUnavailable` when nothing
        could be learnt, :class:`~pgfailover.errors.InvalidConninfo` for a string libpq
        cannot parse.
        """
        if not self._conninfo:
            self._conninfo = base_conninfo
        topology = self._topology
        if not self._fresh(topology, time.monotonic()):
            topology = await self.refresh()
        assert topology is not None
        target = topology.write_target
        if target is None:
            raise NoLeader(topology)
        if (attempt := _ATTEMPT.get()) is not None:
            attempt.target = target  # what follow() compares later refreshes with
        return conninfo_for(base_conninfo, target)

    async def follow(
        self, connect: Callable[[], Awaitable[T]], *, interval: float | None = None
    ) -> T:
        """Run ``connect`` (a connection attempt that gets its conninfo from
        :meth:`conninfo_for_leader`) and return what it returns, following the leader
        while it is pending.

        Every ``interval`` seconds (> 0; None: :attr:`follow_interval`, 0.1 s for
        Patroni's REST API, 1 s for a host list) the attempt is still pending, the topology is
        refreshed (shared with every caller: skipped when someone refreshed within the last
        ``interval``; a refresh that fails is ignored). When it names another leader than
        the one the attempt was given (:func:`~.model.attempt_outdated`; a topology without
        a leader keeps the attempt), the attempt is abandoned and a new one started, which
        goes to the new leader. An abandoned attempt is cancelled (async: its task) or
        left to end within its own bound in its thread (sync), a connection it makes after
        all being closed. The attempt's own errors propagate; after :data:`FOLLOW_RESTARTS`
        abandoned attempts :class:`LeaderMoved` is raised. The sync flavour runs each
        attempt in a daemon thread of its own so that the caller can watch it.
        """
        interval = check_timeout("interval", self.follow_interval if interval is None else interval)
        for _ in range(FOLLOW_RESTARTS + 1):
            attempt = _Attempt()
            pending = _Pending(connect, attempt)
            try:
                while not await pending.wait(interval):
                    try:
                        current = await self.refresh(newer_than=time.monotonic() - interval)
                    except TopologyError:
                        continue  # the attempt goes on; the next look asks again
                    if not pending.done() and attempt_outdated(attempt.target, current):
                        logger.debug(
                            "abandoning a connection attempt to %s: %s names %s leader",
                            attempt.target.address if attempt.target else None,
                            self.description,
                            current.write_target.address if current.write_target else None,
                        )
                        pending.abandon()
                        break
                else:
                    return pending.result()
            except BaseException:  # cancelled or interrupted while waiting: drop the attempt
                pending.abandon()
                raise
        raise LeaderMoved(
            f"the leader changed {FOLLOW_RESTARTS + 1} times during one connection attempt"
            f" ({self.description})"
        )

    # -- in-band
    async def validate(self, conn: psycopg.AsyncConnection[Any]) -> Fence:
        """Check ``conn`` in-band (one query; at most ``timeout`` seconds) and return the
        :func:`~.model.fence` verdict against the cached topology.

        A refused writable primary is reported once per endpoint and leader as a
        ``fenced`` :class:`~pgfailover.events.TopologyEvent`; a verdict asking for a
        refresh invalidates the cache. Connection errors propagate (a pgfailover
        connection classifies them like any other).
        """
        host, port = conn.info.host, conn.info.port
        async with conn.lock:
            observation = await conn.wait(
                _io.inband_gen(conn, host, port), **_io.wait_bound(self.timeout)
            )
        return self.judge(observation)

    def judge(self, observation: Observation) -> Fence:
        """The :func:`~.model.fence` verdict for ``observation`` against the cached topology,
        reported and acted on as :meth:`validate` says (no I/O)."""
        topology = self._topology
        verdict = fence(topology, observation)
        if verdict.refresh:
            self.invalidate()
        if verdict.fenced:
            target = topology.write_target if topology is not None else None
            key = f"fenced {observation.address} {target.address if target else None}"
            self._event_once(key, "fenced", verdict.reason, target)
        return verdict

    async def _check(
        self, members: Sequence[Member], conninfos: Sequence[str]
    ) -> list[Observation]:
        """Check each member in-band, concurrently, with ``conninfos[i]`` for ``members[i]``;
        never raises (a failure is in the observation's ``error``)."""
        if True:  # ASYNC
            return list(
                await asyncio.gather(
                    *(self._check_one(m, c) for m, c in zip(members, conninfos, strict=True))
                )
            )
        else:
            calls = [
                lambda m=m, c=c: self._check_one(m, c)
                for m, c in zip(members, conninfos, strict=True)
            ]
            bound = self._connect_timeout() + self.timeout + GRACE
            found = _io.in_threads(calls, bound)
            return [
                r if isinstance(r, Observation) else Observation(m.host, m.port, error=str(r))
                for m, r in zip(members, found, strict=True)
            ]

    def _connect_timeout(self) -> int:
        return max(2, math.ceil(self.timeout))

    async def _check_one(self, member: Member, conninfo: str) -> Observation:
        host, port = member.host, member.port
        secrets = secret_candidates(conninfo)
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo,
                autocommit=True,
                prepare_threshold=None,
                connect_timeout=self._connect_timeout(),
            )
        except Exception as ex:  # reported in the observation
            info = error_info(ex, secrets, connected=False)
            return Observation(host, port, error=f"{info.kind}: {info.message}")
        try:
            return await conn.wait(_io.inband_gen(conn, host, port), **_io.wait_bound(self.timeout))
        except Exception as ex:  # reported in the observation
            info = error_info(ex, secrets, connected=True)
            return Observation(host, port, error=f"{info.kind}: {info.message}")
        finally:
            await conn.close()

    # -- events
    def _report(self, topology: Topology) -> None:
        for note in topology.notes:
            if note.startswith("split brain"):
                self._event_once(note, "split brain", note, topology.write_target)

    def _event_once(self, key: str, action: str, detail: str, leader: Member | None) -> None:
        with self._report_lock:
            if key in self._reported:
                return
            self._reported.add(key)
        self._event(action, detail, leader)

    def _event(self, action: str, detail: str, leader: Member | None = None) -> None:
        _emit(
            TopologyEvent(
                action, self.description, detail, leader.address if leader is not None else None
            )
        )


if True:  # ASYNC
    #: Closings of connections made by abandoned attempts (a reference keeps each alive).
    _CLOSING: set[asyncio.Future[None]] = set()


class _Pending(Generic[T]):
    """One connection attempt under way, in a context where ``attempt`` is the attempt:
    an asyncio task (async) or a daemon thread (sync)."""

    def __init__(self, connect: Callable[[], Awaitable[T]], attempt: _Attempt) -> None:
        if True:  # ASYNC
            token = _ATTEMPT.set(attempt)
            try:
                self._run: asyncio.Future[T] = asyncio.ensure_future(connect())
            finally:
                _ATTEMPT.reset(token)
        else:
            self._run = _in_thread(connect, attempt)

    async def wait(self, timeout: float) -> bool:
        """Whether the attempt has ended, waiting up to ``timeout`` seconds for it."""
        if True:  # ASYNC
            await asyncio.wait({self._run}, timeout=timeout)
        else:
            concurrent.futures.wait([self._run], timeout=timeout)
        return self._run.done()

    def done(self) -> bool:
        """Whether the attempt has ended (no wait)."""
        return self._run.done()

    def result(self) -> T:
        """What the ended attempt returned, or its exception raised."""
        return self._run.result()

    def abandon(self) -> None:
        """Give the attempt up: cancel it (async; psycopg's connect ends at once and its
        pgconn is freed with it), or let it end in its thread within its own bound and
        close the connection it makes after all (sync)."""
        if True:  # ASYNC
            run = self._run
            if not run.cancel() and not run.cancelled() and run.exception() is None:
                conn: Any = run.result()  # it ended just now: close what it made
                closing = asyncio.ensure_future(conn.close())
                _CLOSING.add(closing)
                closing.add_done_callback(_CLOSING.discard)
        else:
            self._run.add_done_callback(_close_late)


def _in_thread(connect: Callable[[], T], attempt: _Attempt) -> concurrent.futures.Future[T]:
    """Run ``connect`` in a daemon thread, in a copy of the caller's context where
    ``attempt`` is the attempt under way; its future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    context = contextvars.copy_context()
    context.run(_ATTEMPT.set, attempt)

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(context.run(connect))
        except BaseException as ex:  # handed to the waiter, whatever it is
            future.set_exception(ex)

    threading.Thread(target=run, name="pgfailover-topology-attempt", daemon=True).start()
    return future


def _close_late(future: concurrent.futures.Future[Any]) -> None:
    """Close the connection an abandoned attempt made after all (sync)."""
    if future.cancelled() or future.exception() is not None:
        return
    try:
        future.result().close()
    except Exception:  # best effort: the node is being left
        return
