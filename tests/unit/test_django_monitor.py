"""The Django alias's member of the process monitor, without a server: what the monitor's
calls do to the alias's failover state (no I/O), a repr without the password, and joining
and leaving a real Monitor whose watch meets a loopback port nobody listens on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pgfailover import _pool_common
from pgfailover._state import FailoverState
from pgfailover.django import _monitor
from pgfailover.django._monitor import AliasMember
from pgfailover.monitor import Monitor, WatchTarget
from pgfailover.testing._ports import release_port, reserve_port

SECRET = "s3cret-Pa55w0rd"


def _member() -> AliasMember:
    params = {"host": "db1,db2", "port": "5432", "dbname": "app", "password": SECRET}
    target = _pool_common.watch_target("", params)
    assert target is not None
    return AliasMember("default", FailoverState(pooler=None, name="default"), target)


def test_repr_names_the_alias_and_endpoint_never_the_password() -> None:
    """The member's repr (and its watch target's) show the alias and the endpoint only."""
    member = _member()
    shown = repr(member) + repr(member.target)
    assert "default" in shown
    assert "db1:5432,db2:5432/app" in shown
    assert SECRET not in shown


def test_endpoint_lost_purges_the_generation_once_and_back_ends_the_outage() -> None:
    """The monitor's loss report starts the alias's outage and purges its generation once
    (a second report during the same outage does not purge again); its return report ends
    the outage, so the next new connection needs no role check; a return report outside an
    outage changes nothing."""
    member = _member()
    state = member.failover_state
    member._pgf_endpoint_back()
    assert state.outage_since is None
    assert state.stats()["recovery_ms_last"] == 0
    member._pgf_endpoint_lost("db1:5432,db2:5432", "standby")
    member._pgf_endpoint_lost("db1:5432,db2:5432", "down: connection refused")
    assert state.generation == 1
    assert state.outage_since is not None
    assert state.hosts == {"db1:5432,db2:5432": "down: connection refused"}
    member._pgf_endpoint_back()
    assert state.outage_since is None
    assert state.generation == 1
    assert state.stats()["failovers_detected"] == 1


@pytest.fixture
def port() -> Iterator[int]:
    """A loopback port on which nothing listens (the watch gets "connection refused")."""
    reserved = reserve_port()
    yield reserved
    release_port(reserved)


def _target(port: int, dbname: str = "app") -> WatchTarget:
    params = {"host": "127.0.0.1", "port": str(port), "dbname": dbname, "password": SECRET}
    target = _pool_common.watch_target("", params)
    assert target is not None
    return target


def test_an_alias_joins_once_follows_its_endpoint_and_leaves(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """join() registers an alias once (its threads share the member), registers it again
    when its connection parameters name another endpoint (the old watch ends), and takes
    it off with monitor False or leave(); an alias with no target is known
    but not watched, and joins only once too; a closed Monitor is logged once and the alias
    stays on its own."""
    monitor = Monitor(interval=0.2)
    state = FailoverState(pooler=None, name="t")
    try:
        first = _monitor.join("t", monitor, state, _target(port))
        assert first is not None
        assert _monitor.join("t", monitor, state, _target(port)) is first
        assert state.monitored
        assert _monitor.aliases() == ["t"]
        assert [str(e) for e in monitor.endpoints()] == [f"127.0.0.1:{port}/app"]
        moved = _monitor.join("t", monitor, state, _target(port, "test_app"))
        assert moved is not first
        assert [str(e) for e in monitor.endpoints()] == [f"127.0.0.1:{port}/test_app"]
        assert _monitor.join("t", False, state, _target(port)) is None
        assert monitor.endpoints() == []
        assert not state.monitored
        assert _monitor.member_of("t") is None
        unwatched = _monitor.join("t", monitor, state, None)
        assert unwatched is not None
        assert _monitor.join("t", monitor, state, None) is unwatched
        assert _monitor.monitored_health("t") is None
        assert _monitor.aliases() == []
        _monitor.leave("t")
        assert _monitor.member_of("t") is None
    finally:
        monitor.close()
    with caplog.at_level(logging.WARNING, logger="pgfailover.django"):
        refused = _monitor.join("t", monitor, state, _target(port))
        assert _monitor.join("t", monitor, state, _target(port)) is refused
    assert [r.getMessage() for r in caplog.records if "closed" in r.getMessage()] == [
        "pgfailover: the monitor given to DATABASES['t'] is closed: the alias notices "
        "failovers by itself"
    ]
    assert not state.monitored
    _monitor.leave("t")
