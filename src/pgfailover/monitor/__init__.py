"""One monitor per process: notice a failover before requests do, recover faster.

Pools register with the process's :class:`Monitor` when they open (``monitor=True``, the
default; ``monitor=False`` keeps a pool on its own; a :class:`Monitor` of your own changes
the timings) and leave it when they close, and so do SQLAlchemy engines given to
``instrument(engine)``. The cost: one daemon thread per process, one connection per
endpoint, one role query per second on it while all is well.
For each endpoint (host list, ports, database), not each pool, the monitor keeps one watch
connection:

- while all is well it runs one role query every ``interval`` (1 s, +/-20 % jitter) and, on
  a direct connection, notices the loss of its session at once (it waits on the socket);
- when the endpoint stops being writable (lost, standby, read-only) it purges the stale
  connections of every pool there before requests meet them, and the pools stop making
  connection attempts of their own: the monitor alone looks, every ``outage_interval``
  (50 ms), so a process has one prober per endpoint whatever its number of pools;
- when a writable primary is back it wakes the pools, spread over up to 0.25 s so that a
  hundred pools do not stampede PgBouncer or the server.

A pool made with ``topology=`` is watched through its topology source instead: one watch
per source object (shared by the pools using it) reads the topology (the source's own
single-flight refresh: at every look while no writable leader is known, otherwise when the
source's cache is stale), looks at the leader it names with the pool's conninfo (the same
role query, and on each new connection the topology's in-band validation), and purges the
pools when the leader changes or stops being writable, waking them when a writable leader
is found (:mod:`pgfailover.monitor.leader`).

A pool whose own request meets a failure first makes the watch look at once. A pool the
monitor cannot watch (a callable conninfo) keeps its own single-flight prober.
The monitor runs in one daemon thread with its own asyncio loop, for sync and async pools
alike. Decisions are pure (:mod:`pgfailover.monitor.model`).
"""

from __future__ import annotations

from ._runtime import (
    CONNECT_TIMEOUT,
    PROBE_TIMEOUT,
    Member,
    Monitor,
    WatchTarget,
    monitors,
    process_monitor,
)
from ._topology_watch import TopologyTarget
from .leader import TopologyEndpoint
from .model import INTERVAL, OUTAGE_INTERVAL, Endpoint, EndpointWatch, Health, Status

__all__ = [
    "CONNECT_TIMEOUT",
    "INTERVAL",
    "OUTAGE_INTERVAL",
    "PROBE_TIMEOUT",
    "Endpoint",
    "EndpointWatch",
    "Health",
    "Member",
    "Monitor",
    "Status",
    "TopologyEndpoint",
    "TopologyTarget",
    "WatchTarget",
    "monitors",
    "process_monitor",
]
