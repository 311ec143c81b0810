# pgfailover: generate-sync
"""pgfailover's psycopg_pool pool: it heals after a failover.

``pgfailover.ConnectionPool`` (module :mod:`pgfailover.pool`) and
``pgfailover.AsyncConnectionPool`` (module :mod:`pgfailover.pool_async`) are drop-in
subclasses of psycopg_pool's pools of the same names (same constructor, same API) that use
pgfailover's connection classes and:

- discard a poisoned connection when it comes back (closing it, which in PgBouncer session
  mode is also what frees the server connection bound to the standby);
- purge the whole generation once when a verdict says the endpoint's node changed role or
  was lost: idle connections are closed at once, checked-out ones when they return
  (``drain()``); many clients hitting the failure at the same moment purge once;
- validate the role of every new connection with the core probe (no round trip on a direct
  connection once it is known to be direct; one query through a pooler), so the pool never
  fills with standby connections; with a multi-host conninfo and no pooler, libpq's
  ``target_session_attrs=read-write`` is added;
- check a connection at checkout only when there is a reason: an outage is under way, or it
  has been idle longer than ``recheck_interval``; the happy path costs no round trip;
- while no primary is reachable, reconnect on the failover schedule
  (:data:`~pgfailover.policy.RECONNECT_POLICY`) with a single prober at a time, so recovery
  follows the primary's return within a fraction of a second and the number of probes is
  bounded by time, not by the number of failing requests; when a request times out, raise
  :class:`~pgfailover.errors.NoPrimaryAvailable` saying what each host was; an
  authentication or configuration failure fails waiting requests at once with the driver's
  own error;
- with ``topology=`` (a :class:`~pgfailover.topology.AsyncTopologySource` such as
  :class:`~pgfailover.topology.AsyncPatroniTopology`), connect straight to the leader the
  topology names (the conninfo then carries everything but the host and port), validate
  every new connection against it in-band (a writable node that is not the leader is
  refused: fencing), and invalidate the topology on every failover verdict, so the next
  connection attempt refreshes it (once, shared by all the pools using the same source);
- register with the process monitor (:mod:`pgfailover.monitor`; ``monitor=True``, the
  default): one watch connection per endpoint (with ``topology=``, one per topology
  source object, following its leader) purges the pool's stale connections when the
  endpoint stops being writable (or the leader changes), before a request meets them;
  during the outage the pool makes no connection attempt but those the monitor grants
  (the monitor is the one prober of the endpoint, and a waiting pool's attempt is its
  look) and the monitor wakes it when a writable primary is back (its held attempts then
  go one at a time, each once the previous one has connected and was handed over, new
  ones queue behind them, and those no request waits for any more are dropped). It costs
  one thread per process, one connection per endpoint and one role query per second on
  it; ``monitor=False`` opts out;
- count what happened in ``get_stats()``.

Decisions live in :class:`~pgfailover._state.FailoverState` (no I/O); the pool class is a
thin shell. ``pool_async.py`` is the source; ``tools/async_to_sync.py`` generates
``pool.py`` from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool as _BasePool
from psycopg_pool import PoolTimeout
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool_async import AddConnection, MaintenanceTask

from . import _pool_common, _registry
from ._pool_common import FastAttempt, endpoint
from ._state import FailoverState, finding
from .classify import Kind, Phase, classify, read_only_hosts
from .connection import AsyncConnection, _FailoverAware
from .errors import NotWritable
from .events import PoolEvent, _emit
from .monitor import Monitor, TopologyTarget, WatchTarget, process_monitor
from .probe import aprobe
from .topology import AsyncTopologySource, Topology, TopologyError
from .topology.model import former_leader, leader_moved

CT = TypeVar("CT", bound=psycopg.AsyncConnection[Any])

__all__ = ["AsyncConnectionPool"]


class AsyncConnectionPool(_BasePool[CT]):
    """The psycopg_pool pool of the same name, surviving failovers (see the module doc).

    Extra arguments: ``recheck_interval`` (seconds; a connection idle at least this long is
    probed at checkout; 0 probes every checkout, None never; default 10), ``pooler`` (True if
    a multiplexing pooler such as PgBouncer is in front, False if not, None to detect it).
    ``connection_class`` is pgfailover's connection class by default; your own psycopg
    connection subclass (of the same kind: sync or async) is accepted too, pgfailover's
    behaviour mixed in front of it (see :func:`~pgfailover._pool_common.failover_class`).
    ``topology`` (None: the conninfo's own hosts, tried by libpq) is where to find the
    leader: ``conninfo`` must then be a string without the host and port (any given are
    replaced by the leader's). Share one topology object between the pools that reach the
    same cluster: its refreshes are single-flight per object.
    ``monitor``: True (default) registers the pool with the process's shared
    :class:`~pgfailover.monitor.Monitor` when it opens (the pool leaves it when it closes),
    False keeps the pool on its own (it then probes by itself during an outage, one
    attempt at a time), a ``Monitor`` registers it with that one.
    """

    def __init__(
        self,
        conninfo: Any = "",
        *,
        connection_class: type[CT] = AsyncConnection,  # type: ignore[assignment]
        configure: Callable[[CT], Awaitable[None]] | None = None,
        recheck_interval: float | None = 10.0,
        pooler: bool | None = None,
        topology: AsyncTopologySource | None = None,
        monitor: Monitor | bool = True,
        **kwargs: Any,
    ) -> None:
        _pool_common.check_options(recheck_interval, pooler)
        _pool_common.check_monitor(monitor, Monitor)
        self._pgf_monitor_choice = monitor
        self._pgf_monitor: Monitor | None = None  # the one registered with, while open
        # connection attempts held during an outage while the monitor watches (token ->
        # attempt, growing); see _add_connection and _pgf_unpark
        self._pgf_parked: dict[int, tuple[AttemptWithBackoff, bool]] = {}
        self._pgf_parked_lock = threading.Lock()
        self._pgf_tokens = itertools.count()
        self._pgf_connects = 0  # new connections made (see _connect, _add_connection)
        self._pgf_under_way = 0  # connection attempts under way (see _add_connection)
        if True:  # ASYNC
            self._pgf_loop: asyncio.AbstractEventLoop | None = None
        _pool_common.check_topology(topology, AsyncTopologySource, conninfo)
        self.topology = topology
        self._pgf_base_conninfo = conninfo
        self._pgf_leader_seen = ""  # the conninfo last resolved through the topology
        self._pgf_topology_seen: Topology | None = None  # the topology the pool last followed
        #: seconds one connection attempt may take (see _pool_common.connect_bound)
        self._pgf_connect_bound = _pool_common.connect_bound(conninfo, kwargs.get("kwargs"))
        if topology is not None:
            conninfo = self._pgf_leader_conninfo
        connection_class = _pool_common.failover_class(
            connection_class, AsyncConnection, psycopg.AsyncConnection
        )
        self._pgf = FailoverState(pooler=pooler, on_event=self._pgf_event)
        self._pgf_configure_user = configure
        self.recheck_interval = recheck_interval
        super().__init__(
            _pool_common.prefer_read_write(conninfo, pooler),
            connection_class=connection_class,
            configure=self._pgf_configure,
            **kwargs,
        )
        _registry.add_pool(self)  # for pgfailover.metrics and pgfailover.health

    @property
    def failover_state(self) -> FailoverState:
        """The pool's failover knowledge and counters (read-only use)."""
        return self._pgf

    # -- the process monitor
    def _open(self) -> None:
        was_closed = self._closed
        super()._open()
        if not (was_closed and not self._closed) or self._pgf_monitor_choice is False:
            return
        if True:  # ASYNC
            self._pgf_loop = asyncio.get_running_loop()
        choice = self._pgf_monitor_choice
        monitor = process_monitor() if choice is True else choice
        assert isinstance(monitor, Monitor)
        self._pgf_monitor = monitor
        monitor.register(self)

    def _pgf_watch_target(self) -> WatchTarget | None:
        """Where the monitor should look (see :class:`~pgfailover.monitor.Member`)."""
        if self.topology is not None:  # one watch per source, following its leader
            kwargs = self.kwargs
            if kwargs is not None and not isinstance(kwargs, dict):
                return None  # resolved per connection: only the pool knows them
            home: Any = None  # a sync source: the monitor reads it in a thread of its own
            if True:  # ASYNC
                home = self._pgf_loop  # an async source: refreshed on the pool's loop
            return TopologyTarget.of(self.topology, self._pgf_base_conninfo, kwargs, home)
        return _pool_common.watch_target(self.conninfo, self.kwargs)

    def _pgf_topology_followed(self, topology: Topology) -> None:
        """The monitor purged the pool for ``topology``'s new leader (called from its
        thread): the next request need not purge again (see _pgf_follow_topology)."""
        self._pgf_topology_seen = topology

    def _pgf_endpoint_lost(self, where: str, found: str) -> None:
        """The monitor found no writable primary (called from its thread)."""
        if self._pgf.endpoint_lost(where, found, monotonic()):
            self._pgf_in_pool(_Drain(self))

    def _pgf_endpoint_back(self) -> None:
        """The monitor found a writable primary again (called from its thread)."""
        if self._pgf.primary_back():
            self._pgf_in_pool(_Unpark(self, None))

    def _pgf_grant(self, report: Callable[[bool], None]) -> bool:
        """Let one held connection attempt go as the monitor's look (called from its
        thread; see :meth:`~pgfailover._state.FailoverState.grant`). False when the pool
        holds no attempt back or is closed: nothing was granted, ``report`` is not called."""
        with self._pgf_parked_lock:
            token = next(iter(self._pgf_parked), None)
        if token is None or self._closed or not self._pgf.grant(report):
            return False
        self._pgf_in_pool(_Unpark(self, token, granted=True))
        return True

    def _pgf_in_pool(self, task: MaintenanceTask) -> None:
        """Hand ``task`` to the pool's workers, from any thread."""
        if self._closed:
            return
        if True:  # ASYNC
            loop = self._pgf_loop
            if loop is None or loop.is_closed():
                return
            try:  # noqa: SIM105 - contextlib would be an unused import in the sync twin
                loop.call_soon_threadsafe(self.run_task, task)
            except RuntimeError:  # the loop closed meanwhile: the pool is gone with it
                pass
        else:
            self.run_task(task)

    def _pgf_park(self, attempt: AttemptWithBackoff, growing: bool) -> int:
        token = next(self._pgf_tokens)
        with self._pgf_parked_lock:
            self._pgf_parked[token] = (attempt, growing)
        return token

    async def _pgf_unpark(self, token: int | None, granted: bool = False) -> None:
        """Send one held connection attempt on: the oldest (``token`` None: the monitor's
        wake-up, or the previous attempt connected, see :meth:`_connect`), or the one of
        ``token`` (its periodic recheck, which holds it again while the outage lasts, or
        the monitor's grant, ``granted``). After an outage the held attempts thus go one
        at a time, each once the previous one has connected: the first connection serves
        a waiting request at once, not slowed by a burst of logins at the pooler (and one
        that no request needs any more is dropped, see :meth:`_pgf_attempt_unneeded`)."""
        with self._pgf_parked_lock:
            if token is None:
                token = next(iter(self._pgf_parked), None)
            one = None if token is None else self._pgf_parked.pop(token, None)
            held = [] if one is None else [one]
        if granted and not held:  # gone meanwhile (gave up, or its recheck took it)
            self._pgf.grant_unused()
        for attempt, growing in held:
            self.run_task(AddConnection(self, attempt, growing=growing))

    def _pgf_take_turn(self, attempt: AttemptWithBackoff, growing: bool, again: bool) -> int | None:
        """None if a connection attempt may go now (it then counts as under way until
        :meth:`_add_connection` is done with it), else the token it is held under (held
        in the same step, so that the attempt under way, once connected, lets it go).

        After the monitor's wake-up, until one connects, attempts go one at a time: one
        waits its turn, held again, while another is under way (a held one's recheck, a
        retry), and a new one (``again`` False: a request found no connection) also while
        older ones are held; each then goes once the previous one has connected, or is
        dropped if that one served the request. Through a busy pooler the first login can
        take longer than the recheck interval: without the turns a pool would log in twice
        for one request."""
        with self._pgf_parked_lock:
            if self._pgf.waking() and (self._pgf_under_way or (not again and self._pgf_parked)):
                token = next(self._pgf_tokens)
                self._pgf_parked[token] = (attempt, growing)
                return token
            self._pgf_under_way += 1
            return None

    async def _pgf_attempt_unneeded(self, growing: bool) -> bool:
        """Whether a connection attempt that was held or failed before is needless now, no
        request waiting and the pool at ``min_size`` or above without it (the connections
        made since served what waited). If so it is forgotten, as psycopg_pool forgets an
        attempt that gave up (``growing``: one made to grow the pool, whose growth is then
        over; a request that comes later grows the pool again). A purged pool would
        otherwise log in again, after the outage, for every request that waited during it,
        long after one connection served them all."""
        async with self._lock:
            if self._waiting or self._nconns - 1 < self._min_size:
                return False
            self._nconns -= 1
            if growing:
                self._growing = False
            return True

    # -- connection life cycle
    async def _pgf_leader_conninfo(self) -> str:
        assert self.topology is not None
        conninfo = await self.topology.conninfo_for_leader(self._pgf_base_conninfo)
        self._pgf_leader_seen = conninfo
        return conninfo

    async def _pgf_configure(self, conn: CT) -> None:
        report = await aprobe(conn, pooler=self._pgf.pooler)
        self._pgf.probed(report)
        if not report.writable:
            where = endpoint(conn)
            await conn.close()
            raise NotWritable(report, where, finding(report))
        if self.topology is not None:
            fence = await self.topology.validate(conn)
            if not fence.accepted:
                where = endpoint(conn)
                await conn.close()
                raise NotWritable(report, where, f"node the topology refuses ({fence.reason})")
        if self._pgf_configure_user is not None:
            await self._pgf_configure_user(conn)

    async def _connect(self, timeout: float | None = None) -> CT:
        if timeout is None:  # psycopg_pool sets no connect_timeout then: a frozen server
            timeout = self._pgf_connect_bound  # would hold the attempt for ever
        connect = super()._connect
        try:
            if self.topology is not None and self._pgf.outage_since is not None:
                # an attempt stuck on a frozen leader gives way once another is named
                conn = await self.topology.follow(lambda: connect(timeout))
            else:
                conn = await connect(timeout)
        except NotWritable as ex:
            # a new connection belongs to no generation yet: nothing to purge (generation -1)
            self._pgf.not_primary(ex.endpoint, ex.finding, monotonic(), -1)
            self._pgf_invalidate()
            raise
        except TopologyError as ex:  # no leader now, or the topology cannot be read
            assert self.topology is not None
            self._pgf.no_leader(self.topology.description, str(ex), monotonic())
            raise
        except psycopg.Error as ex:
            await self._pgf_connect_failed(ex)
            raise
        now = monotonic()
        aware: _FailoverAware[Any] = conn  # type: ignore[assignment]  # made so in __init__
        aware.pool_generation = self._pgf.generation
        aware.pool_returned_at = now
        self._pgf.connected(now)
        self._pgf_connects += 1  # _add_connection then lets the next held attempt go
        return conn

    def _pgf_misconfigured(self) -> bool:
        return self._pgf.fatal is not None

    def _pgf_invalidate(self) -> None:
        if self.topology is not None:
            self.topology.invalidate()  # the next connection attempt refreshes it

    async def _pgf_connect_failed(self, ex: psycopg.Error) -> None:
        verdict = classify(ex, phase=Phase.CONNECT)
        if self.topology is not None:
            conninfo = self._pgf_leader_seen  # resolving again could refresh the topology
            if verdict.is_failover:
                self._pgf_invalidate()
        else:
            conninfo = await self._resolve_conninfo()
        standbys = read_only_hosts(str(ex)) if verdict.kind is Kind.READ_ONLY else None
        self._pgf.connect_failed(
            _pool_common.conninfo_endpoint(conninfo), verdict, monotonic(), standbys or ()
        )
        if verdict.kind is Kind.CONFIGURATION:
            self._pgf.fatal = ex
            async with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for client in waiting:
                await client.fail(ex)

    async def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        again = attempt is not None  # one that failed or was held before
        attempt = attempt or FastAttempt(
            timeout=self.reconnect_timeout, misconfigured=self._pgf_misconfigured
        )
        now = monotonic()
        if not self._pgf.may_connect(now):
            attempt.update_delay(now)
            if not attempt.time_to_give_up(now):
                if self._pgf.monitored:  # held until the monitor sees the primary back
                    token = self._pgf_park(attempt, growing)
                    await self.schedule_task(_Unpark(self, token), _pool_common.PARK_RECHECK)
                    if self._pgf.may_connect(monotonic()):  # released meanwhile
                        self.run_task(_Unpark(self, token))
                    return
                await self.schedule_task(
                    AddConnection(self, attempt, growing=growing), attempt.delay
                )
                return
            await super()._add_connection(attempt, growing)
            return
        if again and self._pgf.outage_since is None and await self._pgf_attempt_unneeded(growing):
            self._pgf.connect_done()
            if self._pgf_parked:
                self.run_task(_Unpark(self, None))
            return
        turn = self._pgf_take_turn(attempt, growing, again)
        if turn is not None:  # held for its turn
            await self.schedule_task(_Unpark(self, turn), _pool_common.PARK_RECHECK)
            return
        connects = self._pgf_connects
        try:
            await super()._add_connection(attempt, growing)
        finally:
            with self._pgf_parked_lock:
                self._pgf_under_way -= 1
            self._pgf.connect_done()
        if self._pgf_parked and self._pgf_connects != connects:
            # connected and handed over (to a waiting request, or to the pool): the primary
            # is back, the next held attempt may go
            self.run_task(_Unpark(self, None))

    # -- checkout and return
    async def getconn(self, timeout: float | None = None) -> CT:
        if (fatal := self._pgf.fatal) is not None and not self._pool:
            raise fatal.with_traceback(None)
        if self.topology is not None and self.topology.current() is not self._pgf_topology_seen:
            await self._pgf_follow_topology()
        if timeout is None:
            timeout = self.timeout
        start = monotonic()  # also "now" for the idle check: a few µs early is fine
        wait = timeout
        while True:
            try:
                conn = await super().getconn(wait)
            except PoolTimeout as ex:
                raise (self._pgf.no_primary(timeout) or ex) from None
            aware: _FailoverAware[Any] = conn  # type: ignore[assignment]  # made so in __init__
            if not self._pgf.needs_check(
                aware.pool_generation, aware.pool_returned_at, self.recheck_interval, start
            ):
                return conn
            if await self._pgf_checkout_ok(conn):
                return conn
            wait = max(start + timeout - monotonic(), 0.0)

    async def _pgf_follow_topology(self) -> None:
        """The topology was refreshed (by any pool or caller sharing it): if it names
        another leader than before, the connections made before are suspect (they may be
        writing to a node that is no longer the leader, even one that still accepts
        writes): purge them. No I/O beyond closing idle connections."""
        assert self.topology is not None
        current = self.topology.current()
        moved = leader_moved(self._pgf_topology_seen, current)
        self._pgf_topology_seen = current
        if moved is None:
            return
        old, new = moved
        finding = former_leader(old, new, self.topology.description)
        if self._pgf.not_primary(old.address, finding, monotonic(), self._pgf.generation):
            await self.drain()

    async def _pgf_checkout_ok(self, conn: CT) -> bool:
        aware: _FailoverAware[Any] = conn  # type: ignore[assignment]  # made so in __init__
        generation = aware.pool_generation
        try:
            report = await aprobe(conn, pooler=self._pgf.pooler)
        except psycopg.Error:
            await self.putconn(conn)  # poisoned by the failure: putconn discards it
            return False
        self._pgf.probed(report)
        if report.writable:
            aware.pool_generation = self._pgf.generation
            return True
        purge = self._pgf.not_primary(endpoint(conn), finding(report), monotonic(), generation)
        self._pgf_invalidate()
        await conn.close()
        await self.putconn(conn)
        if purge:
            await self.drain()
        return False

    async def putconn(self, conn: CT) -> None:
        if getattr(conn, "_pool", None) is not self:
            self._check_pool_putconn(conn)  # psycopg_pool's error, before we touch a stranger
        aware: _FailoverAware[Any] = conn  # type: ignore[assignment]  # made so in __init__
        aware.pool_returned_at = monotonic()
        try:
            # a runner's deadline ends with its checkout; written only when set (see the
            # note on instance attributes in pgfailover.connection)
            if aware._pgf_deadline is not None:
                aware._pgf_deadline = None
            verdict = aware.poisoned
        except AttributeError:  # not ours after all (a wrapped connect): never poisoned
            verdict = None
        if verdict is None:
            await super().putconn(conn)
            return
        purge = self._pgf.poisoned(aware.pool_generation, verdict, monotonic())
        if verdict.rediscover_primary or purge:
            self._pgf_invalidate()
        if not conn.closed:
            await conn.close()
        await super().putconn(conn)
        if purge:
            await self.drain()

    async def close(self, timeout: float = 5.0) -> None:
        _registry.discard_pool(self)
        monitor, self._pgf_monitor = self._pgf_monitor, None
        if monitor is not None:
            # waits for the watch's end when the pool is the endpoint's last member (its
            # connection closed, up to 2 s): off the event loop for an async pool
            if True:  # ASYNC
                await asyncio.to_thread(monitor.unregister, self)
            else:
                monitor.unregister(self)
        with self._pgf_parked_lock:
            self._pgf_parked.clear()
        self._pgf.grant_unused()  # a monitor's look waiting on this pool ends now
        await super().close(timeout)

    def get_stats(self) -> dict[str, int]:
        return {**super().get_stats(), **self._pgf.stats()}

    def _pgf_event(self, event: PoolEvent) -> None:
        _emit(dataclasses.replace(event, pool=getattr(self, "name", "")))


class _Drain(MaintenanceTask):
    """The monitor found the endpoint not writable: purge the pool's connections."""

    async def _run(self, pool: Any) -> None:
        await pool.drain()


class _Unpark(MaintenanceTask):
    """Send one held connection attempt on (see ``_pgf_unpark``: the oldest when ``token``
    is None; ``granted``: the monitor's grant)."""

    def __init__(self, pool: Any, token: int | None, granted: bool = False) -> None:
        super().__init__(pool)
        self.token = token
        self.granted = granted

    async def _run(self, pool: Any) -> None:
        await pool._pgf_unpark(self.token, self.granted)
