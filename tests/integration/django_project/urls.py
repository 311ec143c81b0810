"""URLs of the test project."""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]

from .shop import views

urlpatterns = [
    path("write/", views.write),
    path("atomic-write/", views.atomic_write),
    path("tx-write/", views.tx_write),
    path("nested/", views.nested),
    path("pid/", views.backend_pid),
    path("server/", views.server),
    path("caught-failover/", views.caught_failover),
    path("read/", views.read),
]
