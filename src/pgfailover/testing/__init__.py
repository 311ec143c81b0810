"""Test bed for failovers: a real local cluster, failure simulation and a pytest plugin.

Needs the PostgreSQL server programs (and ``pgbouncer`` for a cluster with PgBouncer).
"""

from __future__ import annotations

from ._process import live_pids
from .cluster import LocalCluster, Node, PgBouncer, Timings
from .errors import BinariesNotFound, HarnessError
from .proxy import (
    ClientMessage,
    FaultProxy,
    FaultRule,
    FiredFault,
    ProxiedConnection,
    ProxyError,
    ProxyStats,
)
from .trace import round_trips

__all__ = [
    "BinariesNotFound",
    "ClientMessage",
    "FaultProxy",
    "FaultRule",
    "FiredFault",
    "HarnessError",
    "LocalCluster",
    "Node",
    "PgBouncer",
    "ProxiedConnection",
    "ProxyError",
    "ProxyStats",
    "Timings",
    "live_pids",
    "round_trips",
]
