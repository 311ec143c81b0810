# pgfailover: generate-sync
"""The cluster as the hosts of a multi-host conninfo show it in-band, without an HA store.

``AsyncHostListTopology("host=db1,db2,db3 port=5432 dbname=app user=app")``
(``HostListTopology`` in the generated ``hosts.py``) is the same interface as
:class:`~.patroni_async.AsyncPatroniTopology`, discovered by asking every host: each refresh
connects to all of them concurrently (``connect_timeout`` = max(2, ceil(``timeout``)), the
query bounded by ``timeout``) and asks ``pg_is_in_recovery()``, the timeline and the WAL
position (see :data:`~._io.INBAND_SQL`).

The leader is the one writable primary. When several hosts claim to be primary (an old
primary started by hand after a failover, a split brain) the one on the highest timeline is
chosen and the situation is reported once as a ``split brain``
:class:`~pgfailover.events.TopologyEvent`; with a tie, or a timeline unknown, none is chosen
(:class:`~.model.NoLeader`). A primary on a timeline lower than the leader's last seen by
this source is never chosen: it is an old primary. A standby's lag is the leader's WAL
position minus the standby's replay position, in bytes.

The member list is the conninfo's host list: it changes only with a new source.
"""

from __future__ import annotations

import dataclasses
import time

from ..survey import HostTarget, split_hosts
from .model import Member, Topology, inband_topology, next_generation
from .source_async import AsyncTopologySource


class AsyncHostListTopology(AsyncTopologySource):
    """The cluster seen in-band through the hosts of ``conninfo`` (see the module docstring).

    ``conninfo``: a libpq conninfo string or URL listing the hosts (``host=a,b port=x,y``,
    one port for all or one per host; ``hostaddr`` lists too) with the credentials to
    connect; ``target_session_attrs`` and ``load_balance_hosts`` are ignored. Raises
    :class:`~pgfailover.errors.InvalidConninfo` for one libpq cannot parse, or mismatched
    lists, ``ValueError`` for an empty or missing host. ``timeout`` and ``max_age``
    (default 10 s) as for every source.
    """

    #: A refresh opens a connection to every host: a pending attempt asks once a second.
    follow_interval = 1.0

    def __init__(
        self, conninfo: str, *, timeout: float = 2.0, max_age: float | None = 10.0
    ) -> None:
        if not isinstance(conninfo, str):
            raise TypeError(f"conninfo must be a string, got {type(conninfo).__name__}")
        targets = split_hosts(conninfo)
        if any(t.host is None and t.hostaddr is None for t in targets):
            raise ValueError(
                "a host list topology needs every host in the conninfo (host=db1,db2 ...):"
                " an empty or default host cannot be told apart"
            )
        super().__init__(conninfo=conninfo, timeout=timeout, max_age=max_age)
        self._targets: list[HostTarget] = targets
        self.members = tuple(
            Member(t.address, t.host or t.hostaddr, t.port or 5432, "unknown") for t in targets
        )
        self._floor = 0  # the highest timeline a leader was seen on

    @property
    def description(self) -> str:
        return f"HostListTopology({', '.join(m.address for m in self.members)})"

    async def _discover(self, previous: Topology | None) -> Topology:
        observations = await self._check(self.members, [t.conninfo for t in self._targets])
        topology = inband_topology(
            observations,
            source="in-band",
            origin=", ".join(m.address for m in self.members),
            observed_at=time.monotonic(),
            observed_wall=time.time(),
            names=[m.name for m in self.members],
            # the highest leader timeline seen so far: an old primary never wins again
            min_timeline=self._floor or None,
        )
        leader = topology.leader_member
        if leader is not None and leader.timeline is not None:
            self._floor = max(self._floor, leader.timeline)
        return dataclasses.replace(topology, generation=next_generation(previous, leader))
