"""pgfailover.health and the readiness apps, without a database server.

Pools here point at a loopback port nobody listens on: an unmonitored pool with
``min_size=0`` opens without connecting, a monitored one gets a real "connection refused"
from its monitor's watch. The apps are called in-process with the ASGI and WSGI protocols.
"""

from __future__ import annotations

import gc
import inspect
import json
import time
import weakref
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine

import pgfailover
import pgfailover.sqlalchemy
from pgfailover import Phase, classify
from pgfailover._state import FailoverState
from pgfailover.monitor import Health, Monitor
from pgfailover.readiness import _state_health, asgi_app, health, wsgi_app
from pgfailover.testing._ports import release_port, reserve_port

SECRET = "s3cret-Pa55w0rd"
ROLES = {"primary", "read-only", "down", "misconfigured", "unknown", "closed"}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A loopback port reserved for the module, on which nothing listens."""
    reserved = reserve_port()
    yield reserved
    release_port(reserved)


def _dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} dbname=app user=app password={SECRET}"


def _pool(port: int, **kwargs: Any) -> pgfailover.ConnectionPool[Any]:
    return pgfailover.ConnectionPool(_dsn(port), **kwargs)


def _async_pool(port: int, **kwargs: Any) -> pgfailover.AsyncConnectionPool[Any]:
    return pgfailover.AsyncConnectionPool(_dsn(port), **kwargs)


@pytest.fixture
def idle_pool(port: int) -> Iterator[pgfailover.ConnectionPool[Any]]:
    """An open unmonitored pool that makes no connection (min_size=0)."""
    with _pool(port, min_size=0, max_size=1, monitor=False) as pool:
        yield pool


def _chain(ex: BaseException) -> str:
    parts: list[str] = []
    current: BaseException | None = ex
    while current is not None:
        parts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


# ------------------------------------------------------------------------ health()


@pytest.mark.parametrize("target", [f"password={SECRET}", None, 42, object()])
def test_anything_else_is_a_type_error_naming_what_is_accepted(target: object) -> None:
    """A conninfo string, None or any other object is a TypeError that names the accepted
    targets and the given type, never the value (a DSN would show its password)."""
    with pytest.raises(TypeError, match=r"ConnectionPool or .*AsyncConnectionPool") as info:
        health(target)
    assert f"got a {type(target).__module__}.{type(target).__qualname__}" in str(info.value)
    assert SECRET not in _chain(info.value)


def test_health_is_exported_lazily_from_the_package() -> None:
    """``pgfailover.health`` is the readiness function and is listed in ``__all__``."""
    assert pgfailover.health is health
    assert "health" in pgfailover.__all__


def test_a_pool_not_open_yet_is_not_writable(port: int) -> None:
    """A pool made with open=False is not writable and says it is not open yet."""
    pool = _pool(port, open=False)
    found = health(pool)
    assert not found.writable
    assert found.role == "closed"
    assert "not open yet" in found.reason
    assert found.endpoint == f"127.0.0.1:{port}/app"
    assert not found.monitored


def test_a_closed_pool_is_not_writable(port: int) -> None:
    """A pool once open, then closed, is not writable and the reason says it is closed."""
    pool = _pool(port, min_size=0, max_size=1, monitor=False)
    pool.close()
    found = health(pool)
    assert (found.writable, found.role) == (False, "closed")
    assert found.reason == f"the pool {pool.name!r} is closed"


def test_an_unmonitored_pool_answers_from_its_failover_state(
    idle_pool: pgfailover.ConnectionPool[Any],
) -> None:
    """Unmonitored: writable until its requests meet an outage, read-only while a probe
    found a standby (since = when the outage was noticed), writable again once a
    connection reaches a primary; checked_at stays None (nothing looks on a schedule)."""
    state = idle_pool.failover_state
    found = health(idle_pool)
    assert found == Health(True, found.endpoint, "primary", None, None, "", False)
    before = time.time()
    state.not_primary("127.0.0.1:5433", "standby", time.monotonic(), -1)
    found = health(idle_pool)
    assert (found.writable, found.role, found.monitored) == (False, "read-only", False)
    assert found.since is not None
    assert before - 1.0 <= found.since <= time.time() + 1.0
    assert found.checked_at is None
    assert "127.0.0.1:5433: standby" in found.reason
    state.connected(time.monotonic())
    assert health(idle_pool).writable


def test_a_failed_connection_during_an_outage_reads_down(
    idle_pool: pgfailover.ConnectionPool[Any],
) -> None:
    """A refused connection (a failover verdict) starts an outage: role down."""
    verdict = classify(psycopg.OperationalError("connection refused"), phase=Phase.CONNECT)
    idle_pool.failover_state.connect_failed("127.0.0.1:1", verdict, time.monotonic())
    found = health(idle_pool)
    assert (found.writable, found.role) == (False, "down")
    assert found.reason.startswith("no writable primary reached since the outage began")


def test_an_authentication_failure_reads_misconfigured_without_the_password(
    idle_pool: pgfailover.ConnectionPool[Any],
) -> None:
    """An auth failure is misconfigured; a driver message quoting the password is masked."""
    error = psycopg.OperationalError(f'password authentication failed for "{SECRET}"')
    verdict = classify(error, phase=Phase.CONNECT)
    state = idle_pool.failover_state
    state.connect_failed("127.0.0.1:1", verdict, time.monotonic())
    state.fatal = error  # what the pool's shell records with a configuration verdict
    found = health(idle_pool)
    assert (found.writable, found.role) == (False, "misconfigured")
    assert "auth or configuration failure" in found.reason
    assert SECRET not in json.dumps(found.as_dict())


def test_a_monitored_pool_answers_from_the_monitor(port: int) -> None:
    """Registered with a monitor: the watch's answer (monitored, checked_at set); a
    refused watch connection reads down, with no password in the reason."""
    monitor = Monitor(interval=0.2)
    try:
        with _pool(port, min_size=0, max_size=1, monitor=monitor) as pool:
            deadline = time.monotonic() + 10.0
            while (found := health(pool)).role == "unknown":
                assert time.monotonic() < deadline, found
                time.sleep(0.01)
            assert (found.writable, found.role, found.monitored) == (False, "down", True)
            assert found.checked_at is not None
            assert found.endpoint == f"127.0.0.1:{port}/app"
            assert SECRET not in json.dumps(found.as_dict())
        assert health(pool).role == "closed"
    finally:
        monitor.close()


async def test_an_async_pool_is_accepted(port: int) -> None:
    """An AsyncConnectionPool is answered like a sync one (open, then closed)."""
    async with _async_pool(port, min_size=0, max_size=1, monitor=False) as pool:
        assert health(pool).writable
    assert health(pool).role == "closed"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_engine_must_be_instrumented(port: int, kind: str) -> None:
    """An instrumented Engine or AsyncEngine is answered (endpoint from its URL, never its
    password): by a monitor watching it (nothing listens there: not writable) or from its
    own failover state (writable until a failure, then down); one not instrumented is a
    TypeError saying to call instrument()."""
    url = f"postgresql+psycopg://app:{SECRET}@127.0.0.1:{port}/app"
    engine: Any = sa.create_engine(url) if kind == "sync" else create_async_engine(url)
    try:
        with pytest.raises(TypeError, match=r"not instrumented .*instrument\(engine\)") as info:
            health(engine)
        assert SECRET not in _chain(info.value)
        instrumentation = pgfailover.sqlalchemy.instrument(engine)
        found = health(engine)
        assert found.monitored is not found.writable, found
        assert found.endpoint == f"127.0.0.1:{port}/app"
        verdict = classify(psycopg.OperationalError(f"refused {SECRET}"), phase=Phase.CONNECT)
        instrumentation.state.connect_failed("127.0.0.1:1", verdict, time.monotonic())
        found = health(engine)
        assert not found.writable
        assert found.role in ("down", "unknown")
        assert SECRET not in json.dumps(found.as_dict())
        pgfailover.sqlalchemy.uninstrument(engine)
        with pytest.raises(TypeError, match="not instrumented"):
            health(engine)
    finally:
        (engine if kind == "sync" else engine.sync_engine).dispose()


_FINDINGS = st.one_of(
    st.just("standby"),
    st.just("read-only primary (server 10.0.0.2:5432)"),
    st.builds(lambda s: f"down: {s}", st.text(max_size=20)),
    st.builds(lambda s: f"auth or configuration failure: {s}", st.text(max_size=20)),
    st.text(max_size=20),
)


@given(
    hosts=st.dictionaries(st.text(min_size=1, max_size=8), _FINDINGS, max_size=3),
    outage=st.booleans(),
    fatal=st.booleans(),
    leak=st.booleans(),
)
def test_the_state_answer_is_consistent_and_never_shows_a_secret(
    hosts: dict[str, str], outage: bool, fatal: bool, leak: bool
) -> None:
    """For any findings: writable exactly when no outage and no fatal error, a known
    role, a reason exactly when not writable, and a secret in a finding never shown."""
    state = FailoverState(pooler=None)
    state.hosts = {k: (f"{v} {SECRET}" if leak else v) for k, v in hosts.items()}
    state.outage_since = time.monotonic() if outage else None
    state.fatal = psycopg.OperationalError("refused") if fatal else None
    found = _state_health(state, "h:5432/app", [SECRET])
    assert found.writable is (not outage and not fatal)
    assert found.role in ROLES
    assert bool(found.reason) is (not found.writable)
    assert (found.since is None) is (not outage)
    assert SECRET not in json.dumps(found.as_dict())


# --------------------------------------------------------------------------- the apps


class _ASGICall:
    """One in-process ASGI call: the messages the app sent."""

    def __init__(self, incoming: list[dict[str, Any]] | None = None) -> None:
        self.incoming = list(incoming or [])
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return self.incoming.pop(0)

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))

    def response(self) -> tuple[int, dict[str, str], bytes]:
        start, body = self.sent
        assert start["type"] == "http.response.start"
        assert body["type"] == "http.response.body"
        headers = {k.decode(): v.decode() for k, v in start["headers"]}
        return start["status"], headers, body["body"]


async def _asgi_get(app: Any, method: str = "GET", path: str = "/") -> _ASGICall:
    call = _ASGICall([{"type": "http.request", "body": b"", "more_body": False}])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "method": method, "path": path}
    await app(scope, call.receive, call.send)
    return call


def _wsgi_get(app: Any, method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.append((status, headers))

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": "/ready"}, start_response))
    ((status, headers),) = seen
    return status, dict(headers), body


async def test_asgi_answers_200_when_every_target_is_writable_503_otherwise(
    idle_pool: pgfailover.ConnectionPool[Any], port: int
) -> None:
    """GET on any path: 200 with the JSON body when every target is writable, 503 when one
    is not (a closed pool); JSON, no-store, Content-Length of the body."""
    status, headers, body = (await _asgi_get(asgi_app(idle_pool), path="/any/path")).response()
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert headers["content-length"] == str(len(body))
    assert json.loads(body) == {"writable": True, "targets": [health(idle_pool).as_dict()]}
    closed = _pool(port, open=False)
    status, _, body = (await _asgi_get(asgi_app(idle_pool, closed))).response()
    assert status == 503
    answer = json.loads(body)
    assert answer["writable"] is False
    assert [t["writable"] for t in answer["targets"]] == [True, False]
    assert answer["targets"][1]["role"] == "closed"
    assert SECRET not in body.decode()


async def test_asgi_head_has_the_headers_of_get_and_no_body(
    idle_pool: pgfailover.ConnectionPool[Any],
) -> None:
    """HEAD: the status and headers of a GET (Content-Length included), an empty body."""
    app = asgi_app(idle_pool)
    _, get_headers, get_body = (await _asgi_get(app)).response()
    status, headers, body = (await _asgi_get(app, "HEAD")).response()
    assert (status, headers, body) == (200, get_headers, b"")
    assert headers["content-length"] == str(len(get_body))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_asgi_other_methods_get_405(
    idle_pool: pgfailover.ConnectionPool[Any], method: str
) -> None:
    """Any method but GET and HEAD gets 405 with ``Allow: GET, HEAD``."""
    status, headers, _ = (await _asgi_get(asgi_app(idle_pool), method)).response()
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


async def test_asgi_acknowledges_lifespan_startup_and_shutdown(
    idle_pool: pgfailover.ConnectionPool[Any],
) -> None:
    """The lifespan protocol: startup and shutdown are acknowledged, then the call ends."""
    call = _ASGICall([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    await asgi_app(idle_pool)(
        {"type": "lifespan", "asgi": {"version": "3.0"}}, call.receive, call.send
    )
    assert [m["type"] for m in call.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_asgi_refuses_a_websocket_and_rejects_unknown_scopes(
    idle_pool: pgfailover.ConnectionPool[Any],
) -> None:
    """A websocket is closed before acceptance (the server answers 403); an unknown scope
    type raises ValueError, as ASGI asks."""
    app = asgi_app(idle_pool)
    call = _ASGICall([{"type": "websocket.connect"}])
    await app({"type": "websocket", "path": "/"}, call.receive, call.send)
    assert [m["type"] for m in call.sent] == ["websocket.close"]
    with pytest.raises(ValueError, match="'telepathy'"):
        await app({"type": "telepathy"}, call.receive, call.send)


def test_wsgi_answers_like_the_asgi_app(
    idle_pool: pgfailover.ConnectionPool[Any], port: int
) -> None:
    """WSGI: 200/503 with the same JSON and headers, HEAD without a body, 405 otherwise."""
    app = wsgi_app(idle_pool)
    status, headers, body = _wsgi_get(app)
    assert status == "200 OK"
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == {"writable": True, "targets": [health(idle_pool).as_dict()]}
    status, head_headers, head_body = _wsgi_get(app, "HEAD")
    assert (status, head_headers, head_body) == ("200 OK", headers, b"")
    status, headers, _ = _wsgi_get(app, "POST")
    assert (status, headers["Allow"]) == ("405 Method Not Allowed", "GET, HEAD")
    closed = _pool(port, open=False)
    status, _, body = _wsgi_get(wsgi_app(closed))
    assert status == "503 Service Unavailable"
    assert json.loads(body)["writable"] is False


@pytest.mark.parametrize("make_app", [asgi_app, wsgi_app])
def test_an_app_rejects_a_bad_target_when_made(make_app: Any, port: int) -> None:
    """A target health() does not accept is a TypeError when the app is made, not at the
    first probe."""
    with pytest.raises(TypeError, match="health\\(\\) needs"):
        make_app(_pool(port, open=False), _dsn(port))


def test_an_app_holds_its_targets_weakly(port: int) -> None:
    """The app keeps no pool alive; once collected the target reads closed (503), with the
    endpoint it had."""
    pool = _pool(port, open=False)
    app = wsgi_app(pool)
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None
    status, _, body = _wsgi_get(app)
    assert status == "503 Service Unavailable"
    (target,) = json.loads(body)["targets"]
    assert target["role"] == "closed"
    assert "no longer exists" in target["reason"]
    assert target["endpoint"] == f"127.0.0.1:{port}/app"


def test_with_no_target_the_app_checks_every_open_pool_of_the_process(port: int) -> None:
    """No target: each request checks the process's open pools, present and future; a
    closed pool drops out."""
    app = wsgi_app()
    with _pool(port, min_size=0, max_size=1, monitor=False, name="readiness-discovered") as pool:
        endpoints = [t["endpoint"] for t in json.loads(_wsgi_get(app)[2])["targets"]]
        assert health(pool).endpoint in endpoints
        pool.failover_state.not_primary("127.0.0.1:1", "standby", time.monotonic(), -1)
        status, _, body = _wsgi_get(app)
        assert status == "503 Service Unavailable"
        mine = "127.0.0.1:1: standby"
        assert any(mine in t["reason"] for t in json.loads(body)["targets"])
    assert all(mine not in t["reason"] for t in json.loads(_wsgi_get(app)[2])["targets"])


@pytest.mark.parametrize("make_app", [asgi_app, wsgi_app])
def test_the_apps_are_callable_objects_not_functions(make_app: Any, port: int) -> None:
    """The apps are instances, not functions: Starlette's ``Route("/ready", app)`` (and
    FastAPI's) treats a function as a request handler and any other callable as an ASGI
    app, which is what the docs' mount example relies on."""
    app = make_app(_pool(port, open=False))
    assert callable(app)
    assert not inspect.isfunction(app)
    assert not inspect.ismethod(app)
