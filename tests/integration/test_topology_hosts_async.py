# pgfailover: generate-sync
"""The host-list topology source against the real session cluster: discovery in-band,
unreachable hosts, a switchover, and two primaries at once (a split brain).

Written once, async; ``tools/async_to_sync.py`` generates ``test_topology_hosts.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgfailover
from pgfailover.events import TopologyEvent
from pgfailover.testing import LocalCluster
from pgfailover.testing._ports import release_port, reserve_port
from pgfailover.topology.hosts_async import AsyncHostListTopology

from .support import table

TIMEOUT = 1.0
#: A fault must end within the source's bound plus this much (a loaded 2-core machine).
SLACK = 3.0


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on."""
    port = reserve_port()
    yield port
    release_port(port)


@pytest.fixture
def topology_events() -> Iterator[list[TopologyEvent]]:
    seen: list[TopologyEvent] = []

    def hook(event: Any) -> None:
        if isinstance(event, TopologyEvent):
            seen.append(event)

    unsubscribe = pgfailover.subscribe(hook)
    yield seen
    unsubscribe()


def _app_conninfo(cluster: LocalCluster) -> str:
    """The application's own conninfo without host and port."""
    params = conninfo_to_dict(cluster.primary.dsn())
    del params["host"], params["port"]
    return make_conninfo("", **params, application_name="topology-test")


async def _blocking(fn: Any, *args: Any) -> Any:
    """Run a blocking harness operation."""
    if True:  # ASYNC
        return await asyncio.to_thread(fn, *args)
    else:
        return fn(*args)


async def test_host_list_finds_the_primary_timelines_and_lag(
    pgfailover_cluster: LocalCluster,
) -> None:
    """In-band discovery over the cluster's hosts: the primary is the leader, every member
    has its role and timeline, the standby a lag in bytes; the leader's conninfo keeps the
    application's parameters and reaches the primary, which validate() accepts."""
    cluster = pgfailover_cluster
    table(cluster)  # some WAL to replay
    cluster.wait_replicated()
    source = AsyncHostListTopology(cluster.multihost_dsn(), timeout=TIMEOUT)
    topology = await source.refresh()
    assert (topology.source, topology.leader) == ("in-band", cluster.primary.address)
    assert [(m.name, m.role) for m in topology.members] == [
        (n.address, "primary" if n is cluster.primary else "standby") for n in cluster.nodes
    ]
    assert all(m.timeline is not None and m.timeline >= 1 for m in topology.members)
    standby = topology.member(cluster.standbys[0].address)
    assert standby is not None
    assert standby.lag is not None
    assert standby.lag >= 0
    conninfo = await source.conninfo_for_leader(_app_conninfo(cluster))
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        assert conn.info.port == cluster.primary.port
        assert conn.info.parameter_status("application_name") == "topology-test"
        verdict = await source.validate(conn)
        assert verdict.accepted, verdict.reason


async def test_an_unreachable_host_is_reported_and_costs_a_bounded_wait(
    pgfailover_cluster: LocalCluster, closed_port: int
) -> None:
    """A host nobody listens on is an unreachable member with its error and a note; the
    primary is still found, and the refresh ends within its bounds."""
    cluster = pgfailover_cluster
    dsn = cluster.multihost_dsn()
    params = conninfo_to_dict(dsn)
    params["host"] = f"{params['host']},127.0.0.1"
    params["port"] = f"{params['port']},{closed_port}"
    source = AsyncHostListTopology(make_conninfo("", **params), timeout=TIMEOUT)
    started = time.monotonic()
    topology = await source.refresh()
    assert time.monotonic() - started < 2 + TIMEOUT + SLACK
    assert topology.leader == cluster.primary.address
    dead = topology.member(f"127.0.0.1:{closed_port}")
    assert dead is not None
    assert dead.role == "unreachable"
    assert "refused" in (dead.state or "")
    assert any(f"127.0.0.1:{closed_port}" in n for n in topology.notes)
    assert cluster.password not in repr(topology)


async def test_a_switchover_moves_the_leader_to_a_higher_timeline(
    pgfailover_cluster: LocalCluster,
) -> None:
    """After a switchover a refresh names the new primary, on a higher timeline, and a new
    generation; a connection to the old primary (now a standby) is refused."""
    cluster = pgfailover_cluster
    old = cluster.primary
    source = AsyncHostListTopology(cluster.multihost_dsn(), timeout=TIMEOUT)
    before = await source.refresh()
    await _blocking(cluster.switchover)
    source.invalidate()
    conninfo = await source.conninfo_for_leader(_app_conninfo(cluster))
    after = source.current()
    assert after is not None
    assert after.leader == cluster.primary.address != old.address
    assert after.generation == before.generation + 1
    assert after.leader_member is not None
    assert before.leader_member is not None
    assert (after.leader_member.timeline or 0) > (before.leader_member.timeline or 0)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        assert conn.info.port == cluster.primary.port
    async with await psycopg.AsyncConnection.connect(old.dsn(), autocommit=True) as conn:
        assert not (await source.validate(conn)).accepted


async def test_two_primaries_prefer_the_higher_timeline_and_fence_the_other(
    pgfailover_cluster: LocalCluster, topology_events: list[TopologyEvent]
) -> None:
    """A standby promoted while the old primary still runs (a split brain): the source
    chooses the node on the higher timeline, reports the split brain once, and validate()
    refuses the old primary (fenced) although it accepts writes."""
    cluster = pgfailover_cluster
    old, new = cluster.primary, cluster.standbys[0]
    source = AsyncHostListTopology(cluster.multihost_dsn(), timeout=TIMEOUT)
    await _blocking(cluster.promote, new)
    for _ in range(2):
        topology = await source.refresh()
        assert topology.leader == new.address
    assert [e.action for e in topology_events] == ["split brain"]
    assert f"chose {new.address}" in topology_events[0].detail
    async with await psycopg.AsyncConnection.connect(old.dsn(), autocommit=True) as conn:
        verdict = await source.validate(conn)
    assert (verdict.accepted, verdict.fenced) == (False, True)
    assert [e.action for e in topology_events] == ["split brain", "fenced"]
