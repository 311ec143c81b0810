"""The Django alias's member of the process monitor, without a server: what the monitor's
calls do to the alias's failover state (no I/O), and a repr without the password."""

from __future__ import annotations

from pgfailover import _pool_common
from pgfailover._state import FailoverState
from pgfailover.django._monitor import AliasMember

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
