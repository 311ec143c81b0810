"""Fixtures shared by the integration tests (the clusters come from pgfailover's plugin)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import pgfailover
from pgfailover.events import RetryEvent
from pgfailover.testing import LocalCluster
from pgfailover.testing.proxy import FaultProxy


@pytest.fixture
def keys_table(pgfailover_cluster: LocalCluster) -> str:
    """A new table of unique keys ``(k text PRIMARY KEY)`` on the primary."""
    name = f"k_{uuid.uuid4().hex[:10]}"
    with pgfailover_cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (k text PRIMARY KEY)")
    return name


@pytest.fixture
def proxy(pgfailover_cluster: LocalCluster) -> Iterator[FaultProxy]:
    """A fault-injection proxy in front of the primary."""
    with FaultProxy(pgfailover_cluster.primary) as p:
        yield p


@pytest.fixture
def retry_events() -> Iterator[list[RetryEvent]]:
    """RetryEvents delivered to a subscribed hook during the test."""
    seen: list[RetryEvent] = []

    def hook(event: Any) -> None:
        if isinstance(event, RetryEvent):
            seen.append(event)

    unsubscribe = pgfailover.subscribe(hook)
    yield seen
    unsubscribe()
