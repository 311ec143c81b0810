"""The watchdog's decisions (pgfailover._watchdog.judge): pure, no server."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgfailover._watchdog import Action, Watch, judge


def test_an_idle_connection_is_never_probed_or_cut() -> None:
    """No operation in flight: nothing to do, whatever the limits and the deadline."""
    watch = Watch()
    for now in (0.0, 100.0, 1000.0):
        assert judge(watch, active=False, ops=1, now=now, silence_limit=1.0, deadline=0.0) is (
            Action.NOTHING
        )


def test_silence_is_measured_per_operation_and_asked_about_once_per_limit() -> None:
    """The same operation in flight for the silence limit: probe; again only after another
    limit; a new operation restarts the count."""
    watch = Watch()
    look = {"active": True, "silence_limit": 5.0, "deadline": None}
    assert judge(watch, ops=1, now=0.0, **look) is Action.NOTHING  # type: ignore[arg-type]
    assert judge(watch, ops=1, now=4.9, **look) is Action.NOTHING  # type: ignore[arg-type]
    assert judge(watch, ops=1, now=5.0, **look) is Action.PROBE  # type: ignore[arg-type]
    assert judge(watch, ops=1, now=9.9, **look) is Action.NOTHING  # type: ignore[arg-type]
    assert judge(watch, ops=1, now=10.0, **look) is Action.PROBE  # type: ignore[arg-type]
    assert judge(watch, ops=2, now=11.0, **look) is Action.NOTHING  # type: ignore[arg-type]
    assert judge(watch, ops=2, now=15.9, **look) is Action.NOTHING  # type: ignore[arg-type]
    assert judge(watch, ops=2, now=16.0, **look) is Action.PROBE  # type: ignore[arg-type]


def test_a_deadline_cuts_without_asking_and_no_limit_never_asks() -> None:
    """Past its deadline an operation is cut; without a silence limit it is never probed."""
    watch = Watch()
    assert judge(watch, active=True, ops=1, now=0.0, silence_limit=None, deadline=3.0) is (
        Action.NOTHING
    )
    assert judge(watch, active=True, ops=1, now=100.0, silence_limit=None, deadline=None) is (
        Action.NOTHING
    )
    assert judge(watch, active=True, ops=1, now=3.0, silence_limit=None, deadline=3.0) is (
        Action.CUT
    )


@given(
    looks=st.lists(
        st.tuples(st.booleans(), st.integers(0, 3), st.floats(0.0, 0.5)), min_size=1, max_size=40
    ),
    limit=st.one_of(st.none(), st.floats(0.1, 5.0)),
    deadline=st.one_of(st.none(), st.floats(0.0, 20.0)),
)
def test_cuts_need_a_passed_deadline_and_probes_need_a_full_silence(
    looks: list[tuple[bool, int, float]], limit: float | None, deadline: float | None
) -> None:
    """Over any sequence of looks: CUT only at or after the deadline with an operation in
    flight; PROBE only when the same operation has been in flight for the limit since it
    was first seen or last asked about."""
    watch, now = Watch(), 0.0
    first_seen: dict[int, float] = {}
    asked: float | None = None
    previous_ops = None
    for active, ops, step in looks:
        now += step
        action = judge(
            watch, active=active, ops=ops, now=now, silence_limit=limit, deadline=deadline
        )
        if not active:
            first_seen.clear()
            previous_ops, asked = None, None
            assert action is Action.NOTHING
            continue
        if ops != previous_ops:
            first_seen[ops], asked, previous_ops = now, None, ops
        if action is Action.CUT:
            assert deadline is not None
            assert now >= deadline
        if action is Action.PROBE:
            assert limit is not None
            assert now - (asked if asked is not None else first_seen[ops]) >= limit
            asked = now
