"""The test project in a subprocess, driven line by line over stdin/stdout (JSON).

``python -m tests.integration.django_project.serve`` (from the repository root, with
``PGF_DJANGO`` set) answers one JSON line per request line:

- ``{"op": "migrate", "db": alias}``: Django's ``migrate`` on that database;
- ``{"op": "request", "path": ..., "db": alias}`` (optional ``key``): one POST through
  Django's test client, wrapped in ``close_old_connections()`` before and after, as a
  WSGI server's ``request_started``/``request_finished`` signals do (the test client
  disconnects them so that a TestCase keeps its connection); answers the status and the
  JSON body, or for a failed request the error's type, SQLSTATE and message;
- ``{"op": "loop_start", "path": ..., "db": alias}`` / ``loop_progress`` / ``loop_stop``
  (with ``db``): the same requests back to back in a thread per alias until stopped;
  ``loop_progress`` answers how many are done, ``loop_stop`` the outcomes and the number
  of RetryEvents seen since the first loop started;
- ``{"op": "trace", "path": ..., "db": alias, "n": n}``: libpq round trips of ``n``
  requests on the alias's persistent connection, or its pool's only connection (after one
  warm-up request);
- ``{"op": "count", "db": alias}`` (optional ``key``): the number of Items (with that key);
- ``{"op": "retry_actions"}``: the actions of the RetryEvents seen since the last time;
- ``{"op": "wrapper", "db": alias}``: the error (type, message) of connecting the alias;
- ``{"op": "topology_refresh", "db": alias}``: refresh the alias's topology source (as
  any user sharing it may), answer the leader's ``host:port``;
- ``{"op": "health", "db": alias}`` (optional ``by``: ``"name"``, the default, or
  ``"connection"``): ``pgfailover.health()`` of the alias, the alias's failover counters,
  whether it knows of an outage and whether the process monitor has its member; for a
  target it refuses, the error's type and message;
- ``{"op": "ready"}``: one GET of ``pgfailover.readiness.wsgi_app()`` with no target (every
  pool, engine and monitored alias of the process): the status code and the JSON body;
- ``{"op": "testcase"}``: Django's own test runner on ``shop.tests``;
- ``{"op": "exit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import traceback
from typing import Any

import django  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integration.django_project.settings")
django.setup()

from django.core.management import call_command  # type: ignore[import-untyped]  # noqa: E402
from django.db import close_old_connections, connections  # type: ignore[import-untyped]  # noqa: E402
from django.test import Client  # type: ignore[import-untyped]  # noqa: E402

import pgfailover  # noqa: E402
from pgfailover.events import RetryEvent  # noqa: E402
from pgfailover.readiness import wsgi_app  # noqa: E402
from pgfailover.testing.trace import round_trips  # noqa: E402

_retries: list[RetryEvent] = []


def _on_event(event: Any) -> None:
    if isinstance(event, RetryEvent):
        _retries.append(event)


pgfailover.subscribe(_on_event)


def _sqlstate(error: BaseException | None) -> str | None:
    seen = 0
    while error is not None and seen < 10:
        code = getattr(error, "sqlstate", None)
        if code:
            return str(code)
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def request(client: Client, path: str, db: str, key: str = "") -> dict[str, Any]:
    """One request as a WSGI server runs it (connections checked before and after)."""
    close_old_connections()
    try:
        response = client.post(path, {"db": db, "key": key})
    finally:
        close_old_connections()
    result: dict[str, Any] = {"status": response.status_code}
    if response.status_code == 200:
        result["body"] = response.json()
    else:
        exc = response.exc_info[1] if response.exc_info else None
        result["error"] = type(exc).__name__ if exc is not None else ""
        result["sqlstate"] = _sqlstate(exc)
        result["message"] = str(exc).splitlines()[0] if exc is not None and str(exc) else ""
    return result


class Loop(threading.Thread):
    """Requests back to back until stopped (its own Django connections)."""

    def __init__(self, path: str, db: str) -> None:
        super().__init__(daemon=True)
        self.path, self.db = path, db
        self.results: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        client = Client(raise_request_exception=False)
        try:
            while not self.stop.is_set():
                self.results.append(request(client, self.path, self.db))
        finally:
            connections.close_all()


def trace(client: Client, path: str, db: str, n: int) -> int:
    """Round trips of ``n`` requests on the alias's persistent connection, or on its pool's
    only connection (a pool of ``max_size`` 1: each request checks the same one out)."""
    request(client, path, db)  # warm-up: the connection is open and checked
    wrapper = connections[db]
    pooled = getattr(wrapper, "pool", None) is not None
    wrapper.ensure_connection()
    pgconn = wrapper.connection.pgconn
    if pooled:
        wrapper.close()  # back to the pool, for the requests to check it out
    with tempfile.TemporaryFile("w+") as f:
        pgconn.trace(f.fileno())
        try:
            for _ in range(n):
                result = request(client, path, db)
                if result["status"] != 200:
                    raise RuntimeError(f"request failed: {result}")
        finally:
            pgconn.untrace()
        if pooled:
            wrapper.ensure_connection()
        same = wrapper.connection is not None and wrapper.connection.pgconn is pgconn
        if pooled:
            wrapper.close()
        if not same:
            raise RuntimeError("the connection changed during the trace")
        f.seek(0)
        return round_trips(f.read())


def ready() -> dict[str, Any]:
    """One GET of the WSGI readiness app with no target (it finds them at each request)."""
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)

    body = b"".join(wsgi_app()({"REQUEST_METHOD": "GET"}, start_response))
    return {"status": int(statuses[0].split()[0]), "body": json.loads(body)}


def testcase() -> dict[str, Any]:
    """Django's test runner on the project's TestCase (it creates and drops its database)."""
    from django.test.runner import (  # type: ignore[import-untyped]  # noqa: PLC0415
        DiscoverRunner,  # only this op needs it
    )

    runner = DiscoverRunner(verbosity=0, interactive=False)
    failures = runner.run_tests(["tests.integration.django_project.shop.tests"])
    return {"failures": int(failures)}


def handle(  # noqa: PLR0911, PLR0912 - one branch per op
    client: Client, message: dict[str, Any], state: dict[str, Any]
) -> dict[str, Any]:
    """Answer one message."""
    op = message["op"]
    db = message.get("db", "default")
    if op == "migrate":
        call_command("migrate", database=db, verbosity=0)
        return {"ok": True}
    if op == "request":
        return request(client, message["path"], db, message.get("key", ""))
    if op == "retry_actions":  # the RetryEvents' actions since the last time
        actions = [event.action for event in _retries]
        _retries.clear()
        return {"actions": actions}
    loops: dict[str, Loop] = state.setdefault("loops", {})
    if op == "loop_start":
        if not loops:
            _retries.clear()
        loop = loops[db] = Loop(message["path"], db)
        loop.start()
        return {"ok": True}
    if op == "loop_progress":
        return {"done": len(loops[db].results)}
    if op == "loop_stop":
        loop = loops.pop(db)
        loop.stop.set()
        loop.join(60)
        if loop.is_alive():
            raise RuntimeError(f"the request loop on {db!r} did not stop within 60 s")
        return {"results": loop.results, "retries": len(_retries)}
    if op == "trace":
        return {"round_trips": trace(client, message["path"], db, int(message["n"]))}
    if op == "count":
        from .shop.models import Item  # noqa: PLC0415 - after django.setup()

        close_old_connections()  # like a request: the connection is checked first
        try:
            items = Item.objects.using(db)
            if message.get("key"):
                items = items.filter(key=message["key"])
            return {"count": items.count()}
        finally:
            close_old_connections()
    if op == "wrapper":  # what building the alias's DatabaseWrapper raises
        try:
            connections[db].ensure_connection()
        except Exception as ex:
            return {"error": type(ex).__name__, "message": str(ex)}
        return {"error": None}
    if op == "topology_refresh":  # what another user of the alias's topology would do
        topology = connections[db].pgf_topology.refresh()
        leader = topology.write_target
        return {"leader": leader.address if leader is not None else None}
    if op == "health":  # what a readiness probe of the alias answers, and its counters
        target: Any = connections[db] if message.get("by") == "connection" else db
        try:
            found = pgfailover.health(target)
        except TypeError as ex:
            return {"error": type(ex).__name__, "message": str(ex)}
        from pgfailover.django import _monitor  # noqa: PLC0415 - after django.setup()

        failover = connections[db].pgf_state
        return {
            "health": found.as_dict(),
            "stats": failover.stats(),
            "outage": failover.outage_since is not None,
            "member": db in _monitor.aliases(),
        }
    if op == "ready":  # a readiness probe of the whole process
        return ready()
    if op == "testcase":
        return testcase()
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    # the protocol owns stdout: whatever Django prints (the test runner...) goes to stderr
    protocol, sys.stdout = sys.stdout, sys.stderr
    client = Client(raise_request_exception=False)
    state: dict[str, Any] = {}
    for line in sys.stdin:
        message = json.loads(line)
        if message["op"] == "exit":
            break
        try:
            answer = handle(client, message, state)
        except Exception as ex:
            answer = {"exception": f"{type(ex).__name__}: {ex}", "tb": traceback.format_exc()}
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()
    connections.close_all()


if __name__ == "__main__":
    main()
