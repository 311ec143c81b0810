"""What the sync and async topology sources share: the in-band query (an I/O-free
generator), and HTTP GET in a daemon thread with a deadline.

HTTP uses the standard library only (``urllib.request``). Each request runs in a daemon
thread of its own and the caller waits for its future with a deadline: the sync caller
with ``Future.result(timeout)``, the async caller with ``asyncio.wait_for`` on the wrapped
future, so the event loop never blocks and no call outlives its budget, whatever the server
does (refuses, answers 500, never answers, trickles bytes). A request given up on is left to
its thread, which ends by itself: every socket operation has a timeout and the body is read
against the same deadline. Proxies from the environment (``http_proxy``...) are ignored:
the REST API of a cluster member is reached directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import inspect
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import psycopg
from psycopg.abc import PQGen

from .._protocol import row_of, simple_query
from ..survey import lsn_to_int
from .model import Observation


def wait_bound(timeout: float) -> dict[str, float]:
    """Keyword arguments bounding a connection's ``wait()`` by ``timeout`` seconds, where
    the installed psycopg has the parameter (3.3.6 and later). On 3.3.0-3.3.5 the in-band
    query is bounded by the connection's ``connect_timeout`` only until the first byte: a
    server that accepts and then never answers holds it."""
    return {"timeout": timeout} if _WAIT_HAS_TIMEOUT else {}


_WAIT_HAS_TIMEOUT = "timeout" in inspect.signature(psycopg.Connection.wait).parameters

#: The largest ``/cluster`` answer read (bytes); a larger one is an error.
MAX_BODY = 4 * 1024 * 1024

#: One round trip: recovery, read-only default, timeline, WAL position. On a primary the
#: timeline is the one WAL is written on now (from the current WAL file name); on a standby
#: it is the last restartpoint's (``pg_control_checkpoint()``), which may lag behind.
INBAND_SQL = (
    "SELECT pg_catalog.pg_is_in_recovery(),"
    " pg_catalog.current_setting('transaction_read_only') = 'on',"
    " CASE WHEN pg_catalog.pg_is_in_recovery()"
    " THEN (pg_catalog.pg_control_checkpoint()).timeline_id"
    " ELSE ('x' || pg_catalog.substr(pg_catalog.pg_walfile_name("
    "pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int END,"
    " (CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()"
    " ELSE pg_catalog.pg_current_wal_lsn() END)::text"
)
_INBAND_QUERY = INBAND_SQL.encode()


def inband_gen(conn: Any, host: str | None, port: int | None) -> PQGen[Observation]:
    """Run :data:`INBAND_SQL` on ``conn`` (driven by its ``wait()``) and return what it says
    about ``host``:``port``."""
    results = yield from simple_query(conn, _INBAND_QUERY)
    text = row_of(results[-1])
    lsn = bytes(text[3]).decode() if text[3] is not None else None
    return observation_of(
        host,
        port,
        in_recovery=text[0] == b"t",
        read_only=text[1] == b"t",
        timeline=text[2],
        lsn=lsn,
    )


def observation_of(
    host: str | None,
    port: int | None,
    *,
    in_recovery: bool,
    read_only: bool,
    timeline: object,
    lsn: str | None,
) -> Observation:
    """The :class:`Observation` of an :data:`INBAND_SQL` row, whatever the driver that read
    it (``timeline`` as text, bytes or an int)."""
    return Observation(
        host,
        port,
        in_recovery=in_recovery,
        writable=not in_recovery and not read_only,
        timeline=int(timeline) if timeline is not None else None,  # type: ignore[call-overload]
        wal_lsn=lsn_to_int(lsn) if lsn is not None else None,
    )


class HttpError(Exception):
    """An HTTP GET failed; the message says how in a few words (no URL credentials)."""


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float, ssl_context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url``: its body when the answer is 200, else :class:`HttpError`.

    Blocking; ``timeout`` (seconds) bounds each socket operation and the whole read of the
    body. Bodies larger than :data:`MAX_BODY` are refused.
    """
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - http(s) only, checked by the sources
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    opener = urllib.request.build_opener(*handlers) if ssl_context is not None else _opener
    try:
        with opener.open(request, timeout=timeout) as response:
            chunks: list[bytes] = []
            size = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HttpError(f"answer not complete within {timeout:.3g} s")
                _set_timeout(response, left)
                chunk = response.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY:
                    raise HttpError(f"answer larger than {MAX_BODY} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as ex:
        raise HttpError(f"HTTP {ex.code} {ex.reason}".rstrip()) from None
    except urllib.error.URLError as ex:
        raise HttpError(_reason(ex.reason)) from None
    except TimeoutError:  # socket.timeout too
        raise HttpError(f"no answer within {timeout:.3g} s") from None
    except (OSError, http.client.HTTPException) as ex:
        raise HttpError(_reason(ex)) from None


def _set_timeout(response: Any, seconds: float) -> None:
    sock = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(sock, "_sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(max(seconds, 0.001))


def _reason(reason: object) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "no answer in time"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    text = str(reason).strip()
    return text or type(reason).__name__


def start_get(
    url: str, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> concurrent.futures.Future[bytes]:
    """:func:`http_get` in a new daemon thread; its future (wait on it with a deadline)."""
    future: concurrent.futures.Future[bytes] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            body = http_get(url, timeout, ssl_context)
        except BaseException as ex:  # handed to the waiter, whatever it is
            future.set_exception(ex)
        else:
            future.set_result(body)

    threading.Thread(target=run, name="pgfailover-topology-http", daemon=True).start()
    return future


def wait_sync(future: concurrent.futures.Future[bytes], timeout: float) -> bytes:
    """The result of ``future`` within ``timeout`` seconds, else :class:`HttpError`."""
    try:
        return future.result(timeout)
    except (TimeoutError, concurrent.futures.TimeoutError):
        raise HttpError(f"no answer within {timeout:.3g} s") from None


async def wait_async(future: concurrent.futures.Future[bytes], timeout: float) -> bytes:
    """:func:`wait_sync` for a coroutine: the event loop runs while it waits."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise HttpError(f"no answer within {timeout:.3g} s") from None


def in_threads(calls: list[Any], timeout: float) -> list[Any]:
    """Run each zero-argument callable of ``calls`` in a daemon thread of its own and
    return their results in order; a call not done within ``timeout`` seconds, or that
    raised, gives its exception (``TimeoutError`` when late) in its place."""
    futures: list[concurrent.futures.Future[Any]] = []
    for call in calls:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        futures.append(future)

        def run(call: Any = call, future: concurrent.futures.Future[Any] = future) -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(call())
            except BaseException as ex:  # handed to the waiter, whatever it is
                future.set_exception(ex)

        threading.Thread(target=run, name="pgfailover-topology-check", daemon=True).start()
    concurrent.futures.wait(futures, timeout=timeout)
    results: list[Any] = []
    for future in futures:
        if not future.done():
            results.append(TimeoutError(f"no answer within {timeout:.3g} s"))
        elif (error := future.exception()) is not None:
            results.append(error)
        else:
            results.append(future.result())
    return results
