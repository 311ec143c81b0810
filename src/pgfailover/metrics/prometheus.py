"""pgfailover's metrics for prometheus_client: one collector, registered with one call.

::

    import pgfailover.metrics.prometheus

    pgfailover.metrics.prometheus.register()  # prometheus_client's default REGISTRY

    # or a registry of your own
    collector = pgfailover.metrics.prometheus.register(my_registry)
    collector.unregister()

The collector reads the process's live pgfailover pools and instrumented SQLAlchemy engines
at each scrape (their ``get_stats()``: never ``pop_stats()``), what each live process
monitor last found at the endpoints it watches, and the events
(:func:`pgfailover.events.subscribe`) for what no statistic holds. Nothing is added to the
path of a transaction. Every metric, its type, unit and labels: :mod:`pgfailover.metrics`
and ``docs/monitoring.md``.

Needs ``prometheus-client``: ``pip install 'pgfailover[metrics]'``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as ex:  # pragma: no cover - the extra is installed in development
    raise ImportError(
        "pgfailover.metrics.prometheus needs prometheus-client: pip install 'pgfailover[metrics]'"
    ) from ex

from .. import events
from . import _core, _sources

__all__ = ["PgfailoverCollector", "register"]

_lock = threading.Lock()
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, PgfailoverCollector] = (
    weakref.WeakKeyDictionary()
)


def _family(metric: _core.Metric) -> GaugeMetricFamily | CounterMetricFamily:
    if metric.type == "counter":
        return CounterMetricFamily(metric.prometheus, metric.description, labels=metric.labels)
    return GaugeMetricFamily(metric.prometheus, metric.description, labels=metric.labels)


def _filled(
    metric: _core.Metric, points: Iterable[tuple[tuple[str, ...], float]]
) -> GaugeMetricFamily | CounterMetricFamily:
    """The family of ``metric`` with one sample per point (label values, value)."""
    family = _family(metric)
    for labels, value in points:
        family.add_metric(list(labels), value)
    return family


def _histogram(metric: _core.Metric) -> HistogramMetricFamily:
    return HistogramMetricFamily(metric.prometheus, metric.description, labels=metric.labels)


class PgfailoverCollector(Collector):
    """The prometheus_client collector of every pgfailover metric (see the module doc).

    Made by :func:`register`; ``registry`` is the registry it is registered with. Its
    event-fed counts start when it is made: events before are not counted.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tally = _core.EventTally()
        self._unsubscribe: Callable[[], None] | None = None

    def describe(self) -> Iterator[Metric]:
        """Every family, without samples: what prometheus_client checks for clashes with
        the registry's other collectors (no pool is read to answer)."""
        for metric in _core.POOL_METRICS + _core.MONITOR_METRICS:
            yield _family(metric)
        for metric in _core.EVENT_METRICS:
            yield _histogram(metric) if metric.type == "histogram" else _family(metric)

    def collect(self) -> Iterator[Metric]:
        """The families with the values of now: per pool, per monitored endpoint, then
        from the events."""
        samples = _sources.samples()
        for metric in _core.POOL_METRICS:
            yield _filled(metric, _core.pool_points(metric, samples))
        watches = _sources.watch_samples()
        for metric in _core.MONITOR_METRICS:
            yield _filled(metric, _core.watch_points(metric, watches))
        snapshot = self.tally.snapshot()
        histogram = _histogram(_core.EVENT["write_unavailable"])
        for pool, hist in sorted(snapshot.write_unavailable.items()):
            buckets = [(_le(bound), float(n)) for bound, n in hist.cumulative()]
            histogram.add_metric([pool], buckets, hist.total)
        yield _filled(_core.EVENT["failover_errors"], snapshot.counts("failover_errors"))
        yield histogram
        for key in ("retries", "commit_outcomes"):
            yield _filled(_core.EVENT[key], snapshot.counts(key))

    def unregister(self) -> None:
        """Remove the collector from its registry and stop counting events. Idempotent;
        :func:`register` may then make a new one (its event counts start from 0)."""
        with _lock:
            if _collectors.get(self.registry) is self:
                del _collectors[self.registry]
                self.registry.unregister(self)
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def __repr__(self) -> str:
        state = "registered" if self._unsubscribe is not None else "unregistered"
        return f"<{type(self).__name__} {state}>"


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client's own histograms write it (``0.05``,
    ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def register(registry: CollectorRegistry | None = None) -> PgfailoverCollector:
    """Register pgfailover's collector with ``registry`` and return it.

    ``registry`` None means prometheus_client's default ``REGISTRY`` (what
    ``start_http_server`` and ``make_wsgi_app`` serve by default). Idempotent per registry:
    a second call with the same registry returns the collector already registered (one
    event subscription, no duplicate series). Raises ``TypeError`` for anything but a
    ``CollectorRegistry``, and prometheus_client's ``ValueError`` if another collector of
    that registry already exports one of pgfailover's metric names.
    """
    if registry is None:
        registry = REGISTRY
    if not isinstance(registry, CollectorRegistry):
        raise TypeError(
            "register() takes a prometheus_client CollectorRegistry (or None for the "
            f"default REGISTRY), got {type(registry).__name__}"
        )
    with _lock:
        existing = _collectors.get(registry)
        if existing is not None:
            return existing
        collector = PgfailoverCollector(registry)
        registry.register(collector)  # raises on a clash, before anything is subscribed
        collector._unsubscribe = events.subscribe(collector.tally)
        _collectors[registry] = collector
    return collector
