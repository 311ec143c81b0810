"""What the monitor concludes when it follows a topology's leader. No I/O.

Pools made with ``topology=`` connect to the leader a topology source names, not to a
fixed endpoint. The monitor keeps one watch per source object (shared by every pool using
it, whatever its kind: :class:`~pgfailover.topology.AsyncTopologySource` or
:class:`~pgfailover.topology.TopologySource`), keyed by :class:`TopologyEndpoint`. Each
look of that watch:

1. reads the topology again when :func:`refresh_plan` says so (the source's own refresh,
   single-flight: a refresh a pool made a moment ago is reused);
2. :func:`next_leader` says which member to look at, and whether the one followed until
   now is a former leader (the pools' connections to it are then stale: purge);
3. looks at that leader with the pools' conninfo (the endpoint watch's role query; on a new
   connection also the topology's in-band validation, as the pools do) and
   :func:`leader_status` turns what it saw into a :class:`~.model.Status` for the
   :class:`~.model.EndpointWatch`, whose :meth:`~.model.EndpointWatch.observe` decides
   LOST / BACK as for any endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..topology.model import Fence, Member, Topology, former_leader
from .model import Endpoint, Status


@dataclass(frozen=True, slots=True)
class TopologyEndpoint(Endpoint):
    """The "endpoint" of the pools that follow one topology source object: equal only for
    the same object (``source_id`` is its ``id()``, unique while the watch holds it).
    ``hosts`` holds the source's description (no password), which is also what
    :attr:`address` and ``str()`` say; ``ports`` and ``dbname`` are empty."""

    source_id: int = 0

    def __str__(self) -> str:
        return self.hosts

    @property
    def address(self) -> str:
        """The source's description, as the pools' errors name it."""
        return self.hosts

    @classmethod
    def for_source(cls, source: object, description: str) -> TopologyEndpoint:
        """The endpoint of ``source`` (described by ``description``)."""
        return cls(description, "", "", id(source))


def refresh_plan(
    *, stale: bool, status: Status, now: float, gap: float
) -> tuple[bool, float | None]:
    """Whether a look reads the topology again, and the ``newer_than`` to pass to the
    source's ``refresh()`` (a ``time.monotonic()`` instant: a topology observed at or after
    it is reused without I/O; None: a refresh is made unless another caller's is under way).

    While the endpoint is writable (or misconfigured, where asking faster cannot help) only
    when the source says its topology is ``stale`` (none yet, invalidated by a pool's
    failover verdict, older than its ``max_age``, leaderless). While no writable leader is
    known (not looked yet, down, read-only) at every look, reusing any refresh made in the
    last ``gap`` seconds (the source's ``follow_interval``: 0.1 s for Patroni's REST API,
    1 s for a host list, whose refresh connects to every host).
    """
    if status in (Status.WRITABLE, Status.MISCONFIGURED):
        return stale, None
    return True, None if stale else now - gap


@dataclass(frozen=True, slots=True)
class LeaderStep:
    """What a look does with the topology it read.

    ``target``: the member to look at (None: the topology names no leader; ``finding`` then
    says so). ``former``: set when the watch followed another leader until now; the finding
    for it (the pools' connections there are stale, even if it still accepts writes).
    """

    target: Member | None
    former: str | None = None
    finding: str = ""


def next_leader(followed: Member | None, topology: Topology, source: str) -> LeaderStep:
    """The step for a look that read ``topology`` from ``source`` (its description) while
    following ``followed`` (None: no leader followed yet, or none since the last outage).

    Members are compared by address (``host:port``): a member renamed in place is the same
    leader, a new address is a new leader."""
    target = topology.write_target
    if target is None:
        return LeaderStep(None, None, f"no leader (says {source}): {topology.describe()}")
    if followed is not None and followed.address != target.address:
        return LeaderStep(target, former_leader(followed, target, source))
    return LeaderStep(target)


def leader_status(
    leader: Member, *, writable: bool, role: str, fence: Fence | None
) -> tuple[Status, str]:
    """The status and finding of one look at ``leader``.

    ``writable`` and ``role`` are what the role query found (``role`` a finding such as
    ``standby``, used when not writable); ``fence`` the topology's in-band verdict when the
    look made a new connection (None: the connection was validated before). Not writable:
    READ_ONLY. Writable but refused by the topology (not the leader it names now, an older
    timeline): DOWN, since writes must not go there. Otherwise WRITABLE.
    """
    if not writable:
        return Status.READ_ONLY, f"the leader {leader.address} is a {role}"
    if fence is not None and not fence.accepted:
        return Status.DOWN, f"the topology refuses {leader.address}: {fence.reason}"
    return Status.WRITABLE, "primary"
