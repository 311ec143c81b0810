"""pgfailover.metrics after a real failover, read the way monitoring reads it: a Prometheus
scrape of a real ``CollectorRegistry`` (text format, parsed) and a collection by the
OpenTelemetry SDK's in-memory reader, for a sync and an async pool at once."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgfailover
from pgfailover.events import FailoverEvent, PoolEvent, RetryEvent
from pgfailover.metrics import otel, prometheus
from pgfailover.metrics._core import commit_outcome, label_value
from pgfailover.monitor import Monitor
from pgfailover.testing import LocalCluster

from .support import eventually, eventually_async, table

POOL_KWARGS: dict[str, Any] = {
    "kwargs": {"prepare_threshold": None},  # PgBouncer in transaction mode
    "min_size": 2,
    "max_size": 4,
    "timeout": 20,
}
KWARGS: dict[str, Any] = {"prepare_threshold": None}  # PgBouncer in transaction mode
POOLS = ("metrics-sync", "metrics-async")
#: Seconds PgBouncer keeps leading to the old primary after the failover is noticed.
OUTAGE = 0.5

Labels = tuple[tuple[str, str], ...]


@pytest.fixture
def seen_events() -> Iterator[list[pgfailover.Event]]:
    """Every event delivered to a hook during the test."""
    seen: list[pgfailover.Event] = []
    unsubscribe = pgfailover.subscribe(seen.append)
    yield seen
    unsubscribe()


def scrape(registry: CollectorRegistry) -> dict[tuple[str, Labels], float]:
    """The registry in Prometheus's text format, parsed: (sample, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def collect(reader: InMemoryMetricReader) -> dict[tuple[str, Labels], Any]:
    """One OpenTelemetry collection: (instrument, sorted attributes) -> its data point."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        (
            metric.name,
            tuple(sorted((k, str(v)) for k, v in (point.attributes or {}).items())),
        ): point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        for point in metric.data.data_points
    }


def settled(pool: Any) -> bool:
    """Refilled to its minimum, every connection idle, nobody waiting."""
    stats = pool.get_stats()
    return bool(
        stats["pool_size"] == stats["pool_available"] >= 2 and stats["requests_waiting"] == 0
    )


async def test_metrics_show_a_real_failover_for_sync_and_async_pools(
    pgfailover_cluster: LocalCluster, seen_events: list[pgfailover.Event]
) -> None:
    """Pools behind PgBouncer, one connection of each held across a failover (its write
    then fails on the old primary, now a standby); repoint after a while; a runner's
    transaction on each pool fails once with a serialization failure and commits. Scraped
    and collected: one failover and the purges each pool counted, one write-unavailable
    observation per pool whose sum is the pool's own recovery time (at least the wait for
    the repoint), no outage left, the pool gauges (idle = available, 0 used, max 4, 0
    pending), and the failover errors and retries the events carried."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    dsn = cluster.pgbouncer.dsn()
    name = table(cluster)
    insert = f"INSERT INTO {name} (writer) VALUES (1)"
    serialization_failure = (
        "DO $$ BEGIN RAISE EXCEPTION 'could not serialize access' "
        "USING ERRCODE = 'serialization_failure'; END $$"
    )
    attempts: collections.Counter[str] = collections.Counter()

    def flaky(conn: Any) -> None:
        attempts["sync"] += 1
        conn.execute(serialization_failure if attempts["sync"] == 1 else insert)

    async def aflaky(conn: Any) -> None:
        attempts["async"] += 1
        await conn.execute(serialization_failure if attempts["async"] == 1 else insert)

    registry = CollectorRegistry()
    collector = prometheus.register(registry)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = otel.instrument(provider)
    try:
        with pgfailover.ConnectionPool(dsn, name=POOLS[0], **POOL_KWARGS) as spool:
            async with pgfailover.AsyncConnectionPool(dsn, name=POOLS[1], **POOL_KWARGS) as apool:
                await asyncio.to_thread(spool.wait)
                await apool.wait()
                pools = (spool, apool)
                held = await asyncio.to_thread(spool.getconn)
                aheld = await apool.getconn()
                failover_started = time.monotonic()  # no pool can notice an outage before
                await asyncio.to_thread(cluster.failover)
                with pytest.raises(psycopg.Error):
                    await asyncio.to_thread(held.execute, insert)
                with pytest.raises(psycopg.Error):
                    await aheld.execute(insert)
                await asyncio.to_thread(spool.putconn, held)
                await apool.putconn(aheld)
                detected = lambda: all(p.get_stats()["failovers_detected"] for p in pools)  # noqa: E731
                await eventually_async(detected, timeout=30)
                await asyncio.sleep(OUTAGE)  # the time an operator or HA tool takes to repoint
                await asyncio.to_thread(cluster.repoint_pgbouncer, cluster.primary)
                await asyncio.wait_for(
                    asyncio.gather(
                        asyncio.to_thread(pgfailover.run_transaction, spool, flaky),
                        pgfailover.arun_transaction(apool, aflaky),
                    ),
                    timeout=60,
                )
                written_at = time.monotonic()  # each pool reached the new primary before
                await eventually_async(lambda: all(settled(p) for p in pools), timeout=30)
                stats = {p.name: p.get_stats() for p in pools}
                prom = scrape(registry)
                points = collect(reader)
    finally:
        collector.unregister()
        instruments.unregister()
        provider.shutdown()

    recoveries = {
        e.pool: e.recovery
        for e in seen_events
        if isinstance(e, PoolEvent) and e.action == "primary reached again"
    }
    for pool in POOLS:
        s, by_pool = stats[pool], (("pool", pool),)
        attrs = (("db.client.connection.pool.name", pool),)
        recovery = recoveries[pool]
        assert recovery is not None
        assert OUTAGE <= recovery <= written_at - failover_started, recovery
        # the failover and the purge, as the pool counted them
        assert s["failovers_detected"] == 1, s
        assert s["generations_purged"] >= 1, s
        assert prom[("pgfailover_failovers_detected_total", by_pool)] == 1
        assert prom[("pgfailover_generations_purged_total", by_pool)] == s["generations_purged"]
        assert prom[("pgfailover_connections_poisoned_total", by_pool)] == s["connections_poisoned"]
        assert prom[("pgfailover_probes_total", by_pool)] == s["probes_run"]
        assert prom[("pgfailover_outage_in_progress", by_pool)] == 0
        assert points[("pgfailover.failovers.detected", attrs)].value == 1
        assert points[("pgfailover.generations.purged", attrs)].value == s["generations_purged"]
        # the write-unavailable time: one outage, its sum the pool's own recovery time
        assert prom[("pgfailover_write_unavailable_seconds_count", by_pool)] == 1
        assert prom[("pgfailover_write_unavailable_seconds_sum", by_pool)] == pytest.approx(
            recovery
        )
        assert prom[("pgfailover_last_recovery_seconds", by_pool)] == s["recovery_ms_last"] / 1000
        assert abs(s["recovery_ms_last"] / 1000 - recovery) < 0.001
        histogram = points[("pgfailover.write_unavailable.duration", attrs)]
        assert isinstance(histogram, HistogramDataPoint)
        assert histogram.count == 1
        assert histogram.sum == pytest.approx(recovery)
        # the pool gauges, settled: every connection idle
        idle, used = (*by_pool, ("state", "idle")), (*by_pool, ("state", "used"))
        assert prom[("pgfailover_pool_connections", idle)] == s["pool_available"] >= 2
        assert prom[("pgfailover_pool_connections", used)] == 0
        assert prom[("pgfailover_pool_connections_max", by_pool)] == 4
        assert prom[("pgfailover_pool_pending_requests", by_pool)] == 0
        assert prom[("pgfailover_pool_timeouts_total", by_pool)] == s.get("requests_errors", 0)
        state = "db.client.connection.state"
        count = "db.client.connection.count"
        assert points[(count, (*attrs, (state, "idle")))].value == s["pool_available"]
        assert points[(count, (*attrs, (state, "used")))].value == 0
        assert points[("db.client.connection.max", attrs)].value == 4
        assert points[("db.client.connection.pending_requests", attrs)].value == 0

    # what only the events say: failover errors by kind and SQLSTATE, retries by action
    errors = collections.Counter(
        (e.verdict.kind.value, e.verdict.sqlstate or "")
        for e in seen_events
        if isinstance(e, FailoverEvent)
    )
    assert sum(errors.values()) >= 2, errors  # at least the two held connections
    for (kind, sqlstate), n in errors.items():
        assert (
            prom[("pgfailover_failover_errors_total", (("kind", kind), ("sqlstate", sqlstate)))]
            == n
        )
        status: Labels = (("db.response.status_code", sqlstate),) if sqlstate else ()
        key = (
            "pgfailover.failover_errors",
            tuple(sorted((*status, ("pgfailover.failure.kind", kind)))),
        )
        assert points[key].value == n
    retries = collections.Counter(
        (label_value(e.action), e.cause.kind.value)
        for e in seen_events
        if isinstance(e, RetryEvent)
    )
    assert retries[("retry", "transient")] == 2, retries  # one per pool
    for (action, kind), n in retries.items():
        assert prom[("pgfailover_retries_total", (("action", action), ("kind", kind)))] == n
        key = (
            "pgfailover.retries",
            (("pgfailover.failure.kind", kind), ("pgfailover.retry.action", action)),
        )
        assert points[key].value == n
    outcomes = collections.Counter(
        commit_outcome(e) for e in seen_events if isinstance(e, RetryEvent)
    )
    for outcome, n in outcomes.items():
        if outcome is not None:
            assert prom[("pgfailover_commit_outcomes_total", (("outcome", outcome),))] == n


def monitor_values(
    registry: CollectorRegistry, reader: InMemoryMetricReader, endpoint: str
) -> tuple[dict[str, float], dict[str, float]]:
    """The monitor's four values at ``endpoint``, scraped (Prometheus name -> value) and
    collected (OpenTelemetry name -> value); a series not exported is absent."""
    by_endpoint = (("endpoint", endpoint),)
    prom = {
        name: value
        for (name, labels), value in scrape(registry).items()
        if name.startswith("pgfailover_monitor_") and labels == by_endpoint
    }
    points = {
        name: float(point.value)
        for (name, attrs), point in collect(reader).items()
        if name.startswith("pgfailover.monitor.") and attrs == by_endpoint
    }
    return prom, points


def test_metrics_show_what_the_monitor_sees_through_a_failover(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A pool behind PgBouncer watched by a private monitor: scraped and collected, the
    endpoint (host:port/dbname, no password) is writable with no outage; after a failover
    without repoint (PgBouncer leads to the old primary, now a standby) it reads writable 0
    with an outage whose age grows; after the repoint, writable 1 and no outage again, with
    more looks and more watch connection attempts than before the failover."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    dsn = cluster.pgbouncer.dsn()
    password = str(psycopg.conninfo.conninfo_to_dict(dsn)["password"])
    registry = CollectorRegistry()
    collector = prometheus.register(registry)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = otel.instrument(provider)
    monitor = Monitor(interval=0.2)
    try:
        with pgfailover.ConnectionPool[Any](
            dsn, name="metrics-monitor", kwargs=KWARGS, min_size=1, timeout=20, monitor=monitor
        ) as pool:
            pool.wait()
            (watched,) = monitor.endpoints()
            endpoint = str(watched)
            assert endpoint == f"{cluster.pgbouncer.host}:{cluster.pgbouncer.port}/{watched.dbname}"
            values: tuple[dict[str, float], dict[str, float]] = ({}, {})

            def reads(writable: float, outage: bool) -> bool:
                nonlocal values
                values = monitor_values(registry, reader, endpoint)
                prom, points = values
                return (
                    prom.get("pgfailover_monitor_writable") == writable
                    and points.get("pgfailover.monitor.writable") == writable
                    and (prom.get("pgfailover_monitor_outage_seconds", 0) > 0) == outage
                    and (points.get("pgfailover.monitor.outage.duration", 0) > 0) == outage
                )

            eventually(lambda: reads(1.0, outage=False), timeout=30)
            before, _ = values
            assert before["pgfailover_monitor_connects_total"] >= 1, values
            assert password not in generate_latest(registry).decode()

            cluster.failover()  # PgBouncer still leads to the old primary
            eventually(lambda: reads(0.0, outage=True), timeout=30)
            first_age = values[0]["pgfailover_monitor_outage_seconds"]
            eventually(
                lambda: (
                    reads(0.0, outage=True)
                    and values[0]["pgfailover_monitor_outage_seconds"] > first_age
                ),
                timeout=30,
            )

            cluster.repoint_pgbouncer(cluster.primary)
            # the watch connects again once writable (during the outage its looks may all
            # have been the pool's granted attempts, counted in checks, not in connects)
            connects = "pgfailover_monitor_connects_total"
            eventually(
                lambda: reads(1.0, outage=False) and values[0][connects] > before[connects],
                timeout=30,
            )
            prom, points = values
    finally:
        monitor.close()
        collector.unregister()
        instruments.unregister()
        provider.shutdown()
    for name in ("checks", "connects"):
        total = f"pgfailover_monitor_{name}_total"
        assert prom[total] > before[total], (name, before, prom)
        assert points[f"pgfailover.monitor.{name}"] >= prom[total], (name, points, prom)
    assert prom["pgfailover_monitor_outage_seconds"] == 0
    assert points["pgfailover.monitor.outage.duration"] == 0
