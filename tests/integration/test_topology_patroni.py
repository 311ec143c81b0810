"""The Patroni topology source against a real Patroni cluster (etcd + 3 members): the real
``/cluster`` answer, a switchover, and the REST API list learnt from the cluster."""

from __future__ import annotations

import time

import psycopg
import pytest

from pgfailover.testing.patroni import PatroniCluster
from pgfailover.topology import PatroniTopology

TIMEOUT = 2.0


def _app_conninfo(cluster: PatroniCluster) -> str:
    """The application's conninfo: the multi-host one (its hosts are replaced)."""
    return cluster.multihost_dsn(application_name="topology-patroni")


@pytest.fixture
def cluster(pgfailover_patroni_cluster: PatroniCluster) -> PatroniCluster:
    return pgfailover_patroni_cluster


def test_real_cluster_answer_gives_leader_members_timelines_and_lag(
    cluster: PatroniCluster,
) -> None:
    """Patroni's own /cluster: the leader is the one etcd names, every member is listed with
    its endpoint, timeline and (replicas) lag, and the leader's conninfo reaches a
    writable server that validate() accepts."""
    leader = cluster.wait_leader()
    source = PatroniTopology([n.rest_url for n in cluster.nodes], timeout=TIMEOUT)
    topology = source.refresh()
    assert topology.source == "patroni"
    assert topology.leader == leader.name
    assert sorted(m.name for m in topology.members) == sorted(n.name for n in cluster.nodes)
    for member in topology.members:
        node = cluster.node(member.name)
        assert (member.host, member.port) == (node.host, node.port)
        assert member.timeline is not None
        assert member.timeline >= 1
        if member.name != leader.name:
            assert member.role in ("replica", "sync_standby")
            assert member.lag is None or member.lag >= 0
    with psycopg.connect(source.conninfo_for_leader(_app_conninfo(cluster))) as conn:
        assert (conn.info.host, conn.info.port) == (leader.host, leader.port)
        assert conn.info.parameter_status("application_name") == "topology-patroni"
        verdict = source.validate(conn)
        assert verdict.accepted, verdict.reason


def test_a_switchover_is_followed_and_the_old_leader_refused(cluster: PatroniCluster) -> None:
    """After a switchover a refresh names the new leader, on a higher timeline once Patroni
    publishes it (polled), in a new generation; a connection to the old leader, now a
    replica, is refused."""
    old = cluster.wait_leader()
    source = PatroniTopology(old.rest_url, timeout=TIMEOUT)
    before = source.refresh()
    assert before.leader_member is not None
    cluster.switchover()
    new = cluster.wait_leader()
    deadline = time.monotonic() + 15  # each member publishes its timeline once per loop
    while True:
        after = source.refresh()
        leader = after.leader_member
        timeline = leader.timeline or 0 if leader is not None else 0
        if (
            leader is not None
            and leader.name == new.name
            and timeline > (before.leader_member.timeline or 0)
        ):
            break
        assert time.monotonic() < deadline, after.describe()
        time.sleep(0.1)
    assert new.name != old.name
    assert after.generation > before.generation
    with psycopg.connect(source.conninfo_for_leader(_app_conninfo(cluster))) as conn:
        assert conn.info.port == new.port
    with psycopg.connect(old.dsn()) as conn:
        assert not source.validate(conn).accepted


def test_rest_urls_are_learnt_from_the_cluster(cluster: PatroniCluster) -> None:
    """Given one replica's REST API, the source learns every member's (the leader's first)
    from the first answer: the list follows the cluster, not the configuration."""
    leader = cluster.wait_leader()
    replica = next(n for n in cluster.nodes if n is not leader)
    source = PatroniTopology(replica.rest_url, timeout=TIMEOUT)
    source.refresh()
    urls = source.urls_to_try()
    assert urls[0] == leader.rest_url
    assert sorted(urls) == sorted(n.rest_url for n in cluster.nodes)


def _poll_members(source: PatroniTopology, wanted: set[str], timeout: float) -> None:
    """Refresh until the member names are ``wanted``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        topology = source.refresh()
        if {m.name for m in topology.members} == wanted:
            return
        assert time.monotonic() < deadline, topology.describe()
        time.sleep(0.2)


def test_a_member_leaving_and_coming_back_is_followed(cluster: PatroniCluster) -> None:
    """A replica that hangs (frozen) is dropped from the topology once Patroni drops it
    (its member key expires after ttl), without any refresh hanging on its dead REST API;
    healed, it is listed again. No restart of the source."""
    leader = cluster.wait_leader()
    replica = next(n for n in cluster.nodes if n is not leader)
    source = PatroniTopology([n.rest_url for n in cluster.nodes], timeout=TIMEOUT)
    everyone = {n.name for n in cluster.nodes}
    _poll_members(source, everyone, 5)
    cluster.freeze(replica)
    try:
        _poll_members(source, everyone - {replica.name}, 40)
        assert replica.rest_url not in source.urls_to_try()[: len(everyone) - 1]
        assert source.current() is not None
        assert source.current().leader == leader.name  # type: ignore[union-attr]
    finally:
        cluster.heal(replica)
    _poll_members(source, everyone, 40)
