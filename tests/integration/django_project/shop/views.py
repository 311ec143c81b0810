"""Views: a plain write, a transaction under ``pgfailover.django.AtomicRunner`` or
Django's own ``transaction.atomic``, a read.

The database alias is the ``db`` parameter; the key a ``key`` parameter (a new UUID when
absent).
"""

from __future__ import annotations

import uuid

from django.db import DatabaseError, connections, transaction  # type: ignore[import-untyped]
from django.http import HttpRequest, JsonResponse  # type: ignore[import-untyped]

from pgfailover.django import AtomicRunner

from .models import Item

_runners: dict[str, AtomicRunner] = {}


def _params(request: HttpRequest) -> tuple[str, str]:
    data = request.POST if request.method == "POST" else request.GET
    return str(data.get("db", "default")), str(data.get("key") or uuid.uuid4().hex)


def write(request: HttpRequest) -> JsonResponse:
    """Insert one Item in autocommit mode (one statement)."""
    db, key = _params(request)
    item = Item.objects.using(db).create(key=key)
    return JsonResponse({"id": item.id})


def atomic_write(request: HttpRequest) -> JsonResponse:
    """Insert one Item and read it back in one transaction, retried by pgfailover."""
    db, key = _params(request)
    runner = _runners.get(db)
    if runner is None:
        runner = _runners[db] = AtomicRunner(db, timeout=30)

    def work() -> int:
        item = Item.objects.using(db).create(key=key)
        return int(Item.objects.using(db).filter(pk=item.pk).count())

    return JsonResponse({"found": runner(work)})


def tx_write(request: HttpRequest) -> JsonResponse:
    """The same transaction as :func:`atomic_write` in Django's plain ``transaction.atomic``."""
    db, key = _params(request)
    with transaction.atomic(using=db):
        item = Item.objects.using(db).create(key=key)
        found = Item.objects.using(db).filter(pk=item.pk).count()
    return JsonResponse({"found": found})


def nested(request: HttpRequest) -> JsonResponse:
    """AtomicRunner inside an outer atomic block (refused: NestedAtomicError)."""
    db, key = _params(request)
    with transaction.atomic(using=db):
        AtomicRunner(db)(lambda: Item.objects.using(db).create(key=key))
    return JsonResponse({})


def backend_pid(request: HttpRequest) -> JsonResponse:
    """The server process of this request's connection."""
    db, _ = _params(request)
    wrapper = connections[db]
    wrapper.ensure_connection()
    return JsonResponse({"pid": wrapper.connection.info.backend_pid})


def server(request: HttpRequest) -> JsonResponse:
    """The port of the server this request's connection leads to (``inet_server_port()``,
    so the server's own, through a pooler too), after a write on it."""
    db, key = _params(request)
    Item.objects.using(db).create(key=key)
    with connections[db].cursor() as cur:
        cur.execute("SELECT inet_server_port()")
        (port,) = cur.fetchone()
    return JsonResponse({"port": port})


def caught_failover(request: HttpRequest) -> JsonResponse:
    """A write that meets a standby's 0A000 (simulated on the live primary) and catches it."""
    db, key = _params(request)
    wrapper = connections[db]
    wrapper.ensure_connection()
    wrapper.connection.simulate_recovery()
    try:
        Item.objects.using(db).create(key=key)
    except DatabaseError as ex:
        return JsonResponse({"caught": type(ex).__name__})
    return JsonResponse({"caught": None})


def read(request: HttpRequest) -> JsonResponse:
    """Count the Items."""
    db, _ = _params(request)
    return JsonResponse({"count": Item.objects.using(db).count()})
