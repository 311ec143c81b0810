"""The monitor's watch of a topology's leader: the I/O (decisions in :mod:`.leader`).

A pool made with ``topology=`` hands the monitor a :class:`TopologyTarget`; the monitor keeps
one :class:`TopologyWatch` per topology source object, shared by every pool using it. It is
the endpoint watch (:class:`~._runtime._Watch`: same loop, same pauses on the watch
connection's socket, same purge and wake-up of the members) with another look: read the
topology when due, look at the leader it names with the pools' conninfo, and purge the
pools when the leader changes or stops being writable.

Reading the topology is the source's own ``refresh()``, so that the watch and the pools
share one cache and one refresh at a time (the pools see the watch's refresh through
``current()`` and follow it). The source is not thread-safe and the watch runs in the
monitor's thread, so the refresh runs where the source lives:

- an :class:`~pgfailover.topology.AsyncTopologySource` (async pools) on its pools' event
  loop (``asyncio.run_coroutine_threadsafe``): its ``asyncio.Lock`` belongs to that loop,
  and awaiting it from the monitor's loop would break its single flight (or raise);
- a :class:`~pgfailover.topology.TopologySource` (sync pools) in a short-lived daemon
  thread: its refresh blocks, and its ``threading.Lock`` already serializes it with the
  pools' threads. An async twin of the source would be a second cache the pools never
  read, with refreshes of its own; a thread per refresh (at most one per source at a time,
  every ``follow_interval`` while an outage lasts) keeps no idle thread behind.

The look at the leader itself is done by the monitor's loop on an async connection of its
own, for both kinds: the role query of the endpoint watch, and on each new connection the
topology's in-band validation (the query of ``validate()``, judged by the source's
``judge()``, which has no I/O and may be called from any thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from .._secrets import scrub
from .._state import finding
from ..classify import Kind, Phase, classify
from ..probe import _probe_gen
from ..topology import AsyncTopologySource, TopologySource
from ..topology._io import inband_gen
from ..topology.model import (
    Fence,
    Member,
    Topology,
    TopologyError,
    TopologyUnavailable,
    conninfo_for,
)
from ._runtime import _NOT_FOR_THE_WATCH, WatchTarget, _call, _waited, _Watch
from .leader import TopologyEndpoint, leader_status, next_leader, refresh_plan
from .model import Status

if TYPE_CHECKING:
    from ._runtime import Monitor

T = TypeVar("T")

#: Connection keyword arguments the watch drops: the topology says where the leader is.
_ROUTING = frozenset({"host", "hostaddr", "port"})


@dataclass(frozen=True, slots=True)
class TopologyTarget(WatchTarget):
    """How the monitor follows the leader of ``topology`` for a pool: ``conninfo`` and
    ``kwargs`` are the pool's (without host and port: the leader's are used; the watch of a
    source shared by several pools uses the first pool's), ``home`` the event loop an async
    source lives on (the pool's; None for a sync source). The repr shows the source's
    description only."""

    topology: AsyncTopologySource | TopologySource | None = field(default=None, repr=False)
    home: asyncio.AbstractEventLoop | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        topology: AsyncTopologySource | TopologySource,
        conninfo: str,
        kwargs: dict[str, Any] | None,
        home: asyncio.AbstractEventLoop | None,
    ) -> TopologyTarget:
        """The target of a pool following ``topology`` (one watch per source object)."""
        endpoint = TopologyEndpoint.for_source(topology, topology.description)
        return cls(endpoint, conninfo, dict(kwargs or {}), topology=topology, home=home)

    def _new_watch(self, monitor: Monitor) -> _Watch:
        return TopologyWatch(monitor, self)


class TopologyWatch(_Watch):
    """The loop that follows one topology source's leader (runs in the monitor's thread)."""

    def __init__(self, monitor: Monitor, target: TopologyTarget) -> None:
        super().__init__(monitor, target)
        assert target.topology is not None
        self.source: AsyncTopologySource | TopologySource = target.topology
        self.home = target.home
        #: the leader the watch follows (None before the first one is named)
        self.leader: Member | None = None

    async def _look(self) -> None:
        source = self.source
        now = time.monotonic()
        gap = max(self.monitor.outage_interval, source.follow_interval)
        refresh, newer_than = refresh_plan(
            stale=source.stale(now), status=self.state.status, now=now, gap=gap
        )
        topology = source.current()
        if refresh or topology is None:
            try:
                topology = await self._refresh(newer_than)
            except (TopologyError, asyncio.TimeoutError, TimeoutError) as ex:
                await self._close()
                reason = scrub(str(ex) or "no answer in time", self._secrets)
                self._record(Status.DOWN, f"down: {source.description} cannot be read: {reason}")
                return
        step = next_leader(self.leader, topology, source.description)
        if step.target is None:
            await self._close()
            self._record(Status.DOWN, step.finding)
            return
        if step.former is not None:  # the pools' connections there are stale: purge
            await self._close()
            self._record(Status.DOWN, step.former)
            self._followed(topology)
        self.leader = step.target
        status, found = await self._look_at(step.target)
        if status is not Status.WRITABLE and status is not Status.MISCONFIGURED:
            source.invalidate()  # pools that still probe on their own ask again too
        self._record(status, found)

    def _followed(self, topology: Topology) -> None:
        """Tell the members they were purged for ``topology``'s leader change (so that
        their next request does not purge the new leader's connections once more)."""
        for member in self.monitor.members(self.endpoint):
            hook = getattr(member, "_pgf_topology_followed", None)
            if hook is not None:
                _call(hook, topology)

    async def _refresh(self, newer_than: float | None) -> Topology:
        """The source's own refresh, run where the source lives (see the module doc),
        bounded in time (``TimeoutError`` past the bound)."""
        source = self.source
        phase = max(2.0, math.ceil(source.timeout)) + source.timeout
        bound = 3.0 * phase + 1.0  # a REST round, then in-band checks, with room to spare
        future: concurrent.futures.Future[Topology]
        if isinstance(source, AsyncTopologySource):
            future = _on_loop(
                self._home(), functools.partial(source.refresh, newer_than=newer_than)
            )
        else:
            future = _in_thread(functools.partial(source.refresh, newer_than=newer_than))
        return await asyncio.wait_for(asyncio.wrap_future(future), bound)

    def _home(self) -> asyncio.AbstractEventLoop | None:
        """A running event loop of the async source's pools (the first member's, or, once
        that one has ended, another member's)."""
        homes = [self.home]
        for member in self.monitor.members(self.endpoint):
            target = member._pgf_watch_target()
            if isinstance(target, TopologyTarget):
                homes.append(target.home)
        for loop in homes:
            if loop is not None and loop.is_running() and not loop.is_closed():
                self.home = loop
                return loop
        return None

    async def _look_at(self, leader: Member) -> tuple[Status, str]:
        """One look at ``leader``: connect when needed (and validate the new connection
        in-band), then the role query."""
        phase = Phase.CONNECT
        fence: Fence | None = None
        try:
            if self.conn is None or self.conn.closed:
                self.state.connects += 1
                self.conn = await asyncio.wait_for(
                    self._connect_to(leader), self.monitor.connect_timeout + 1.0
                )
                phase = Phase.AUTOCOMMIT
                conn = self.conn
                observation = await asyncio.wait_for(
                    _waited(inband_gen(conn, conn.info.host, conn.info.port), conn.pgconn.socket),
                    self.monitor.probe_timeout,
                )
                fence = self.source.judge(observation)
            phase = Phase.AUTOCOMMIT
            conn = self.conn
            report = await asyncio.wait_for(
                _waited(_probe_gen(conn), conn.pgconn.socket), self.monitor.probe_timeout
            )
        except (asyncio.TimeoutError, TimeoutError):
            await self._close()
            what = "connection" if phase is Phase.CONNECT else "role query"
            return Status.DOWN, f"down: the leader {leader.address} did not answer the {what}"
        except psycopg.Error as ex:
            await self._close()
            verdict = classify(ex, phase=phase)
            message = scrub(verdict.message, self._secrets)
            if verdict.kind is Kind.CONFIGURATION:
                return Status.MISCONFIGURED, f"auth or configuration failure: {message}"
            return Status.DOWN, f"down: the leader {leader.address}: {message}"
        except ValueError as ex:  # a member without host or port
            await self._close()
            return Status.DOWN, f"down: {ex}"
        status, found = leader_status(
            leader, writable=report.writable, role=finding(report), fence=fence
        )
        if status is not Status.WRITABLE:
            await self._close()  # the next look connects afresh, to whichever leader
        return status, found

    async def _connect_to(self, leader: Member) -> psycopg.AsyncConnection[Any]:
        kwargs = {
            k: v
            for k, v in self.target.kwargs.items()
            if k not in _NOT_FOR_THE_WATCH and k not in _ROUTING
        }
        kwargs["autocommit"] = True
        conninfo = conninfo_for(self.target.conninfo, leader)
        if "connect_timeout" not in kwargs and "connect_timeout" not in conninfo:
            kwargs["connect_timeout"] = int(self.monitor.connect_timeout)
        return await psycopg.AsyncConnection.connect(conninfo, **kwargs)


def _on_loop(
    loop: asyncio.AbstractEventLoop | None, make: Callable[[], Coroutine[Any, Any, T]]
) -> concurrent.futures.Future[T]:
    """Run the coroutine ``make()`` on ``loop`` (another thread's); its future. A future
    failed with ``TopologyUnavailable`` when there is no running loop to run it on."""
    if loop is not None:
        coro = make()
        try:
            return asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed meanwhile
            coro.close()
    failed: concurrent.futures.Future[T] = concurrent.futures.Future()
    failed.set_exception(
        TopologyUnavailable("no event loop of the pools using this topology is running")
    )
    return failed


def _in_thread(fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``fn`` in a new daemon thread; its future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return  # given up before it started
        try:
            future.set_result(fn())
        except BaseException as ex:  # handed to the waiter, whatever it is
            future.set_exception(ex)

    threading.Thread(target=run, name="pgfailover-monitor-refresh", daemon=True).start()
    return future
