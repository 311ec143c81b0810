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
- :meth:`~AsyncTopologySource.conninfo_for_leader` returns the caller's conninfo with the
  leader's host and port, refreshing first when the cache is missing, invalidated, older than
  ``max_age``, or has no leader (then at most every :data:`NO_LEADER_RETRY` seconds); raises
  :class:`~.model.NoLeader` when there is none;
- :meth:`~AsyncTopologySource.validate` checks a new connection in-band (one query: role,
  timeline) and returns the :func:`~.model.fence` verdict; a writable primary that is refused
  is reported once as a :class:`~pgfailover.events.TopologyEvent` (``fenced``).

Every refresh is bounded: in-band checks connect with ``connect_timeout`` =
max(2, ceil(``timeout``)) (libpq's minimum is 2 s) and wait at most ``timeout`` for the
query; the checks of several members run concurrently.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from .._secrets import secret_candidates
from ..events import TopologyEvent, _emit
from ..survey import error_info
from . import _io
from .model import (
    Fence,
    Member,
    NoLeader,
    Observation,
    Topology,
    TopologyUnavailable,
    check_timeout,
    conninfo_for,
    fence,
)

#: Seconds between two refreshes asked by :meth:`AsyncTopologySource.conninfo_for_leader`
#: while the cached topology names no leader.
NO_LEADER_RETRY = 0.25
#: Seconds a sync in-band check may run past its own bounds before it is given up.
GRACE = 0.5


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
        return conninfo_for(base_conninfo, target)

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
