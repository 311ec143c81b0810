"""Property tests for pgfailover.policy: bounded waits, deadlines kept, history immutable."""

from __future__ import annotations

import math
from collections.abc import Callable

import psycopg.errors
from hypothesis import given, settings
from hypothesis import strategies as st

from pgfailover.classify import Phase, RetryCondition, Verdict, classify
from pgfailover.policy import Decision, RetryPolicy

# Verdicts of every retry permission, built once from real psycopg errors.
_ERRORS = [
    psycopg.errors.lookup("57P03")("the database system is starting up"),
    psycopg.errors.lookup("40001")("could not serialize access"),
    psycopg.errors.lookup("57P01")("terminating connection due to administrator command"),
    psycopg.errors.lookup("08006")("connection failure"),
    psycopg.errors.lookup("23505")("duplicate key value"),
    ValueError("not a database error"),
]
VERDICTS: list[Verdict] = sorted(
    {classify(exc, phase=phase) for exc in _ERRORS for phase in Phase},
    key=lambda v: (v.retry.value, v.kind.value, v.sqlstate or ""),
)
assert {v.retry for v in VERDICTS} == set(RetryCondition)
RETRYING = [v for v in VERDICTS if v.retry in {RetryCondition.NOT_SENT, RetryCondition.ROLLED_BACK}]


def fixed(value: float) -> Callable[[], float]:
    """A random() that always returns ``value``."""
    return lambda: value


seconds = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    """Any valid policy (not started)."""
    wait_initial = draw(st.floats(min_value=0.0, max_value=5.0))
    return RetryPolicy(
        attempts=draw(st.none() | st.integers(min_value=1, max_value=20)),
        timeout=draw(st.none() | seconds),
        wait_initial=wait_initial,
        wait_max=wait_initial + draw(st.floats(min_value=0.0, max_value=30.0)),
        wait_exp_base=draw(st.floats(min_value=1.0, max_value=10.0)),
        jitter=draw(st.booleans()),
        idempotent=draw(st.booleans()),
    )


@given(policy=policies(), n=st.integers(min_value=1, max_value=5000), r=unit)
def test_waits_stay_within_the_jitter_bound_and_wait_max(
    policy: RetryPolicy, n: int, r: float
) -> None:
    """backoff(n) lies in [0, cap(n)] and cap(n) in [0, wait_max]; without jitter it is cap(n)."""
    cap = policy.cap(n)
    assert 0.0 <= cap <= policy.wait_max
    wait = policy.backoff(n, fixed(r))
    assert 0.0 <= wait <= cap
    if not policy.jitter:
        assert wait == cap
    try:
        grown = policy.wait_initial * policy.wait_exp_base ** (n - 1)
    except OverflowError:
        grown = math.inf
    assert cap == (0.0 if policy.wait_initial == 0.0 else min(policy.wait_max, grown))


@given(policy=policies(), n=st.integers(min_value=1, max_value=5000))
def test_the_cap_is_non_decreasing(policy: RetryPolicy, n: int) -> None:
    """cap(n) <= cap(n + 1): waits never shrink as retries go on."""
    assert policy.cap(n) <= policy.cap(n + 1)


@settings(max_examples=300)
@given(
    policy=policies(),
    start=st.floats(min_value=-1e6, max_value=1e6),
    steps=st.lists(st.tuples(st.sampled_from(VERDICTS), seconds, unit, st.booleans()), max_size=30),
)
def test_a_run_keeps_the_deadline_the_attempts_bound_and_the_history(
    policy: RetryPolicy,
    start: float,
    steps: list[tuple[Verdict, float, float, bool]],
) -> None:
    """Along any run: no retry at or past the deadline, no wait ending past it, at most
    attempts - 1 retries, waits within the jitter bound, one history record per failure,
    and earlier policies unchanged."""
    current = policy.start(start)
    now = start
    retries = 0
    for verdict, elapsed, r, slept in steps:
        now += elapsed
        before = current
        before_history = before.history
        decision = current.after(verdict, now, random=fixed(r))
        _check(decision, before, now, r)
        assert before.history == before_history  # immutable
        assert decision.policy.history[:-1] == before_history
        assert len(decision.policy.history) == len(before_history) + 1
        if decision.needs_outcome:
            decision = decision.not_committed(now)
            assert not decision.needs_outcome
            _check(decision, before, now, r, resolved=True)
        if decision.retry:
            retries += 1
            if slept:
                now += decision.wait
        current = decision.policy
    if policy.attempts is not None:
        assert retries <= policy.attempts - 1
    assert [a.number for a in current.history] == list(range(1, len(steps) + 1))
    assert policy.history == ()
    assert policy.started_at is None


def _check(
    decision: Decision, before: RetryPolicy, now: float, r: float, *, resolved: bool = False
) -> None:
    """The invariants of one decision taken by ``before`` at ``now`` with random() = r."""
    number = len(before.history) + 1
    deadline = before.deadline
    assert decision.deadline == deadline
    assert decision.attempt.number == number
    assert decision.attempt.failed_at == now
    assert decision.attempt.wait == decision.wait
    assert 0.0 <= decision.wait <= before.cap(number)
    assert decision.wait <= before.backoff(number, fixed(r))
    assert decision.reason
    if deadline is not None:
        assert now + decision.wait <= deadline or decision.wait == 0.0
    if decision.retry:
        if resolved:  # a lost COMMIT found not to have committed
            assert decision.verdict.retry is RetryCondition.OUTCOME_UNKNOWN
        else:
            assert decision.verdict.may_retry(idempotent=before.idempotent)
        assert not decision.needs_outcome
        assert not decision.exhausted
        if deadline is not None:
            assert now < deadline
            assert now + decision.wait <= deadline
        if before.attempts is not None:
            assert number < before.attempts
    else:
        assert (
            decision.needs_outcome
            or decision.exhausted
            or decision.reason.startswith("verdict forbids retry")
        )
    if decision.needs_outcome or resolved:
        assert decision.verdict.retry is RetryCondition.OUTCOME_UNKNOWN
    if decision.verdict.retry is RetryCondition.NEVER:
        assert not decision.retry
        assert decision.reason.startswith("verdict forbids retry")


@given(
    policy=policies(),
    start=st.floats(min_value=-1e6, max_value=1e6),
    verdict=st.sampled_from(RETRYING),
    elapsed=st.lists(seconds, min_size=1, max_size=40),
)
def test_retryable_failures_stop_only_for_the_budget(
    policy: RetryPolicy, start: float, verdict: Verdict, elapsed: list[float]
) -> None:
    """A retryable failure is retried exactly while attempts and time remain."""
    current = policy.start(start)
    deadline = current.deadline
    now = start
    for number, step in enumerate(elapsed, start=1):
        now += step
        decision = current.after(verdict, now)
        attempts_left = policy.attempts is None or number < policy.attempts
        time_left = deadline is None or now < deadline
        assert decision.retry is (attempts_left and time_left)
        assert decision.exhausted is not decision.retry
        if not attempts_left:
            assert decision.reason == f"attempts exhausted ({policy.attempts})"
        elif not time_left:
            assert decision.reason.startswith("deadline reached")
        current = decision.policy


@given(
    timeout=st.floats(min_value=0.0, max_value=1e4),
    start=st.floats(min_value=-1e9, max_value=1e9),
    offset=st.floats(min_value=0.0, max_value=1e4),
    wait_max=st.floats(min_value=0.0, max_value=1e4),
)
def test_now_plus_wait_never_passes_the_deadline(
    timeout: float, start: float, offset: float, wait_max: float
) -> None:
    """Even with float rounding at large clock values, now + wait <= started_at + timeout."""
    policy = RetryPolicy(timeout=timeout, wait_initial=wait_max, wait_max=wait_max, jitter=False)
    started = policy.start(start)
    now = start + offset
    decision = started.after(RETRYING[0], now)
    deadline = started.deadline
    assert deadline is not None
    assert now + decision.wait <= deadline or not decision.retry
    if decision.retry:
        assert math.isfinite(decision.wait)
        assert decision.wait >= 0.0
