"""pgfailover's metrics as OpenTelemetry instruments, after the database-client conventions.

::

    import pgfailover.metrics.otel

    pgfailover.metrics.otel.instrument()  # the global MeterProvider
    pgfailover.metrics.otel.instrument(meter_provider)  # or one of your own

The instruments are observable: the SDK's reader calls them at each collection and they
read the process's live pgfailover pools and instrumented SQLAlchemy engines
(``get_stats()``, never ``pop_stats()``), attributed with
``db.client.connection.pool.name``, and what each live process monitor last found at the
endpoints it watches (``pgfailover.monitor.*``, attribute ``endpoint``). What no statistic
holds comes from the events (:func:`pgfailover.events.subscribe`): failover errors by
verdict kind and SQLSTATE, retries, commit outcomes, and the histogram
``pgfailover.write_unavailable.duration`` recorded once per outage. Nothing is added to the
path of a transaction.

From the semantic conventions for database-client connection pools (experimental in
them): ``db.client.connection.count`` (attribute ``db.client.connection.state``: ``idle``
or ``used``), ``db.client.connection.max``, ``db.client.connection.pending_requests``,
``db.client.connection.timeouts``. The conventions' ``create_time``, ``wait_time`` and
``use_time`` are histograms of each connection's or request's duration; psycopg_pool keeps
only their running totals, and recording each duration would add work to every
checkout, so they are exported as counters of seconds under pgfailover's names
(``pgfailover.pool.connection.create_time``, ``...wait_time``, ``...use_time``) with the
counts that give their means (``...attempts`` - ``...errors``, ``pgfailover.pool.requests
.queued``): a mean per interval, not a distribution. Every instrument:
:mod:`pgfailover.metrics` and ``docs/monitoring.md``.

Needs ``opentelemetry-api`` (and an SDK to export): ``pip install 'pgfailover[metrics]'``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation
except ImportError as ex:  # pragma: no cover - the extra is installed in development
    raise ImportError(
        "pgfailover.metrics.otel needs opentelemetry-api: pip install 'pgfailover[metrics]'"
    ) from ex

from .. import events
from . import _core, _sources

__all__ = ["PgfailoverInstruments", "instrument"]

_lock = threading.Lock()
_instruments: weakref.WeakKeyDictionary[MeterProvider, PgfailoverInstruments] = (
    weakref.WeakKeyDictionary()
)

#: The instrumentation scope's name (the meter's).
SCOPE = "pgfailover"

Callback = Callable[[CallbackOptions], Iterable[Observation]]


def _attributes(labels: Iterable[str], values: Iterable[str]) -> dict[str, str]:
    """Prometheus labels as OpenTelemetry attributes; an empty value (no SQLSTATE) is
    left out."""
    return {
        _core.ATTRIBUTES[label]: value
        for label, value in zip(labels, values, strict=True)
        if value != ""
    }


class PgfailoverInstruments:
    """pgfailover's instruments on one meter provider (see the module doc).

    Made by :func:`instrument`. ``histogram`` is the write-unavailable histogram;
    ``tally`` counts the events since the object was made.
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        self.meter_provider = meter_provider
        self.meter = meter_provider.get_meter(SCOPE)
        self.tally = _core.EventTally()
        self._active = False
        self._unsubscribe: Callable[[], None] | None = None
        for metric in _core.POOL_METRICS:
            self._observable(metric, self._pool_callback(metric))
        for metric in _core.MONITOR_METRICS:
            self._observable(metric, self._monitor_callback(metric))
        self._observable(_core.EVENT["failover_errors"], self._event_callback("failover_errors"))
        self._observable(_core.EVENT["retries"], self._event_callback("retries"))
        self._observable(_core.EVENT["commit_outcomes"], self._event_callback("commit_outcomes"))
        self.histogram = self._histogram(_core.EVENT["write_unavailable"])

    # -- instruments
    def _observable(self, metric: _core.Metric, callback: Callback) -> None:
        make = (
            self.meter.create_observable_counter
            if metric.type == "counter"
            else self.meter.create_observable_up_down_counter
            if metric.up_down
            else self.meter.create_observable_gauge
        )
        make(metric.otel, callbacks=[callback], unit=metric.unit, description=metric.description)

    def _histogram(self, metric: _core.Metric) -> Histogram:
        try:
            return self.meter.create_histogram(
                metric.otel,
                unit=metric.unit,
                description=metric.description,
                explicit_bucket_boundaries_advisory=_core.UNAVAILABLE_BUCKETS,
            )
        except TypeError:  # opentelemetry-api < 1.23: no advisory, the SDK's own buckets
            return self.meter.create_histogram(
                metric.otel, unit=metric.unit, description=metric.description
            )

    def _pool_callback(self, metric: _core.Metric) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            if not self._active:
                return []
            points = _core.pool_points(metric, _sources.samples())
            return [Observation(v, _attributes(metric.labels, labels)) for labels, v in points]

        return observe

    def _monitor_callback(self, metric: _core.Metric) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            if not self._active:
                return []
            points = _core.watch_points(metric, _sources.watch_samples())
            return [Observation(v, _attributes(metric.labels, labels)) for labels, v in points]

        return observe

    def _event_callback(self, key: str) -> Callback:
        metric = _core.EVENT[key]

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            if not self._active:
                return []
            return [
                Observation(count, _attributes(metric.labels, labels))
                for labels, count in self.tally.snapshot().counts(key)
            ]

        return observe

    # -- events
    def _on_event(self, event: events.Event, /) -> None:
        self.tally.observe(event)
        if (
            isinstance(event, events.PoolEvent)
            and event.action == "primary reached again"
            and event.recovery is not None
        ):
            self.histogram.record(max(event.recovery, 0.0), {_core.POOL_NAME: event.pool})

    def _start(self) -> None:
        self._active = True
        if self._unsubscribe is None:
            self._unsubscribe = events.subscribe(self._on_event)

    def unregister(self) -> None:
        """Stop: the instruments report nothing more and events are no longer counted.
        OpenTelemetry's API cannot remove an instrument from its meter, so the instruments
        stay (empty); :func:`instrument` with the same provider starts this object again
        rather than making duplicates. Idempotent."""
        with _lock:
            self._active = False
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def __repr__(self) -> str:
        state = "active" if self._active else "stopped"
        return f"<{type(self).__name__} {state} on {type(self.meter_provider).__name__}>"


def instrument(meter_provider: MeterProvider | None = None) -> PgfailoverInstruments:
    """Create pgfailover's instruments on ``meter_provider`` and return them.

    ``meter_provider`` None means OpenTelemetry's global provider (a proxy until the
    application sets one: the instruments then reach the provider set later). Idempotent
    per provider: a second call returns the same object (no duplicate instruments, one
    event subscription); after :meth:`~PgfailoverInstruments.unregister` it starts it
    again. Raises ``TypeError`` for anything but an OpenTelemetry ``MeterProvider``.
    """
    if meter_provider is None:
        meter_provider = otel_metrics.get_meter_provider()
    if not isinstance(meter_provider, MeterProvider):
        raise TypeError(
            "instrument() takes an OpenTelemetry MeterProvider (or None for the global "
            f"one), got {type(meter_provider).__name__}"
        )
    with _lock:
        instruments = _instruments.get(meter_provider)
        if instruments is None:
            instruments = PgfailoverInstruments(meter_provider)
            _instruments[meter_provider] = instruments
        instruments._start()
    return instruments
