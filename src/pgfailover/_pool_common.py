"""What the sync and async pools share: no I/O of its own (see :mod:`pgfailover.pool_async`)."""

from __future__ import annotations

import random
import threading
import typing
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool.base import AttemptWithBackoff

from ._secrets import scrub, secret_candidates
from .errors import InvalidConninfo
from .monitor import Endpoint, WatchTarget
from .policy import CONNECT_ATTEMPT_BOUND, RECONNECT_POLICY

#: Seconds between two rechecks of a connection attempt held while the monitor watches an
#: outage: the monitor wakes held attempts at once when the primary is back; the recheck
#: only lets an attempt give up at ``reconnect_timeout``, or go on if the monitor stopped.
PARK_RECHECK = 1.0


class FastAttempt(AttemptWithBackoff):
    """psycopg_pool's reconnection attempt, on the failover schedule.

    The waits come from :data:`~pgfailover.policy.RECONNECT_POLICY` (full jitter, caps
    50 ms x1.5 up to 200 ms; 0 in the policy's testing mode): psycopg_pool's own schedule
    starts at 1 s and doubles, so after a repoint the pool could sit for seconds before
    trying again, while a failover is exactly when the primary comes back quickly.

    While ``misconfigured()`` is true (the last failure was an authentication or
    configuration error: retrying fast cannot help and floods the server's log), the waits
    are psycopg_pool's own (1 s +/-10 %, doubling), never shorter. The attempt gives up
    ``timeout`` seconds after its first wait, as psycopg_pool's does.
    """

    def __init__(self, *, timeout: float, misconfigured: Callable[[], bool]) -> None:
        super().__init__(timeout=timeout)
        self.retries = 0
        self._misconfigured = misconfigured
        self._slow = 0.0  # psycopg_pool's delay, grown while misconfigured

    def update_delay(self, now: float) -> None:
        if self.retries == 0:
            self.give_up_at = now + self.timeout
        self.retries += 1
        if self._misconfigured():
            if self._slow == 0.0:
                jitter = 1.0 + random.uniform(-self.DELAY_JITTER, self.DELAY_JITTER)  # noqa: S311
                self._slow = self.INITIAL_DELAY * jitter
            else:
                self._slow *= self.DELAY_BACKOFF
            wait = self._slow
        else:
            self._slow = 0.0
            wait = RECONNECT_POLICY.backoff(self.retries)
        self.delay = min(wait, max(0.0, self.give_up_at - now))


def endpoint(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """``host:port`` of a connection, ``unknown`` once it is finished."""
    try:
        return f"{conn.info.host}:{conn.info.port}"
    except psycopg.Error:
        return "unknown"


def conninfo_endpoint(conninfo: str) -> str:
    """The ``host:port`` list of a conninfo string (never its password)."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "unknown"
    hosts = str(params.get("host") or "localhost").split(",")
    ports = str(params.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    return ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=False))


def prefer_read_write(conninfo: Any, pooler: bool | None) -> Any:
    """Add target_session_attrs=read-write to a multi-host conninfo string (not behind a
    pooler: libpq's check reads ParameterStatus, which a pooler may serve stale)."""
    if not isinstance(conninfo, str) or pooler is True:
        return conninfo
    error: InvalidConninfo | None = None
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as ex:
        error = InvalidConninfo(
            "cannot parse the connection string: "
            + scrub(str(ex).strip(), secret_candidates(conninfo))
        )
    if error is not None:
        # raised outside the handler: psycopg's error quotes the string, password included,
        # and would stay reachable as the new error's __context__ even with "from None"
        raise error
    if "," in str(params.get("host", "")) and "target_session_attrs" not in params:
        return make_conninfo(conninfo, target_session_attrs="read-write")
    return conninfo


_failover_classes: dict[tuple[type[Any], type[Any]], type[Any]] = {}
_failover_classes_lock = threading.Lock()


def failover_class(
    connection_class: type[Any], base: type[Any], driver_class: type[Any]
) -> type[Any]:
    """The failover-aware class for a pool's ``connection_class``.

    ``base`` is pgfailover's ``Connection`` or ``AsyncConnection``, ``driver_class`` the
    psycopg class it extends. A subclass of ``base`` is used as is; any other subclass of
    ``driver_class`` (a
    user's own, with its row factory or an overridden ``close()``) gets a subclass that
    mixes pgfailover's behaviour in front of it, made once per class: ``isinstance`` holds
    for both. Anything else raises ``TypeError``.
    """
    # A parametrized class (Connection[DictRow]) is a generic alias: its class is the origin.
    connection_class = typing.get_origin(connection_class) or connection_class
    if isinstance(connection_class, type) and issubclass(connection_class, base):
        return connection_class
    if not (isinstance(connection_class, type) and issubclass(connection_class, driver_class)):
        raise TypeError(
            f"connection_class must be a {driver_class.__module__}.{driver_class.__name__} "
            f"subclass (pgfailover.{base.__name__} or your own), got "
            + (  # a class by name; any other value by type only (a DSN would show its password)
                repr(connection_class)
                if isinstance(connection_class, type)
                else f"a {type(connection_class).__name__}"
            )
        )
    with _failover_classes_lock:
        made: type[Any] | None = _failover_classes.get((connection_class, base))
        if made is None:
            made = _failover_classes[connection_class, base] = type(
                f"Failover{connection_class.__name__}",
                (base, connection_class),
                {"__module__": connection_class.__module__, "__doc__": connection_class.__doc__},
            )
    return made


def check_options(recheck_interval: float | None, pooler: bool | None) -> None:
    """``TypeError``/``ValueError`` naming the option for a bad pool argument."""
    if pooler is not None and not isinstance(pooler, bool):
        raise TypeError(f"pooler must be True, False or None, got {pooler!r}")
    if recheck_interval is not None and (
        isinstance(recheck_interval, bool) or not isinstance(recheck_interval, (int, float))
    ):
        raise TypeError(
            "recheck_interval must be a number of seconds or None, "
            f"got {type(recheck_interval).__name__}"
        )
    if recheck_interval is not None and recheck_interval < 0:
        raise ValueError(f"recheck_interval must be >= 0 seconds or None, got {recheck_interval}")


def check_topology(topology: Any, source_class: type[Any], conninfo: Any) -> None:
    """``TypeError`` for a ``topology=`` that is not a source of the pool's kind, or given
    with a conninfo that is not a string (the topology supplies host and port to it)."""
    if topology is None:
        return
    if not isinstance(topology, source_class):
        prefix = "Async" if source_class.__name__.startswith("Async") else ""
        raise TypeError(
            f"topology must be {'an' if prefix else 'a'} {source_class.__name__} (for "
            f"instance {prefix}PatroniTopology or {prefix}HostListTopology), got "
            f"{type(topology).__name__}"
        )
    if not isinstance(conninfo, str):
        raise TypeError(
            "with topology=, conninfo must be a string holding everything but the host and "
            f"port (dbname, user, ...), got {type(conninfo).__name__}"
        )


def connect_bound(conninfo: Any, kwargs: Any) -> float | None:
    """The bound a pool puts on each connection attempt (see
    :data:`~pgfailover.policy.CONNECT_ATTEMPT_BOUND`), None when the caller set its own
    ``connect_timeout`` (in the conninfo or the keyword arguments) or gave them as
    callables (then only they know)."""
    if not isinstance(conninfo, str) or (kwargs is not None and not isinstance(kwargs, dict)):
        return None
    if kwargs and "connect_timeout" in kwargs:
        return None
    try:
        if "connect_timeout" in conninfo_to_dict(conninfo):
            return None
    except psycopg.ProgrammingError:
        return None  # reported by prefer_read_write, with the password hidden
    return CONNECT_ATTEMPT_BOUND


def check_monitor(monitor: Any, monitor_class: type[Any]) -> None:
    """``TypeError`` for a ``monitor=`` that is neither a bool nor a Monitor."""
    if not isinstance(monitor, (bool, monitor_class)):
        raise TypeError(
            "monitor must be True (the process monitor), False (none) or a "
            f"pgfailover.monitor.Monitor, got {type(monitor).__name__}"
        )


def watch_target(conninfo: Any, kwargs: Any) -> WatchTarget | None:
    """What the monitor needs to watch a pool's endpoint; None when the conninfo or the
    keyword arguments are callables (resolved per connection: only they know) or cannot
    be parsed."""
    if not isinstance(conninfo, str) or (kwargs is not None and not isinstance(kwargs, dict)):
        return None
    kwargs = dict(kwargs or {})
    try:
        params: dict[str, Any] = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return None
    for key in ("host", "hostaddr", "port", "dbname", "user"):
        if kwargs.get(key) is not None:
            params[key] = kwargs[key]
    return WatchTarget(Endpoint.of(params), conninfo, kwargs)
