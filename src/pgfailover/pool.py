"""``ConnectionPool`` and ``AsyncConnectionPool``: psycopg_pool pools that heal after a failover.

Drop-in subclasses of :class:`psycopg_pool.ConnectionPool` and
:class:`psycopg_pool.AsyncConnectionPool` (same constructor, same API) that use
:class:`pgfailover.Connection` and:

- discard a poisoned connection when it comes back (closing it, which in PgBouncer session
  mode is also what frees the server connection bound to the standby);
- purge the whole generation once when a verdict says the endpoint's node changed role or
  was lost: idle connections are closed at once, checked-out ones when they return
  (``drain()``); many threads hitting the failure at the same moment purge once;
- validate the role of every new connection with the core probe (no round trip on a direct
  connection once it is known to be direct; one query through a pooler), so the pool never
  fills with standby connections; with a multi-host conninfo and no pooler, libpq's
  ``target_session_attrs=read-write`` is added;
- check a connection at checkout only when there is a reason: an outage is under way, or it
  has been idle longer than ``recheck_interval``; the happy path costs no round trip;
- while no primary is reachable, reconnect with a fast capped backoff and a single prober
  at a time, so recovery follows the primary's return within a fraction of a second and the
  number of probes is bounded by time, not by the number of failing requests; when a request
  times out, raise :class:`~pgfailover.errors.NoPrimaryAvailable` saying what each host was;
  an authentication or configuration failure fails waiting requests at once with the
  driver's own error;
- count what happened in ``get_stats()``.

Decisions live in :class:`FailoverState` (no I/O); the two pool classes are thin shells.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from time import monotonic
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool as _AsyncPool
from psycopg_pool import ConnectionPool as _Pool
from psycopg_pool import PoolTimeout
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import AddConnection
from psycopg_pool.pool_async import AddConnection as AsyncAddConnection

from .classify import Kind, Phase, classify
from .connection import AsyncConnection, Connection
from .events import PoolEvent, emit
from .probe import RoleReport, aprobe, probe
from .state import FailoverState, finding

CT = TypeVar("CT", bound=Connection[Any])
ACT = TypeVar("ACT", bound=AsyncConnection[Any])

#: Largest wait between reconnection attempts while no primary is reachable.
MAX_RECONNECT_DELAY = 0.2


class _FastAttempt(AttemptWithBackoff):
    """Reconnection backoff for failovers: 50 ms +/-10 % jitter, x1.5, capped at 200 ms.

    psycopg_pool's own starts at 1 s and doubles, so after a repoint the pool could sit for
    seconds before trying again; a failover is exactly when the primary comes back quickly.
    """

    INITIAL_DELAY = 0.05
    DELAY_BACKOFF = 1.5

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, MAX_RECONNECT_DELAY)


class NotWritable(psycopg.OperationalError):
    """A new connection reached a server that cannot take writes (a standby, or read-only).

    Raised from the pool's connection set-up; the connection is closed first.
    """

    def __init__(self, report: RoleReport, endpoint: str) -> None:
        self.report = report
        self.endpoint = endpoint
        super().__init__(f"{endpoint} leads to a {finding(report)}, not a writable primary")


def _endpoint(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    try:
        return f"{conn.info.host}:{conn.info.port}"
    except psycopg.Error:
        return "unknown"


def _conninfo_endpoint(conninfo: str) -> str:
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "unknown"
    hosts = str(params.get("host") or "localhost").split(",")
    ports = str(params.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    return ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=False))


def _prefer_read_write(conninfo: Any, pooler: bool | None) -> Any:
    """Add target_session_attrs=read-write to a multi-host conninfo string (not behind a
    pooler: libpq's check reads ParameterStatus, which a pooler may serve stale)."""
    if not isinstance(conninfo, str) or pooler is True:
        return conninfo
    params = conninfo_to_dict(conninfo)
    if "," in str(params.get("host", "")) and "target_session_attrs" not in params:
        return make_conninfo(conninfo, target_session_attrs="read-write")
    return conninfo


def _check_options(
    connection_class: type[Any], base: type[Any], recheck_interval: float | None
) -> None:
    if not (isinstance(connection_class, type) and issubclass(connection_class, base)):
        raise TypeError(
            f"connection_class must be pgfailover.{base.__name__} or a subclass of it, "
            f"got {connection_class!r}"
        )
    if recheck_interval is not None and recheck_interval < 0:
        raise ValueError(f"recheck_interval must be >= 0 seconds or None, got {recheck_interval}")


class ConnectionPool(_Pool[CT]):
    """A :class:`psycopg_pool.ConnectionPool` that survives failovers (see the module doc).

    Extra arguments: ``recheck_interval`` (seconds; a connection idle at least this long is
    probed at checkout; 0 probes every checkout, None never; default 10), ``pooler`` (True if
    a multiplexing pooler such as PgBouncer is in front, False if not, None to detect it).
    ``connection_class`` must be :class:`pgfailover.Connection` or a subclass.
    """

    def __init__(
        self,
        conninfo: Any = "",
        *,
        connection_class: type[CT] = Connection,  # type: ignore[assignment]
        configure: Callable[[CT], None] | None = None,
        recheck_interval: float | None = 10.0,
        pooler: bool | None = None,
        **kwargs: Any,
    ) -> None:
        _check_options(connection_class, Connection, recheck_interval)
        self._pgf = FailoverState(pooler=pooler, on_event=self._pgf_event)
        self._pgf_configure_user = configure
        self.recheck_interval = recheck_interval
        super().__init__(
            _prefer_read_write(conninfo, pooler),
            connection_class=connection_class,
            configure=self._pgf_configure,
            **kwargs,
        )

    @property
    def failover_state(self) -> FailoverState:
        """The pool's failover knowledge and counters (read-only use)."""
        return self._pgf

    # -- connection life cycle
    def _pgf_configure(self, conn: CT) -> None:
        report = probe(conn, pooler=self._pgf.pooler)
        self._pgf.probed(report)
        if not report.writable:
            endpoint = _endpoint(conn)
            conn.close()
            raise NotWritable(report, endpoint)
        if self._pgf_configure_user is not None:
            self._pgf_configure_user(conn)

    def _connect(self, timeout: float | None = None) -> CT:
        try:
            conn = super()._connect(timeout)
        except NotWritable as ex:
            # a new connection belongs to no generation yet: nothing to purge (generation -1)
            self._pgf.not_primary(ex.endpoint, finding(ex.report), monotonic(), -1)
            raise
        except psycopg.Error as ex:
            self._pgf_connect_failed(ex)
            raise
        conn.pool_generation = self._pgf.generation
        conn.pool_returned_at = monotonic()
        self._pgf.connected(monotonic())
        return conn

    def _pgf_connect_failed(self, ex: psycopg.Error) -> None:
        verdict = classify(ex, phase=Phase.CONNECT)
        self._pgf.connect_failed(_conninfo_endpoint(self._resolve_conninfo()), verdict, monotonic())
        if verdict.kind is Kind.CONFIGURATION:
            self._pgf.fatal = ex
            with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for client in waiting:
                client.fail(ex)

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        attempt = attempt or _FastAttempt(timeout=self.reconnect_timeout)
        now = monotonic()
        if not self._pgf.may_connect(now):
            attempt.update_delay(now)
            if not attempt.time_to_give_up(now):
                self.schedule_task(AddConnection(self, attempt, growing=growing), attempt.delay)
                return
            super()._add_connection(attempt, growing)
            return
        try:
            super()._add_connection(attempt, growing)
        finally:
            self._pgf.connect_done()

    # -- checkout and return
    def getconn(self, timeout: float | None = None) -> CT:
        if (fatal := self._pgf.fatal) is not None and not self._pool:
            raise fatal.with_traceback(None)
        timeout = self.timeout if timeout is None else timeout
        deadline = monotonic() + timeout
        while True:
            try:
                conn = super().getconn(max(deadline - monotonic(), 0.0))
            except PoolTimeout as ex:
                raise (self._pgf.no_primary(timeout) or ex) from None
            if not self._pgf_needs_check(conn) or self._pgf_checkout_ok(conn):
                return conn

    def _pgf_needs_check(self, conn: CT) -> bool:
        return self._pgf.needs_check(
            conn.pool_generation, conn.pool_returned_at, self.recheck_interval, monotonic()
        )

    def _pgf_checkout_ok(self, conn: CT) -> bool:
        generation = conn.pool_generation
        try:
            report = probe(conn, pooler=self._pgf.pooler)
        except psycopg.Error:
            self.putconn(conn)  # poisoned by the failure: putconn discards it
            return False
        self._pgf.probed(report)
        if report.writable:
            conn.pool_generation = self._pgf.generation
            return True
        purge = self._pgf.not_primary(_endpoint(conn), finding(report), monotonic(), generation)
        conn.close()
        self.putconn(conn)
        if purge:
            self.drain()
        return False

    def putconn(self, conn: CT) -> None:
        conn.pool_returned_at = monotonic()
        verdict = conn.poisoned
        if verdict is not None:
            purge = self._pgf.poisoned(conn.pool_generation, verdict, monotonic())
            if not conn.closed:
                conn.close()
            super().putconn(conn)
            if purge:
                self.drain()
            return
        super().putconn(conn)

    def get_stats(self) -> dict[str, int]:
        return {**super().get_stats(), **self._pgf.stats()}

    def _pgf_event(self, event: PoolEvent) -> None:
        emit(dataclasses.replace(event, pool=getattr(self, "name", "")))


class AsyncConnectionPool(_AsyncPool[ACT]):
    """Async twin of :class:`ConnectionPool`, a :class:`psycopg_pool.AsyncConnectionPool`."""

    def __init__(
        self,
        conninfo: Any = "",
        *,
        connection_class: type[ACT] = AsyncConnection,  # type: ignore[assignment]
        configure: Callable[[ACT], Any] | None = None,
        recheck_interval: float | None = 10.0,
        pooler: bool | None = None,
        **kwargs: Any,
    ) -> None:
        _check_options(connection_class, AsyncConnection, recheck_interval)
        self._pgf = FailoverState(pooler=pooler, on_event=self._pgf_event)
        self._pgf_configure_user = configure
        self.recheck_interval = recheck_interval
        super().__init__(
            _prefer_read_write(conninfo, pooler),
            connection_class=connection_class,
            configure=self._pgf_configure,
            **kwargs,
        )

    @property
    def failover_state(self) -> FailoverState:
        """The pool's failover knowledge and counters (read-only use)."""
        return self._pgf

    async def _pgf_configure(self, conn: ACT) -> None:
        report = await aprobe(conn, pooler=self._pgf.pooler)
        self._pgf.probed(report)
        if not report.writable:
            endpoint = _endpoint(conn)
            await conn.close()
            raise NotWritable(report, endpoint)
        if self._pgf_configure_user is not None:
            await self._pgf_configure_user(conn)

    async def _connect(self, timeout: float | None = None) -> ACT:
        try:
            conn = await super()._connect(timeout)
        except NotWritable as ex:
            self._pgf.not_primary(ex.endpoint, finding(ex.report), monotonic(), -1)
            raise
        except psycopg.Error as ex:
            await self._pgf_connect_failed(ex)
            raise
        conn.pool_generation = self._pgf.generation
        conn.pool_returned_at = monotonic()
        self._pgf.connected(monotonic())
        return conn

    async def _pgf_connect_failed(self, ex: psycopg.Error) -> None:
        verdict = classify(ex, phase=Phase.CONNECT)
        conninfo = await self._resolve_conninfo()
        self._pgf.connect_failed(_conninfo_endpoint(conninfo), verdict, monotonic())
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
        attempt = attempt or _FastAttempt(timeout=self.reconnect_timeout)
        now = monotonic()
        if not self._pgf.may_connect(now):
            attempt.update_delay(now)
            if not attempt.time_to_give_up(now):
                await self.schedule_task(
                    AsyncAddConnection(self, attempt, growing=growing), attempt.delay
                )
                return
            await super()._add_connection(attempt, growing)
            return
        try:
            await super()._add_connection(attempt, growing)
        finally:
            self._pgf.connect_done()

    async def getconn(self, timeout: float | None = None) -> ACT:
        if (fatal := self._pgf.fatal) is not None and not self._pool:
            raise fatal.with_traceback(None)
        timeout = self.timeout if timeout is None else timeout
        deadline = monotonic() + timeout
        while True:
            try:
                conn = await super().getconn(max(deadline - monotonic(), 0.0))
            except PoolTimeout as ex:
                raise (self._pgf.no_primary(timeout) or ex) from None
            if not self._pgf_needs_check(conn) or await self._pgf_checkout_ok(conn):
                return conn

    def _pgf_needs_check(self, conn: ACT) -> bool:
        return self._pgf.needs_check(
            conn.pool_generation, conn.pool_returned_at, self.recheck_interval, monotonic()
        )

    async def _pgf_checkout_ok(self, conn: ACT) -> bool:
        generation = conn.pool_generation
        try:
            report = await aprobe(conn, pooler=self._pgf.pooler)
        except psycopg.Error:
            await self.putconn(conn)
            return False
        self._pgf.probed(report)
        if report.writable:
            conn.pool_generation = self._pgf.generation
            return True
        purge = self._pgf.not_primary(_endpoint(conn), finding(report), monotonic(), generation)
        await conn.close()
        await self.putconn(conn)
        if purge:
            await self.drain()
        return False

    async def putconn(self, conn: ACT) -> None:
        conn.pool_returned_at = monotonic()
        verdict = conn.poisoned
        if verdict is not None:
            purge = self._pgf.poisoned(conn.pool_generation, verdict, monotonic())
            if not conn.closed:
                await conn.close()
            await super().putconn(conn)
            if purge:
                await self.drain()
            return
        await super().putconn(conn)

    def get_stats(self) -> dict[str, int]:
        return {**super().get_stats(), **self._pgf.stats()}

    def _pgf_event(self, event: PoolEvent) -> None:
        emit(dataclasses.replace(event, pool=getattr(self, "name", "")))
