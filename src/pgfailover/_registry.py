"""The process's failover-aware pools, weakly held: what the metrics and readiness read.

A pool adds itself when it is made and is forgotten when it is closed or collected; an
instrumented SQLAlchemy engine is found through :func:`pgfailover.sqlalchemy.instrumentation_of`
and the SQLAlchemy module's own registry. No I/O; thread-safe.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_lock = threading.Lock()
_pools: weakref.WeakSet[Any] = weakref.WeakSet()


def add_pool(pool: Any) -> None:
    """Remember ``pool`` (a pgfailover ``ConnectionPool`` or ``AsyncConnectionPool``)."""
    with _lock:
        _pools.add(pool)


def discard_pool(pool: Any) -> None:
    """Forget ``pool`` (closed); a pool never added is ignored."""
    with _lock:
        _pools.discard(pool)


def pools() -> list[Any]:
    """The pools alive and not closed, in no particular order."""
    with _lock:
        found = list(_pools)
    return [pool for pool in found if not getattr(pool, "closed", False)]
