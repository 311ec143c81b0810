"""Readiness through real HTTP servers on a real cluster: 200, 503 during the outage, 200.

The ASGI app is served by uvicorn (lifespan on), the WSGI app by wsgiref's server, each in
a thread on a reserved loopback port; both answer for a sync and an async pgfailover pool
registered with a fast private monitor. Every wait polls the HTTP endpoint with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import uvicorn

import pgfailover
from pgfailover.monitor import Monitor
from pgfailover.readiness import ASGIApp, WSGIApp, asgi_app, wsgi_app
from pgfailover.testing import LocalCluster
from pgfailover.testing._ports import release_port, reserve_port

from .support import eventually

#: Seconds the endpoint may take to turn 503 after the outage begins, or 200 after it ends:
#: generous, for a loaded machine (the monitor looks every 0.2 s, every 0.05 s in an outage).
DEADLINE = 30.0
#: The pools' connection arguments (PgBouncer in transaction mode: no prepared statements).
KWARGS: dict[str, Any] = {"prepare_threshold": None, "autocommit": True}


# ------------------------------------------------------------------- real HTTP servers


@contextlib.contextmanager
def _uvicorn(app: ASGIApp) -> Iterator[int]:
    """uvicorn serving ``app`` (lifespan on: a failed lifespan would stop it) on a
    reserved loopback port, in a thread; yields the port."""
    port = reserve_port()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        eventually(lambda: server.started or not thread.is_alive(), 15.0)
        assert server.started, "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(15.0)
        sock.close()
        release_port(port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""


@contextlib.contextmanager
def _wsgiref(app: WSGIApp) -> Iterator[int]:
    """wsgiref's server serving ``app`` on a reserved loopback port, in a thread."""
    port = reserve_port()
    server: WSGIServer = make_server("127.0.0.1", port, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(15.0)
        release_port(port)


def _request(port: int, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request to ``/ready`` on a new connection: status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        conn.request(method, "/ready")
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def _poll(port: int, status: int) -> dict[str, Any]:
    """GET until the answer is ``status`` (failing after DEADLINE); its JSON body."""
    deadline = time.monotonic() + DEADLINE
    while True:
        got, headers, body = _request(port)
        if got == status:
            assert headers["content-type"] == "application/json"
            assert headers["cache-control"] == "no-store"
            answer: dict[str, Any] = json.loads(body)
            return answer
        assert time.monotonic() < deadline, f"still {got} after {DEADLINE} s: {body!r}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- pools


def _write(pool: pgfailover.ConnectionPool[Any]) -> None:
    """A statement only a primary runs (a standby cannot assign a transaction id)."""
    with pool.connection() as conn:
        conn.execute("SELECT txid_current()")


async def _awrite(pool: pgfailover.AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        await conn.execute("SELECT txid_current()")


@contextlib.asynccontextmanager
async def _pools(
    dsn: str,
) -> AsyncIterator[tuple[pgfailover.ConnectionPool[Any], pgfailover.AsyncConnectionPool[Any]]]:
    """A sync and an async pool on ``dsn``, open, registered with a fast private monitor."""
    monitor = Monitor(interval=0.2)
    options: dict[str, Any] = {"kwargs": KWARGS, "min_size": 1, "max_size": 2, "timeout": 20}
    sync_pool: pgfailover.ConnectionPool[Any] = pgfailover.ConnectionPool(
        dsn, monitor=monitor, open=False, **options
    )
    async_pool: pgfailover.AsyncConnectionPool[Any] = pgfailover.AsyncConnectionPool(
        dsn, monitor=monitor, open=False, **options
    )
    try:
        await asyncio.to_thread(sync_pool.open, True, 20.0)
        await async_pool.open(wait=True, timeout=20.0)
        yield sync_pool, async_pool
    finally:
        await async_pool.close()
        await asyncio.to_thread(sync_pool.close)
        monitor.close()


def _check_writable(answer: dict[str, Any], endpoint: str) -> None:
    assert answer["writable"] is True, answer
    assert [t["writable"] for t in answer["targets"]] == [True, True], answer
    assert {t["endpoint"] for t in answer["targets"]} == {endpoint}, answer
    assert all(t["monitored"] and t["role"] == "primary" for t in answer["targets"]), answer


def _check_not_writable(answer: dict[str, Any], cluster: LocalCluster) -> None:
    assert answer["writable"] is False, answer
    for target in answer["targets"]:
        assert target["writable"] is False, answer
        assert target["role"] in ("read-only", "down"), answer
        assert target["reason"], answer
        assert target["monitored"] is True, answer
    assert cluster.password not in json.dumps(answer)


# ----------------------------------------------------------------------------- tests


async def test_readiness_through_pgbouncer_is_503_during_the_failover_and_200_after_the_repoint(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Behind PgBouncer (transaction mode), through uvicorn and wsgiref: 200 (HEAD too)
    while the primary is there, 503 after a failover while PgBouncer still points at the
    old primary (now a standby), 200 again after the repoint, and both pools then write."""
    cluster = pgfailover_cluster
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    endpoint = f"{bouncer.address}/{cluster.dbname}"
    async with _pools(bouncer.dsn()) as (sync_pool, async_pool):
        with (
            _uvicorn(asgi_app(sync_pool, async_pool)) as asgi_port,
            _wsgiref(wsgi_app(sync_pool, async_pool)) as wsgi_port,
        ):
            ports = (asgi_port, wsgi_port)
            for port in ports:
                _check_writable(await asyncio.to_thread(_poll, port, 200), endpoint)
                status, headers, body = await asyncio.to_thread(_request, port, "HEAD")
                assert (status, body) == (200, b"")
                assert int(headers["content-length"]) > 0
                assert (await asyncio.to_thread(_request, port, "POST"))[0] == 405

            await asyncio.to_thread(cluster.failover)
            for port in ports:
                answer = await asyncio.to_thread(_poll, port, 503)
                _check_not_writable(answer, cluster)

            await asyncio.to_thread(cluster.repoint_pgbouncer, cluster.primary)
            for port in ports:
                _check_writable(await asyncio.to_thread(_poll, port, 200), endpoint)
            await asyncio.to_thread(_write, sync_pool)
            await _awrite(async_pool)


async def test_readiness_direct_multihost_is_503_while_no_primary_and_200_after_promotion(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Direct to the servers with a multi-host conninfo: 200, 503 once the primary is
    stopped (the other host is a standby), 200 once the standby is promoted, and both
    pools then write on it."""
    cluster = pgfailover_cluster
    old, standby = cluster.primary, cluster.standbys[0]
    dsn = cluster.multihost_dsn()
    async with _pools(dsn) as (sync_pool, async_pool):
        endpoint = pgfailover.health(sync_pool).endpoint
        assert endpoint == f"{old.address},{standby.address}/{cluster.dbname}"
        with (
            _uvicorn(asgi_app(sync_pool, async_pool)) as asgi_port,
            _wsgiref(wsgi_app(sync_pool, async_pool)) as wsgi_port,
        ):
            ports = (asgi_port, wsgi_port)
            for port in ports:
                _check_writable(await asyncio.to_thread(_poll, port, 200), endpoint)

            await asyncio.to_thread(cluster.stop, old)
            for port in ports:
                _check_not_writable(await asyncio.to_thread(_poll, port, 503), cluster)

            await asyncio.to_thread(cluster.promote, standby)
            for port in ports:
                _check_writable(await asyncio.to_thread(_poll, port, 200), endpoint)
            await asyncio.to_thread(_write, sync_pool)
            await _awrite(async_pool)
