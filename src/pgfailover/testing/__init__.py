"""Test bed for failovers: a real local cluster, failure simulation and a pytest plugin.

Needs the PostgreSQL server programs (and ``pgbouncer`` for a cluster with PgBouncer).
"""

from __future__ import annotations

from ._process import live_pids
from .cluster import LocalCluster, Node, PgBouncer, Timings
from .errors import BinariesNotFound, HarnessError

__all__ = [
    "BinariesNotFound",
    "HarnessError",
    "LocalCluster",
    "Node",
    "PgBouncer",
    "Timings",
    "live_pids",
]
