"""Examples for pgfailover.policy: defaults, validation, backoff, budget, verdicts, integrations."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import psycopg.errors
import pytest
import stamina
import tenacity

from pgfailover.classify import Phase, RetryCondition, Verdict, classify, is_retryable
from pgfailover.policy import (
    Attempt,
    Decision,
    RetryPolicy,
    is_testing,
    set_testing,
    tenacity_retry,
    tenacity_stop,
    tenacity_wait,
)


def error(code: str, message: str = "server said so") -> Exception:
    """A psycopg error with ``code`` as its SQLSTATE, built without a server."""
    return psycopg.errors.lookup(code)(message)


def fixed(value: float) -> Callable[[], float]:
    """A random() that always returns ``value``."""
    return lambda: value


STANDBY = error("0A000", "cannot set transaction read-write mode during recovery")
STARTING = error("57P03", "the database system is starting up")  # NOT_SENT
SERIALIZATION = error("40001", "could not serialize access")  # ROLLED_BACK
TERMINATED = error("57P01", "terminating connection due to administrator command")
DUPLICATE = error("23505", "duplicate key value")  # NEVER


@pytest.fixture(autouse=True)
def _no_testing_mode() -> Iterator[None]:
    """Every test starts and ends with testing mode off."""
    with set_testing(False):
        yield
    assert not is_testing()


class FakeState:
    """What the tenacity helpers read of tenacity's RetryCallState."""

    def __init__(self, attempt_number: int, seconds_since_start: float | None) -> None:
        self.attempt_number = attempt_number
        self.seconds_since_start = seconds_since_start


def failing(errors: list[Exception]) -> tuple[Callable[[], str], list[int]]:
    """A function raising ``errors`` one per call, then returning "done"; and its calls."""
    calls: list[int] = []

    def work() -> str:
        calls.append(len(calls))
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "done"

    return work, calls


# ------------------------------------------------------------------ construction


def test_defaults_fit_a_failover() -> None:
    """The defaults: 45 s deadline, no attempt bound, 50 ms to 1 s full-jitter backoff."""
    policy = RetryPolicy()
    assert policy.attempts is None
    assert policy.timeout == 45.0
    assert policy.wait_initial == 0.05
    assert policy.wait_max == 1.0
    assert policy.wait_exp_base == 2.0
    assert policy.jitter is True
    assert policy.idempotent is False
    assert policy.started_at is None
    assert policy.history == ()
    assert policy.deadline is None
    assert [policy.cap(n) for n in range(1, 8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_timedeltas_are_normalized_to_float_seconds() -> None:
    """Every time argument accepts a timedelta and is stored as float seconds."""
    policy = RetryPolicy(
        timeout=timedelta(seconds=30),
        wait_initial=timedelta(milliseconds=100),
        wait_max=timedelta(seconds=2),
    )
    assert (policy.timeout, policy.wait_initial, policy.wait_max) == (30.0, 0.1, 2.0)
    assert all(type(v) is float for v in (policy.timeout, policy.wait_initial, policy.wait_max))
    assert type(RetryPolicy(timeout=3, wait_initial=0, wait_max=1).timeout) is float


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"attempts": 0}, ["attempts", "at least 1"]),
        ({"attempts": -3}, ["attempts", "at least 1"]),
        ({"timeout": -1.0}, ["timeout", "at least 0"]),
        ({"timeout": timedelta(seconds=-1)}, ["timeout", "at least 0"]),
        ({"timeout": float("nan")}, ["timeout", "NaN"]),
        ({"timeout": float("inf")}, ["timeout", "infinite", "None"]),
        ({"wait_initial": -0.1}, ["wait_initial", "at least 0"]),
        ({"wait_max": float("inf")}, ["wait_max", "infinite"]),
        ({"wait_initial": 2.0, "wait_max": 1.0}, ["wait_max", "wait_initial"]),
        ({"wait_exp_base": 0.5}, ["wait_exp_base", "at least 1"]),
        ({"wait_exp_base": float("nan")}, ["wait_exp_base"]),
        ({"wait_exp_base": float("inf")}, ["wait_exp_base"]),
        ({"started_at": float("nan")}, ["now", "finite"]),
    ],
)
def test_invalid_values_raise_value_error_naming_the_parameter(
    kwargs: dict[str, Any], words: list[str]
) -> None:
    """An invalid value raises ValueError saying which parameter and what to fix."""
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
        RetryPolicy(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"attempts": 2.5}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"timeout": "30"}, "timeout"),
        ({"wait_max": True}, "wait_max"),
        ({"wait_exp_base": timedelta(seconds=2)}, "wait_exp_base"),
        ({"jitter": 0.5}, "jitter"),
        ({"idempotent": "yes"}, "idempotent"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_parameter(
    kwargs: dict[str, Any], name: str
) -> None:
    """A value of the wrong type raises TypeError naming the parameter."""
    with pytest.raises(TypeError, match=name):
        RetryPolicy(**kwargs)


def test_zero_waits_and_a_constant_base_are_valid() -> None:
    """wait_initial=0 never waits; wait_exp_base=1 keeps the cap constant."""
    assert RetryPolicy(wait_initial=0, wait_max=0).backoff(5, fixed(0.9)) == 0.0
    constant = RetryPolicy(wait_exp_base=1, jitter=False)
    assert [constant.backoff(n) for n in (1, 2, 10)] == [0.05, 0.05, 0.05]


def test_the_policy_is_frozen() -> None:
    """A policy cannot be changed in place."""
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.timeout = 3.0  # type: ignore[misc]


# ----------------------------------------------------------------------- backoff


def test_backoff_follows_the_full_jitter_formula() -> None:
    """wait(n) = random() * min(wait_max, wait_initial * base ** (n - 1))."""
    policy = RetryPolicy(wait_initial=0.1, wait_max=5.0, wait_exp_base=3)
    assert policy.cap(1) == pytest.approx(0.1)
    assert policy.cap(2) == pytest.approx(0.3)
    assert policy.cap(3) == pytest.approx(0.9)
    assert policy.cap(4) == pytest.approx(2.7)
    assert policy.cap(5) == 5.0
    assert policy.backoff(1, fixed(0.5)) == pytest.approx(0.05)
    assert policy.backoff(3, fixed(0.25)) == pytest.approx(0.225)
    assert policy.backoff(4, fixed(0.0)) == 0.0
    assert policy.backoff(5, fixed(1.0)) == 5.0


def test_without_jitter_the_wait_is_the_cap() -> None:
    """jitter=False waits cap(n) exactly and never calls random."""
    policy = RetryPolicy(jitter=False)

    def no_random() -> float:
        raise AssertionError("random must not be called without jitter")

    assert [policy.backoff(n, no_random) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_a_huge_retry_number_caps_at_wait_max() -> None:
    """cap(n) for an n whose power overflows a float is wait_max, not an error."""
    assert RetryPolicy().cap(100_000) == 1.0
    assert RetryPolicy(wait_exp_base=1e300, wait_max=7).cap(3) == 7.0


def test_retry_numbers_start_at_one_and_random_must_be_in_range() -> None:
    """cap(0) is refused, and so is a random() outside [0, 1]."""
    with pytest.raises(ValueError, match="from 1"):
        RetryPolicy().cap(0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RetryPolicy().backoff(1, fixed(1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RetryPolicy().backoff(1, fixed(float("nan")))


# -------------------------------------------------------------------- decisions


def test_a_retryable_error_is_retried_with_the_jittered_wait() -> None:
    """A NOT_SENT error is retried after random() * cap(1), and the attempt is recorded."""
    policy = RetryPolicy(timeout=10).start(100.0)
    decision = policy.after(STARTING, 100.5, random=fixed(0.5))
    assert decision.retry is True
    assert decision.wait == pytest.approx(0.025)
    assert decision.deadline == 110.0
    assert decision.needs_outcome is False
    assert decision.exhausted is False
    assert "57P03" in decision.reason
    assert decision.verdict == classify(STARTING)
    assert decision.attempt == Attempt(
        1, 100.5, decision.verdict, "psycopg.errors.CannotConnectNow", decision.wait
    )
    assert decision.policy.history == (decision.attempt,)
    assert decision.policy.started_at == 100.0
    assert policy.history == ()
    assert "policy=" not in repr(decision)


def test_the_loop_from_the_docs_runs_until_success() -> None:
    """The documented loop retries failover errors and returns the result."""
    clock = [0.0]
    sleeps: list[float] = []
    work, calls = failing([STANDBY, STARTING, SERIALIZATION])

    def run() -> str:
        policy = RetryPolicy(timeout=30).start(clock[0])
        while True:
            try:
                return work()
            except Exception as ex:
                decision = policy.after(ex, clock[0])
                if not decision.retry:
                    raise
                sleeps.append(decision.wait)
                clock[0] += decision.wait
                policy = decision.policy

    assert run() == "done"
    assert len(calls) == 4
    assert len(sleeps) == 3
    assert all(0 <= wait <= cap for wait, cap in zip(sleeps, (0.05, 0.1, 0.2), strict=True))


def test_an_unstarted_policy_starts_at_the_first_failure() -> None:
    """after() on a policy never started starts the run (and the deadline) at that failure."""
    decision = RetryPolicy(timeout=5).after(STARTING, 42.0)
    assert decision.policy.started_at == 42.0
    assert decision.deadline == 47.0


def test_start_gives_a_fresh_run_of_the_same_parameters() -> None:
    """start() sets started_at and empties the history; the template is unchanged."""
    template = RetryPolicy(timeout=5, attempts=4)
    used = template.start(1.0).after(STARTING, 2.0).policy
    fresh = used.start(10.0)
    assert fresh.history == ()
    assert fresh.started_at == 10.0
    assert fresh.deadline == 15.0
    assert (fresh.timeout, fresh.attempts) == (5.0, 4)
    assert template.started_at is None
    assert len(used.history) == 1


def test_remaining_counts_down_to_zero() -> None:
    """remaining(now) is the time left before the deadline, never negative."""
    assert RetryPolicy(timeout=None).start(0).remaining(1.0) is None
    assert RetryPolicy(timeout=10).remaining(123.0) == 10.0
    started = RetryPolicy(timeout=10).start(100.0)
    assert started.remaining(104.0) == 6.0
    assert started.remaining(200.0) == 0.0


def test_attempts_are_exhausted_after_the_last_one() -> None:
    """With attempts=3, two failures are retried and the third stops: attempts exhausted (3)."""
    policy = RetryPolicy(attempts=3, timeout=None).start(0.0)
    decisions: list[Decision] = []
    for now in (1.0, 2.0, 3.0):
        decision = policy.after(SERIALIZATION, now)
        decisions.append(decision)
        policy = decision.policy
    assert [d.retry for d in decisions] == [True, True, False]
    assert decisions[-1].reason == "attempts exhausted (3)"
    assert decisions[-1].exhausted is True
    assert decisions[-1].wait == 0.0
    assert [a.number for a in policy.history] == [1, 2, 3]
    assert policy.history[-1].wait == 0.0


def test_one_attempt_never_retries() -> None:
    """attempts=1 stops at the first failure."""
    decision = RetryPolicy(attempts=1).after(STARTING, 0.0)
    assert decision.retry is False
    assert decision.reason == "attempts exhausted (1)"


def test_the_wait_is_clipped_to_the_deadline() -> None:
    """A wait that would end past the deadline is shortened to end on it."""
    policy = RetryPolicy(timeout=1.0, wait_initial=0.5, wait_max=0.5, jitter=False).start(10.0)
    decision = policy.after(STARTING, 10.8)
    assert decision.retry is True
    assert decision.wait == pytest.approx(0.2)
    assert 10.8 + decision.wait <= 11.0
    assert decision.attempt.wait == decision.wait


def test_no_retry_once_the_deadline_is_reached() -> None:
    """At or after the deadline the decision is to stop: deadline reached."""
    policy = RetryPolicy(timeout=2.0).start(10.0)
    for now in (12.0, 30.0):
        decision = policy.after(STARTING, now)
        assert decision.retry is False
        assert decision.exhausted is True
        assert decision.wait == 0.0
        assert decision.reason.startswith("deadline reached")
        assert "2 s timeout" in decision.reason


def test_a_zero_timeout_never_retries() -> None:
    """timeout=0 makes the deadline the start: no retry at all."""
    decision = RetryPolicy(timeout=0).start(5.0).after(STARTING, 5.0)
    assert decision.retry is False
    assert decision.reason.startswith("deadline reached")


def test_now_must_be_a_finite_number() -> None:
    """after() and start() refuse a NaN or infinite clock reading."""
    with pytest.raises(ValueError, match="now"):
        RetryPolicy().after(STARTING, float("nan"))
    with pytest.raises(ValueError, match="now"):
        RetryPolicy().start(float("inf"))


# ------------------------------------------------------------- verdict mapping


@pytest.mark.parametrize(
    ("exc", "phase", "permission"),
    [
        (STARTING, Phase.UNKNOWN, RetryCondition.NOT_SENT),
        (TERMINATED, Phase.CONNECT, RetryCondition.NOT_SENT),
        (SERIALIZATION, Phase.UNKNOWN, RetryCondition.ROLLED_BACK),
        (STANDBY, Phase.UNKNOWN, RetryCondition.ROLLED_BACK),
        (TERMINATED, Phase.TRANSACTION, RetryCondition.ROLLED_BACK),
    ],
)
def test_not_sent_and_rolled_back_are_retried(
    exc: Exception, phase: Phase, permission: RetryCondition
) -> None:
    """NOT_SENT and ROLLED_BACK verdicts are retried within the budget."""
    decision = RetryPolicy().start(0.0).after(exc, 0.0, phase=phase)
    assert decision.verdict.retry is permission
    assert decision.retry is True
    assert decision.needs_outcome is False
    assert permission.value in decision.reason


def test_if_idempotent_is_retried_only_for_idempotent_work() -> None:
    """A connection lost mid-statement is retried only when the policy says idempotent."""
    for phase in (Phase.UNKNOWN, Phase.AUTOCOMMIT):
        stop = RetryPolicy().start(0.0).after(TERMINATED, 0.0, phase=phase)
        assert stop.verdict.retry is RetryCondition.IF_IDEMPOTENT
        assert stop.retry is False
        assert stop.exhausted is False
        assert stop.reason.startswith("verdict forbids retry:")
        assert "not declared idempotent" in stop.reason
        go = RetryPolicy(idempotent=True).start(0.0).after(TERMINATED, 0.0, phase=phase)
        assert go.retry is True


def test_never_stops_at_once_even_with_budget_left() -> None:
    """A NEVER verdict stops with "verdict forbids retry" and the classifier's reason."""
    for exc in (DUPLICATE, error("28P01", "password authentication failed"), ValueError("x")):
        decision = RetryPolicy(idempotent=True).start(0.0).after(exc, 0.0)
        assert decision.verdict.retry is RetryCondition.NEVER
        assert decision.retry is False
        assert decision.exhausted is False
        assert decision.reason == f"verdict forbids retry: {decision.verdict.reason}"
        assert len(decision.policy.history) == 1


def test_the_verdict_wins_over_a_spent_budget() -> None:
    """A NEVER verdict with the budget spent says the verdict forbids it, not exhausted."""
    decision = RetryPolicy(attempts=1).after(DUPLICATE, 0.0)
    assert decision.reason.startswith("verdict forbids retry")
    assert decision.exhausted is False


def test_a_lost_commit_needs_its_outcome_resolved_first() -> None:
    """OUTCOME_UNKNOWN: retry is False, needs_outcome is True, and the would-be wait is set."""
    policy = RetryPolicy(timeout=10, idempotent=True).start(0.0)
    decision = policy.after(TERMINATED, 1.0, phase=Phase.COMMIT, random=fixed(0.5))
    assert decision.verdict.retry is RetryCondition.OUTCOME_UNKNOWN
    assert decision.retry is False
    assert decision.needs_outcome is True
    assert decision.exhausted is False
    assert decision.reason.startswith("commit outcome must be resolved first")
    assert decision.wait == pytest.approx(0.025)


def test_not_committed_turns_a_lost_commit_into_a_retry() -> None:
    """After finding the COMMIT did not happen, not_committed(now) retries within the budget."""
    policy = RetryPolicy(timeout=10).start(0.0)
    decision = policy.after(TERMINATED, 1.0, phase=Phase.COMMIT, random=fixed(0.5))
    resolved = decision.not_committed(1.01)
    assert resolved.retry is True
    assert resolved.needs_outcome is False
    assert resolved.wait == decision.wait
    assert resolved.reason.startswith("not committed: retry 1")
    assert len(resolved.policy.history) == 1
    assert resolved.policy.history[-1].wait == resolved.wait


def test_not_committed_clips_the_wait_and_respects_the_deadline() -> None:
    """Time spent resolving the outcome shortens the wait; past the deadline it stops."""
    policy = RetryPolicy(timeout=1.0, wait_initial=0.5, wait_max=0.5, jitter=False).start(0.0)
    decision = policy.after(TERMINATED, 0.2, phase=Phase.COMMIT)
    assert decision.wait == 0.5
    late = decision.not_committed(0.9)
    assert late.retry is True
    assert late.wait == pytest.approx(0.1)
    too_late = decision.not_committed(1.0)
    assert too_late.retry is False
    assert too_late.exhausted is True
    assert too_late.reason.startswith("not committed, but deadline reached")
    assert too_late.policy.history[-1].wait == 0.0


def test_a_lost_commit_with_the_budget_spent_says_both() -> None:
    """OUTCOME_UNKNOWN with no attempts left: resolve first, and no retry after it."""
    decision = RetryPolicy(attempts=1).after(TERMINATED, 0.0, phase=Phase.COMMIT)
    assert decision.needs_outcome is True
    assert decision.exhausted is True
    assert "attempts exhausted (1)" in decision.reason
    resolved = decision.not_committed(0.0)
    assert resolved.retry is False
    assert resolved.reason == "not committed, but attempts exhausted (1)"


def test_not_committed_only_applies_to_a_lost_commit() -> None:
    """not_committed() on a decision without needs_outcome raises ValueError."""
    decision = RetryPolicy().after(STARTING, 0.0)
    with pytest.raises(ValueError, match="needs_outcome"):
        decision.not_committed(0.0)


def test_a_precomputed_verdict_is_accepted() -> None:
    """after() takes a Verdict as is, without classifying again, and records error_type."""
    verdict = classify(TERMINATED, phase=Phase.TRANSACTION)
    decision = RetryPolicy().after(verdict, 0.0, phase=Phase.COMMIT)
    assert decision.verdict is verdict
    assert decision.retry is True
    assert decision.attempt.error_type == ""
    named = RetryPolicy().after(verdict, 0.0, error_type="AdminShutdown")
    assert named.attempt.error_type == "AdminShutdown"


def test_conn_and_phase_reach_the_classifier() -> None:
    """A 25006 on a session that asked for read-only is an application error: no retry."""

    class ReadOnlyConn:
        read_only = True

    exc = error("25006", "cannot execute INSERT in a read-only transaction")
    assert RetryPolicy().after(exc, 0.0).retry is True
    assert RetryPolicy().after(exc, 0.0, conn=ReadOnlyConn()).retry is False


def test_interrupts_are_never_retried() -> None:
    """KeyboardInterrupt and friends stop the loop."""
    decision = RetryPolicy().after(KeyboardInterrupt(), 0.0)
    assert decision.retry is False
    assert decision.attempt.error_type == "builtins.KeyboardInterrupt"


# ------------------------------------------------------------------ testing mode


def test_testing_mode_makes_waits_zero_and_caps_attempts() -> None:
    """set_testing(True, attempts=2): every wait is 0 and at most 2 attempts are made."""
    policy = RetryPolicy(wait_initial=1, wait_max=10, jitter=False)
    with set_testing(True, attempts=2):
        assert is_testing()
        assert policy.backoff(3) == 0.0
        first = policy.after(STARTING, 0.0)
        assert (first.retry, first.wait) == (True, 0.0)
        second = first.policy.after(STARTING, 0.0)
        assert second.retry is False
        assert second.reason == "attempts exhausted (2)"
        assert RetryPolicy(attempts=1).after(STARTING, 0.0).reason == "attempts exhausted (1)"
    assert not is_testing()
    assert policy.backoff(3) == 4.0


def test_testing_mode_without_attempts_keeps_the_policy_bounds() -> None:
    """set_testing(True) without attempts only zeroes the waits."""
    policy = RetryPolicy(attempts=5).start(0.0)
    with set_testing(True):
        for _ in range(4):
            decision = policy.after(SERIALIZATION, 0.0)
            assert (decision.retry, decision.wait) == (True, 0.0)
            policy = decision.policy
        assert policy.after(SERIALIZATION, 0.0).reason == "attempts exhausted (5)"


def test_testing_modes_nest_and_restore() -> None:
    """set_testing returns a context manager restoring the previous mode; modes nest."""
    set_testing(True, attempts=3)
    try:
        with set_testing(True, attempts=1):
            assert RetryPolicy().after(STARTING, 0.0).reason == "attempts exhausted (1)"
        assert RetryPolicy().after(STARTING, 0.0).retry is True
        with set_testing(False):
            assert not is_testing()
        assert is_testing()
    finally:
        set_testing(False)
    assert not is_testing()


def test_testing_mode_refuses_a_bad_attempt_cap() -> None:
    """set_testing(attempts=0) raises ValueError and leaves the mode unchanged."""
    with pytest.raises(ValueError, match="attempts"):
        set_testing(True, attempts=0)
    assert not is_testing()


def test_the_module_imports_neither_tenacity_nor_stamina() -> None:
    """Importing pgfailover.policy does not import the optional retry libraries."""
    code = (
        "import sys, pgfailover.policy\n"
        "assert 'tenacity' not in sys.modules and 'stamina' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_is_retryable_retries_only_blind_retries() -> None:
    """The generic predicate is True for NOT_SENT and ROLLED_BACK, False otherwise."""
    assert is_retryable(STARTING) is True
    assert is_retryable(STANDBY) is True
    assert is_retryable(SERIALIZATION) is True
    assert is_retryable(TERMINATED) is False  # may have taken effect
    assert is_retryable(TERMINATED, idempotent=True) is True
    assert is_retryable(DUPLICATE) is False
    assert is_retryable(DUPLICATE, idempotent=True) is False
    assert is_retryable(KeyboardInterrupt()) is False


def test_tenacity_retries_failover_errors_with_the_policy_backoff() -> None:
    """tenacity.Retrying with our retry, wait and stop retries until success, within caps."""
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=5, timeout=None)
    retrying = tenacity.Retrying(
        retry=tenacity_retry(),
        wait=tenacity_wait(policy, random=lambda: 0.5),
        stop=tenacity_stop(policy),
        sleep=sleeps.append,
        reraise=True,
    )
    work, calls = failing([STANDBY, STARTING, SERIALIZATION])
    assert retrying(work) == "done"
    assert len(calls) == 4
    assert sleeps == pytest.approx([0.025, 0.05, 0.1])


def test_tenacity_stops_on_errors_that_must_not_be_retried() -> None:
    """An application error, or a lost statement of non-idempotent work, is raised at once."""
    retrying = tenacity.Retrying(
        retry=tenacity_retry(), wait=tenacity.wait_none(), sleep=lambda _: None, reraise=True
    )
    for exc in (DUPLICATE, TERMINATED):
        work, calls = failing([exc])
        with pytest.raises(type(exc)):
            retrying(work)
        assert len(calls) == 1

    idempotent = retrying.copy(retry=tenacity_retry(idempotent=True))
    work, calls = failing([TERMINATED])
    assert idempotent(work) == "done"
    assert len(calls) == 2


def test_tenacity_stop_enforces_the_attempts_bound() -> None:
    """tenacity_stop(RetryPolicy(attempts=2)) makes at most two attempts."""
    retrying = tenacity.Retrying(
        retry=tenacity_retry(),
        wait=tenacity_wait(),
        stop=tenacity_stop(RetryPolicy(attempts=2)),
        sleep=lambda _: None,
        reraise=True,
    )
    work, calls = failing([STARTING] * 5)
    with pytest.raises(psycopg.errors.CannotConnectNow):
        retrying(work)
    assert len(calls) == 2


def test_tenacity_retry_composes_with_tenacity_strategies() -> None:
    """tenacity_retry() is a tenacity strategy: it combines with | like tenacity's own."""
    retrying = tenacity.Retrying(
        retry=tenacity_retry() | tenacity.retry_if_exception_type(LookupError),
        sleep=lambda _: None,
        stop=tenacity.stop_after_attempt(3),
        reraise=True,
    )
    work, calls = failing([KeyError("k"), STARTING])
    assert retrying(work) == "done"
    assert len(calls) == 3


def test_tenacity_wait_applies_the_formula_and_the_deadline() -> None:
    """TenacityWait returns random() * cap(attempt_number), clipped to the timeout."""
    wait = tenacity_wait(RetryPolicy(timeout=10, wait_max=8), random=lambda: 1.0)
    assert wait(FakeState(1, 0.0)) == 0.05
    assert wait(FakeState(4, 1.0)) == 0.4
    assert wait(FakeState(10, 1.0)) == 8.0
    assert wait(FakeState(10, 9.5)) == 0.5
    assert wait(FakeState(10, 12.0)) == 0.0
    assert wait(FakeState(10, None)) == 8.0
    with set_testing(True):
        assert wait(FakeState(10, 1.0)) == 0.0


def test_tenacity_stop_applies_attempts_timeout_and_the_testing_cap() -> None:
    """TenacityStop stops at the attempts bound, at the timeout, and at the testing cap."""
    stop = tenacity_stop(RetryPolicy(attempts=3, timeout=5))
    assert not stop(FakeState(2, 4.9))
    assert stop(FakeState(3, 0.0))
    assert stop(FakeState(1, 5.0))
    assert not tenacity_stop()(FakeState(1000, 44.0))
    assert tenacity_stop()(FakeState(1, 45.0))
    with set_testing(True, attempts=2):
        assert stop(FakeState(2, 0.0))


def test_stamina_retries_with_the_predicate() -> None:
    """stamina.retry(on=is_retryable) retries failover errors, not application errors."""
    with stamina.set_testing(True, attempts=3):
        work, calls = failing([STANDBY, STARTING])
        assert stamina.retry(on=is_retryable, attempts=3)(work)() == "done"
        assert len(calls) == 3

        work, calls = failing([DUPLICATE])
        with pytest.raises(psycopg.errors.UniqueViolation):
            stamina.retry(on=is_retryable, attempts=3)(work)()
        assert len(calls) == 1

        work, calls = failing([TERMINATED])
        with pytest.raises(psycopg.errors.AdminShutdown):
            stamina.retry(on=is_retryable, attempts=3)(work)()
        assert len(calls) == 1

        on_idempotent = functools.partial(is_retryable, idempotent=True)
        work, calls = failing([TERMINATED])
        assert stamina.retry(on=on_idempotent, attempts=3)(work)() == "done"
        assert len(calls) == 2
    assert not stamina.is_testing()


def test_verdicts_are_hashable_records_in_the_history() -> None:
    """Policies with their history are hashable and compare by value."""
    a = RetryPolicy().start(0.0).after(STARTING, 1.0, random=fixed(0.5)).policy
    b = RetryPolicy().start(0.0).after(STARTING, 1.0, random=fixed(0.5)).policy
    assert a == b
    assert hash(a) == hash(b)
    assert isinstance(a.history[0].verdict, Verdict)
