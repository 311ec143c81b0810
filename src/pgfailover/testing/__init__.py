"""Test bed for failovers: a real local cluster, failure simulation and a pytest plugin.

Needs the PostgreSQL server programs (and ``pgbouncer`` for a cluster with PgBouncer;
``patroni`` and ``etcd`` for :class:`PatroniCluster`).

The names below are imported on first use: pytest imports :mod:`pgfailover.testing.plugin`,
and with it this package, in every run of every project that installs pgfailover; that must
not start the harness's machinery (exit hooks, port reservations, OS user lookups).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._process import live_pids
    from .cluster import LocalCluster, Node, PgBouncer, Timings
    from .errors import BinariesNotFound, HarnessError
    from .patroni import Member, PatroniCluster, PatroniError, PatroniNode, PatroniTimeout
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

#: Where each public name lives (a submodule of this package).
_HOMES = {
    "BinariesNotFound": "errors",
    "ClientMessage": "proxy",
    "FaultProxy": "proxy",
    "FaultRule": "proxy",
    "FiredFault": "proxy",
    "HarnessError": "errors",
    "LocalCluster": "cluster",
    "Member": "patroni",
    "Node": "cluster",
    "PatroniCluster": "patroni",
    "PatroniError": "patroni",
    "PatroniNode": "patroni",
    "PatroniTimeout": "patroni",
    "PgBouncer": "cluster",
    "ProxiedConnection": "proxy",
    "ProxyError": "proxy",
    "ProxyStats": "proxy",
    "Timings": "cluster",
    "live_pids": "_process",
    "round_trips": "trace",
}


def __getattr__(name: str) -> object:
    """Import the submodule that defines ``name`` on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "BinariesNotFound",
    "ClientMessage",
    "FaultProxy",
    "FaultRule",
    "FiredFault",
    "HarnessError",
    "LocalCluster",
    "Member",
    "Node",
    "PatroniCluster",
    "PatroniError",
    "PatroniNode",
    "PatroniTimeout",
    "PgBouncer",
    "ProxiedConnection",
    "ProxyError",
    "ProxyStats",
    "Timings",
    "live_pids",
    "round_trips",
]
