"""pgfailover.metrics without a server: the definitions, the values made from statistics
and events, and both exporters' registration and output."""

from __future__ import annotations

import importlib
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgfailover
import pgfailover.metrics
from pgfailover import classify, events
from pgfailover.classify import Phase
from pgfailover.events import FailoverEvent, NodeInfo, PoolEvent, RetryEvent
from pgfailover.metrics import _core, otel, prometheus
from pgfailover.metrics._core import (
    EVENT_METRICS,
    MONITOR_METRICS,
    POOL_METRICS,
    UNAVAILABLE_BUCKETS,
    EventTally,
    Sample,
    WatchSample,
    commit_outcome,
    engine_sample,
    merge,
    merge_watches,
    pool_sample,
    watch_sample,
)
from pgfailover.monitor import Endpoint, EndpointWatch, Monitor, Status
from pgfailover.monitor._runtime import monitors
from pgfailover.outcome import Outcome
from pgfailover.testing._ports import release_port, reserve_port

ROOT = Path(__file__).resolve().parents[2]
READ_ONLY = classify(psycopg.errors.lookup("25006")("cannot execute INSERT"))
LOST = classify(psycopg.OperationalError("server closed the connection unexpectedly"))
LOST_COMMIT = classify(
    psycopg.OperationalError("server closed the connection unexpectedly"), phase=Phase.COMMIT
)
NODE = NodeInfo("db1", 5432, 42, False)

#: A psycopg_pool pool's get_stats() with pgfailover's counters, as after some failovers.
STATS = {
    "pool_min": 2,
    "pool_max": 8,
    "pool_size": 5,
    "pool_available": 3,
    "requests_waiting": 1,
    "requests_num": 100,
    "requests_queued": 7,
    "requests_wait_ms": 1500,
    "requests_errors": 2,
    "usage_ms": 20250,
    "returns_bad": 1,
    "connections_num": 12,
    "connections_ms": 360,
    "connections_errors": 4,
    "connections_lost": 2,
    "failovers_detected": 2,
    "connections_poisoned": 5,
    "generations_purged": 3,
    "probes_run": 9,
    "connections_rejected": 6,
    "recovery_ms_last": 412,
}


def retry_event(
    action: str, cause: object = LOST_COMMIT, detail: str = "", outcome: Outcome | None = None
) -> RetryEvent:
    return RetryEvent(
        1,
        0.0,
        action,
        cause,  # type: ignore[arg-type]
        "psycopg.OperationalError",
        0.5,
        detail,
        outcome=outcome,
    )


def recovered(pool: str, seconds: float) -> PoolEvent:
    return PoolEvent("primary reached again", pool, 1, recovery=seconds)


# ----------------------------------------------------------------------- definitions


def test_names_follow_each_convention() -> None:
    """Prometheus counters end in _total and times are in seconds; every name and every
    OpenTelemetry name is unique; per-pool metrics are labelled by pool first, the
    monitor's by endpoint alone."""
    metrics = POOL_METRICS + MONITOR_METRICS + EVENT_METRICS
    assert len({m.prometheus for m in metrics}) == len(metrics)
    assert len({m.otel for m in metrics}) == len(metrics)
    assert len({m.key for m in metrics}) == len(metrics)
    for m in metrics:
        assert re.fullmatch(r"pgfailover_[a-z_]+", m.prometheus), m
        assert m.prometheus.endswith("_total") == (m.type == "counter"), m
        assert ("seconds" in m.prometheus) == (m.unit == "s"), m
        assert all(label in _core.ATTRIBUTES for label in m.labels), m
    for m in POOL_METRICS:
        assert m.labels[0] == "pool"
        assert all(len(extra) == len(m.labels) - 1 for _, extra in m.keys), m
    for m in MONITOR_METRICS:
        assert m.labels == ("endpoint",), m
        assert m.prometheus.startswith("pgfailover_monitor_"), m
        assert m.otel.startswith("pgfailover.monitor."), m


def test_the_semantic_conventions_names_units_and_attributes() -> None:
    """The connection-pool instruments carry the names, units and attributes of the
    OpenTelemetry database-client semantic conventions."""
    by_name = {m.otel: m for m in POOL_METRICS}
    expected = {
        "db.client.connection.count": "{connection}",
        "db.client.connection.max": "{connection}",
        "db.client.connection.pending_requests": "{request}",
        "db.client.connection.timeouts": "{timeout}",
    }
    for name, unit in expected.items():
        assert by_name[name].unit == unit
    assert by_name["db.client.connection.timeouts"].type == "counter"
    assert all(by_name[n].up_down for n in expected if n != "db.client.connection.timeouts")
    count = by_name["db.client.connection.count"]
    assert [_core.ATTRIBUTES[label] for label in count.labels] == [
        "db.client.connection.pool.name",
        "db.client.connection.state",
    ]
    assert [extra for _, extra in count.keys] == [("idle",), ("used",)]
    # the conventions' histograms cannot be made from totals: not emitted under their names
    names = {m.otel for m in POOL_METRICS + EVENT_METRICS}
    assert not names & {
        f"db.client.connection.{t}" for t in ("create_time", "wait_time", "use_time")
    }


def test_every_metric_is_documented() -> None:
    """docs/monitoring.md and the package docstring name every metric in both namings."""
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    for m in POOL_METRICS + MONITOR_METRICS + EVENT_METRICS:
        assert m.prometheus in doc, m.prometheus
        assert m.otel in doc, m.otel
        assert m.prometheus in (pgfailover.metrics.__doc__ or ""), m.prometheus
        assert m.otel in (pgfailover.metrics.__doc__ or ""), m.otel


# ---------------------------------------------------------------------------- samples


def test_a_pools_statistics_become_values_in_their_units() -> None:
    """get_stats() becomes the sample: idle = available, used = the rest, milliseconds
    become seconds, lost = lost + returned bad, pgfailover's counters as they are."""
    values = pool_sample("orders", STATS, outage=True).values
    assert values == {
        "idle": 3.0,
        "used": 2.0,
        "max": 8.0,
        "pending": 1.0,
        "timeouts": 2.0,
        "requests": 100.0,
        "requests_queued": 7.0,
        "wait_seconds": 1.5,
        "use_seconds": 20.25,
        "attempts": 12.0,
        "errors": 4.0,
        "create_seconds": 0.36,
        "lost": 3.0,
        "failovers_detected": 2.0,
        "connections_poisoned": 5.0,
        "generations_purged": 3.0,
        "probes": 9.0,
        "connections_rejected": 6.0,
        "recovery_last": 0.412,
        "outage": 1.0,
    }


def test_counters_a_fresh_pool_has_not_counted_yet_are_zero() -> None:
    """psycopg_pool adds a counter's key when it first counts: absent counters are 0,
    absent gauges are left out (never reported as 0)."""
    fresh = {"pool_min": 1, "pool_max": 4, "pool_size": 1, "pool_available": 1}
    values = pool_sample("p", fresh, outage=False).values
    assert values["timeouts"] == values["requests"] == values["create_seconds"] == 0.0
    assert values["outage"] == 0.0
    assert "pending" not in values  # requests_waiting missing from these stats
    assert "failovers_detected" not in values  # not a pgfailover pool's stats


def test_an_engines_sample_leaves_out_what_its_pool_cannot_tell() -> None:
    """An engine's sample has pgfailover's counters; sizes only when its pool has them."""
    counters = {k: STATS[k] for k in ("failovers_detected", "probes_run", "recovery_ms_last")}
    bare = engine_sample("postgresql+psycopg://u:***@h/db", counters, outage=False).values
    assert bare == {"failovers_detected": 2.0, "probes": 9.0, "recovery_last": 0.412, "outage": 0}
    sized = engine_sample(
        "e", counters, outage=True, checked_in=4, checked_out=1, max_connections=15
    ).values
    assert (sized["idle"], sized["used"], sized["max"], sized["outage"]) == (4, 1, 15, 1)


def test_pools_sharing_a_name_are_one_series() -> None:
    """Same-named pools are summed, except the last recovery and the outage flag (maximum);
    names come out sorted, each once."""
    a = Sample("b", {"idle": 1.0, "recovery_last": 0.5, "outage": 0.0})
    b = Sample("b", {"idle": 2.0, "recovery_last": 0.2, "outage": 1.0, "max": 4.0})
    c = Sample("a", {"idle": 7.0})
    assert merge([a, c, b]) == [
        Sample("a", {"idle": 7.0}),
        Sample("b", {"idle": 3.0, "recovery_last": 0.5, "outage": 1.0, "max": 4.0}),
    ]


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 100), st.integers(0, 100)), max_size=20
    )
)
def test_merging_keeps_every_total(rows: list[tuple[str, int, int]]) -> None:
    """Whatever the names, merging keeps each name's sum of a counter and the maximum of a
    gauge combined by maximum, and reports each name once."""
    samples = [Sample(n, {"requests": float(r), "outage": float(o > 50)}) for n, r, o in rows]
    merged = {s.pool: s.values for s in merge(samples)}
    assert sorted(merged) == sorted({n for n, _, _ in rows})
    for name, values in merged.items():
        assert values["requests"] == sum(r for n, r, _ in rows if n == name)
        assert values["outage"] == max(float(o > 50) for n, _, o in rows if n == name)


# --------------------------------------------------------------------------- monitors

ENDPOINT = Endpoint("db1,db2", "5432", "app")


def test_a_watch_becomes_values_at_each_state() -> None:
    """Before the first look: checks and connects, outage 0, no writable series. A look
    that finds no primary: writable 0, outage = seconds since that look; later looks of
    the same outage keep its start. Writable again: writable 1, outage 0. The endpoint is
    host:port/dbname."""
    watch = EndpointWatch(ENDPOINT)
    first = watch_sample(watch, now=5.0)
    assert first == WatchSample(
        "db1:5432,db2:5432/app",
        {"monitor_checks": 0.0, "monitor_connects": 0.0, "monitor_outage": 0.0},
    )
    watch.connects += 1
    watch.observe(Status.WRITABLE, "primary", now=10.0, wall=1000.0)
    values = watch_sample(watch, now=11.0).values
    assert (values["monitor_writable"], values["monitor_outage"]) == (1.0, 0.0)
    watch.observe(Status.DOWN, "down: refused", now=20.0, wall=1010.0)
    watch.connects += 1
    watch.observe(Status.READ_ONLY, "a standby", now=21.0, wall=1011.0)
    values = watch_sample(watch, now=22.5).values
    assert values == {
        "monitor_checks": 3.0,
        "monitor_connects": 2.0,
        "monitor_writable": 0.0,
        "monitor_outage": 2.5,
    }
    watch.observe(Status.WRITABLE, "primary", now=23.0, wall=1013.0)
    values = watch_sample(watch, now=24.0).values
    assert (values["monitor_writable"], values["monitor_outage"]) == (1.0, 0.0)


def test_a_refused_watch_is_not_writable_and_a_torn_read_is_no_outage() -> None:
    """Authentication refused counts as not writable (an outage for the monitor); a watch
    read between the status becoming writable and the outage start being cleared reports
    no outage; a clock read before the outage began gives 0, never a negative age."""
    watch = EndpointWatch(ENDPOINT)
    watch.observe(Status.MISCONFIGURED, "auth or configuration failure", now=1.0, wall=1.0)
    values = watch_sample(watch, now=0.5).values
    assert (values["monitor_writable"], values["monitor_outage"]) == (0.0, 0.0)
    assert watch_sample(watch, now=4.0).values["monitor_outage"] == 3.0
    watch.status = Status.WRITABLE  # as observe() leaves it for an instant
    assert watch.outage_since is not None
    assert watch_sample(watch, now=4.0).values["monitor_outage"] == 0.0


STATUSES = st.sampled_from([s for s in Status if s is not Status.UNKNOWN])


@given(st.lists(STATUSES, max_size=20), st.floats(0, 100))
def test_the_outage_age_is_since_the_first_look_that_found_no_primary(
    statuses: list[Status], after: float
) -> None:
    """Whatever the looks (one a second), writable says what the last look found (absent
    before any), the outage is 0 after a writable look and otherwise the time since the
    first of the looks that found no writable primary since the last writable one, and
    checks count every look."""
    watch = EndpointWatch(ENDPOINT)
    for i, status in enumerate(statuses):
        watch.observe(status, status.value, now=float(i), wall=float(i))
    now = len(statuses) + after
    values = watch_sample(watch, now).values
    assert values["monitor_checks"] == len(statuses)
    if not statuses:
        assert "monitor_writable" not in values
        assert values["monitor_outage"] == 0.0
        return
    assert values["monitor_writable"] == float(statuses[-1] is Status.WRITABLE)
    if statuses[-1] is Status.WRITABLE:
        assert values["monitor_outage"] == 0.0
    else:
        start = len(statuses) - 1
        while start > 0 and statuses[start - 1] is not Status.WRITABLE:
            start -= 1
        assert values["monitor_outage"] == pytest.approx(now - start)


def test_monitors_watching_one_endpoint_are_one_series() -> None:
    """Two monitors at one endpoint: counters summed, writable the minimum (0 when either
    finds no primary), the outage the longest; a key only one has is kept; endpoints come
    out sorted, each once."""
    a = WatchSample("b:5432/app", {"monitor_writable": 1.0, "monitor_checks": 4.0})
    b = WatchSample(
        "b:5432/app",
        {"monitor_writable": 0.0, "monitor_checks": 6.0, "monitor_outage": 1.5},
    )
    c = WatchSample("a:5432/app", {"monitor_writable": 1.0, "monitor_outage": 0.0})
    d = WatchSample("b:5432/app", {"monitor_outage": 0.5})
    assert merge_watches([a, c, b, d]) == [
        c,
        WatchSample(
            "b:5432/app",
            {"monitor_writable": 0.0, "monitor_checks": 10.0, "monitor_outage": 1.5},
        ),
    ]


# ----------------------------------------------------------------------------- events


@pytest.mark.parametrize(
    ("action", "outcome", "expected"),
    [
        ("committed", Outcome.COMMITTED, "committed"),
        ("retry", Outcome.NOT_COMMITTED, "not_committed"),
        ("give up", Outcome.NOT_COMMITTED, "not_committed"),
        ("give up", Outcome.UNKNOWN, "unknown"),
        ("retry", None, None),
        ("give up", None, None),
    ],
)
def test_commit_outcomes_from_the_runners_events(
    action: str, outcome: Outcome | None, expected: str | None
) -> None:
    """A lost COMMIT's settled outcome is the event's ``outcome``; failures that were not a
    settled lost COMMIT have none."""
    assert commit_outcome(retry_event(action, LOST_COMMIT, "", outcome)) == expected


def test_the_tally_counts_what_no_statistic_holds() -> None:
    """Failover errors by kind and SQLSTATE ("" without one), retries by action (spaces as
    underscores) and kind, commit outcomes; topology events are ignored."""
    tally = EventTally()
    for event in (
        FailoverEvent(READ_ONLY, NODE, "poisoned", "E"),
        FailoverEvent(READ_ONLY, NODE, "poisoned", "E"),
        FailoverEvent(LOST, NODE, "poisoned", "E"),
        retry_event("retry", READ_ONLY),
        retry_event("give up", LOST_COMMIT, "asking the primary failed", Outcome.UNKNOWN),
        events.TopologyEvent("split brain", "src"),
    ):
        tally(event)
    snap = tally.snapshot()
    assert snap.failover_errors == {("read_only", "25006"): 2, ("connection_lost", ""): 1}
    assert snap.retries == {("retry", "read_only"): 1, ("give_up", "connection_lost"): 1}
    assert snap.commit_outcomes == {"unknown": 1}
    assert snap.write_unavailable == {}
    assert snap.counts("failover_errors") == [
        (("connection_lost", ""), 1),
        (("read_only", "25006"), 2),
    ]
    assert snap.counts("commit_outcomes") == [(("unknown",), 1)]
    with pytest.raises(KeyError):
        snap.counts("write_unavailable")


def test_points_are_the_series_each_exporter_writes() -> None:
    """A pool metric gives one point per sample and key the sample has (pool name first, then
    the key's own labels), a monitor metric one per endpoint that has it; a missing value
    gives no point at all, never a 0."""
    count = next(m for m in POOL_METRICS if m.key == "connections")
    samples = [Sample("a", {"idle": 1.0, "used": 2.0}), Sample("b", {"used": 5.0})]
    assert _core.pool_points(count, samples) == [
        (("a", "idle"), 1.0),
        (("a", "used"), 2.0),
        (("b", "used"), 5.0),
    ]
    monitor = MONITOR_METRICS[0]
    watches = [WatchSample("h:1/db", {monitor.key: 3.0}), WatchSample("h:2/db", {})]
    assert _core.watch_points(monitor, watches) == [(("h:1/db",), 3.0)]


def test_a_bound_belongs_to_its_bucket() -> None:
    """The histogram's buckets are Prometheus's: a value equal to a bound counts in it
    (le), cumulative counts end with +Inf = the count, and the sum is exact."""
    tally = EventTally([0.1, 1.0])
    for seconds in (0.1, 0.5, 1.0, 7.0):
        tally(recovered("p", seconds))
    tally(PoolEvent("generation purged", "p", 1, reason="read-only"))
    hist = tally.snapshot().write_unavailable["p"]
    assert hist.counts == (1, 2, 1)
    assert hist.cumulative() == [(0.1, 1), (1.0, 3), (math.inf, 4)]
    assert hist.count == 4
    assert hist.total == pytest.approx(8.6)


@given(st.lists(st.floats(0, 1000, allow_nan=False), max_size=30))
def test_the_histogram_holds_every_observation(seconds: list[float]) -> None:
    """Whatever the durations, count and sum are exact and the cumulative buckets never
    decrease."""
    tally = EventTally()
    for s in seconds:
        tally(recovered("p", s))
    hist = tally.snapshot().write_unavailable.get("p")
    if not seconds:
        assert hist is None
        return
    assert hist is not None
    assert hist.count == len(seconds)
    assert hist.total == pytest.approx(sum(seconds))
    cumulative = [n for _, n in hist.cumulative()]
    assert cumulative == sorted(cumulative)
    assert len(cumulative) == len(UNAVAILABLE_BUCKETS) + 1


def test_histogram_bounds_must_increase() -> None:
    """Unsorted or repeated bounds are refused with a clear error."""
    with pytest.raises(ValueError, match="must increase"):
        EventTally([1.0, 0.5])


# ------------------------------------------------------------------------- exporters


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A fresh prometheus_client registry; pgfailover's collector is removed after."""
    reg = CollectorRegistry()
    yield reg
    prometheus.register(reg).unregister()


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The registry in text format, parsed: (sample name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_register_is_idempotent_per_registry(registry: CollectorRegistry) -> None:
    """A second register() with the same registry returns the same collector; another
    registry gets its own; None means prometheus_client's default REGISTRY."""
    collector = prometheus.register(registry)
    assert prometheus.register(registry) is collector
    assert prometheus.register(CollectorRegistry()) is not collector
    default = prometheus.register()
    try:
        assert default.registry is REGISTRY
        assert prometheus.register(None) is default
    finally:
        default.unregister()
    assert prometheus.register(registry) is collector


def test_register_refuses_what_is_not_a_registry() -> None:
    """Anything but a CollectorRegistry is a TypeError saying what is expected."""
    with pytest.raises(TypeError, match="CollectorRegistry"):
        prometheus.register("default")  # type: ignore[arg-type]


def test_the_event_fed_families_in_text_format(registry: CollectorRegistry) -> None:
    """Events after register() appear in the scrape: failover errors by kind and SQLSTATE,
    the write-unavailable histogram per pool, retries, commit outcomes."""
    prometheus.register(registry)
    events._emit(FailoverEvent(READ_ONLY, NODE, "poisoned", "E"))
    events._emit(recovered("orders", 0.3))
    events._emit(retry_event("committed", LOST_COMMIT, "committed", Outcome.COMMITTED))
    seen = scrape(registry)
    assert (
        seen[("pgfailover_failover_errors_total", (("kind", "read_only"), ("sqlstate", "25006")))]
        == 1
    )
    assert seen[("pgfailover_write_unavailable_seconds_count", (("pool", "orders"),))] == 1
    assert seen[("pgfailover_write_unavailable_seconds_sum", (("pool", "orders"),))] == 0.3
    assert (
        seen[("pgfailover_write_unavailable_seconds_bucket", (("le", "0.25"), ("pool", "orders")))]
        == 0
    )
    assert (
        seen[("pgfailover_write_unavailable_seconds_bucket", (("le", "0.5"), ("pool", "orders")))]
        == 1
    )
    assert (
        seen[("pgfailover_retries_total", (("action", "committed"), ("kind", "connection_lost")))]
        == 1
    )
    assert seen[("pgfailover_commit_outcomes_total", (("outcome", "committed"),))] == 1


def test_unregister_removes_the_collector_and_its_subscription(
    registry: CollectorRegistry,
) -> None:
    """After unregister() the registry exports none of pgfailover's families and events
    are no longer counted; register() then makes a fresh collector."""
    collector = prometheus.register(registry)
    collector.unregister()
    collector.unregister()  # idempotent
    events._emit(recovered("orders", 0.3))
    assert collector.tally.snapshot().write_unavailable == {}
    assert not any(name.startswith("pgfailover_") for name, _ in scrape(registry))
    assert prometheus.register(registry) is not collector


def test_a_clash_with_another_collector_is_prometheus_clients_error() -> None:
    """A registry that already exports one of pgfailover's names refuses the collector,
    and nothing stays subscribed."""
    from prometheus_client import Counter  # noqa: PLC0415

    reg = CollectorRegistry()
    Counter("pgfailover_probes", "someone else's", registry=reg)
    before = len(events._hooks)
    with pytest.raises(ValueError, match="pgfailover_probes"):
        prometheus.register(reg)
    assert len(events._hooks) == before


def test_an_instrumented_engine_is_exported_under_its_url_without_password(
    registry: CollectorRegistry,
) -> None:
    """An instrumented SQLAlchemy engine (never connected) is a pool named by its URL
    without the password: idle/used from its QueuePool, max = size + max_overflow, and
    pgfailover's counters at 0."""
    import sqlalchemy  # noqa: PLC0415

    import pgfailover.sqlalchemy  # noqa: PLC0415

    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://app:s3cret@db.invalid:5432/app", pool_size=3, max_overflow=2
    )
    pgfailover.sqlalchemy.instrument(engine)
    try:
        prometheus.register(registry)
        text = generate_latest(registry).decode()
        seen = scrape(registry)
    finally:
        pgfailover.sqlalchemy.uninstrument(engine)
        engine.dispose()
    name = "postgresql+psycopg://app:***@db.invalid:5432/app"
    assert "s3cret" not in text
    assert seen[("pgfailover_pool_connections", (("pool", name), ("state", "idle")))] == 0
    assert seen[("pgfailover_pool_connections", (("pool", name), ("state", "used")))] == 0
    assert seen[("pgfailover_pool_connections_max", (("pool", name),))] == 5
    assert seen[("pgfailover_failovers_detected_total", (("pool", name),))] == 0
    assert ("pgfailover_pool_pending_requests", (("pool", name),)) not in seen


def otel_points(reader: InMemoryMetricReader) -> dict[str, list[object]]:
    """Metric name -> its data points, from one collection."""
    data = reader.get_metrics_data()
    found: dict[str, list[object]] = {}
    if data is None:
        return found
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def test_otel_instruments_are_made_once_per_provider_and_can_stop() -> None:
    """instrument() returns the same object for the same provider; events reach the
    histogram (with pgfailover's bucket bounds) and counters; after unregister() nothing
    is reported or counted; instrument() starts the same object again."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = otel.instrument(provider)
    try:
        assert otel.instrument(provider) is instruments
        events._emit(recovered("orders", 0.3))
        events._emit(FailoverEvent(LOST, NODE, "poisoned", "E"))
        points = otel_points(reader)
        (hist,) = points["pgfailover.write_unavailable.duration"]
        assert isinstance(hist, HistogramDataPoint)
        assert (hist.count, hist.sum) == (1, 0.3)
        assert tuple(hist.explicit_bounds) == UNAVAILABLE_BUCKETS
        assert dict(hist.attributes or {}) == {"db.client.connection.pool.name": "orders"}
        (errors,) = points["pgfailover.failover_errors"]
        assert dict(errors.attributes or {}) == {"pgfailover.failure.kind": "connection_lost"}  # type: ignore[attr-defined]
        instruments.unregister()
        events._emit(recovered("orders", 0.3))
        assert instruments.tally.snapshot().write_unavailable["orders"].count == 1
        assert "pgfailover.failover_errors" not in otel_points(reader)
        assert otel.instrument(provider) is instruments
        assert "pgfailover.failover_errors" in otel_points(reader)
    finally:
        instruments.unregister()
        provider.shutdown()


def test_otel_refuses_what_is_not_a_meter_provider() -> None:
    """Anything but a MeterProvider is a TypeError saying what is expected."""
    with pytest.raises(TypeError, match="MeterProvider"):
        otel.instrument(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("module", "library"),
    [("prometheus", "prometheus_client"), ("otel", "opentelemetry")],
)
def test_a_missing_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, library: str
) -> None:
    """Without its library, importing an exporter raises ImportError saying which extra
    to install."""
    for name in [n for n in sys.modules if n == library or n.startswith(f"{library}.")]:
        monkeypatch.setitem(sys.modules, name, None)  # an imported submodule would be found
    monkeypatch.delitem(sys.modules, f"pgfailover.metrics.{module}")
    with pytest.raises(ImportError, match=re.escape("pip install 'pgfailover[metrics]'")):
        importlib.import_module(f"pgfailover.metrics.{module}")


def test_importing_the_package_imports_neither_library() -> None:
    """``import pgfailover.metrics`` loads neither prometheus_client nor OpenTelemetry;
    attribute access loads the exporter."""
    code = (
        "import sys, pgfailover.metrics as m\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "assert 'opentelemetry' not in sys.modules\n"
        "assert m.prometheus.register\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------- a monitor that finds none

SECRET = "s3cret-Pa55w0rd"


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    """A loopback port reserved for the module, on which nothing listens."""
    reserved = reserve_port()
    yield reserved
    release_port(reserved)


def test_a_live_monitor_is_exported_per_endpoint_until_closed(
    registry: CollectorRegistry, refused_port: int
) -> None:
    """A pool watched by a private monitor at an endpoint where nothing listens: the
    scrape and the OpenTelemetry collection say writable 0, an outage under way, looks and
    watch connection attempts counted, labelled host:port/dbname with no password anywhere.
    The endpoint's series go when its last pool closes; monitors() no longer lists the
    monitor once closed."""
    dsn = f"host=127.0.0.1 port={refused_port} dbname=app user=app password={SECRET}"
    endpoint = f"127.0.0.1:{refused_port}/app"
    by_endpoint = (("endpoint", endpoint),)
    prometheus.register(registry)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = otel.instrument(provider)
    monitor = Monitor(interval=0.2, outage_interval=0.02)
    try:
        assert monitor in monitors()
        with pgfailover.ConnectionPool[Any](dsn, min_size=0, max_size=1, monitor=monitor):
            deadline = time.monotonic() + 20.0
            while True:
                seen = scrape(registry)
                if (
                    seen.get(("pgfailover_monitor_checks_total", by_endpoint), 0) >= 2
                    and seen.get(("pgfailover_monitor_outage_seconds", by_endpoint), 0) > 0
                ):
                    break
                assert time.monotonic() < deadline, seen
                time.sleep(0.02)
            text = generate_latest(registry).decode()
            points = {
                name: {dict(p.attributes or {})["endpoint"]: p for p in found}  # type: ignore[attr-defined]
                for name, found in otel_points(reader).items()
                if name.startswith("pgfailover.monitor.")
            }
        assert seen[("pgfailover_monitor_writable", by_endpoint)] == 0
        assert seen[("pgfailover_monitor_connects_total", by_endpoint)] >= 1
        assert SECRET not in text
        assert f'endpoint="{endpoint}"' in text
        assert points["pgfailover.monitor.writable"][endpoint].value == 0  # type: ignore[attr-defined]
        assert points["pgfailover.monitor.outage.duration"][endpoint].value > 0  # type: ignore[attr-defined]
        assert points["pgfailover.monitor.checks"][endpoint].value >= 2  # type: ignore[attr-defined]
        assert points["pgfailover.monitor.connects"][endpoint].value >= 1  # type: ignore[attr-defined]
        assert not any(labels == by_endpoint for _, labels in scrape(registry))
    finally:
        monitor.close()
        instruments.unregister()
        provider.shutdown()
    assert monitor not in monitors()
