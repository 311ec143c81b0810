"""Unit tests for pgfailover.monitor.leader: what the monitor's watch of a topology decides
(when to read the topology, which leader to look at, what a look at it means), and how
those decisions drive :class:`~pgfailover.monitor.model.EndpointWatch` to purge (LOST) and
wake (BACK) the pools. No I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgfailover.monitor.leader import (
    LeaderStep,
    TopologyEndpoint,
    leader_status,
    next_leader,
    refresh_plan,
)
from pgfailover.monitor.model import Change, Endpoint, EndpointWatch, Status
from pgfailover.topology import AsyncHostListTopology, HostListTopology
from pgfailover.topology.model import Fence, FenceAction, Member, Topology

SOURCE = "HostListTopology(db1:5432, db2:5432)"
DB1 = Member("db1:5432", "db1", 5432, "primary")
DB2 = Member("db2:5432", "db2", 5432, "primary")


def _topology(leader: Member | None, *others: Member) -> Topology:
    members = (leader, *others) if leader is not None else others
    return Topology(
        members=tuple(members),
        leader=leader.name if leader is not None else None,
        source="in-band",
        origin="db1:5432, db2:5432",
        observed_at=1.0,
    )


def test_the_endpoint_of_a_source_is_its_object_named_by_its_description() -> None:
    """One endpoint per source object: equal for the same object, distinct for two
    sources with the same description, never equal to a host endpoint; it reads as the
    source's description (no password: the description holds none)."""
    one = HostListTopology("host=db1,db2 port=5432 user=app password=secret")
    two = HostListTopology("host=db1,db2 port=5432 user=app password=secret")
    mine = TopologyEndpoint.for_source(one, one.description)
    assert mine == TopologyEndpoint.for_source(one, one.description)
    assert mine != TopologyEndpoint.for_source(two, two.description)
    assert mine != Endpoint(one.description, "", "")
    assert str(mine) == mine.address == one.description
    assert "secret" not in repr(mine)
    other = AsyncHostListTopology("host=db1 user=app")
    assert str(TopologyEndpoint.for_source(other, other.description)) == other.description


def test_refresh_while_writable_only_when_the_source_is_stale() -> None:
    """Writable (or misconfigured): read the topology only when the source says its cache
    is stale, and then for real (newer_than None)."""
    for status in (Status.WRITABLE, Status.MISCONFIGURED):
        assert refresh_plan(stale=False, status=status, now=10.0, gap=1.0) == (False, None)
        assert refresh_plan(stale=True, status=status, now=10.0, gap=1.0) == (True, None)


def test_refresh_at_every_look_while_no_writable_leader_is_known() -> None:
    """Not looked yet, down or read-only: read at every look, reusing a refresh of the
    last ``gap`` seconds unless the source is stale."""
    for status in (Status.UNKNOWN, Status.DOWN, Status.READ_ONLY):
        assert refresh_plan(stale=False, status=status, now=10.0, gap=1.0) == (True, 9.0)
        assert refresh_plan(stale=True, status=status, now=10.0, gap=1.0) == (True, None)


def test_next_leader_follows_the_named_leader() -> None:
    """First leader: look at it; same address: look again; another address: the former
    leader is named (the pools' connections there are stale); no leader: say so."""
    assert next_leader(None, _topology(DB1, DB2), SOURCE) == LeaderStep(DB1)
    assert next_leader(DB1, _topology(DB1, DB2), SOURCE) == LeaderStep(DB1)
    renamed = Member("node1", "db1", 5432, "leader")
    assert next_leader(DB1, _topology(renamed), SOURCE) == LeaderStep(renamed)
    moved = next_leader(DB1, _topology(DB2, DB1), SOURCE)
    assert moved.target == DB2
    assert moved.former == f"former leader (db2:5432 leads now, says {SOURCE})"
    none = next_leader(DB1, _topology(None, DB1, DB2), SOURCE)
    assert none.target is None
    assert none.finding.startswith(f"no leader (says {SOURCE}): ")


def test_a_leader_without_address_is_no_leader() -> None:
    """A leader whose host or port the source does not know cannot be looked at."""
    blind = Member("node1", None, None, "leader")
    assert next_leader(None, _topology(blind), SOURCE).target is None


def test_leader_status_from_the_role_and_the_fence() -> None:
    """Not writable: READ_ONLY naming the leader; writable but refused by the topology:
    DOWN with the fence's reason; writable and accepted (or validated before): WRITABLE."""
    accept = Fence(FenceAction.ACCEPT, "db1:5432 is the leader db1:5432")
    refuse = Fence(FenceAction.REFUSE, "db1:5432 is not the leader", fenced=True)
    assert leader_status(DB1, writable=False, role="standby", fence=None) == (
        Status.READ_ONLY,
        "the leader db1:5432 is a standby",
    )
    assert leader_status(DB1, writable=True, role="primary", fence=refuse) == (
        Status.DOWN,
        "the topology refuses db1:5432: db1:5432 is not the leader",
    )
    assert leader_status(DB1, writable=True, role="primary", fence=accept) == (
        Status.WRITABLE,
        "primary",
    )
    assert leader_status(DB1, writable=True, role="primary", fence=None)[0] is Status.WRITABLE


def test_a_leader_change_purges_then_wakes_the_pools() -> None:
    """The watch's sequence across a switchover (former leader named, then the new one
    writable): LOST when the leader moves, BACK when the new one is writable, and the
    endpoint's health says so."""
    watch = EndpointWatch(TopologyEndpoint.for_source(object(), SOURCE))
    assert watch.observe(Status.WRITABLE, "primary", 1.0, 1.0) is None
    step = next_leader(DB1, _topology(DB2, DB1), SOURCE)
    assert step.former is not None
    assert watch.observe(Status.DOWN, step.former, 2.0, 2.0) is Change.LOST
    assert not watch.health().writable
    assert watch.health().endpoint == SOURCE
    assert watch.observe(
        *leader_status(DB2, writable=True, role="primary", fence=None), 2.1, 2.1
    ) is (Change.BACK)
    assert watch.health().writable
    assert watch.health().monitored


_members = st.sampled_from([DB1, DB2, Member("db3:5433", "db3", 5433, "primary")])


@given(followed=st.none() | _members, leader=st.none() | _members)
def test_next_leader_names_a_former_leader_exactly_when_the_address_changes(
    followed: Member | None, leader: Member | None
) -> None:
    """For any followed and named leader: the target is the named one; a former leader is
    reported iff one was followed and the named one (present) has another address."""
    others = [m for m in (DB1, DB2) if m != leader]
    step = next_leader(followed, _topology(leader, *others), SOURCE)
    assert step.target == leader
    moved = followed is not None and leader is not None and followed.address != leader.address
    assert (step.former is not None) is moved
    assert (step.finding != "") is (leader is None)
