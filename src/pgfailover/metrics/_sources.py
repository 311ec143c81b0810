"""Where the metrics' values come from: the process's live pools, instrumented engines and
process monitors.

Read at each scrape or collection, never on the hot path: a pool's ``get_stats()`` (never
``pop_stats()``, which would reset the application's own counters), its failover state;
for an instrumented SQLAlchemy engine its pool's sizes and its instrumentation's counters;
for each live monitor what it last found at each endpoint it watches (no I/O of its own).
SQLAlchemy is looked at only when :mod:`pgfailover.sqlalchemy` is already imported (no
engine can be instrumented otherwise): this module imports neither.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from .. import _registry
from ..monitor._runtime import monitors
from ._core import (
    Sample,
    WatchSample,
    engine_sample,
    merge,
    merge_watches,
    pool_sample,
    watch_sample,
)

logger = logging.getLogger("pgfailover.metrics")


def samples() -> list[Sample]:
    """One :class:`~pgfailover.metrics._core.Sample` per pool name (pools and engines
    that share a name are combined), sorted by name. A pool whose statistics cannot be
    read (closed meanwhile) is skipped and logged at DEBUG: a scrape never fails for it.
    """
    found: list[Sample] = []
    for pool in _registry.pools():
        try:
            state = pool.failover_state
            found.append(
                pool_sample(str(pool.name), pool.get_stats(), outage=state.outage_since is not None)
            )
        except Exception:  # a pool closing under our feet must not break the scrape
            logger.debug("cannot read the statistics of pool %r", pool, exc_info=True)
    found.extend(_engine_samples())
    return merge(found)


def _engine_samples() -> list[Sample]:
    module = sys.modules.get("pgfailover.sqlalchemy")
    if module is None:
        return []
    from sqlalchemy.pool import QueuePool  # noqa: PLC0415 - imported already (see above)

    with module._registry_lock:
        items: list[tuple[Any, Any]] = list(module._registry.items())
    found: list[Sample] = []
    for engine, instrumentation in items:
        if not instrumentation.installed:
            continue
        try:
            pool = engine.pool
            checked_in = checked_out = max_connections = None
            if isinstance(pool, QueuePool):
                checked_in, checked_out = pool.checkedin(), pool.checkedout()
                overflow = getattr(pool, "_max_overflow", -1)
                if isinstance(overflow, int) and overflow >= 0:
                    max_connections = pool.size() + overflow
            state = instrumentation.state
            found.append(
                engine_sample(
                    state.name,
                    instrumentation.stats(),
                    outage=state.outage_since is not None,
                    checked_in=checked_in,
                    checked_out=checked_out,
                    max_connections=max_connections,
                )
            )
        except Exception:  # an engine disposed under our feet must not break the scrape
            logger.debug("cannot read the statistics of engine %r", engine, exc_info=True)
    return found


def watch_samples() -> list[WatchSample]:
    """One :class:`~pgfailover.metrics._core.WatchSample` per endpoint watched by a live
    monitor (:func:`~pgfailover.monitor._runtime.monitors`: made, not closed), sorted by
    endpoint; monitors watching the same endpoint are combined. Reads what the watches
    already know: no I/O, no lock held while reading a watch. A monitor that cannot be
    read (closed meanwhile) is skipped and logged at DEBUG."""
    now = time.monotonic()
    found: list[WatchSample] = []
    for monitor in monitors():
        try:
            for endpoint in monitor.endpoints():
                watch = monitor.watch_of(endpoint)
                if watch is not None:  # its last member left meanwhile
                    found.append(watch_sample(watch, now))
        except Exception:  # a monitor closing under our feet must not break the scrape
            logger.debug("cannot read the watches of monitor %r", monitor, exc_info=True)
    return merge_watches(found)
