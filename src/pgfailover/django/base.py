"""``ENGINE: "pgfailover.django"``: Django's own PostgreSQL backend, surviving failovers.

:class:`DatabaseWrapper` subclasses ``django.db.backends.postgresql.base.DatabaseWrapper``
and changes only what a failover needs (psycopg 3 only):

- connections are :class:`pgfailover.Connection`\\ s: a failover error (a standby's
  25006/0A000, a lost connection, a server shutting down) poisons the connection it
  happened on;
- with ``OPTIONS {"pool": True | {...}}`` (Django 5.1+) the pool is a
  :class:`pgfailover.ConnectionPool` (role-checked new connections, purge of a failed
  node's connections, fast reconnection) instead of psycopg_pool's, registered with the
  process monitor like every pgfailover pool (``{"pool": {"monitor": False}}`` opts out);
- :meth:`DatabaseWrapper.is_usable` (what ``CONN_HEALTH_CHECKS`` and the end-of-request
  check after an error call) is role-aware: a poisoned, closed, broken or failed
  connection, or one of a generation purged since it was opened or last checked (a
  failover seen on this database alias by another thread or by the process monitor), is
  unusable at no cost, and the server is asked (the core role probe) only when there is a
  reason: an outage is under way, the connection sat idle at least ``recheck_interval``
  seconds, or its socket received something while idle (the server or a pooler closing
  it). Otherwise the check costs no round trip;
- a poisoned connection, or one of a purged generation, is closed by Django's own
  ``close_if_unusable_or_obsolete`` (request_started and request_finished), whatever
  ``errors_occurred`` says and with or without ``CONN_HEALTH_CHECKS``, so the next request
  opens a new connection instead of writing to the standby again;
- during an outage a new connection is role-checked before use: one that reaches a standby
  is closed and :class:`~pgfailover.errors.NotWritable` (a ``psycopg.OperationalError``,
  ``django.db.OperationalError`` in a view) is raised;
- a multi-host ``HOST`` (``"db1,db2"``) gets libpq's ``target_session_attrs=read-write``
  unless ``OPTIONS`` sets it, says a pooler is in front, or names a topology;
- with ``OPTIONS {"topology": ...}`` (see :mod:`pgfailover.django._topology`): a new
  connection goes to the leader the topology names (``HOST``/``PORT`` are then only the
  topology's business), is checked in-band against it before use (a writable node that is
  not the leader is refused: fencing; one query per new connection), a failover verdict
  invalidates the topology so that the next connection refreshes it, and a persistent
  connection opened before the topology named another leader is closed at the end of its
  request, or refused by its next health check (no round trip: the topology is cached).
  With the pool, the pool gets the topology (``pgfailover.ConnectionPool(topology=)``);
- with ``OPTIONS {"monitor": True}`` (the default) the alias joins the process monitor
  (:mod:`pgfailover.monitor`, see :mod:`pgfailover.django._monitor`) at its first
  connection: one watch connection per endpoint (with a topology, per source object,
  following its leader) in the process, whatever the number of threads and aliases.
  When it finds no writable primary there, it purges the alias's generation (no I/O,
  from its thread), and each thread's persistent connection opened before is then closed
  by its own thread at the next request start or end (``close_if_unusable_or_obsolete``)
  or health check, without a round trip: an idle connection never meets the failover,
  the next request connects anew. With the pool, the pool registers itself (``monitor``
  is passed on to it).

Extra ``OPTIONS`` (taken out before psycopg sees the others): ``pooler`` (True: a
multiplexing pooler such as PgBouncer is in front, so the role is always asked with a
query; False: direct, ParameterStatus is trusted; None, the default: detected by the first
probe of each connection), ``recheck_interval`` (seconds, default 10; 0 probes at every
health check, None never for idleness alone), ``topology`` (None, the default: the
``HOST`` list, tried by libpq) and ``monitor`` (True, the default: the process's shared
:class:`~pgfailover.monitor.Monitor`; a ``Monitor`` of your own, for its timings; False:
none, the alias learns of a failover from its own requests only).
"""

from __future__ import annotations

import select
import threading
import types
from time import monotonic
from typing import Any

import django  # type: ignore[import-untyped]
import psycopg
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.db.backends.base.base import NO_DB_ALIAS  # type: ignore[import-untyped]
from django.db.backends.postgresql import base as _pg  # type: ignore[import-untyped]
from django.db.backends.postgresql import creation as _pg_creation
from django.db.backends.postgresql.psycopg_any import (  # type: ignore[import-untyped]
    is_psycopg3,
)
from psycopg.pq import TransactionStatus

from .. import _pool_common
from .._state import FailoverState, finding
from ..classify import Phase, classify
from ..connection import Connection
from ..errors import NotWritable
from ..events import _emit
from ..monitor import Monitor, TopologyTarget, WatchTarget
from ..probe import probe
from ..topology import Topology, TopologyError, TopologySource
from ..topology.model import ROUTING_KEYS, former_leader, leader_moved
from . import _monitor
from ._topology import base_conninfo, topology_from

if not is_psycopg3:  # pragma: no cover - Django picks psycopg 3 when both are installed
    raise ImproperlyConfigured(
        "ENGINE 'pgfailover.django' needs psycopg 3 (pip install 'psycopg[binary]'); "
        "Django loaded psycopg2"
    )

__all__ = ["DatabaseCreation", "DatabaseWrapper"]

#: Whether the installed Django has the ``pool`` option (5.1+).
HAS_POOL = django.VERSION >= (5, 1)
#: Seconds a connection may sit idle before its health check asks the server its role.
DEFAULT_RECHECK_INTERVAL = 10.0
#: ``OPTIONS`` keys of pgfailover's, taken out of the connection parameters.
_OUR_OPTIONS = ("pooler", "recheck_interval", "topology", "monitor")

_OK_STATUS = (TransactionStatus.IDLE, TransactionStatus.INTRANS)

_states: dict[str, FailoverState] = {}
_states_lock = threading.Lock()


def failover_state(alias: str) -> FailoverState:
    """The process's failover knowledge for one database alias (shared by its threads)."""
    with _states_lock:
        state = _states.get(alias)
        if state is None:
            state = _states[alias] = FailoverState(pooler=None, name=alias, on_event=_emit)
        return state


class _Driver(types.ModuleType):
    """psycopg as Django's backend sees it (``DatabaseWrapper.Database``), with ``connect``
    opening a :class:`pgfailover.Connection`; every other name is psycopg's own."""

    def __init__(self) -> None:
        super().__init__("psycopg", psycopg.__doc__)
        self.connect = Connection.connect

    def __getattr__(self, name: str) -> Any:
        return getattr(psycopg, name)


_DRIVER = _Driver()


def _socket_readable(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection's socket has something to read (the server or a pooler
    closed it, or sent a notice): no round trip, a zero-timeout ``poll`` (``select`` where
    there is no ``poll``). A socket that cannot be asked counts as readable: then the
    server is asked."""
    try:
        fd = conn.pgconn.socket
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def _locally_usable(conn: Any) -> bool:
    """What can be told without a round trip: open, not broken, not poisoned, and idle or
    in a healthy transaction."""
    return (
        conn is not None
        and not conn.closed
        and not getattr(conn, "broken", False)
        and getattr(conn, "poisoned", None) is None
        and conn.info.transaction_status in _OK_STATUS
    )


class DatabaseCreation(_pg_creation.DatabaseCreation):  # type: ignore[misc]
    """Django's PostgreSQL test database creation; the alias leaves the process monitor
    before its database is dropped or cloned (the watch connection would hold it open:
    ``DROP DATABASE`` and ``CREATE DATABASE ... TEMPLATE`` refuse a database in use). It
    joins again, at the new ``NAME``, with its next connection."""

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> Any:
        _monitor.leave(self.connection.alias)
        return super()._destroy_test_db(test_database_name, verbosity)

    def _clone_test_db(self, suffix: str, verbosity: int, keepdb: bool = False) -> Any:
        _monitor.leave(self.connection.alias)
        return super()._clone_test_db(suffix, verbosity, keepdb)


class DatabaseWrapper(_pg.DatabaseWrapper):  # type: ignore[misc]
    """Django's PostgreSQL ``DatabaseWrapper`` with pgfailover's connections (see the
    module doc). ``vendor`` stays ``"postgresql"``: ``django.contrib.postgres``, migrations
    and every PostgreSQL feature work unchanged."""

    display_name = "PostgreSQL (pgfailover)"
    Database = _DRIVER
    creation_class = DatabaseCreation
    # Pools per alias, apart from the stock backend's (a process may use both).
    _connection_pools: dict[str, Any] = {}  # noqa: RUF012 - Django's own shape: class-level

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.settings_dict.get("OPTIONS") or {}
        pooler = options.get("pooler")
        recheck = options.get("recheck_interval", DEFAULT_RECHECK_INTERVAL)
        monitor = options.get("monitor", True)
        try:
            _pool_common.check_options(recheck, pooler)
            _pool_common.check_monitor(monitor, Monitor)
        except (TypeError, ValueError) as ex:
            raise ImproperlyConfigured(f"DATABASES[{self.alias!r}]['OPTIONS']: {ex}") from None
        if options.get("pool") and not HAS_POOL:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['pool'] needs Django 5.1 or newer "
                f"(installed: {django.get_version()})"
            )
        self.pgf_pooler: bool | None = pooler
        self.pgf_recheck_interval: float | None = recheck
        #: ``OPTIONS["monitor"]``: True (the process monitor), False (none) or a Monitor.
        self.pgf_monitor: Monitor | bool = monitor
        #: The alias's topology source (shared by its threads), None without one.
        self.pgf_topology: TopologySource | None = topology_from(
            self.alias, options.get("topology"), self.settings_dict
        )

    @property
    def pgf_state(self) -> FailoverState:
        """This alias's failover state (generations, outage, counters) in this process."""
        return failover_state(self.alias)

    # -- connection parameters and the pool
    def get_connection_params(self) -> dict[str, Any]:
        params: dict[str, Any] = super().get_connection_params()
        for key in _OUR_OPTIONS:
            params.pop(key, None)
        host = str(params.get("host") or "")
        if (
            "," in host
            and "target_session_attrs" not in params
            and self.pgf_pooler is not True
            and self.pgf_topology is None
        ):
            params["target_session_attrs"] = "read-write"
        return params

    @property
    def pool(self) -> Any:
        """A :class:`pgfailover.ConnectionPool` per alias when ``OPTIONS["pool"]`` is set
        (Django 5.1+), else None. Its checkout check is the pool's role-aware one
        (``recheck_interval``, ``pooler`` from ``OPTIONS``), not psycopg_pool's
        ``check_connection`` (which passes on a standby)."""
        pool_options = self.settings_dict["OPTIONS"].get("pool")
        if not HAS_POOL or self.alias == NO_DB_ALIAS or not pool_options:
            return None
        if self.alias not in self._connection_pools:
            if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
                raise ImproperlyConfigured("Pooling doesn't support persistent connections.")
            options = {} if pool_options is True else dict(pool_options)
            try:
                from ..pool import ConnectionPool  # noqa: PLC0415 - the pool extra is optional
            except ImportError as err:  # pragma: no cover - depends on the installed extras
                raise ImproperlyConfigured(
                    "OPTIONS['pool'] needs psycopg_pool: pip install 'pgfailover[pool]'"
                ) from err
            connect_kwargs = self.get_connection_params()
            connect_kwargs["autocommit"] = True  # Django sets its own mode after checkout
            options.setdefault("recheck_interval", self.pgf_recheck_interval)
            options.setdefault("pooler", self.pgf_pooler)
            options.setdefault("monitor", self.pgf_monitor)
            conninfo = ""
            if self.pgf_topology is not None:
                options.setdefault("topology", self.pgf_topology)
                conninfo = base_conninfo(connect_kwargs)  # the leader's host and port added
                for key in ROUTING_KEYS:
                    connect_kwargs.pop(key, None)
            pool = ConnectionPool(
                conninfo,
                kwargs=connect_kwargs,
                open=False,
                configure=self._configure_connection,
                **options,
            )
            self._connection_pools.setdefault(self.alias, pool)
        return self._connection_pools[self.alias]

    # -- opening and closing
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if self.pool is not None:
            return super().get_new_connection(conn_params)  # the pool checked its role
        state = self.pgf_state
        topology = self.pgf_topology
        self._pgf_join_monitor(conn_params)
        if topology is not None:
            conn_params = self._pgf_leader_params(topology, conn_params, state)
        try:
            conn = super().get_new_connection(conn_params)
        except psycopg.Error as ex:
            verdict = classify(ex, phase=Phase.CONNECT)
            if verdict.is_failover and topology is not None:
                topology.invalidate()  # the next attempt asks where the leader is
            raise
        now = monotonic()
        conn.pool_generation = state.generation
        conn.pool_returned_at = now
        if topology is not None or state.outage_since is not None:
            self._pgf_check_new(conn, state, topology)
        return conn

    # -- the process monitor
    def pgf_join_monitor(self) -> _monitor.AliasMember | None:
        """Join the monitor ``OPTIONS["monitor"]`` names now rather than at the first new
        connection (:func:`pgfailover.health` does, so that readiness is watched from the
        start). Once per alias; no I/O in this thread (the watch connects in the monitor's).
        None with a pool (the pool registers itself when it opens), or ``monitor`` False."""
        if self.pool is not None:
            return None
        return self._pgf_join_monitor(self.get_connection_params())

    def _pgf_join_monitor(self, conn_params: dict[str, Any]) -> _monitor.AliasMember | None:
        if self.alias == NO_DB_ALIAS:  # Django's short-lived maintenance connections
            return None
        return _monitor.join(
            self.alias, self.pgf_monitor, self.pgf_state, self._pgf_watch_target(conn_params)
        )

    def _pgf_watch_target(self, conn_params: dict[str, Any]) -> WatchTarget | None:
        """Where the monitor's watch connects: the alias's own connection parameters (the
        watch leaves out what shapes cursors and adaptation); with a topology, the leader
        it names, followed by one watch per source object (a sync source: the monitor
        refreshes it in a thread of its own, sharing its cache with the alias's threads)."""
        topology = self.pgf_topology
        if topology is not None:
            return TopologyTarget.of(topology, base_conninfo(conn_params), conn_params, None)
        return _pool_common.watch_target("", conn_params)

    def _pgf_leader_params(
        self, topology: TopologySource, conn_params: dict[str, Any], state: FailoverState
    ) -> dict[str, Any]:
        """``conn_params`` with the host and port of the leader ``topology`` names (it
        refreshes itself when it must); NoLeader or TopologyUnavailable (both
        ``psycopg.OperationalError``) when it names none."""
        try:
            conninfo = topology.conninfo_for_leader(base_conninfo(conn_params))
        except TopologyError as ex:
            state.no_leader(topology.description, str(ex), monotonic())
            raise
        leader = psycopg.conninfo.conninfo_to_dict(conninfo)
        params = {k: v for k, v in conn_params.items() if k not in ROUTING_KEYS}
        params["host"], params["port"] = leader["host"], leader.get("port", 5432)
        return params

    def _pgf_check_new(
        self, conn: Connection[Any], state: FailoverState, topology: TopologySource | None
    ) -> None:
        """During an outage, or always with a topology: refuse a new connection that does
        not reach a writable primary (or, with a topology, the leader it names)."""
        try:
            report = probe(conn, pooler=self._pgf_pooler(state))
            fence = topology.validate(conn) if topology is not None and report.writable else None
        except psycopg.Error:
            conn.close()
            raise
        state.probed(report)
        refused = finding(report) if not report.writable else None
        if fence is not None and not fence.accepted:
            refused = f"node the topology refuses ({fence.reason})"
        if refused is not None:
            where = _pool_common.endpoint(conn)
            conn.close()
            state.not_primary(where, refused, monotonic(), -1)
            if topology is not None:
                topology.invalidate()
            raise NotWritable(report, where, refused)
        if topology is not None:
            conn.pgf_topology_seen = topology.current()  # type: ignore[attr-defined]
        state.connected(monotonic())

    def _pgf_leader_moved(self, conn: Any) -> bool:
        """Whether the topology names another leader (or none) than when ``conn`` was
        opened: then it is closed, as the pools purge such connections (it may still accept
        writes: a split brain). No I/O: the topology's cached view. The first connection to
        notice it records it (a ``generation purged`` event, the old leader's address)."""
        topology = self.pgf_topology
        if topology is None or conn is None:
            return False
        seen: Topology | None = getattr(conn, "pgf_topology_seen", None)
        moved = leader_moved(seen, topology.current())
        if moved is None:
            return False
        old, new = moved
        what = former_leader(old, new, topology.description)
        self.pgf_state.not_primary(
            old.address, what, monotonic(), getattr(conn, "pool_generation", -1)
        )
        return True

    def _pgf_obsolete(self, conn: Any) -> bool:
        """Whether a connection without a pool must end now, with no round trip: its
        generation was purged (a failover seen by another thread or by the monitor), or the
        topology names another leader than when it was opened."""
        purged = getattr(conn, "pool_generation", -1) != self.pgf_state.generation
        return purged or self._pgf_leader_moved(conn)

    def _pgf_pooler(self, state: FailoverState) -> bool | None:
        return self.pgf_pooler if self.pgf_pooler is not None else state.pooler

    def _close(self) -> Any:
        conn = self.connection
        verdict = getattr(conn, "poisoned", None)
        if verdict is not None and self.pool is None:
            # the pool counts its own in putconn()
            purge = self.pgf_state.poisoned(conn.pool_generation, verdict, monotonic())
            if (verdict.rediscover_primary or purge) and self.pgf_topology is not None:
                self.pgf_topology.invalidate()  # the next connection refreshes it, once
        return super()._close()

    # -- health
    def is_usable(self) -> bool:
        """Whether the connection may serve the next request: False without a round trip
        when it is poisoned, closed, broken, in a failed transaction, or of a purged
        generation (or, with a topology, opened before it named another leader); otherwise
        True without a round trip unless there is a reason to ask the server its role (see
        the module doc), and then True only if the server is a writable primary."""
        conn = self.connection
        if not _locally_usable(conn):
            return False
        if self.pool is not None:
            return True  # the pool checks the role at the next checkout when needed
        return self._pgf_usable(conn)

    def _pgf_usable(self, conn: Any) -> bool:
        """:meth:`is_usable` for an open connection without a pool."""
        if self._pgf_leader_moved(conn):
            return False
        state = self.pgf_state
        generation = getattr(conn, "pool_generation", -1)
        if generation != state.generation:
            return False  # purged: the pools close such connections too, unasked
        reason = state.needs_check(
            generation,
            getattr(conn, "pool_returned_at", 0.0),
            self.pgf_recheck_interval,
            monotonic(),
        )
        readable = _socket_readable(conn)
        if not reason and not readable:
            return True
        # Something arrived on an idle connection (a shutdown's FATAL, a pooler closing
        # it): only a round trip tells whether it is alive, whatever ParameterStatus says.
        pooler = True if readable else self._pgf_pooler(state)
        try:
            report = probe(conn, pooler=pooler)
        except psycopg.Error:
            return False  # a failover error poisoned it: closing it reports it
        state.probed(report)
        if not report.writable:
            where = _pool_common.endpoint(conn)
            state.not_primary(where, finding(report), monotonic(), generation)
            if self.pgf_topology is not None:
                self.pgf_topology.invalidate()
            return False
        conn.pool_generation = state.generation
        state.connected(monotonic())
        return True

    def close_if_unusable_or_obsolete(self) -> None:
        """Django's check at the start and end of each request, which also closes a
        poisoned connection (even when Django saw no error: the failure may have been
        caught) and, without a pool, one of a purged generation or opened before the
        topology named another leader (no round trip), and notes when the connection went
        idle, for the next health check."""
        conn = self.connection
        if conn is not None and (
            getattr(conn, "poisoned", None) is not None
            or (self.pool is None and self._pgf_obsolete(conn))
        ):
            self.close()
            return
        super().close_if_unusable_or_obsolete()
        conn = self.connection
        if conn is not None and self.pool is None:
            conn.pool_returned_at = monotonic()
