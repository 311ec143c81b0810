"""The pool side of the monitor's grants (pgfailover._state.FailoverState, no server): one
held connection attempt let go during an outage as the monitor's look, reported once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgfailover._state import FailoverState


def _monitored_outage() -> FailoverState:
    state = FailoverState(pooler=True)
    state.monitored = True
    assert state.endpoint_lost("h:1", "standby", 1.0)
    return state


def test_a_grant_lets_exactly_one_attempt_go_and_reports_it() -> None:
    """Monitored, in an outage: no attempt goes until a grant; then one (and one only),
    and its end is reported once: False when it failed, True when it connected (which
    also ends the pool's outage)."""
    state = _monitored_outage()
    reports: list[bool] = []
    assert not state.may_connect(2.0)
    assert state.grant(reports.append)
    assert state.grant(reports.append)  # a second offer replaces the first (one report)
    assert state.may_connect(2.0)
    assert not state.may_connect(2.0)  # one granted attempt, not two
    assert not state.grant(reports.append)  # one is running: nothing more to grant
    state.connect_done()  # failed
    assert reports == [False]
    assert state.grant(reports.append)
    assert state.may_connect(3.0)
    state.connected(3.1)
    state.connect_done()
    assert reports == [False, True]
    assert state.outage_since is None
    assert not state.grant(reports.append)  # no outage: nothing to grant
    assert state.may_connect(4.0)


def test_no_grant_for_a_pool_on_its_own_or_released() -> None:
    """A pool the monitor does not watch, or one the monitor released already, takes no
    grant (its attempts go by their own rules)."""
    alone = FailoverState(pooler=True)
    alone.not_primary("h:1", "standby", 1.0, -1)
    assert not alone.grant(lambda ok: None)
    state = _monitored_outage()
    assert state.primary_back()
    assert not state.grant(lambda ok: None)


def test_an_unused_grant_is_withdrawn_and_reported_failed() -> None:
    """A grant no attempt took (the attempt gave up, the pool closed) is withdrawn and
    reported as failed once; a taken one is left to its attempt."""
    state = _monitored_outage()
    reports: list[bool] = []
    assert state.grant(reports.append)
    state.grant_unused()
    state.grant_unused()
    assert reports == [False]
    assert not state.may_connect(2.0)  # withdrawn: nothing goes
    assert state.grant(reports.append)
    assert state.may_connect(2.0)
    state.grant_unused()  # taken: the attempt reports
    assert reports == [False]
    state.connect_done()
    assert reports == [False, False]


def test_a_grant_from_an_outage_past_is_not_taken_in_the_next() -> None:
    """A grant offered in an outage that ended without it being taken does not let an
    attempt go in the next outage."""
    state = _monitored_outage()
    assert state.grant(lambda ok: None)
    state.connected(2.0)  # another attempt ended the outage (the monitor released it)
    state.not_primary("h:1", "standby", 3.0, -1)
    assert not state.may_connect(3.0)


@given(st.lists(st.sampled_from(["grant", "take", "done", "ok", "unused"]), max_size=40))
def test_each_grant_is_reported_at_most_once_and_attempts_are_single_flight(
    steps: list[str],
) -> None:
    """Whatever the order of grants, attempts, ends and withdrawals during a monitored
    outage: at most one granted attempt runs at a time, and each grant's report is called
    at most once."""
    state = _monitored_outage()
    calls: dict[int, int] = {}
    running = 0
    for n, step in enumerate(steps):
        if step == "grant":
            calls[n] = 0

            def report(ok: bool, n: int = n) -> None:
                calls[n] += 1

            state.grant(report)
        elif step == "take" and state.may_connect(2.0):
            running += 1
            assert running == 1 or state.outage_since is None
        elif step == "done" and running:
            state.connect_done()
            running -= 1
        elif step == "ok" and running:
            state.connected(2.0)
        elif step == "unused":
            state.grant_unused()
    assert all(count <= 1 for count in calls.values())
