"""Pure decisions of pgfailover._state.FailoverState (no server)."""

from __future__ import annotations

import psycopg.errors
from hypothesis import given
from hypothesis import strategies as st
from psycopg_pool import PoolTimeout

from pgfailover import classify
from pgfailover._state import MIN_PROBE_INTERVAL, FailoverState
from pgfailover.errors import NoPrimaryAvailable
from pgfailover.events import PoolEvent

READ_ONLY = classify(psycopg.errors.lookup("25006")("cannot execute INSERT"))
TRANSIENT = classify(psycopg.errors.lookup("40001")("could not serialize"))


def test_many_poisoned_connections_of_one_generation_purge_once() -> None:
    """However many connections of the same generation come back poisoned, one purge."""
    state = FailoverState(pooler=None)
    purges = [state.poisoned(0, READ_ONLY, now=1.0) for _ in range(10)]
    assert purges.count(True) == 1
    assert state.generation == 1
    assert state.stats()["connections_poisoned"] == 10
    assert state.stats()["failovers_detected"] == 1


@given(st.lists(st.integers(0, 3), min_size=1, max_size=50))
def test_purges_never_exceed_generations(generations: list[int]) -> None:
    """Each purge bumps the generation; a connection from an older generation never purges."""
    state = FailoverState(pooler=None)
    purges = sum(state.poisoned(g, READ_ONLY, now=1.0) for g in generations)
    assert purges == state.generation == state.stats()["generations_purged"]


def test_non_failover_poison_does_not_start_an_outage() -> None:
    """A verdict that does not purge leaves the generation and the outage alone."""
    state = FailoverState(pooler=None)
    assert state.poisoned(0, TRANSIENT, now=1.0) is False
    assert state.outage_since is None
    assert state.generation == 0


def test_single_flight_during_an_outage() -> None:
    """In an outage one connect at a time, at most every MIN_PROBE_INTERVAL; free otherwise."""
    state = FailoverState(pooler=None)
    assert state.may_connect(0.0)  # healthy: no gate
    assert state.may_connect(0.0)
    state.not_primary("h:1", "standby", now=1.0, generation=-1)
    assert state.may_connect(1.0)
    assert not state.may_connect(1.0 + MIN_PROBE_INTERVAL * 2)  # one in flight
    state.connect_done()
    assert not state.may_connect(1.0 + MIN_PROBE_INTERVAL / 2)  # too soon
    assert state.may_connect(1.0 + MIN_PROBE_INTERVAL)
    state.connect_done()
    state.connected(now=2.5)
    assert state.outage_since is None
    assert state.stats()["recovery_ms_last"] == 1500


def test_no_primary_error_names_hosts_during_an_outage() -> None:
    """Outside an outage there is no NoPrimaryAvailable; in one it is a PoolTimeout naming
    each host."""
    state = FailoverState(pooler=None)
    assert state.no_primary(1.0) is None
    state.not_primary("10.0.0.1:5432", "standby", now=1.0, generation=-1)
    error = state.no_primary(2.0)
    assert isinstance(error, NoPrimaryAvailable)
    assert isinstance(error, PoolTimeout)
    assert error.hosts == {"10.0.0.1:5432": "standby"}
    assert "10.0.0.1:5432: standby" in str(error)


def test_needs_check_only_with_a_reason() -> None:
    """A connection of the current generation returned recently is not probed; an idle,
    stale-generation or outage-time one is."""
    state = FailoverState(pooler=None)
    assert not state.needs_check(0, returned_at=5.0, recheck_interval=10.0, now=6.0)
    assert not state.needs_check(0, returned_at=5.0, recheck_interval=None, now=600.0)
    assert state.needs_check(0, returned_at=5.0, recheck_interval=10.0, now=15.0)
    assert state.needs_check(0, returned_at=5.0, recheck_interval=0.0, now=5.0)
    state.poisoned(0, READ_ONLY, now=1.0)
    assert state.needs_check(1, returned_at=5.0, recheck_interval=None, now=6.0)
    assert state.needs_check(0, returned_at=5.0, recheck_interval=None, now=6.0)


def test_each_purge_and_each_recovery_is_one_pool_event() -> None:
    """A purge (from a poisoned connection or a probe) and the first writable connection
    after an outage each produce one PoolEvent, with the generation after the action and
    the recovery time; healthy connects produce none."""
    events: list[PoolEvent] = []
    state = FailoverState(pooler=None, name="orders", on_event=events.append)
    state.connected(now=0.5)  # healthy: nothing to say
    for _ in range(3):
        state.poisoned(0, READ_ONLY, now=1.0)
    state.not_primary("db1:5432", "standby", now=1.2, generation=1)
    state.not_primary("db1:5432", "standby", now=1.3, generation=0)  # an older generation
    state.connected(now=1.75)
    state.connected(now=2.0)
    assert [(e.action, e.pool, e.generation) for e in events] == [
        ("generation purged", "orders", 1),
        ("generation purged", "orders", 2),
        ("primary reached again", "orders", 2),
    ]
    assert events[0].reason == READ_ONLY.reason
    assert events[1].reason == "db1:5432 leads to a standby"
    assert events[2].recovery == 0.75
    assert "after 0.750 s" in events[2].summary()


def test_pool_events_are_delivered_outside_the_state_lock() -> None:
    """The event callback may call back into the state (e.g. read stats) without deadlock."""
    seen: list[dict[str, int]] = []
    state = FailoverState(pooler=None, on_event=lambda event: seen.append(state.stats()))
    state.poisoned(0, READ_ONLY, now=1.0)
    state.connected(now=2.0)
    assert [s["generations_purged"] for s in seen] == [1, 1]


def test_recheck_interval_zero_checks_even_a_connection_returned_after_now() -> None:
    """0 means every checkout: also for a connection handed over after the caller read
    the clock (returned_at later than now)."""
    state = FailoverState(pooler=None)
    assert state.needs_check(0, returned_at=10.5, recheck_interval=0, now=10.0)
    assert not state.needs_check(0, returned_at=10.5, recheck_interval=5, now=10.0)
