"""SQLAlchemy 2 integration: one call makes an engine survive a failover.

.. code-block:: python

    engine = create_engine("postgresql+psycopg://app@db/app")      # or create_async_engine
    pgfailover.sqlalchemy.instrument(engine)

Works with the psycopg (sync and async), psycopg2 and asyncpg dialects; classification is
by SQLSTATE, so the three behave the same. :func:`instrument` adds listeners, nothing else:
the engine, its pool, its connections and the driver's exceptions keep their types.

What it changes:

- **Errors** (``handle_error``): a failover verdict (the node is a standby or read-only,
  the connection is lost, the server is shutting down) is marked as a disconnect, so
  SQLAlchemy invalidates the connection instead of handing it out again. When the verdict
  says the endpoint's node changed role or went away, the whole pool is invalidated too
  (every connection opened before that instant is replaced at its next checkout), once per
  generation however many requests fail at the same moment.
- **New connections** (``do_connect``): each is checked with the core role probe (no round
  trip on a direct connection once it is known to be direct; one query through a pooler).
  A connection to a standby is closed and the next attempt follows with a fast capped
  backoff (50 ms, x1.5, at most 200 ms, with jitter; one attempt at a time per engine during
  an outage) until ``timeout``; then :class:`~pgfailover.errors.NoPrimaryAvailable` says
  what each host was. Authentication and configuration errors are raised at once.
  A URL with several hosts gets ``target_session_attrs=read-write`` (unless it sets its
  own, or ``pooler=True``), as the pools' conninfo does, so the driver passes over hosts
  that answer as standbys. With ``NullPool`` (every checkout is a new connection) new
  connections are probed only while an outage is under way, so the happy path costs no
  round trip there either.
- **Checkout** (``checkout``): a pooled connection is probed only when there is a reason:
  an outage is under way, or it was last checked out (or probed) at least
  ``recheck_interval`` seconds ago. (The time of the last checkout, not of the last
  checkin, spares a ``checkin`` listener: a connection held longer than the interval is
  probed at its next checkout.) One
  that leads to a standby raises ``InvalidatePoolError`` (first time in a generation) or
  ``DisconnectionError``: SQLAlchemy replaces it, and the replacement goes through the
  checks above. This replaces the blind ``pool_pre_ping`` (``;`` passes on a standby);
  ``pool_pre_ping=True`` may stay on and still catches dead connections.

- **Statements in flight on a silent server** (the process's watchdog, as for
  :class:`pgfailover.Connection`): each new DBAPI connection is registered with it. An
  operation in flight with no sign of life for ``silence_limit`` seconds makes it ask the
  server, on a side connection bounded by ``probe_timeout``, whether it answers; a live
  server's slow statement is left alone, a silent one gets the connection's socket shut
  down, so the call fails with the driver's connection error, which ``handle_error``
  classifies as a lost connection (invalidated, the outage recorded). A statement on a
  dead, blackholed or frozen server thus ends within about
  ``silence_limit + 2 * probe_timeout`` seconds (11 s by default). In flight means: libpq's
  transaction status is ACTIVE (psycopg, psycopg2); a cursor execution holds the
  adapter's lock, or its COMMIT/ROLLBACK is under way (asyncpg). The happy path costs
  nothing per statement.

- **The process monitor** (:mod:`pgfailover.monitor`; ``monitor=True``, the default;
  ``monitor=False`` opts out): the engine registers with the process's monitor, which
  keeps one watch connection per endpoint (shared with the pools and engines of the
  process that use it; one thread per process, one role query per second). When the
  endpoint stops being writable, the monitor invalidates the engine's pool before a
  request meets it: every connection opened before then is replaced at its next checkout
  (idle ones at once when a request comes, checked-out ones the next time they are checked
  out); during the outage the engine makes no connection attempt of its own (a request
  that needs a connection waits, up to ``timeout``, for the monitor to see a writable
  primary), and it is woken at once when the monitor does, which also ends the outage for
  the engine (an idle one included). An engine the monitor cannot
  watch (``topology=``, a ``creator``/``async_creator``, a driver other than psycopg,
  psycopg2 or asyncpg, or an asyncpg ``ssl`` given as an ``SSLContext``) keeps probing by
  itself, one attempt at a time. ``engine.dispose()`` leaves the monitor (an engine
  disposed of at shutdown must not keep a watch alive); the engine's next connection
  attempt, if any, joins it again.

Each connection invalidated for a failover produces one
:class:`~pgfailover.events.FailoverEvent` (logged once on ``pgfailover.events``).
:meth:`Instrumentation.stats` returns the counters. ``instrument()`` is idempotent and
:meth:`Instrumentation.remove` (or :func:`uninstrument`) takes every listener away.
See ``docs/sqlalchemy.md`` for the ORM pattern and the retry recipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import Dialect, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, Pool, PoolProxiedConnection

from . import _watchdog
from ._runner import WATCHED_KEY
from ._state import FailoverState, finding
from .classify import Kind, Phase, Verdict, attach_verdict, classify, read_only_hosts
from .connection import _FailoverAware
from .errors import NoPrimaryAvailable
from .events import FailoverEvent, NodeInfo, _emit, caller_stack, diagnostics_of
from .monitor import Endpoint, Monitor, WatchTarget, process_monitor
from .policy import CONNECT_ATTEMPT_BOUND, RECONNECT_POLICY
from .probe import PROBE_SQL, RoleReport, aprobe, probe, report_from_row, role_from_parameters
from .topology import AsyncTopologySource, Fence, Topology, TopologyError, TopologySource
from .topology._io import INBAND_SQL, observation_of
from .topology.model import former_leader, leader_moved

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

try:
    from sqlalchemy.util.concurrency import await_ as _await
except ImportError:  # pragma: no cover - SQLAlchemy 2.0 names it await_only
    from sqlalchemy.util.concurrency import await_only as _await

__all__ = ["Instrumentation", "instrument", "uninstrument"]

logger = logging.getLogger("pgfailover.sqlalchemy")

_CHECKED_AT = "pgfailover.checked_at"  # record.info: monotonic time of last checkout or probe
_GENERATION = "pgfailover.generation"  # record.info: the engine generation it was made in
_VIA_POOLER = "pgfailover.via_pooler"  # record.info: what the first query probe found
_REPORTED = "pgfailover.reported"  # record.info: an event was emitted for this connection
_SERVER = "pgfailover.server"  # record.info: host:port of the server behind, per last query
_WATCHED = WATCHED_KEY  # record.info: the DBAPI connection's watchdog handle


@dataclass(frozen=True, slots=True)
class Options:
    """What :func:`instrument` was called with (see there)."""

    recheck_interval: float | None
    timeout: float
    pooler: bool | None
    silence_limit: float | None
    probe_timeout: float
    topology: TopologySource | AsyncTopologySource | None = None
    monitor: Monitor | bool = True


class Instrumentation:
    """The listeners :func:`instrument` added to one engine, and what they have seen.

    It is also the engine's member of the process monitor (a
    :class:`pgfailover.monitor.Member`): the monitor watches the engine's endpoint and calls
    :meth:`_pgf_endpoint_lost` and :meth:`_pgf_endpoint_back` from its own thread.
    """

    def __init__(self, engine: Engine, options: Options) -> None:
        self._engine = weakref.ref(engine)
        self.options = options
        self.state = FailoverState(
            pooler=options.pooler,
            name=engine.url.render_as_string(hide_password=True),
            on_event=_emit,
        )
        self._async = bool(engine.dialect.is_async)
        # (event name, listener) on the engine; the engine is not held here: the registry
        # holds this object strongly, and a strong reference back would keep every
        # instrumented engine (and its membership of the monitor) alive for ever
        self._listeners: list[tuple[str, Callable[..., Any]]] = []
        self._topology_seen: Topology | None = None  # the topology last followed
        #: the monitor the engine is registered with (None: none, or removed)
        self._pgf_monitor: Monitor | None = None
        self._rejoin = False  # left the monitor at dispose(): join again at the next connect
        self._membership = threading.Lock()  # joining and leaving the monitor
        self._wakeup = _Wakeup()  # cuts the connect loop's waits when the primary is back

    @property
    def failover_state(self) -> FailoverState:
        """The engine's failover knowledge and counters (read-only use)."""
        return self.state

    # -- installation
    def _install(self, engine: Engine) -> None:
        for name, fn in (
            ("handle_error", self._on_error),
            ("do_connect", self._on_do_connect),
            ("checkout", self._on_checkout),
            ("engine_disposed", self._on_disposed),
        ):
            event.listen(engine, name, fn)
            self._listeners.append((name, fn))

    def _register(self) -> None:
        """Join the monitor chosen by ``options.monitor`` (none when False)."""
        choice = self.options.monitor
        if choice is False:
            return
        monitor = process_monitor() if choice is True else choice
        assert isinstance(monitor, Monitor)
        monitor.register(self)  # RuntimeError for a closed monitor: nothing is installed yet
        self._pgf_monitor = monitor

    def _leave_monitor(self, *, rejoin: bool) -> None:
        """Leave the monitor (its watch of the endpoint ends with its last member, within
        2 s: this waits for it); ``rejoin``: join again at the next connection attempt."""
        with self._membership:
            monitor, self._pgf_monitor = self._pgf_monitor, None
            if monitor is not None:
                monitor.unregister(self)
            self._rejoin = rejoin and self.options.monitor is not False

    def _rejoin_monitor(self) -> None:
        """The engine connects again after ``dispose()``: join the monitor again."""
        with self._membership:
            if not self._rejoin or not self._listeners:
                return
            self._rejoin = False
            try:
                self._register()
            except RuntimeError:  # a Monitor of the caller's, closed since
                logger.warning(
                    "pgfailover: the monitor of %s is closed: the engine probes by itself",
                    self.state.name,
                )

    def _on_disposed(self, engine: Engine) -> None:
        """``engine.dispose()``: leave the monitor, as an engine disposed of at shutdown
        must (its watch connection would outlive it); if the engine is used again, its
        next connection attempt joins again."""
        self._leave_monitor(rejoin=True)

    def remove(self) -> None:
        """Remove every listener and leave the monitor (its watch of the endpoint ends with
        its last member, within 2 s); the engine behaves as if never instrumented.
        Idempotent."""
        self._leave_monitor(rejoin=False)
        engine = self._engine()
        while self._listeners:
            name, fn = self._listeners.pop()
            if engine is not None and event.contains(engine, name, fn):
                event.remove(engine, name, fn)
        if engine is not None:
            with _registry_lock:
                if _registry.get(engine) is self:
                    del _registry[engine]

    @property
    def installed(self) -> bool:
        """Whether the listeners are in place."""
        return bool(self._listeners)

    def stats(self) -> dict[str, int]:
        """Counters: failovers_detected, connections_poisoned (invalidated for a failover
        verdict), generations_purged (pool invalidations), probes_run (role queries),
        connections_rejected (new or checked-out connections that led to no writable
        primary), recovery_ms_last (from noticing the last outage to the next writable
        connection)."""
        return self.state.stats()

    # -- the process monitor
    def _pgf_watch_target(self) -> WatchTarget | None:
        """Where the monitor should look (see :class:`~pgfailover.monitor.Member`): a libpq
        conninfo made of what the driver is given (the URL's hosts, ports, database, user,
        password and libpq options, and the engine's ``connect_args``); the watch always
        connects with psycopg. None when the monitor cannot watch the engine: a
        ``topology=``, a ``creator``/``async_creator`` (only it knows where it connects), a
        driver other than psycopg, psycopg2 or asyncpg, or connection arguments libpq cannot
        express (an asyncpg ``ssl`` given as an ``SSLContext``); the engine then keeps
        probing by itself."""
        engine = self._engine()
        if engine is None or self.options.topology is not None:
            return None
        return _watch_target(engine, self.options.pooler)

    def _pgf_endpoint_lost(self, where: str, found: str) -> None:
        """The monitor found no writable primary (called from its thread): start the outage
        and, when the engine knew of none, invalidate its pool.

        The pool is invalidated by time, SQLAlchemy's own way (as for a disconnect with
        ``invalidate_pool_on_disconnect``): only a timestamp is written here, so no DBAPI
        connection is touched from the monitor's thread, which matters for an AsyncEngine
        whose connections belong to their event loop. Each connection made before is
        closed and replaced by whoever checks it out next, in that thread or task, before
        it is handed out (idle ones at the next request, checked-out ones at their next
        checkout)."""
        if not self.state.endpoint_lost(where, found, time.monotonic()):
            return
        engine = self._engine()
        if engine is not None:
            _invalidate_pool(engine.pool)

    def _pgf_endpoint_back(self) -> None:
        """The monitor found a writable primary again (called from its thread): connection
        attempts may go, the ones waiting out a backoff are woken at once, and the outage
        is over (an engine opens connections only for requests: an idle one would
        otherwise stay in it, unready and counting unavailable time, until its next
        request; its stale connections are replaced at checkout all the same)."""
        if self.state.primary_back():
            self.state.connected(time.monotonic())
            self._wakeup.wake()

    # -- errors
    def _on_error(self, ctx: ExceptionContext) -> BaseException | None:
        original = ctx.original_exception
        if isinstance(original, NoPrimaryAvailable):
            # The same type whatever the dialect: psycopg's would wrap it (it is a psycopg
            # error), psycopg2's and asyncpg's would not.
            return original if ctx.sqlalchemy_exception is not None else None
        proxied = _proxied(ctx)
        dbapi_conn = proxied.dbapi_connection if proxied is not None else None
        driver = _driver(dbapi_conn) if dbapi_conn is not None else None
        verdict = classify(
            original,
            conn=driver,
            read_only=_read_only(ctx.dialect, dbapi_conn),
            phase=_phase(ctx, proxied, driver),
        )
        attach_verdict(original, verdict)
        watched = proxied.info.get(_WATCHED) if proxied is not None else None
        cut = watched._pgf_cut_reason if watched is not None else None
        if cut is not None and sys.version_info >= (3, 11):
            original.add_note(f"pgfailover: the watchdog cut this connection: {cut}")
        if not verdict.discard_connection or proxied is None:
            return None
        ctx.is_disconnect = True
        generation = proxied.info.get(_GENERATION, -1)
        purge = self.state.poisoned(generation, verdict, time.monotonic())
        ctx.invalidate_pool_on_disconnect = purge
        if (verdict.rediscover_primary or purge) and self.options.topology is not None:
            self.options.topology.invalidate()  # the next connection refreshes it, once
        self._report(original, verdict, proxied, purge)
        return None

    def _report(
        self,
        ex: BaseException,
        verdict: Verdict,
        proxied: PoolProxiedConnection,
        purge: bool,
    ) -> None:
        if proxied.info.get(_REPORTED):
            return
        proxied.info[_REPORTED] = True
        dbapi_conn = proxied.dbapi_connection
        driver = _driver(dbapi_conn) if dbapi_conn is not None else None
        if isinstance(driver, _FailoverAware) and driver.poisoned is not None:
            return  # a pgfailover.Connection reported it already
        action = "connection invalidated: SQLAlchemy will not reuse it"
        if purge:
            action += "; pool invalidated: connections opened before now are replaced"
        _emit(
            FailoverEvent(
                verdict=verdict,
                node=_node(driver, proxied.info.get(_VIA_POOLER), proxied.info.get(_SERVER)),
                action=action,
                error_type=f"{type(ex).__module__}.{type(ex).__qualname__}",
                diagnostics=diagnostics_of(ex),
                stack=caller_stack(("pgfailover", "psycopg", "sqlalchemy")),
            )
        )

    # -- new connections
    def _on_do_connect(
        self,
        dialect: Dialect,
        conn_rec: ConnectionPoolEntry,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
    ) -> Any:
        if self._rejoin:
            self._rejoin_monitor()
        timeout = self.options.timeout
        deadline = time.monotonic() + timeout
        cparams = _bounded(dialect, cparams, timeout)
        if self.options.topology is None:
            cparams = _read_write(dialect, cparams, self.options.pooler)
        retries = 0
        last_error: BaseException | None = None
        while True:
            now = time.monotonic()
            woken = self._wakeup.count
            if self.state.may_connect(now):
                try:
                    conn, last_error = self._connect_once(dialect, conn_rec, cargs, cparams)
                finally:
                    self.state.connect_done()
                if conn is not None:
                    return conn
            now = time.monotonic()
            if now >= deadline:
                raise self.state.no_primary(timeout) or NoPrimaryAvailable(
                    timeout, {}
                ) from last_error
            retries += 1
            self._pause(max(min(RECONNECT_POLICY.backoff(retries), deadline - now), 0.0), woken)

    def _connect_once(
        self,
        dialect: Dialect,
        conn_rec: ConnectionPoolEntry,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
    ) -> tuple[Any, BaseException | None]:
        """One attempt: the connection if it leads to a writable primary, else (None, why)."""
        topology = self.options.topology
        if topology is not None:
            try:
                cparams = {**cparams, **self._leader_params(topology, cparams)}
            except TopologyError as ex:  # no leader now, or the topology cannot be read
                self.state.no_leader(topology.description, str(ex), time.monotonic())
                return None, ex
        try:
            dbapi_conn = dialect.connect(*cargs, **cparams)
        except Exception as ex:
            verdict = classify(ex, phase=Phase.CONNECT)
            if verdict.kind is Kind.CONFIGURATION or not verdict.may_retry():
                raise
            standbys = read_only_hosts(str(ex)) if verdict.kind is Kind.READ_ONLY else None
            self.state.connect_failed(
                _endpoint_of_params(cparams), verdict, time.monotonic(), standbys or ()
            )
            return None, ex
        watched = self._watch(dialect, dbapi_conn)  # the probe below is watched too
        validate = self.state.outage_since is not None or not self._null_pool()
        report = None
        if validate:
            try:
                report = self._probe(dbapi_conn, None)
            except Exception as ex:
                _close_quietly(dbapi_conn)
                verdict = classify(ex, phase=Phase.CONNECT)
                if not verdict.may_retry():
                    raise
                self.state.connect_failed(_endpoint_of_params(cparams), verdict, time.monotonic())
                return None, ex
            if not report.writable:
                endpoint = _endpoint(_driver(dbapi_conn), cparams)
                _close_quietly(dbapi_conn)
                self.state.not_primary(endpoint, finding(report), time.monotonic(), -1)
                if topology is not None:
                    topology.invalidate()
                return None, None
        if topology is not None and self._refused(topology, dbapi_conn, cparams):
            return None, None
        if validate:
            self.state.connected(time.monotonic())
        self._adopt(conn_rec.info, watched, report)
        return dbapi_conn, None

    def _adopt(
        self,
        info: dict[Any, Any],
        watched: _watchdog.Watchable | None,
        report: RoleReport | None,
    ) -> None:
        """Note in a pool record what is known of its new DBAPI connection, forgetting
        what was known of the old one."""
        for key in (_REPORTED, _VIA_POOLER, _SERVER, _WATCHED):
            info.pop(key, None)
        info[_CHECKED_AT] = time.monotonic()
        info[_GENERATION] = self.state.generation
        if watched is not None:
            info[_WATCHED] = watched  # keeps it watched as long as the record holds it
            if report is not None and report.via_pooler is not None:
                watched.via_pooler = report.via_pooler
        if report is not None:
            _remember(info, report)

    def _leader_params(
        self, topology: TopologySource | AsyncTopologySource, cparams: dict[str, Any]
    ) -> dict[str, Any]:
        """``host`` and ``port`` of the leader ``topology`` names, for the driver's connect
        arguments (the topology refreshes itself when it must: see its module)."""
        base = make_conninfo(
            "",
            **{
                key: cparams[name]
                for key, name in (
                    ("user", "user"),
                    ("password", "password"),
                    ("dbname", "dbname" if "dbname" in cparams else "database"),
                )
                if cparams.get(name) is not None
            },
        )
        if isinstance(topology, AsyncTopologySource):
            conninfo = _await(topology.conninfo_for_leader(base))
        else:
            conninfo = topology.conninfo_for_leader(base)
        params = conninfo_to_dict(conninfo)
        return {"host": params["host"], "port": int(str(params.get("port", 5432)))}

    def _refused(
        self,
        topology: TopologySource | AsyncTopologySource,
        dbapi_conn: Any,
        cparams: dict[str, Any],
    ) -> bool:
        """Whether the topology refuses a new connection (then closed and recorded)."""
        fence = self._fence(topology, dbapi_conn, cparams)
        if fence.accepted:
            return False
        endpoint = _endpoint(_driver(dbapi_conn), cparams)
        _close_quietly(dbapi_conn)
        what = f"node the topology refuses ({fence.reason})"
        self.state.not_primary(endpoint, what, time.monotonic(), -1)
        return True

    def _fence(
        self,
        topology: TopologySource | AsyncTopologySource,
        dbapi_conn: Any,
        cparams: dict[str, Any],
    ) -> Fence:
        """The topology's verdict on a new connection (one in-band query)."""
        driver = _driver(dbapi_conn)
        if isinstance(topology, AsyncTopologySource) and isinstance(
            driver, psycopg.AsyncConnection
        ):
            return _await(topology.validate(driver))
        if isinstance(topology, TopologySource) and isinstance(driver, psycopg.Connection):
            return topology.validate(driver)
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(INBAND_SQL)
            in_recovery, read_only, timeline, lsn = cursor.fetchone()
        finally:
            cursor.close()
        dbapi_conn.rollback()
        host, port = cparams["host"], cparams["port"]
        seen = observation_of(
            host,
            port,
            in_recovery=in_recovery,
            read_only=read_only,
            timeline=timeline,
            lsn=str(lsn) if lsn is not None else None,
        )
        return topology.judge(seen)

    def _follow_topology(self, now: float) -> None:
        """At checkout: the topology names another leader than when it was last looked at:
        connections made before are suspect (in a split brain they would keep writing to
        the old primary). Raise to make SQLAlchemy replace them all."""
        topology = self.options.topology
        assert topology is not None
        current = topology.current()
        moved = leader_moved(self._topology_seen, current)
        self._topology_seen = current
        if moved is None:
            return
        old, new = moved
        what = former_leader(old, new, topology.description)
        purge = self.state.not_primary(old.address, what, now, self.state.generation)
        raise _disconnection(f"{old.address} leads to a {what}", purge)

    def _watch(self, dialect: Dialect, dbapi_conn: Any) -> _watchdog.Watchable | None:
        """Register a new DBAPI connection with the process's watchdog (see the module
        doc); None when it is off, the driver is not one we know, or the connection is a
        pgfailover connection (watched already)."""
        silence_limit = self.options.silence_limit
        if silence_limit is None:
            return None
        driver = _driver(dbapi_conn)
        probe_timeout = self.options.probe_timeout
        watched: _watchdog.Watchable
        if isinstance(driver, _FailoverAware):
            return None
        if isinstance(driver, psycopg.Connection | psycopg.AsyncConnection):
            watched = _PsycopgWatched(driver, silence_limit, probe_timeout)
        elif dialect.driver == "psycopg2":
            watched = _Psycopg2Watched(driver, silence_limit, probe_timeout)
        elif dialect.driver == "asyncpg":
            watched = _AsyncpgWatched(dbapi_conn, driver, silence_limit, probe_timeout)
        else:
            return None
        watched.via_pooler = self.state.pooler
        _watchdog.watch(watched)
        return watched

    # -- checkout
    def _on_checkout(
        self, dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        now = time.monotonic()
        topology = self.options.topology
        if topology is not None and topology.current() is not self._topology_seen:
            self._follow_topology(now)
        info = record.info
        generation = info.get(_GENERATION, -1)
        last_used = info.get(_CHECKED_AT, 0.0)
        info[_CHECKED_AT] = now
        if not self.state.needs_check(generation, last_used, self.options.recheck_interval, now):
            return
        try:
            report = self._probe(dbapi_conn, info)
        except Exception as ex:
            verdict = classify(ex, conn=_driver(dbapi_conn))
            if not verdict.discard_connection:
                raise
            purge = self.state.poisoned(generation, verdict, now)
            raise _disconnection(f"role probe at checkout failed: {verdict.message}", purge) from ex
        if report.writable:
            info[_CHECKED_AT] = now
            info[_GENERATION] = self.state.generation
            return
        endpoint = _endpoint(_driver(dbapi_conn), {})
        purge = self.state.not_primary(endpoint, finding(report), now, generation)
        raise _disconnection(f"{endpoint} leads to a {finding(report)}, not a primary", purge)

    # -- I/O helpers
    def _probe(self, dbapi_conn: Any, info: dict[Any, Any] | None) -> RoleReport:
        """The role of ``dbapi_conn``'s server: ParameterStatus when it can be trusted, else one
        query (leaving the connection idle, as found)."""
        driver = _driver(dbapi_conn)
        pooler = self.state.pooler
        if pooler is None and info is not None:
            pooler = info.get(_VIA_POOLER)
        if isinstance(driver, psycopg.Connection):
            report = probe(driver, pooler=pooler)
        elif isinstance(driver, psycopg.AsyncConnection):
            report = _await(aprobe(driver, pooler=pooler))
        else:
            report = self._dbapi_probe(dbapi_conn, driver, pooler)
        self.state.probed(report)
        if info is not None:
            _remember(info, report)
        return report

    @staticmethod
    def _dbapi_probe(dbapi_conn: Any, driver: Any, pooler: bool | None) -> RoleReport:
        if pooler is False:
            report = role_from_parameters(_parameter_getter(driver))
            if report is not None:
                return report
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(PROBE_SQL)
            row = cursor.fetchone()
        finally:
            cursor.close()
        dbapi_conn.rollback()
        return report_from_row(row, _client_pid(driver))

    def _null_pool(self) -> bool:
        engine = self._engine()
        return engine is not None and isinstance(engine.pool, NullPool)

    def _pause(self, seconds: float, woken: int) -> None:
        """Wait ``seconds`` before the next connection attempt, less if the monitor sees a
        writable primary meanwhile (or saw one since the wake-up count was ``woken``)."""
        if self._async:
            _await(self._wakeup.wait_async(seconds, woken))
        else:
            self._wakeup.wait(seconds, woken)


class _Wakeup:
    """Cuts short the connect loop's backoff waits when the monitor sees the primary back.

    Thread-safe. A waiter passes the :attr:`count` it read before deciding to wait: a
    wake-up that came in between ends the wait at once (none is lost). Sync waiters wait on
    a condition, async ones on a future of their own event loop, resolved through that
    loop (an AsyncEngine may be used from more than one loop in a process's life).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: wake-ups so far
        self.count = 0
        self._futures: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    def wake(self) -> None:
        """End every wait under way (from any thread)."""
        with self._cond:
            self.count += 1
            futures = list(self._futures)
            self._futures.clear()
            self._cond.notify_all()
        for loop, future in futures:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
                loop.call_soon_threadsafe(_resolve, future)

    def wait(self, seconds: float, seen: int) -> None:
        """Block up to ``seconds``, less after a wake-up (since the count was ``seen``)."""
        with self._cond:
            self._cond.wait_for(lambda: self.count != seen, seconds)

    async def wait_async(self, seconds: float, seen: int) -> None:
        """Async twin of :meth:`wait`, for the running event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._cond:
            if self.count != seen:
                return
            self._futures.add(entry)
        try:
            await asyncio.wait([future], timeout=seconds)
        finally:
            with self._cond:
                self._futures.discard(entry)
            future.cancel()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --------------------------------------------------------------------- public API

_registry: weakref.WeakKeyDictionary[Engine, Instrumentation] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def instrument(
    engine: Engine | AsyncEngine,
    *,
    recheck_interval: float | None = 10.0,
    timeout: float | None = None,
    pooler: bool | None = None,
    silence_limit: float | None = 5.0,
    probe_timeout: float = 3.0,
    topology: TopologySource | AsyncTopologySource | None = None,
    monitor: Monitor | bool = True,
) -> Instrumentation:
    """Make ``engine`` (an ``Engine`` or ``AsyncEngine``) survive failovers; see the module doc.

    Args:
        engine: a PostgreSQL engine using the psycopg, psycopg2 or asyncpg dialect.
        recheck_interval: a pooled connection last checked out at least this many seconds
            ago is probed at checkout; 0 probes at every checkout, None only during an
            outage. Default 10 s, as pgjdbc's and Npgsql's host recheck.
        timeout: how long a new connection waits for a writable primary before
            :class:`~pgfailover.errors.NoPrimaryAvailable` (seconds; default: the pool's
            own checkout timeout, 30 s for pools without one). 0 makes one attempt.
        pooler: True if a multiplexing pooler (PgBouncer) is in front of the servers: roles
            are always queried; False if not: ParameterStatus is trusted (no round trip);
            None (default) detects it per connection with the first probe.
        silence_limit: seconds an operation may be in flight with no sign of life before
            the process's watchdog asks the server, on a side connection, whether it is
            alive; one that does not answer gets the connection cut (see the module doc).
            A statement on a dead, blackholed or frozen server ends within about
            ``silence_limit + 2 * probe_timeout`` seconds. None turns the watchdog off for
            this engine. Default 5 s, as :attr:`pgfailover.Connection.silence_limit`.
        probe_timeout: seconds that bound the side connection's connect and its
            ``SELECT 1`` (a connect is given at least 2 s, libpq's minimum). Default 3 s.
        topology: where to find the leader (a :class:`~pgfailover.topology.TopologySource`
            for an ``Engine``, an :class:`~pgfailover.topology.AsyncTopologySource` for an
            ``AsyncEngine``, e.g. ``PatroniTopology``): new connections go to the leader it
            names (the URL's host and port are replaced), are fenced against it in-band,
            a failover verdict invalidates it, and a checkout that finds it naming another
            leader replaces the engine's connections. None (default): the URL's hosts.
        monitor: True (default) registers the engine with the process's shared
            :class:`~pgfailover.monitor.Monitor` (see the module doc), False
            keeps it on its own (during an outage it then probes by itself, one attempt
            at a time), a ``Monitor`` registers it with that one (its timings). The
            engine leaves it with :meth:`Instrumentation.remove` (or
            :func:`uninstrument`). ``TypeError`` for anything else; ``RuntimeError`` for
            a closed ``Monitor`` (nothing installed).

    Returns the :class:`Instrumentation` (counters, :meth:`~Instrumentation.remove`).
    Calling it again on the same engine returns the same object; with different options it
    raises ``ValueError`` (remove the first one before).
    """
    sync_engine = _sync(engine)
    if pooler is not None and not isinstance(pooler, bool):
        raise TypeError(f"pooler must be True, False or None, got {pooler!r}")
    if sync_engine.dialect.name != "postgresql":
        raise ValueError(
            f"instrument() needs a PostgreSQL engine, got dialect {sync_engine.dialect.name!r}"
        )
    _check_topology(topology, is_async=bool(sync_engine.dialect.is_async))
    if not isinstance(monitor, bool | Monitor):
        raise TypeError(
            "monitor must be True (the process monitor), False (none) or a "
            f"pgfailover.monitor.Monitor, got {type(monitor).__name__}"
        )
    options = Options(
        recheck_interval=_seconds("recheck_interval", recheck_interval),
        timeout=_seconds("timeout", _default_timeout(sync_engine) if timeout is None else timeout)
        or 0.0,
        pooler=pooler,
        silence_limit=_positive("silence_limit", silence_limit, off=True),
        probe_timeout=_positive("probe_timeout", probe_timeout, off=False) or 0.0,
        topology=topology,
        monitor=monitor,
    )
    with _registry_lock:
        existing = _registry.get(sync_engine)
        if existing is not None:
            if existing.options != options:
                raise ValueError(
                    f"this engine is already instrumented with {existing.options}; "
                    "call uninstrument(engine) first to change the options"
                )
            return existing
        instrumentation = Instrumentation(sync_engine, options)
        instrumentation._register()
        instrumentation._install(sync_engine)
        _registry[sync_engine] = instrumentation
    return instrumentation


def uninstrument(engine: Engine | AsyncEngine) -> bool:
    """Remove pgfailover's listeners from ``engine``; False if it was not instrumented."""
    sync_engine = _sync(engine)
    with _registry_lock:
        instrumentation = _registry.get(sync_engine)
    if instrumentation is None:
        return False
    instrumentation.remove()
    return True


def instrumentation_of(engine: Engine | AsyncEngine) -> Instrumentation | None:
    """The :class:`Instrumentation` of ``engine``, None if it is not instrumented."""
    sync_engine = _sync(engine)
    with _registry_lock:
        return _registry.get(sync_engine)


# ------------------------------------------------------------------ small helpers


def _sync(engine: Engine | AsyncEngine) -> Engine:
    """The base ``Engine``: the one behind an ``AsyncEngine`` (without importing
    SQLAlchemy's asyncio extension, which needs greenlet), and the one an ``OptionEngine``
    (``engine.execution_options(...)``) proxies, since it shares that engine's pool: both
    must resolve to one instrumentation, never a second set of pool listeners."""
    sync_engine = getattr(engine, "sync_engine", engine)
    if not isinstance(sync_engine, Engine):
        raise TypeError(f"expected an Engine or AsyncEngine, got {type(engine)!r}")
    while isinstance(proxied := getattr(sync_engine, "_proxied", None), Engine):
        sync_engine = proxied  # an OptionEngine: its options are per call, its pool shared
    return sync_engine


def _seconds(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be a number of seconds or None, got {type(value).__name__} {value!r}"
        )
    if not value >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, got {value!r}")
    return float(value)


def _positive(name: str, value: float | None, *, off: bool) -> float | None:
    """``value`` as seconds > 0; None only when ``off`` (the option can be turned off)."""
    if value is None and off:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        allowed = "a number of seconds > 0 or None" if off else "a number of seconds > 0"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _default_timeout(engine: Engine) -> float:
    timeout = getattr(engine.pool, "_timeout", None)
    return float(timeout) if isinstance(timeout, int | float) and timeout > 0 else 30.0


#: Each driver's own bound of one connection attempt, and its unit.
_CONNECT_BOUNDS = {
    "psycopg": "connect_timeout",
    "psycopg2": "connect_timeout",
    "asyncpg": "timeout",
}


def _bounded(dialect: Dialect, cparams: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``cparams`` with a bound on one connection attempt when the caller set none: the
    engine waits ``timeout`` seconds for a primary in all, while the drivers' own defaults
    (130 s for libpq's longest wait, 60 s for asyncpg) would let a single attempt to a
    silent host outlast it; and no attempt takes more than
    :data:`~pgfailover.policy.CONNECT_ATTEMPT_BOUND`, so a frozen host does not hold the
    next attempt back. libpq's minimum is 2 s. The caller's own value is kept."""
    key = _CONNECT_BOUNDS.get(dialect.driver)
    if key is None or key in cparams or ("dsn" in cparams and key in str(cparams["dsn"])):
        return cparams
    timeout = min(timeout, CONNECT_ATTEMPT_BOUND)  # then the next attempt can go elsewhere
    bound = max(2, math.ceil(timeout)) if key == "connect_timeout" else max(timeout, 0.1)
    return {**cparams, key: bound}


def _read_write(dialect: Dialect, cparams: dict[str, Any], pooler: bool | None) -> dict[str, Any]:
    """``cparams`` with ``target_session_attrs=read-write`` when they name several hosts,
    say nothing of it, and ``pooler`` is not True: as the pools' conninfo (and the monitor's
    watch of the engine) do. libpq and asyncpg then pass over hosts that answer as standbys
    instead of stopping at the first that answers; without it, once the first host of the
    list is a standby again (a switchover back, a rejoin), every new connection lands there
    and is refused, for as long as the list stays in that order. The caller's own value,
    or a ``dsn`` string, is kept as given."""
    if (
        pooler is True
        or dialect.driver not in _CONNECT_BOUNDS
        or "target_session_attrs" in cparams
        or "dsn" in cparams
    ):
        return cparams
    host = cparams.get("host")
    if isinstance(host, str):
        several = "," in host
    else:
        several = isinstance(host, list | tuple) and len(host) > 1
    return {**cparams, "target_session_attrs": "read-write"} if several else cparams


def _check_topology(topology: object, *, is_async: bool) -> None:
    expected: type[Any] = AsyncTopologySource if is_async else TopologySource
    if topology is not None and not isinstance(topology, expected):
        kind = "an AsyncEngine" if is_async else "an Engine"
        raise TypeError(
            f"topology for {kind} must be {'an' if is_async else 'a'} {expected.__name__} "
            "(for instance "
            f"{'Async' if is_async else ''}PatroniTopology), got {type(topology).__name__}"
        )


#: libpq's connection keywords: what a watch conninfo may carry.
_LIBPQ_KEYWORDS = frozenset(d.keyword.decode() for d in psycopg.pq.Conninfo.get_defaults())
#: asyncpg's names of connection arguments that libpq spells otherwise.
_ASYNCPG_KEYWORDS = {"database": "dbname"}
#: libpq's ``sslmode`` values (asyncpg's ``ssl`` accepts the same strings).
_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})


def _watch_target(engine: Engine, pooler: bool | None) -> WatchTarget | None:
    """The monitor's view of ``engine``: a libpq conninfo from the arguments its driver is
    given (see :meth:`Instrumentation._pgf_watch_target`); None when it cannot be made.

    A host list gets ``target_session_attrs=read-write`` unless it says otherwise or
    ``pooler`` is True, as the pools' conninfo does: the watch must find the primary among
    the hosts, not stop at the first one that answers."""
    driver = engine.dialect.driver
    if driver not in _CONNECT_BOUNDS:
        return None
    params = _driver_params(engine)
    if params is None:
        return None
    libpq: dict[str, str] = {}
    for name, value in params.items():
        if value is None:
            continue
        key = _ASYNCPG_KEYWORDS.get(name, name) if driver == "asyncpg" else name
        if driver == "asyncpg" and key == "ssl":
            if isinstance(value, bool):
                libpq["sslmode"] = "require" if value else "disable"
            elif isinstance(value, str) and value in _SSLMODES:
                libpq["sslmode"] = value
            else:  # an SSLContext: libpq cannot say the same
                return None
        elif key in _LIBPQ_KEYWORDS:  # not a driver option (prepare_threshold, context...)
            if isinstance(value, list | tuple):  # asyncpg's host and port lists
                libpq[key] = ",".join("" if v is None else str(v) for v in value)
            else:
                libpq[key] = str(value)
    if "," in libpq.get("host", "") and "target_session_attrs" not in libpq and pooler is not True:
        libpq["target_session_attrs"] = "read-write"
    return WatchTarget(Endpoint.of(libpq), make_conninfo("", **libpq))


def _driver_params(engine: Engine) -> Mapping[str, Any] | None:
    """The keyword arguments ``engine`` gives its driver: the URL's and the ``connect_args``,
    as ``create_engine`` assembled them for its default creator; the URL's alone when they
    cannot be read there; None when the pool has another creator (``creator``,
    ``async_creator``, a ``pool`` of one's own: only it knows where it connects)."""
    creator = getattr(engine.pool, "_creator", None)
    if (
        getattr(creator, "__module__", None) != "sqlalchemy.engine.create"
        or getattr(creator, "__qualname__", None) != "create_engine.<locals>.connect"
    ):
        return None
    code = getattr(creator, "__code__", None)
    cells = getattr(creator, "__closure__", None) or ()
    names = getattr(code, "co_freevars", ())
    for name, cell in zip(names, cells, strict=False):
        if name == "cparams":
            with contextlib.suppress(ValueError):  # an empty cell
                found = cell.cell_contents
                if isinstance(found, Mapping):
                    return found
    try:
        return engine.dialect.create_connect_args(engine.url)[1]
    except (exc.ArgumentError, ValueError):  # a malformed URL: the engine's connects say so
        return None


def _invalidate_pool(pool: Pool) -> None:
    """Mark every connection ``pool`` holds, checked in or out, as to be replaced at its
    next checkout: SQLAlchemy's pool invalidation by time, which only writes a timestamp
    (safe from any thread; the connections are closed by whoever checks them out)."""
    pool._invalidate(None, _checkin=False)  # type: ignore[arg-type]  # no connection: all


def _disconnection(message: str, purge: bool) -> exc.DisconnectionError:
    return exc.InvalidatePoolError(message) if purge else exc.DisconnectionError(message)


def _proxied(ctx: ExceptionContext) -> PoolProxiedConnection | None:
    """The pooled connection the error happened on, without ever reconnecting."""
    conn = ctx.connection
    if conn is None or conn.closed or conn.invalidated:
        return None
    try:
        return conn.connection
    except exc.SQLAlchemyError:
        return None


def _phase(ctx: ExceptionContext, proxied: PoolProxiedConnection | None, driver: Any) -> Phase:
    """What was in flight: a connect; a statement inside a transaction (the DBAPI
    connection is not in autocommit mode, so nothing it did can have committed); else
    unknown (a COMMIT, or an autocommit statement)."""
    if proxied is None:
        return Phase.CONNECT
    if ctx.statement is not None and getattr(driver, "autocommit", None) is False:
        return Phase.TRANSACTION
    return Phase.UNKNOWN


def _driver(dbapi_conn: Any) -> Any:
    """The driver's own connection: asyncio dialects wrap it in an adapter."""
    return getattr(dbapi_conn, "driver_connection", dbapi_conn)


def _read_only(dialect: Dialect, dbapi_conn: Any) -> bool | None:
    """Whether the session asked for read-only (``postgresql_readonly``), None if unknown."""
    if dbapi_conn is None:
        return None
    try:
        value = dialect.get_readonly(dbapi_conn)  # type: ignore[attr-defined]
    except Exception:  # not every dialect or connection state can tell
        return None
    return value if isinstance(value, bool) else None


def _parameter_getter(driver: Any) -> Callable[[str], str | None]:
    """ParameterStatus access: psycopg and psycopg2 (``info``), asyncpg (``get_settings``)."""
    info = getattr(driver, "info", None)
    getter = getattr(info, "parameter_status", None)
    if callable(getter):
        return getter  # type: ignore[no-any-return]
    get_settings = getattr(driver, "get_settings", None)
    if callable(get_settings):
        settings = get_settings()
        return lambda name: getattr(settings, name, None)
    return lambda name: None


def _client_pid(driver: Any) -> int | None:
    """The backend PID the client was given at start-up (a pooler's own, through one)."""
    info = getattr(driver, "info", None)
    pid = getattr(info, "backend_pid", None)
    if pid is None and callable(getattr(driver, "get_server_pid", None)):
        pid = driver.get_server_pid()
    return int(pid) if pid else None


def _host_port(driver: Any) -> tuple[str | None, int | None]:
    """The endpoint a driver connection was opened to; (None, None) if it cannot say."""
    try:
        info = getattr(driver, "info", None)
        if info is not None and getattr(info, "host", None) is not None:
            return str(info.host), int(info.port)
        addr = getattr(driver, "_addr", None)  # asyncpg
        if isinstance(addr, tuple) and len(addr) == 2:
            return str(addr[0]), int(addr[1])
    except Exception:  # a finished connection cannot say
        return None, None
    return None, None


def _endpoint(driver: Any, params: Mapping[str, Any]) -> str:
    host, port = _host_port(driver)
    if host is None:
        return _endpoint_of_params(params)
    return f"{host}:{port}"


def _endpoint_of_params(params: Mapping[str, Any]) -> str:
    host = params.get("host") or "localhost"
    port = params.get("port") or 5432
    return f"{host}:{port}"


def _node(driver: Any, via_pooler: bool | None, server: str | None) -> NodeInfo:
    host, port = _host_port(driver)
    pid = _client_pid(driver) if driver is not None else None
    return NodeInfo(host, port, pid, via_pooler, server)


def _remember(info: dict[Any, Any], report: RoleReport) -> None:
    """Keep what a probe learnt about a pooled connection in its record's ``info``."""
    if report.via_pooler is not None:
        info[_VIA_POOLER] = report.via_pooler
        watched = info.get(_WATCHED)
        if watched is not None:
            watched.via_pooler = report.via_pooler
    if report.server_address is not None:
        info[_SERVER] = report.server_address


def _close_quietly(dbapi_conn: Any) -> None:
    try:
        dbapi_conn.close()
    except Exception:  # already broken: nothing to free
        logger.debug("closing a rejected connection failed", exc_info=True)


# ------------------------------------------------------------- the watchdog's view

_ACTIVE = psycopg.pq.TransactionStatus.ACTIVE
_PSYCOPG2_ACTIVE = 1  # psycopg2.extensions.TRANSACTION_STATUS_ACTIVE (libpq's PQTRANS_ACTIVE)


class _PsycopgWatched(_watchdog.Watchable):
    """A psycopg 3 connection (sync or async) as the watchdog sees it: libpq's status."""

    def __init__(
        self,
        conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
        silence_limit: float,
        probe_timeout: float,
    ) -> None:
        super().__init__(silence_limit, probe_timeout)
        self._conn = conn

    def in_flight(self) -> bool:
        return not self._conn.closed and self._conn.pgconn.transaction_status == _ACTIVE

    def socket_fd(self) -> int:
        return self._conn.pgconn.socket

    def endpoint(self) -> str:
        return f"{self._conn.info.host}:{self._conn.info.port}"

    def conninfo(self) -> str:
        return _watchdog.side_conninfo(self._conn)


class _Psycopg2Watched(_watchdog.Watchable):
    """A psycopg2 connection as the watchdog sees it: libpq's status, read through
    ``conn.info`` (no lock: psycopg2 releases the GIL while it waits)."""

    def __init__(self, conn: Any, silence_limit: float, probe_timeout: float) -> None:
        super().__init__(silence_limit, probe_timeout)
        self._conn = conn

    def in_flight(self) -> bool:
        conn = self._conn
        return bool(conn.closed == 0 and conn.info.transaction_status == _PSYCOPG2_ACTIVE)

    def socket_fd(self) -> int:
        return int(self._conn.fileno())

    def endpoint(self) -> str:
        info = self._conn.info
        return f"{info.host}:{info.port}"

    def conninfo(self) -> str:
        info = self._conn.info
        options: dict[str, object] = dict(info.dsn_parameters)
        options.pop("hostaddr", None)
        options.update(host=info.host, port=info.port, password=info.password)
        return _watchdog.conninfo_of(options)


class _AsyncpgWatched(_watchdog.Watchable):
    """An asyncpg connection behind SQLAlchemy's adapter, as the watchdog sees it.

    asyncpg keeps no status a thread can read, so: a cursor execution holds the adapter's
    ``_execute_mutex``; a COMMIT or ROLLBACK of the adapter's transaction is under way when
    asyncpg has let go of it as the connection's top transaction (it does so right before
    sending) while it is still started. Progress: the protocol's ``queries_count``.
    """

    def __init__(self, adapter: Any, conn: Any, silence_limit: float, probe_timeout: float) -> None:
        super().__init__(silence_limit, probe_timeout)
        self._adapter = adapter
        self._conn = conn

    @property
    def _pgf_ops(self) -> int:
        return int(getattr(self._conn._protocol, "queries_count", 0))

    def in_flight(self) -> bool:
        conn, adapter = self._conn, self._adapter
        if conn.is_closed():
            return False
        mutex = getattr(adapter, "_execute_mutex", None)
        if mutex is not None and mutex.locked():
            return True
        xact = getattr(adapter, "_transaction", None)
        return (
            xact is not None
            and getattr(conn, "_top_xact", xact) is None
            and getattr(getattr(xact, "_state", None), "name", None) == "STARTED"
        )

    def socket_fd(self) -> int:
        return int(self._conn._transport.get_extra_info("socket").fileno())

    def endpoint(self) -> str:
        host, port = self._address()
        return f"{host}:{port}"

    def _address(self) -> tuple[str, str]:
        addr = self._conn._addr
        if isinstance(addr, tuple):
            return str(addr[0]), str(addr[1])
        path = str(addr)  # a Unix socket: <dir>/.s.PGSQL.<port>
        return os.path.dirname(path), path.rsplit(".", 1)[-1]

    def conninfo(self) -> str:
        params = self._conn._params
        host, port = self._address()
        password = getattr(params, "password", None)
        sslmode = getattr(getattr(params, "sslmode", None), "name", None)
        return _watchdog.conninfo_of(
            {
                "host": host,
                "port": port,
                "user": getattr(params, "user", None),
                "password": password if isinstance(password, str) else None,
                "dbname": getattr(params, "database", None),
                "sslmode": sslmode.replace("_", "-") if isinstance(sslmode, str) else None,
            }
        )
