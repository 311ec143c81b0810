"""Topology: who the members of the cluster are, which one is the leader, their timelines
and lag, and when and where that was seen.

- :mod:`.model` is the pure core: frozen values (:class:`Member`, :class:`Topology`,
  :class:`Observation`, :class:`Fence`) and decisions (:func:`parse_cluster`,
  :func:`choose_leader`, :func:`fence`, :func:`conninfo_for`). No I/O.
- Sources fill it: :class:`PatroniTopology` / :class:`AsyncPatroniTopology` read Patroni's
  REST API (``GET /cluster``) and fall back to in-band checks of the last known members;
  :class:`HostListTopology` / :class:`AsyncHostListTopology` check the hosts of a multi-host
  conninfo in-band. All share one interface (:class:`TopologySource` /
  :class:`AsyncTopologySource`): ``current()``, ``refresh()``, ``invalidate()``,
  ``conninfo_for_leader(base_conninfo)``, ``validate(conn)``.

The async sources are written once (``*_async.py``); the sync ones are generated from them.
"""

from __future__ import annotations

from .hosts import HostListTopology
from .hosts_async import AsyncHostListTopology
from .model import (
    Fence,
    FenceAction,
    LeaderMoved,
    Member,
    NoLeader,
    Observation,
    Topology,
    TopologyError,
    TopologySchemaError,
    TopologyUnavailable,
    attempt_outdated,
    choose_leader,
    conninfo_for,
    fence,
    parse_cluster,
)
from .patroni import PatroniTopology
from .patroni_async import AsyncPatroniTopology
from .source import TopologySource
from .source_async import AsyncTopologySource

__all__ = [
    "AsyncHostListTopology",
    "AsyncPatroniTopology",
    "AsyncTopologySource",
    "Fence",
    "FenceAction",
    "HostListTopology",
    "LeaderMoved",
    "Member",
    "NoLeader",
    "Observation",
    "PatroniTopology",
    "Topology",
    "TopologyError",
    "TopologySchemaError",
    "TopologySource",
    "TopologyUnavailable",
    "attempt_outdated",
    "choose_leader",
    "conninfo_for",
    "fence",
    "parse_cluster",
]
