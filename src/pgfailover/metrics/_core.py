"""The metrics' definitions, and the pure functions that make their values. No I/O.

Both exporters (:mod:`pgfailover.metrics.prometheus`, :mod:`pgfailover.metrics.otel`) read
the same table, :data:`POOL_METRICS`, :data:`MONITOR_METRICS` and :data:`EVENT_METRICS`, and
the same values:

- per pool, a :class:`Sample` made by :func:`pool_sample` (a pgfailover psycopg_pool pool:
  its ``get_stats()``) or :func:`engine_sample` (an instrumented SQLAlchemy engine: its
  pool's sizes and the instrumentation's counters); pools that share a name are summed by
  :func:`merge`, so a name is one time series;
- per endpoint a process monitor watches, a :class:`WatchSample` made by
  :func:`watch_sample` from the monitor's :class:`~pgfailover.monitor.EndpointWatch`;
  monitors watching the same endpoint are combined by :func:`merge_watches`;
- from events, what no statistic holds: an :class:`EventTally` counts failover errors by
  verdict kind and SQLSTATE, retries by action, resolved commit outcomes, and keeps the
  histogram of the write-unavailable time of each incident, per pool.

Nothing here imports prometheus_client or opentelemetry.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from ..events import Event, FailoverEvent, PoolEvent, RetryEvent
from ..monitor.model import EndpointWatch, Status
from ..outcome import Outcome

#: Upper bounds (seconds) of the write-unavailable histogram's buckets: a failover handled
#: by pgfailover takes tenths of a second after the primary is back; an HA tool's own
#: detection takes seconds (a switchover) to tens of seconds (Patroni's ttl after a crash).
UNAVAILABLE_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

#: The OpenTelemetry attribute that names the pool (semantic conventions).
POOL_NAME = "db.client.connection.pool.name"
#: The OpenTelemetry attribute of a connection's state in ``db.client.connection.count``.
CONNECTION_STATE = "db.client.connection.state"

#: Prometheus label name -> OpenTelemetry attribute name.
ATTRIBUTES: Mapping[str, str] = {
    "pool": POOL_NAME,
    "state": CONNECTION_STATE,
    "kind": "pgfailover.failure.kind",
    "sqlstate": "db.response.status_code",
    "action": "pgfailover.retry.action",
    "outcome": "pgfailover.commit.outcome",
    "endpoint": "endpoint",
}

MetricType = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric, as both exporters name it.

    ``prometheus`` is the family name (a counter's ends in ``_total``, a time's in
    ``_seconds``); ``otel`` the OpenTelemetry instrument name; ``type`` the Prometheus type
    (an OpenTelemetry gauge that counts connections or requests is an observable
    up-down counter, as the semantic conventions say; the others are observable gauges and
    counters, and the histogram is a histogram); ``unit`` the UCUM unit OpenTelemetry
    carries (``s``, ``{connection}``, ...); ``labels`` the Prometheus label names, ``pool``
    first for the per-pool ones (``endpoint`` for the monitor's). ``series`` maps a
    :class:`Sample` key to the values of the labels after ``pool`` (only
    ``db.client.connection.count`` has one: the state). ``combine`` says how pools that
    share a name (or monitors that watch the same endpoint) are merged: ``sum``, ``max`` or
    ``min``.
    """

    key: str
    prometheus: str
    otel: str
    type: MetricType
    unit: str
    description: str
    labels: tuple[str, ...] = ("pool",)
    series: tuple[tuple[str, tuple[str, ...]], ...] = ()
    combine: Literal["sum", "max", "min"] = "sum"
    up_down: bool = False  # OpenTelemetry: an observable up-down counter, not a gauge

    @property
    def keys(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The sample keys this metric reads, each with its extra label values."""
        return self.series or ((self.key, ()),)


#: The per-pool metrics, read from the pools' statistics at each scrape or collection.
#: The ones marked "psycopg_pool" exist for pgfailover's psycopg_pool pools only; an
#: instrumented SQLAlchemy engine gives the connection counts and maximum of a QueuePool
#: and pgfailover's own counters.
POOL_METRICS: tuple[Metric, ...] = (
    Metric(
        "connections",
        "pgfailover_pool_connections",
        "db.client.connection.count",
        "gauge",
        "{connection}",
        "Connections of the pool by state: idle (in the pool, ready) or used (checked out, "
        "or being opened or checked by the pool).",
        labels=("pool", "state"),
        series=(("idle", ("idle",)), ("used", ("used",))),
        up_down=True,
    ),
    Metric(
        "max",
        "pgfailover_pool_connections_max",
        "db.client.connection.max",
        "gauge",
        "{connection}",
        "The most connections the pool may open (max_size; a QueuePool's size + "
        "max_overflow, absent when its overflow is unlimited).",
        up_down=True,
    ),
    Metric(
        "pending",
        "pgfailover_pool_pending_requests",
        "db.client.connection.pending_requests",
        "gauge",
        "{request}",
        "Requests waiting for a connection now (psycopg_pool).",
        up_down=True,
    ),
    Metric(
        "timeouts",
        "pgfailover_pool_timeouts_total",
        "db.client.connection.timeouts",
        "counter",
        "{timeout}",
        "Requests that got no connection: timed out, refused because max_waiting requests "
        "were already waiting, or cancelled while waiting (psycopg_pool's requests_errors).",
    ),
    Metric(
        "requests",
        "pgfailover_pool_requests_total",
        "pgfailover.pool.requests",
        "counter",
        "{request}",
        "Requests for a connection (psycopg_pool's requests_num; a checkout whose "
        "connection failed pgfailover's role check and was replaced counts once more).",
    ),
    Metric(
        "requests_queued",
        "pgfailover_pool_requests_queued_total",
        "pgfailover.pool.requests.queued",
        "counter",
        "{request}",
        "Requests that had to wait for a connection (psycopg_pool's requests_queued).",
    ),
    Metric(
        "wait_seconds",
        "pgfailover_pool_connection_wait_seconds_total",
        "pgfailover.pool.connection.wait_time",
        "counter",
        "s",
        "Seconds requests spent waiting for a connection, summed over the requests that "
        "had to wait (psycopg_pool's requests_wait_ms).",
    ),
    Metric(
        "use_seconds",
        "pgfailover_pool_connection_use_seconds_total",
        "pgfailover.pool.connection.use_time",
        "counter",
        "s",
        "Seconds connections were held by their users, summed over pool.connection() blocks "
        "(psycopg_pool's usage_ms; getconn/putconn pairs are not counted).",
    ),
    Metric(
        "attempts",
        "pgfailover_pool_connection_attempts_total",
        "pgfailover.pool.connection.attempts",
        "counter",
        "{connection}",
        "Connections the pool tried to open (psycopg_pool's connections_num).",
    ),
    Metric(
        "errors",
        "pgfailover_pool_connection_errors_total",
        "pgfailover.pool.connection.errors",
        "counter",
        "{connection}",
        "Attempts to open a connection that failed (psycopg_pool's connections_errors); "
        "attempts - errors is the number of connections opened.",
    ),
    Metric(
        "create_seconds",
        "pgfailover_pool_connection_create_seconds_total",
        "pgfailover.pool.connection.create_time",
        "counter",
        "s",
        "Seconds spent opening the connections that opened (psycopg_pool's connections_ms).",
    ),
    Metric(
        "lost",
        "pgfailover_pool_connections_lost_total",
        "pgfailover.pool.connection.lost",
        "counter",
        "{connection}",
        "Connections found broken by the pool, in the pool or when returned "
        "(psycopg_pool's connections_lost + returns_bad; a poisoned connection, closed by "
        "pgfailover before its return, counts here too).",
    ),
    Metric(
        "failovers_detected",
        "pgfailover_failovers_detected_total",
        "pgfailover.failovers.detected",
        "counter",
        "{failover}",
        "Outages the pool noticed: the first failover symptom (met by a request, or found "
        "by the process monitor) after it last reached a writable primary.",
    ),
    Metric(
        "connections_poisoned",
        "pgfailover_connections_poisoned_total",
        "pgfailover.connections.poisoned",
        "counter",
        "{connection}",
        "Connections discarded because a failure made them unusable (read-only node, "
        "connection lost, server going away).",
    ),
    Metric(
        "generations_purged",
        "pgfailover_generations_purged_total",
        "pgfailover.generations.purged",
        "counter",
        "{purge}",
        "Purges: every connection opened before was closed when idle or returned.",
    ),
    Metric(
        "probes",
        "pgfailover_probes_total",
        "pgfailover.probes",
        "counter",
        "{probe}",
        "Role queries the pool ran (pg_is_in_recovery through a pooler, or on checkout "
        "during an outage).",
    ),
    Metric(
        "connections_rejected",
        "pgfailover_connections_rejected_total",
        "pgfailover.connections.rejected",
        "counter",
        "{connection}",
        "New or checked-out connections refused because they led to no writable primary.",
    ),
    Metric(
        "recovery_last",
        "pgfailover_last_recovery_seconds",
        "pgfailover.recovery.last",
        "gauge",
        "s",
        "Write-unavailable time of the pool's last outage: from its first symptom to the "
        "next connection to a writable primary (0 before any).",
        combine="max",
    ),
    Metric(
        "outage",
        "pgfailover_outage_in_progress",
        "pgfailover.outage.active",
        "gauge",
        "1",
        "1 while the pool is in an outage (a failover symptom seen, no writable primary "
        "reached since), else 0.",
        combine="max",
    ),
)

#: The per-endpoint metrics of the process monitors (:func:`pgfailover.monitor._runtime.monitors`),
#: read from their watches at each scrape or collection; labelled by ``endpoint``
#: (``host:port/dbname``, never a password). Keys are :class:`WatchSample` keys.
MONITOR_METRICS: tuple[Metric, ...] = (
    Metric(
        "monitor_writable",
        "pgfailover_monitor_writable",
        "pgfailover.monitor.writable",
        "gauge",
        "1",
        "1 when the monitor's last look at the endpoint found a writable primary, 0 when it "
        "found none (down, read-only, standby, refused); absent before the first look. "
        "Monitors watching the same endpoint: the minimum.",
        labels=("endpoint",),
        combine="min",
    ),
    Metric(
        "monitor_checks",
        "pgfailover_monitor_checks_total",
        "pgfailover.monitor.checks",
        "counter",
        "{check}",
        "Looks the monitor took at the endpoint since its watch began: one role query each, "
        "after a new watch connection when it had none (a look that failed counts too).",
        labels=("endpoint",),
    ),
    Metric(
        "monitor_connects",
        "pgfailover_monitor_connects_total",
        "pgfailover.monitor.connects",
        "counter",
        "{connection}",
        "Watch connection attempts the monitor made to the endpoint, since its watch began.",
        labels=("endpoint",),
    ),
    Metric(
        "monitor_outage",
        "pgfailover_monitor_outage_seconds",
        "pgfailover.monitor.outage.duration",
        "gauge",
        "s",
        "Seconds since the monitor's current outage at the endpoint began (its first look "
        "that found no writable primary), 0 when it last found one.",
        labels=("endpoint",),
        combine="max",
    ),
)

#: The metrics fed by events (:func:`pgfailover.events.subscribe`): what no statistic holds.
EVENT_METRICS: tuple[Metric, ...] = (
    Metric(
        "failover_errors",
        "pgfailover_failover_errors_total",
        "pgfailover.failover_errors",
        "counter",
        "{error}",
        "Connections found unusable by a failure (one per connection, as FailoverEvents), "
        "by verdict kind and SQLSTATE (empty when the error had none, e.g. a lost "
        "connection).",
        labels=("kind", "sqlstate"),
    ),
    Metric(
        "write_unavailable",
        "pgfailover_write_unavailable_seconds",
        "pgfailover.write_unavailable.duration",
        "histogram",
        "s",
        "Write-unavailable time of each outage, as the pool saw it: from its first failover "
        "symptom (met by a request, or found by the process monitor) to its next connection "
        "to a writable primary.",
        labels=("pool",),
    ),
    Metric(
        "retries",
        "pgfailover_retries_total",
        "pgfailover.retries",
        "counter",
        "{attempt}",
        "Failed attempts of transaction runners, by what followed (retry, give_up, "
        "committed: a lost COMMIT had committed) and the failure's verdict kind.",
        labels=("action", "kind"),
    ),
    Metric(
        "commit_outcomes",
        "pgfailover_commit_outcomes_total",
        "pgfailover.commit_outcomes",
        "counter",
        "{commit}",
        "Lost COMMITs, by what the runner found: committed, not_committed, unknown "
        "(CommitOutcomeUnknown raised).",
        labels=("outcome",),
    ),
)

#: The event-fed metrics by key.
EVENT: Mapping[str, Metric] = {metric.key: metric for metric in EVENT_METRICS}


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True, slots=True)
class Sample:
    """What one pool (or one name shared by several) measures now.

    ``values`` maps a metric's sample key (:attr:`Metric.keys`) to its value, in the
    metric's unit; a key absent means the pool cannot tell (e.g. an engine's pending
    requests): the series is left out, never reported as 0.
    """

    pool: str
    values: Mapping[str, float]


#: FailoverState's counters -> sample keys.
_FAILOVER_COUNTERS = {
    "failovers_detected": "failovers_detected",
    "connections_poisoned": "connections_poisoned",
    "generations_purged": "generations_purged",
    "probes_run": "probes",
    "connections_rejected": "connections_rejected",
}


def _failover_values(counters: Mapping[str, int], outage: bool) -> dict[str, float]:
    values: dict[str, float] = {
        key: float(counters[name]) for name, key in _FAILOVER_COUNTERS.items() if name in counters
    }
    if "recovery_ms_last" in counters:
        values["recovery_last"] = counters["recovery_ms_last"] / 1000.0
    values["outage"] = 1.0 if outage else 0.0
    return values


def pool_sample(name: str, stats: Mapping[str, int], *, outage: bool) -> Sample:
    """The sample of a pgfailover psycopg_pool pool named ``name``.

    ``stats`` is its ``get_stats()`` (psycopg_pool's statistics and pgfailover's counters;
    a gauge missing from it is left out of the sample, a counter missing counts 0:
    psycopg_pool adds a counter's key when it first counts); ``outage`` whether its
    failover state has an outage under way. psycopg_pool's times are whole milliseconds:
    they become seconds. Its counters restart from 0 when the application calls
    ``pop_stats()``; the exported counters then reset too.
    """
    get = stats.get
    values: dict[str, float] = {}
    size, available = get("pool_size"), get("pool_available")
    if size is not None and available is not None:
        values["idle"] = float(available)
        values["used"] = float(max(size - available, 0))
    for key, stat in (("max", "pool_max"), ("pending", "requests_waiting")):
        if (value := get(stat)) is not None:
            values[key] = float(value)
    # psycopg_pool's counters hold no key until they first count: absent means 0
    for key, stat in (
        ("timeouts", "requests_errors"),
        ("requests", "requests_num"),
        ("requests_queued", "requests_queued"),
        ("attempts", "connections_num"),
        ("errors", "connections_errors"),
    ):
        values[key] = float(get(stat, 0))
    for key, stat in (
        ("wait_seconds", "requests_wait_ms"),
        ("use_seconds", "usage_ms"),
        ("create_seconds", "connections_ms"),
    ):
        values[key] = get(stat, 0) / 1000.0
    values["lost"] = float(get("connections_lost", 0) + get("returns_bad", 0))
    values.update(_failover_values(stats, outage))
    return Sample(name, values)


def engine_sample(
    name: str,
    counters: Mapping[str, int],
    *,
    outage: bool,
    checked_in: int | None = None,
    checked_out: int | None = None,
    max_connections: int | None = None,
) -> Sample:
    """The sample of an instrumented SQLAlchemy engine whose pool is named ``name``.

    ``counters`` is its instrumentation's ``stats()``; ``checked_in``/``checked_out`` the
    pool's idle and used connections and ``max_connections`` its ``size + max_overflow``,
    each None when the pool cannot tell (a NullPool, or an unlimited overflow): the series
    is then left out.
    """
    values = _failover_values(counters, outage)
    if checked_in is not None and checked_out is not None:
        values["idle"] = float(checked_in)
        values["used"] = float(checked_out)
    if max_connections is not None:
        values["max"] = float(max_connections)
    return Sample(name, values)


_COMBINE = {key: metric.combine for metric in POOL_METRICS for key, _ in metric.keys}


def merge(samples: Iterable[Sample]) -> list[Sample]:
    """One sample per pool name, sorted by name: pools that share a name are combined
    (each key summed, or its maximum for the last recovery and the outage flag), so that
    an exporter never reports the same series twice. A key is present if any pool of the
    name has it."""
    merged: dict[str, dict[str, float]] = {}
    for sample in samples:
        values = merged.setdefault(sample.pool, {})
        for key, value in sample.values.items():
            if key not in values:
                values[key] = value
            elif _COMBINE.get(key, "sum") == "max":
                values[key] = max(values[key], value)
            else:
                values[key] += value
    return [Sample(name, merged[name]) for name in sorted(merged)]


# ------------------------------------------------------------------------- monitors


@dataclass(frozen=True, slots=True)
class WatchSample:
    """What one monitor (or several watching the same endpoint) knows of ``endpoint``
    (``host:port/dbname``, no password) now; ``values`` maps a :data:`MONITOR_METRICS` key
    to its value, a key absent meaning the monitor cannot tell yet (never reported as 0)."""

    endpoint: str
    values: Mapping[str, float]


#: One series of a metric at one instant: its label values (in the metric's label order)
#: and its value.
Point: TypeAlias = tuple[tuple[str, ...], float]


def pool_points(metric: Metric, samples: Iterable[Sample]) -> list[Point]:
    """The series of pool metric ``metric`` in ``samples``: for each sample, one point per
    key of :attr:`Metric.keys` the sample has a value for (pool name first, then the key's
    own label values); a key a sample lacks gives no point, never a 0."""
    return [
        ((sample.pool, *extra), value)
        for sample in samples
        for key, extra in metric.keys
        if (value := sample.values.get(key)) is not None
    ]


def watch_points(metric: Metric, watches: Iterable[WatchSample]) -> list[Point]:
    """The series of monitor metric ``metric``: one point per watched endpoint that has a
    value for it (label: the endpoint)."""
    return [
        ((watch.endpoint,), value)
        for watch in watches
        if (value := watch.values.get(metric.key)) is not None
    ]


def watch_sample(watch: EndpointWatch, now: float) -> WatchSample:
    """The sample of one monitor's watch of an endpoint, read at ``now``
    (``time.monotonic()``).

    ``monitor_writable`` is 1 for a writable primary, 0 for any other finding, absent
    before the first look (status unknown); ``monitor_outage`` the seconds since
    ``watch.outage_since`` (0 when no outage is under way, or when the last look found a
    writable primary: the watch's thread may be between setting the one and clearing the
    other; never negative); ``monitor_checks`` and ``monitor_connects`` its running
    counters. Reads the watch without a lock: each attribute is read once.
    """
    status = watch.status
    outage_since = watch.outage_since
    values = {
        "monitor_checks": float(watch.checks),
        "monitor_connects": float(watch.connects),
    }
    if status is not Status.UNKNOWN:
        values["monitor_writable"] = 1.0 if status is Status.WRITABLE else 0.0
    if outage_since is None or status is Status.WRITABLE:
        values["monitor_outage"] = 0.0
    else:
        values["monitor_outage"] = max(now - outage_since, 0.0)
    return WatchSample(str(watch.endpoint), values)


_WATCH_COMBINE = {metric.key: metric.combine for metric in MONITOR_METRICS}


def merge_watches(samples: Iterable[WatchSample]) -> list[WatchSample]:
    """One sample per endpoint, sorted by endpoint: monitors watching the same endpoint
    are combined (counters summed, ``monitor_writable`` its minimum: 0 if any monitor
    found no writable primary, ``monitor_outage`` its maximum). A key is present if any
    monitor of the endpoint has it."""
    merged: dict[str, dict[str, float]] = {}
    for sample in samples:
        values = merged.setdefault(sample.endpoint, {})
        for key, value in sample.values.items():
            combine = _WATCH_COMBINE.get(key, "sum")
            if key not in values:
                values[key] = value
            elif combine == "max":
                values[key] = max(values[key], value)
            elif combine == "min":
                values[key] = min(values[key], value)
            else:
                values[key] += value
    return [WatchSample(endpoint, merged[endpoint]) for endpoint in sorted(merged)]


# ---------------------------------------------------------------------------- events


def label_value(text: str) -> str:
    """An event's action as a label value: lower case, spaces as underscores
    (``give up`` -> ``give_up``)."""
    return text.strip().lower().replace(" ", "_")


def commit_outcome(event: RetryEvent) -> Literal["committed", "not_committed", "unknown"] | None:
    """What a :class:`~pgfailover.events.RetryEvent` says of a lost COMMIT (its
    ``outcome``), None when its failure was not a lost COMMIT whose fate was settled.

    A lost COMMIT of read-only or idempotent work is taken as not committed without asking
    the primary, and counts as ``not_committed`` too.
    """
    if event.outcome is Outcome.COMMITTED:
        return "committed"
    if event.outcome is Outcome.NOT_COMMITTED:
        return "not_committed"
    if event.outcome is Outcome.UNKNOWN:
        return "unknown"
    return None


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """A histogram's state: ``counts[i]`` observations fell in bucket ``i`` (at most
    ``bounds[i]``; the last count, one more than there are bounds, is above every
    bound), with ``total`` their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        """How many observations."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most that)`` per bucket, ending with
        ``(inf, count)``: Prometheus's ``le`` buckets."""
        running, rows = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            rows.append((bound, running))
        return rows


@dataclass(frozen=True, slots=True)
class TallySnapshot:
    """An :class:`EventTally`'s counts at one instant (every mapping is a copy)."""

    failover_errors: Mapping[tuple[str, str], int] = field(default_factory=dict)
    retries: Mapping[tuple[str, str], int] = field(default_factory=dict)
    commit_outcomes: Mapping[str, int] = field(default_factory=dict)
    write_unavailable: Mapping[str, HistogramValue] = field(default_factory=dict)

    def counts(self, key: str) -> list[tuple[tuple[str, ...], int]]:
        """The counts of event metric ``key`` (``failover_errors``, ``retries`` or
        ``commit_outcomes``) as (label values, count), sorted by label values; KeyError for
        another key."""
        if key == "commit_outcomes":
            return sorted(((outcome,), n) for outcome, n in self.commit_outcomes.items())
        counted = {"failover_errors": self.failover_errors, "retries": self.retries}[key]
        return sorted(counted.items())


class EventTally:
    """Counts what the events say and no statistic holds. Thread-safe; no I/O.

    :meth:`observe` takes every event (a hook for :func:`pgfailover.events.subscribe`):

    - a :class:`~pgfailover.events.FailoverEvent` counts under (verdict kind, SQLSTATE or
      ``""``);
    - a :class:`~pgfailover.events.RetryEvent` under (action, verdict kind), and its commit
      outcome (:func:`commit_outcome`) when it has one;
    - a :class:`~pgfailover.events.PoolEvent` ``primary reached again`` adds its
      ``recovery`` seconds to the pool's histogram (``bounds``: upper bounds in seconds,
      increasing; default :data:`UNAVAILABLE_BUCKETS`).

    Events only happen on failures: the happy path never reaches this.
    """

    def __init__(self, bounds: Iterable[float] = UNAVAILABLE_BUCKETS) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if any(b >= c for b, c in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError(f"histogram bounds must increase, got {self.bounds}")
        self._lock = threading.Lock()
        self._failover_errors: dict[tuple[str, str], int] = {}
        self._retries: dict[tuple[str, str], int] = {}
        self._outcomes: dict[str, int] = {}
        self._unavailable: dict[str, tuple[list[int], list[float]]] = {}

    def __call__(self, event: Event, /) -> None:
        """Same as :meth:`observe`: the tally itself is an event hook."""
        self.observe(event)

    def observe(self, event: Event) -> None:
        """Count ``event`` (other event types are ignored)."""
        if isinstance(event, FailoverEvent):
            key = (event.verdict.kind.value, event.verdict.sqlstate or "")
            with self._lock:
                self._failover_errors[key] = self._failover_errors.get(key, 0) + 1
        elif isinstance(event, RetryEvent):
            key = (label_value(event.action), event.cause.kind.value)
            outcome = commit_outcome(event)
            with self._lock:
                self._retries[key] = self._retries.get(key, 0) + 1
                if outcome is not None:
                    self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
        elif (
            isinstance(event, PoolEvent)
            and event.action == "primary reached again"
            and event.recovery is not None
        ):
            seconds = max(float(event.recovery), 0.0)
            index = bisect.bisect_left(self.bounds, seconds)  # le: a bound is inclusive
            with self._lock:
                counts, total = self._unavailable.setdefault(
                    event.pool, ([0] * (len(self.bounds) + 1), [0.0])
                )
                counts[index] += 1
                total[0] += seconds

    def snapshot(self) -> TallySnapshot:
        """The counts now."""
        with self._lock:
            return TallySnapshot(
                failover_errors=dict(self._failover_errors),
                retries=dict(self._retries),
                commit_outcomes=dict(self._outcomes),
                write_unavailable={
                    pool: HistogramValue(self.bounds, tuple(counts), total[0])
                    for pool, (counts, total) in self._unavailable.items()
                },
            )
