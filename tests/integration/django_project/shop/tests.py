"""A Django TestCase run by Django's own test runner on the backend under test."""

from __future__ import annotations

from django.db import connection  # type: ignore[import-untyped]
from django.test import TestCase  # type: ignore[import-untyped]

import pgfailover
from pgfailover.django import run_atomic

from .models import Item


class ItemTests(TestCase):  # type: ignore[misc]
    """Plain ORM work, and pgfailover's atomic inside the test's own transaction."""

    def test_create_and_count(self) -> None:
        """Rows written in a test are visible in it (and rolled back after it)."""
        Item.objects.create(key="a")
        Item.objects.create(key="b")
        assert Item.objects.count() == 2

    def test_starts_empty(self) -> None:
        """The other test's rows were rolled back."""
        assert Item.objects.count() == 0

    def test_run_atomic_inside_a_testcase_runs_once(self) -> None:
        """Inside a TestCase, run_atomic runs the work once in a savepoint."""
        assert run_atomic(lambda: Item.objects.create(key="c").key) == "c"
        assert Item.objects.filter(key="c").count() == 1

    def test_connections_are_pgfailover_connections(self) -> None:
        """The backend under test opens pgfailover connections (and keeps the vendor)."""
        connection.ensure_connection()
        assert isinstance(connection.connection, pgfailover.Connection)
        assert connection.vendor == "postgresql"
