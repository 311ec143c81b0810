"""pgfailover's metrics, for Prometheus and OpenTelemetry (``pip install 'pgfailover[metrics]'``).

One call exports every live pgfailover pool (``pgfailover.ConnectionPool``,
``pgfailover.AsyncConnectionPool``), every SQLAlchemy engine instrumented with
:func:`pgfailover.sqlalchemy.instrument` and every live process monitor
(:class:`pgfailover.monitor.Monitor`), present and future::

    import pgfailover.metrics.prometheus
    pgfailover.metrics.prometheus.register()  # registry=None: prometheus_client's REGISTRY

    import pgfailover.metrics.otel
    pgfailover.metrics.otel.instrument()  # meter_provider=None: the global one

Importing this package imports neither library; each submodule imports its own and
raises ``ImportError`` naming the extra when it is missing. Values are read from the pools'
own statistics at each scrape or collection (``get_stats()``, never ``pop_stats()``);
only what no statistic holds comes from the events: nothing is added to the path of a
transaction. Pools that share a name are summed into one series. Counters come from
psycopg_pool's running totals: an application calling ``pop_stats()`` resets them.

Per pool (Prometheus label ``pool``; OpenTelemetry attribute
``db.client.connection.pool.name``; an engine's pool is named by its URL without the
password). Prometheus name / OpenTelemetry name (unit): meaning.

- ``pgfailover_pool_connections{state}`` / ``db.client.connection.count`` (``{connection}``,
  attribute ``db.client.connection.state``): connections ``idle`` in the pool, or ``used``
  (checked out, or being opened or checked by the pool).
- ``pgfailover_pool_connections_max`` / ``db.client.connection.max`` (``{connection}``):
  the most connections the pool may open.
- ``pgfailover_pool_pending_requests`` / ``db.client.connection.pending_requests``
  (``{request}``): requests waiting for a connection now.
- ``pgfailover_pool_timeouts_total`` / ``db.client.connection.timeouts`` (``{timeout}``):
  requests that got no connection (timed out, refused by ``max_waiting``, cancelled).
- ``pgfailover_pool_requests_total`` / ``pgfailover.pool.requests`` (``{request}``).
- ``pgfailover_pool_requests_queued_total`` / ``pgfailover.pool.requests.queued``
  (``{request}``): requests that had to wait.
- ``pgfailover_pool_connection_wait_seconds_total`` /
  ``pgfailover.pool.connection.wait_time`` (``s``): seconds those requests waited.
- ``pgfailover_pool_connection_use_seconds_total`` / ``pgfailover.pool.connection.use_time``
  (``s``): seconds connections were held in ``pool.connection()`` blocks.
- ``pgfailover_pool_connection_attempts_total`` / ``pgfailover.pool.connection.attempts``
  and ``pgfailover_pool_connection_errors_total`` / ``pgfailover.pool.connection.errors``
  (``{connection}``): connections the pool tried to open, and those that failed.
- ``pgfailover_pool_connection_create_seconds_total`` /
  ``pgfailover.pool.connection.create_time`` (``s``): seconds spent opening the ones that
  opened.
- ``pgfailover_pool_connections_lost_total`` / ``pgfailover.pool.connection.lost``
  (``{connection}``): connections the pool found broken.
- ``pgfailover_failovers_detected_total`` / ``pgfailover.failovers.detected``
  (``{failover}``): outages noticed.
- ``pgfailover_connections_poisoned_total`` / ``pgfailover.connections.poisoned``
  (``{connection}``): connections discarded after a failure.
- ``pgfailover_generations_purged_total`` / ``pgfailover.generations.purged`` (``{purge}``).
- ``pgfailover_probes_total`` / ``pgfailover.probes`` (``{probe}``): role queries run.
- ``pgfailover_connections_rejected_total`` / ``pgfailover.connections.rejected``
  (``{connection}``): connections that led to no writable primary.
- ``pgfailover_last_recovery_seconds`` / ``pgfailover.recovery.last`` (``s``, gauge): the
  last outage's write-unavailable time.
- ``pgfailover_outage_in_progress`` / ``pgfailover.outage.active`` (``1``, gauge): 1 while
  the pool is in an outage.

Per endpoint a live monitor watches (Prometheus label ``endpoint``, OpenTelemetry
attribute ``endpoint``: ``host:port/dbname``, never a password; monitors watching the same
endpoint are combined), read from what the watch last found (no I/O at a scrape):

- ``pgfailover_monitor_writable`` / ``pgfailover.monitor.writable`` (``1``, gauge): 1 when
  the last look found a writable primary, 0 otherwise (the minimum over monitors); absent
  before the first look.
- ``pgfailover_monitor_checks_total`` / ``pgfailover.monitor.checks`` (``{check}``) and
  ``pgfailover_monitor_connects_total`` / ``pgfailover.monitor.connects``
  (``{connection}``): looks taken and watch connection attempts made since the watch began.
- ``pgfailover_monitor_outage_seconds`` / ``pgfailover.monitor.outage.duration`` (``s``,
  gauge): seconds since the current outage began, 0 when none.

From the events (counted from the moment of ``register()`` / ``instrument()``):

- ``pgfailover_failover_errors_total{kind,sqlstate}`` / ``pgfailover.failover_errors``
  (``{error}``, attributes ``pgfailover.failure.kind``, ``db.response.status_code``):
  connections found unusable, by verdict kind and SQLSTATE.
- ``pgfailover_write_unavailable_seconds{pool}`` (histogram) /
  ``pgfailover.write_unavailable.duration`` (``s``, histogram): the write-unavailable
  time of each outage, one observation per outage and pool.
- ``pgfailover_retries_total{action,kind}`` / ``pgfailover.retries`` (``{attempt}``,
  attributes ``pgfailover.retry.action``, ``pgfailover.failure.kind``): failed runner
  attempts by what followed: ``retry``, ``give_up``, ``committed``.
- ``pgfailover_commit_outcomes_total{outcome}`` / ``pgfailover.commit_outcomes``
  (``{commit}``, attribute ``pgfailover.commit.outcome``): lost COMMITs found
  ``committed``, ``not_committed`` or ``unknown``.

The semantic conventions' ``db.client.connection.create_time``, ``wait_time`` and
``use_time`` are histograms; psycopg_pool keeps only totals, so they are exported as the
``..._seconds_total`` counters above (means per interval, not distributions).

``pgfailover.metrics.prometheus`` and ``pgfailover.metrics.otel`` are imported on first
access (``pgfailover.metrics.prometheus`` works after ``import pgfailover.metrics``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["otel", "prometheus"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
