"""Readiness: can this process write now? For Kubernetes readiness probes.

:func:`health` answers for one pool, instrumented engine or Django database alias (with
``ENGINE: "pgfailover.django"``), from what is known already:
the process monitor's watch of the pool's endpoint (:mod:`pgfailover.monitor`) when it has
one, otherwise what the pool's (or engine's) own requests and connection attempts last
saw. It never makes a database call: a probe every few seconds costs no round trip and
cannot hang on a frozen server. The answer is about *writability* (a primary accepting
writes is there), not about liveness: a standby answers ``SELECT 1`` and still refuses
every write, so ``SELECT 1`` is the wrong readiness check for a writer.

:func:`asgi_app` and :func:`wsgi_app` make tiny apps for a probe: every GET (or HEAD), on
any path, is answered ``200`` when every target is writable and ``503`` otherwise, with
``Content-Type: application/json``, ``Cache-Control: no-store`` and the body::

    {"writable": true, "targets": [{"writable": true, "endpoint": "db1:5432/app",
      "role": "primary", "since": 1764662400.1, "checked_at": 1764662431.9,
      "reason": "", "monitored": true}]}

(one :meth:`Health.as_dict <pgfailover.monitor.model.Health.as_dict>` per target, in
order). Other methods get ``405``. Both apps are plain callables with no dependency: mount
them next to an application (see ``docs/monitoring.md``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from . import _registry
from ._secrets import scrub, secret_candidates
from ._state import FailoverState
from .monitor.model import Endpoint, Health

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["ASGIApp", "WSGIApp", "asgi_app", "health", "wsgi_app"]

logger = logging.getLogger("pgfailover.readiness")

#: What :func:`health` accepts, for its ``TypeError``.
ACCEPTED = (
    "a pgfailover.ConnectionPool or pgfailover.AsyncConnectionPool, a SQLAlchemy "
    "Engine or AsyncEngine instrumented with pgfailover.sqlalchemy.instrument(), or a "
    "Django database alias (or its django.db.connections[alias]) with ENGINE "
    "'pgfailover.django'"
)

#: Role of a target that is closed, not open yet, or gone (the apps hold targets weakly).
CLOSED = "closed"

_READ_ONLY_FINDINGS = ("standby", "read-only primary")
_CONFIG_FINDING = "auth or configuration failure"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: An ASGI 3 application.
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: A WSGI (PEP 3333) application.
WSGIApp = Callable[["WSGIEnvironment", "StartResponse"], Iterable[bytes]]


# --------------------------------------------------------------------------- health


def health(target: object) -> Health:
    """Whether this process can write through ``target`` now, and why. No I/O.

    ``target``: a pgfailover ``ConnectionPool`` or ``AsyncConnectionPool``, a SQLAlchemy
    ``Engine``/``AsyncEngine`` instrumented with :func:`pgfailover.sqlalchemy.instrument`,
    or a Django database alias whose ``ENGINE`` is ``"pgfailover.django"``, given by name
    (``"default"``) or as its connection (``django.db.connections["default"]``,
    ``django.db.connection``); anything else (an engine not instrumented, an alias of
    another engine or not configured included) raises ``TypeError``.

    - A pool (or an engine's instrumentation) registered with a monitor (``monitor=True``
      or a ``Monitor``) gets the monitor's answer for its endpoint (``monitored=True``):
      writable while the last look found a writable primary there. Before the first look
      (just after the pool opened) it is not writable (``role="unknown"``, for a few
      milliseconds).
    - A pool or an instrumented engine the monitor does not watch (``monitor=False``, a
      callable conninfo) is answered from its own failover state
      (``monitored=False``): not writable while an outage its requests or connection
      attempts met is not over (``since`` = when it was noticed, ``role`` ``down``,
      ``read-only`` or ``unknown`` from what each host was found to be) or after an
      authentication or configuration failure (``role="misconfigured"``); writable
      otherwise (``role="primary"``, ``since=None``). ``checked_at`` is None: nothing
      looks on a schedule. Such a target turns writable again only when one of its
      connection attempts reaches a primary: a pool refills itself (``min_size > 0``), an
      engine connects only for a request.
    - A pool that is closed or not open yet is not writable (``role="closed"``, the
      reason says which).
    - A Django alias is answered as its pool when it has one (``OPTIONS {"pool": ...}``);
      otherwise from the monitor when ``OPTIONS["monitor"]`` is not False (the alias joins
      it here if it has not connected yet: no I/O in this call), else from the alias's
      failover state, shared by its threads, as for an unwatched pool.

    Times are ``time.time()`` values. No field ever holds a password.
    """
    pool_classes = _pool_classes()
    if pool_classes and isinstance(target, pool_classes):
        return _pool_health(target)
    instrumentation = _instrumentation(target)
    if instrumentation is not None:
        return _engine_health(target, instrumentation)
    wrapper = _django_wrapper(target)
    if wrapper is not None:
        return _django_health(wrapper)
    raise TypeError(f"health() needs {ACCEPTED}, got {_kind(target)}")


def _kind(target: object) -> str:
    """What ``target`` is, by type only (a conninfo string would show its password)."""
    kind = type(target)
    return f"a {kind.__module__}.{kind.__qualname__}"


def _pool_classes() -> tuple[type[Any], ...]:
    """The pool classes already imported: a pool exists only once its module is."""
    found: list[type[Any]] = []
    for module_name, class_name in (
        ("pgfailover.pool", "ConnectionPool"),
        ("pgfailover.pool_async", "AsyncConnectionPool"),
    ):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None:  # None too while the module is being imported
            found.append(cls)
    return tuple(found)


def _instrumentation(target: object) -> Any:
    """The instrumentation of an instrumented engine; None when ``target`` is no engine.

    SQLAlchemy is looked at only when it is imported already (no engine exists
    otherwise). ``TypeError`` for an engine that is not instrumented."""
    engine_module = sys.modules.get("sqlalchemy.engine.base")
    engine_class = getattr(engine_module, "Engine", None)
    if engine_class is None or not isinstance(getattr(target, "sync_engine", target), engine_class):
        return None
    import pgfailover.sqlalchemy  # noqa: PLC0415 - SQLAlchemy is imported already

    found = pgfailover.sqlalchemy.instrumentation_of(target)  # type: ignore[arg-type]
    if found is None or not found.installed:
        raise TypeError(
            f"health() needs {ACCEPTED}: this {type(target).__name__} is not instrumented "
            "(call pgfailover.sqlalchemy.instrument(engine) once, where it is created)"
        )
    return found


def _pool_health(pool: Any) -> Health:
    endpoint, secrets = _pool_endpoint(pool)
    if pool.closed:
        opened = getattr(pool, "_opened", True)
        reason = f"the pool {pool.name!r} is {'closed' if opened else 'not open yet'}"
        return Health(False, endpoint, CLOSED, None, None, reason, False)
    return _monitored(pool) or _state_health(pool.failover_state, endpoint, secrets)


def _monitored(member: Any) -> Health | None:
    """The monitor's answer for ``member`` (a pool, or an engine's instrumentation), None
    when no monitor watches its endpoint."""
    monitor = getattr(member, "_pgf_monitor", None)
    if monitor is None:
        return None
    found: Health | None = monitor.health(member)
    return found


def _pool_endpoint(pool: Any) -> tuple[str, list[str]]:
    """Where ``pool`` connects (``host:port/dbname``, as the monitor names endpoints) and
    the strings of its configuration that may be passwords."""
    from . import _pool_common  # noqa: PLC0415 - needs psycopg_pool, imported with the pool

    topology = getattr(pool, "topology", None)
    conninfo = pool.conninfo
    kwargs = pool.kwargs if isinstance(pool.kwargs, dict) else {}
    secrets = [str(kwargs[k]) for k in ("password", "sslpassword") if kwargs.get(k)]
    if isinstance(conninfo, str):
        secrets += secret_candidates(conninfo)
    if topology is not None:
        return str(topology.description), secrets
    target = _pool_common.watch_target(conninfo, pool.kwargs)
    return ("unknown" if target is None else str(target.endpoint)), secrets


def _engine_health(engine: Any, instrumentation: Any) -> Health:
    watched = _monitored(instrumentation)  # an engine registered with a monitor
    if watched is not None:
        return watched
    url = getattr(engine, "sync_engine", engine).url
    secrets = [url.password] if isinstance(url.password, str) and url.password else []
    topology = instrumentation.options.topology
    if topology is not None:
        endpoint = str(topology.description)
    else:
        host: Any = url.host or url.query.get("host")
        if isinstance(host, tuple):  # psycopg's multi-host URL: ?host=a:5432&host=b:5433
            host = ",".join(host)
        endpoint = str(
            Endpoint.of({"host": host, "port": url.port, "dbname": url.database or url.username})
        )
    return _state_health(instrumentation.state, endpoint, secrets)


def _django_wrapper(target: object) -> Any:
    """This thread's ``DatabaseWrapper`` of a Django alias given by name or connection;
    None when ``target`` is neither (or Django is not imported and configured).
    ``TypeError`` for an alias of another ``ENGINE``. A string that is no configured alias
    is never shown (it may be a conninfo with its password)."""
    db = sys.modules.get("django.db")
    settings = getattr(sys.modules.get("django.conf"), "settings", None)
    if db is None or settings is None or not settings.configured:
        return None
    connections = db.connections
    if isinstance(target, str):
        if target not in connections.settings:
            return None
        target = connections[target]
    else:
        proxy = getattr(sys.modules.get("django.utils.connection"), "ConnectionProxy", None)
        if proxy is not None and isinstance(target, proxy):  # django.db.connection
            target = connections[target.alias]
    django_base = sys.modules.get("django.db.backends.base.base")
    base_wrapper = getattr(django_base, "BaseDatabaseWrapper", None)
    if base_wrapper is None or not isinstance(target, base_wrapper):
        return None
    ours = getattr(sys.modules.get("pgfailover.django.base"), "DatabaseWrapper", None)
    if ours is None or not isinstance(target, ours):
        raise TypeError(
            f"health() needs {ACCEPTED}: the Django database {target.alias!r} uses "
            f"ENGINE {target.settings_dict.get('ENGINE')!r}"
        )
    return target


def _django_health(wrapper: Any) -> Health:
    pool = wrapper.pool
    if pool is not None:
        return _pool_health(pool)
    from .django import _monitor  # noqa: PLC0415 - Django is imported already

    wrapper.pgf_join_monitor()
    watched = _monitor.monitored_health(wrapper.alias)
    if watched is not None:
        return watched
    params = wrapper.get_connection_params()
    password = params.get("password")
    secrets = [password] if isinstance(password, str) and password else []
    topology = wrapper.pgf_topology
    endpoint = str(topology.description) if topology is not None else str(Endpoint.of(params))
    return _state_health(wrapper.pgf_state, endpoint, secrets)


def _state_health(state: FailoverState, endpoint: str, secrets: list[str]) -> Health:
    """The answer from a pool's or engine's own failover state (no monitor)."""
    fatal, outage, hosts = state.fatal, state.outage_since, dict(state.hosts)
    if fatal is None and outage is None:
        return Health(True, endpoint, "primary", None, None, "", False)
    since = None if outage is None else time.time() - (time.monotonic() - outage)
    if fatal is not None:
        found = [f"{where}: {what}" for where, what in hosts.items() if what.startswith("auth")]
        reason = "; ".join(found) or (
            f"{_CONFIG_FINDING}: the last connection attempt was refused ({type(fatal).__name__})"
        )
        return Health(False, endpoint, "misconfigured", since, None, scrub(reason, secrets), False)
    if any(what.startswith(_READ_ONLY_FINDINGS) for what in hosts.values()):
        role = "read-only"
    elif hosts:
        role = "down"
    else:
        role = "unknown"
    if hosts:
        reason = "no writable primary reached since the outage began: " + "; ".join(
            f"{where}: {what}" for where, what in hosts.items()
        )
    else:
        reason = (
            "requests met a failover error and no new connection has reached a writable "
            "primary since"
        )
    return Health(False, endpoint, role, since, None, scrub(reason, secrets), False)


# ----------------------------------------------------------------------------- apps


class _Targets:
    """What an app checks: the given targets, held weakly, or (none given) every pool and
    instrumented engine alive in the process, found at each check."""

    def __init__(self, targets: tuple[object, ...]) -> None:
        self._held: list[tuple[Callable[[], object | None], str]] = []
        for target in targets:
            endpoint = health(target).endpoint  # TypeError now, not at the first probe
            try:
                ref: Callable[[], object | None] = weakref.ref(target)
            except TypeError:  # no weak reference possible: hold it (none known today)
                ref = _Strong(target)
            self._held.append((ref, endpoint))
        self._discover = not targets

    def healths(self) -> list[Health]:
        if self._discover:
            return [_checked(t, "") for t in _process_targets()]
        found: list[Health] = []
        for ref, endpoint in self._held:
            target = ref()
            if target is None:
                reason = (
                    "the pool or engine no longer exists (collected): the app holds its "
                    "targets weakly, keep a reference to them"
                )
                found.append(Health(False, endpoint, CLOSED, None, None, reason, False))
            else:
                found.append(_checked(target, endpoint))
        return found

    def response(self) -> tuple[int, bytes]:
        """The status and JSON body of a GET."""
        healths = self.healths()
        writable = bool(healths) and all(h.writable for h in healths)
        body = {"writable": writable, "targets": [h.as_dict() for h in healths]}
        return (200 if writable else 503), json.dumps(body).encode()


class _Strong:
    """A strong reference with a weak reference's call."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __call__(self) -> object:
        return self._target


def _checked(target: object, endpoint: str) -> Health:
    """:func:`health`, never raising: a failure to tell is an answer (not writable)."""
    try:
        return health(target)
    except Exception as ex:  # a probe must get an answer, whatever happened to the target
        logger.warning(
            "readiness: cannot tell whether %s is writable: %s", endpoint, type(ex).__name__
        )
        logger.debug("readiness check failed", exc_info=True)
        reason = f"cannot tell: {type(ex).__name__}"
        return Health(False, endpoint, "unknown", None, None, reason, False)


def _process_targets() -> list[object]:
    """Every open pgfailover pool and instrumented engine of the process, and every Django
    alias registered with a monitor (by name)."""
    found: list[object] = list(_registry.pools())
    module = sys.modules.get("pgfailover.sqlalchemy")
    if module is not None:
        with module._registry_lock:
            items = list(module._registry.items())
        found.extend(engine for engine, instrumentation in items if instrumentation.installed)
    django_members = sys.modules.get("pgfailover.django._monitor")
    if django_members is not None:
        found.extend(django_members.aliases())
    return found


_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
_NOT_ALLOWED = b'{"error": "method not allowed: only GET and HEAD are answered"}'
_REASONS = {200: "OK", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _answer(method: str, targets: _Targets) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body for a request with ``method`` (HEAD: no body, the
    headers of a GET)."""
    if method not in ("GET", "HEAD"):
        status, body, extra = 405, _NOT_ALLOWED, [("Allow", "GET, HEAD")]
    else:
        status, body = targets.response()
        extra = []
    headers = [*_HEADERS, *extra, ("Content-Length", str(len(body)))]
    return status, headers, (b"" if method == "HEAD" else body)


class _ASGIReadiness:
    """The ASGI 3 app :func:`asgi_app` returns."""

    def __init__(self, targets: _Targets) -> None:
        self._targets = targets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            status, headers, body = _answer(scope["method"], self._targets)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif kind == "lifespan":
            while True:  # nothing to start or stop: acknowledge both
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # refused: HTTP 403
        else:
            raise ValueError(f"the readiness app serves http and lifespan, not {kind!r}")


class _WSGIReadiness:
    """The WSGI app :func:`wsgi_app` returns."""

    def __init__(self, targets: _Targets) -> None:
        self._targets = targets

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        status, headers, body = _answer(method, self._targets)
        start_response(f"{status} {_REASONS[status]}", headers)
        return [body]


def asgi_app(*targets: object) -> ASGIApp:
    """An ASGI 3 app answering readiness probes for ``targets`` (see the module doc).

    Every HTTP GET or HEAD, whatever its path, gets ``200`` when every target is writable
    (:func:`health`) and ``503`` otherwise, with the JSON body; other methods get ``405``.
    ``lifespan`` messages are acknowledged (servers with lifespan on work); a websocket is
    refused. With no target, the app checks every open pgfailover pool and instrumented
    engine of the process at each request (``503`` while there is none).

    Targets are held weakly: the app never keeps a pool or an engine alive, and one that
    was collected is answered not writable (``role="closed"``). Keep your own reference,
    as you do to use it. ``TypeError`` now for a target :func:`health` does not accept.
    Each request is answered in the server's event loop with no I/O and no await other
    than the two sends.
    """
    return _ASGIReadiness(_Targets(targets))


def wsgi_app(*targets: object) -> WSGIApp:
    """A WSGI app answering readiness probes for ``targets``: the same answers as
    :func:`asgi_app` (no lifespan in WSGI). Safe to call from many threads at once."""
    return _WSGIReadiness(_Targets(targets))
