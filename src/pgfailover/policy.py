"""The retry policy: an immutable value saying whether, and after how long, to run work again.

:class:`RetryPolicy` is pure: it performs no I/O, never sleeps and starts no thread. A retry
loop (sync or async) asks it, after each failure, for a :class:`Decision`::

    policy = RetryPolicy(timeout=30).start(monotonic())
    while True:
        try:
            return work()
        except Exception as ex:
            decision = policy.after(ex, monotonic())
            if not decision.retry:
                raise
            sleep(decision.wait)
            policy = decision.policy

Each failure returns a *new* policy with one more :class:`Attempt` in its ``history`` (as
urllib3's ``Retry`` does); the original is never changed, so one policy can serve as the
template of many runs. The clock is the caller's (``time.monotonic()``), and the randomness
of the jitter can be injected (``random=``), so every decision is reproducible in tests.

Which failures may be retried comes from the classifier: :meth:`RetryPolicy.after` calls
:func:`~pgfailover.classify.classify` on an exception (or takes a precomputed
:class:`~pgfailover.classify.Verdict`) and maps its :class:`~pgfailover.classify.RetryCondition`
permission:

===================  ===================================================================
``NOT_SENT``         retry, within the budget: the work never reached the server.
``ROLLED_BACK``      retry, within the budget: the server rolled the transaction back.
``IF_IDEMPOTENT``    retry, within the budget, only if the policy was built with
                     ``idempotent=True`` (the work may have taken effect: a connection lost
                     during an autocommit statement or in an unknown phase); else stop.
``OUTCOME_UNKNOWN``  ``retry=False`` and ``needs_outcome=True``: a COMMIT was in flight.
                     The runner must find out whether it committed. If it did not,
                     :meth:`Decision.not_committed` gives the decision to follow (a retry
                     within the budget, as for a rollback); if it did, the work is done.
``NEVER``            stop: application and configuration errors, interrupts.
===================  ===================================================================

The budget is ``attempts`` (in total, the first included) and ``timeout`` (a deadline,
counted from :meth:`RetryPolicy.start`). A refused retry says why in ``Decision.reason``,
and ``Decision.exhausted`` tells a spent budget from a verdict that forbids retrying.

The retry predicate for tenacity and stamina (:func:`~pgfailover.is_retryable`, and
:func:`tenacity_retry` built on it) retries only what may run again blindly: ``NOT_SENT`` and
``ROLLED_BACK`` (plus ``IF_IDEMPOTENT`` when told ``idempotent=True``). An error whose commit
outcome is unknown is never retried by them: they cannot look the outcome up. Neither
library is imported by this module until one of the tenacity helpers is called.

:func:`set_testing` (also a context manager) makes every wait 0 (and optionally cap the attempts),
for the tests of applications that use the policy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from random import random as _default_random
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeAlias

from .classify import Phase, RetryCondition, Verdict, classify, is_retryable

if TYPE_CHECKING:
    import tenacity

__all__ = [
    "CONNECT_ATTEMPT_BOUND",
    "RECONNECT_POLICY",
    "Attempt",
    "Decision",
    "RandomFn",
    "RetryPolicy",
    "RetryState",
    "Seconds",
    "TenacityStop",
    "TenacityWait",
    "is_testing",
    "set_testing",
    "tenacity_retry",
    "tenacity_stop",
    "tenacity_wait",
]

#: A duration: seconds as a number, or a :class:`datetime.timedelta`.
Seconds: TypeAlias = float | timedelta

#: A source of randomness for the jitter: returns a number in [0, 1), as ``random.random``.
RandomFn: TypeAlias = Callable[[], float]


# ------------------------------------------------------------------- testing mode


@dataclass(frozen=True, slots=True)
class _Testing:
    attempts: int | None


_testing: _Testing | None = None  # replaced whole under the lock, read without it
_testing_lock = threading.Lock()


class _RestoreTesting:
    """Returned by :func:`set_testing`: as a context manager, restores the previous mode."""

    __slots__ = ("_previous",)

    def __init__(self, previous: _Testing | None) -> None:
        self._previous = previous

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _testing  # noqa: PLW0603 - the testing switch is process-wide by design
        with _testing_lock:
            _testing = self._previous


def set_testing(on: bool, *, attempts: int | None = None) -> _RestoreTesting:
    """Switch the process-wide testing mode on or off.

    In testing mode every wait chosen by a :class:`RetryPolicy` (and by :class:`TenacityWait`)
    is 0, and, if ``attempts`` is given, every policy allows at most that many attempts
    (its own ``attempts`` still applies if lower). ``attempts=None`` keeps each policy's own
    bounds: work that keeps failing is then retried without pause until the policy's
    timeout, so pass ``attempts`` in tests where that can happen. Deadlines still apply.

    The switch is a module global, set atomically: it affects every thread, so tests that
    run in parallel threads share it. Usable as a context manager that restores the
    previous mode on exit::

        with set_testing(True, attempts=3):
            ...

    stamina has its own switch (``stamina.set_testing``); this one does not touch it.
    """
    global _testing  # noqa: PLW0603 - the testing switch is process-wide by design
    if attempts is not None:
        _check_attempts("attempts", attempts)
    with _testing_lock:
        previous = _testing
        _testing = _Testing(attempts) if on else None
    return _RestoreTesting(previous)


def is_testing() -> bool:
    """True while testing mode is on."""
    return _testing is not None


def _attempts_limit(attempts: int | None) -> int | None:
    """The attempts bound in force: the policy's, capped by testing mode's."""
    mode = _testing
    if mode is None or mode.attempts is None:
        return attempts
    return mode.attempts if attempts is None else min(attempts, mode.attempts)


# --------------------------------------------------------------------- validation


def _seconds(name: str, value: object, *, none_means: str | None = None) -> float:
    """``value`` as float seconds, or a clear error naming ``name``."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        alternative = f", or None for {none_means}" if none_means else ""
        raise TypeError(
            f"{name} must be a number of seconds or a datetime.timedelta{alternative}, "
            f"not {type(value).__name__}"
        )
    if math.isnan(seconds):
        raise ValueError(f"{name} is NaN: pass a number of seconds")
    if math.isinf(seconds):
        alternative = f" (None means {none_means})" if none_means else ""
        raise ValueError(f"{name} is infinite: pass a finite number of seconds{alternative}")
    if seconds < 0:
        raise ValueError(f"{name} must be at least 0 seconds, got {seconds!r}")
    return seconds


def _check_attempts(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (or None for no limit), not {type(value).__name__}")
    if value < 1:
        raise ValueError(
            f"{name} must be at least 1 (the first attempt counts), got {value}; "
            "use None for no limit on the number of attempts"
        )
    return value


def _check_bool(name: str, value: object, hint: str = "") -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}{hint}")
    return value


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, numbers.Real) or not math.isfinite(now):
        raise ValueError(f"now must be a finite monotonic time in seconds, got {now!r}")
    return float(now)


def _draw(random: RandomFn) -> float:
    value = random()
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"random() must return a number in [0, 1), got {value!r}")
    return value


def _describe(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


# -------------------------------------------------------------------- the values


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed attempt in a policy's history.

    Attributes:
        number: 1 for the first attempt, 2 for the first retry...
        failed_at: when it failed (the caller's monotonic clock, in seconds).
        verdict: the classifier's verdict on the error.
        error_type: the exception's qualified class name (e.g.
            ``psycopg.errors.AdminShutdown``), or the description the caller gave with a
            precomputed verdict (empty if none).
        wait: the wait chosen before the next attempt, in seconds (0 if none follows).
    """

    number: int
    failed_at: float
    verdict: Verdict
    error_type: str
    wait: float


@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """How long and how often to retry work across a failover: an immutable value.

    Backoff is exponential with full jitter ("Full Jitter" in the AWS Architecture Blog's
    *Exponential Backoff And Jitter*). Before the *n*-th retry (n = 1 for the first)::

        cap(n)  = min(wait_max, wait_initial * wait_exp_base ** (n - 1))
        wait(n) = uniform(0, cap(n))     if jitter (random() * cap(n))
        wait(n) = cap(n)                 otherwise

    and the wait is then clipped so that ``now + wait <= started_at + timeout``: no wait ends
    past the deadline, and no retry is allowed once the deadline is reached.

    The defaults fit a failover. With Patroni's defaults (``ttl`` 30 s, ``loop_wait``
    10 s) a new primary is usually writable within 30-45 s of the old one failing, and
    within a second in a local lab or on a switchover, so:

    - ``timeout=45.0``: long enough to ride out a typical automatic failover, short
      enough that a request does not hang for minutes when the cluster is really down.
    - ``attempts=None``: time, not a count, is what bounds a failover. Attempts fail at
      very different speeds (a refused connection in a millisecond, a pool checkout only
      after waiting for a primary), so a count would be either too low or meaningless.
    - ``wait_initial=0.05``: a serialization failure or a lab switchover clears in tens
      of milliseconds; the first retry should not wait longer than that.
    - ``wait_max=1.0``: the new primary should be noticed within about a second. Waits
      need not be long: a pool checkout already waits for a primary on its own, and
      between attempts the loop only spaces clients out.
    - ``wait_exp_base=2``: doubling reaches the cap after five retries (caps 0.05, 0.1,
      0.2, 0.4, 0.8, then 1.0 s).
    - ``jitter=True``: full jitter spreads the clients that all lost the old primary at
      the same moment, instead of sending them to the new one in synchronized waves.

    Args:
        attempts: the most attempts in total, the first included (1 never retries);
            ``None``: bounded only by the timeout.
        timeout: the deadline, in seconds (or a timedelta) after :meth:`start`; ``None``:
            no deadline. With both ``attempts`` and ``timeout`` None, retries are unbounded.
        wait_initial: the cap before the first retry (seconds or timedelta).
        wait_max: the largest wait (seconds or timedelta); at least ``wait_initial``.
        wait_exp_base: how much the cap grows per retry; at least 1.
        jitter: full jitter (the wait is uniform in [0, cap)); False waits the cap itself.
        idempotent: the work may run twice harmlessly, so an error after which it may
            have taken effect (``RetryCondition.IF_IDEMPOTENT``) is retried too.
        started_at: when the run started (monotonic seconds); set by :meth:`start`.
        history: the failed attempts so far; grown by :meth:`after`.

    Invalid values raise ValueError (or TypeError for a wrong type) naming the parameter.
    Time fields are floats (seconds) once built.
    """

    attempts: int | None
    timeout: float | None
    wait_initial: float
    wait_max: float
    wait_exp_base: float
    jitter: bool
    idempotent: bool
    started_at: float | None
    history: tuple[Attempt, ...]

    def __init__(
        self,
        *,
        attempts: int | None = None,
        timeout: Seconds | None = 45.0,
        wait_initial: Seconds = 0.05,
        wait_max: Seconds = 1.0,
        wait_exp_base: float = 2.0,
        jitter: bool = True,
        idempotent: bool = False,
        started_at: float | None = None,
        history: tuple[Attempt, ...] = (),
    ) -> None:
        initial = _seconds("wait_initial", wait_initial)
        maximum = _seconds("wait_max", wait_max)
        if maximum < initial:
            raise ValueError(
                f"wait_max ({maximum!r} s) must be at least wait_initial ({initial!r} s): "
                "raise wait_max or lower wait_initial"
            )
        if isinstance(wait_exp_base, bool) or not isinstance(wait_exp_base, numbers.Real):
            raise TypeError(f"wait_exp_base must be a number, not {type(wait_exp_base).__name__}")
        base = float(wait_exp_base)
        if not (math.isfinite(base) and base >= 1.0):
            raise ValueError(
                f"wait_exp_base must be a finite number of at least 1 (1 keeps the wait "
                f"constant), got {wait_exp_base!r}"
            )
        if started_at is not None:
            started_at = _check_now(started_at)
        history = tuple(history)
        if not all(isinstance(attempt, Attempt) for attempt in history):
            raise TypeError("history must hold Attempt records only")
        fields = {
            "attempts": None if attempts is None else _check_attempts("attempts", attempts),
            "timeout": None
            if timeout is None
            else _seconds("timeout", timeout, none_means="no deadline"),
            "wait_initial": initial,
            "wait_max": maximum,
            "wait_exp_base": base,
            "jitter": _check_bool(
                "jitter", jitter, ": it switches full jitter on or off, it is not an amount"
            ),
            "idempotent": _check_bool("idempotent", idempotent),
            "started_at": started_at,
            "history": history,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ the run

    def start(self, now: float) -> RetryPolicy:
        """A copy of this policy for a fresh run started at ``now``: empty history.

        ``now`` is the caller's monotonic clock (``time.monotonic()``); the deadline is
        ``now + timeout``.
        """
        return dataclasses.replace(self, started_at=_check_now(now), history=())

    @property
    def deadline(self) -> float | None:
        """When the run must end (monotonic seconds): ``started_at + timeout``.

        None without a timeout, or before the run has started.
        """
        if self.timeout is None or self.started_at is None:
            return None
        return self.started_at + self.timeout

    def remaining(self, now: float) -> float | None:
        """Seconds left before the deadline at ``now`` (at least 0), None if no deadline.

        Before :meth:`start`, the whole timeout.
        """
        if self.timeout is None:
            return None
        deadline = self.deadline
        if deadline is None:
            return self.timeout
        return max(0.0, deadline - now)

    # ------------------------------------------------------------------ backoff

    def cap(self, n: int) -> float:
        """The jitter bound before the ``n``-th retry (n >= 1).

        ``min(wait_max, wait_initial * wait_exp_base ** (n - 1))``: non-decreasing in n.
        """
        if n < 1:
            raise ValueError(f"n counts retries from 1, got {n}")
        if self.wait_initial == 0.0:
            return 0.0
        try:
            grown = self.wait_initial * self.wait_exp_base ** (n - 1)
        except OverflowError:  # far beyond wait_max anyway
            return self.wait_max
        return min(self.wait_max, grown)

    def backoff(self, n: int, random: RandomFn = _default_random) -> float:
        """The wait before the ``n``-th retry, before clipping to the deadline.

        ``random() * cap(n)`` with jitter, ``cap(n)`` without; 0 in testing mode.
        ``random`` must return a number in [0, 1) (1 is accepted and gives the cap).
        """
        cap = self.cap(n)
        if _testing is not None:
            return 0.0
        if not self.jitter:
            return cap
        return _draw(random) * cap

    # ----------------------------------------------------------------- decisions

    def after(
        self,
        cause: BaseException | Verdict,
        now: float,
        *,
        phase: Phase = Phase.UNKNOWN,
        conn: object | None = None,
        error_type: str | None = None,
        random: RandomFn = _default_random,
    ) -> Decision:
        """Record a failure at ``now`` and decide whether to run the work again.

        Args:
            cause: the exception raised (classified with :func:`classify`, using
                ``phase`` and ``conn``), or a verdict the caller already has.
            now: when it failed, on the caller's monotonic clock. If the policy was not
                started, the run starts now.
            phase: what the caller was doing (see :class:`~pgfailover.classify.Phase`):
                pass ``Phase.COMMIT`` when a COMMIT failed, ``Phase.TRANSACTION`` for a
                statement inside a transaction, so that a lost connection is judged right.
            conn: the connection the exception was raised on, if known.
            error_type: how to describe the error in the history; by default the
                exception's qualified class name ("" for a bare verdict).
            random: the jitter's randomness, a number in [0, 1) per call.

        Returns:
            The decision, holding the new policy (this one plus the attempt); this policy
            is unchanged. The attempt is recorded whatever the decision.
        """
        now = _check_now(now)
        if isinstance(cause, Verdict):
            verdict = cause
            described = "" if error_type is None else error_type
        else:
            verdict = classify(cause, conn=conn, phase=phase)
            described = _describe(cause) if error_type is None else error_type
        started = self if self.started_at is not None else self.start(now)
        number = len(started.history) + 1
        deadline = started.deadline

        permission = verdict.retry
        forbidden: str | None = None
        if permission is RetryCondition.NEVER:
            forbidden = f"verdict forbids retry: {verdict.reason}"
        elif permission is RetryCondition.IF_IDEMPOTENT and not self.idempotent:
            forbidden = (
                "verdict forbids retry: the work may have taken effect and is not "
                f"declared idempotent: {verdict.reason}"
            )

        wait = 0.0
        spent: str | None = None
        if forbidden is None:
            spent = started._spent(number, now)
            if spent is None:
                wait = _clip(started.backoff(number, random), now, deadline)

        record = Attempt(number, now, verdict, described, wait)
        policy = dataclasses.replace(started, history=(*started.history, record))

        if forbidden is not None:
            return Decision(False, 0.0, forbidden, policy, verdict, deadline)
        if permission is RetryCondition.OUTCOME_UNKNOWN:
            then = spent if spent is not None else f"retry in {wait:.3f} s if it did not commit"
            return Decision(
                False,
                wait,
                f"commit outcome must be resolved first (then: {then}): {verdict.reason}",
                policy,
                verdict,
                deadline,
                needs_outcome=True,
                exhausted=spent is not None,
            )
        if spent is not None:
            return Decision(False, 0.0, spent, policy, verdict, deadline, exhausted=True)
        return Decision(
            True,
            wait,
            f"retry {number} in {wait:.3f} s ({permission.value}): {verdict.reason}",
            policy,
            verdict,
            deadline,
        )

    def _spent(self, number: int, now: float) -> str | None:
        """Why no retry may follow the ``number``-th attempt at ``now``: None if one may."""
        limit = _attempts_limit(self.attempts)
        if limit is not None and number >= limit:
            return f"attempts exhausted ({limit})"
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            return f"deadline reached ({self.timeout:g} s timeout)"
        return None


def _clip(wait: float, now: float, deadline: float | None) -> float:
    """``wait`` shortened so that ``now + wait <= deadline`` holds in floating point."""
    if deadline is None:
        return wait
    wait = max(0.0, min(wait, deadline - now))
    for _ in range(8):  # rounding of deadline - now: one step down usually suffices
        if now + wait <= deadline:
            return wait
        wait = math.nextafter(wait, 0.0)
    return 0.0


#: The one reconnection schedule: how pgfailover's pools and instrumented SQLAlchemy
#: engines space their connection attempts while no primary is reachable. Caps 50 ms,
#: growing x1.5 to 200 ms, full jitter (a mean wait of at most 100 ms): a new primary is
#: usually writable within a fraction of a second of being promoted, and one prober at a
#: time (not one per request) waits this long, so the cost is a handful of connection
#: attempts per second per process. No deadline of its own: the pool's or engine's
#: timeout bounds it. 0 in testing mode, like every wait of a policy.
RECONNECT_POLICY = RetryPolicy(timeout=None, wait_initial=0.05, wait_max=0.2, wait_exp_base=1.5)

#: Seconds one connection attempt may take when the caller set no bound of its own
#: (libpq's ``connect_timeout``, asyncpg's ``timeout``): a server that accepts TCP and then
#: never answers (a frozen machine, a proxy whose backend vanished) ends the attempt within
#: it, so that the next attempt can go elsewhere. libpq counts whole seconds, at least 2.
CONNECT_ATTEMPT_BOUND = 5.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failure, as decided by :meth:`RetryPolicy.after`.

    Attributes:
        retry: run the work again, after sleeping ``wait`` seconds.
        wait: seconds to sleep before the retry (0 when there is none), already clipped so
            that it ends by the deadline. With ``needs_outcome``, the wait to use if the
            transaction turns out not to have committed.
        reason: why it retries or stops, for logs, e.g. ``"attempts exhausted (10)"``,
            ``"deadline reached (45 s timeout)"``, ``"verdict forbids retry: ..."``,
            ``"commit outcome must be resolved first (...)"``.
        policy: the policy to use for the next attempt: the history now includes this
            failure (``policy.history[-1]``).
        verdict: the classifier's verdict on the failure.
        deadline: the run's deadline (monotonic seconds), None without a timeout: a runner
            passes ``deadline - now`` as the timeout of a pool checkout.
        needs_outcome: a COMMIT was in flight (``RetryCondition.OUTCOME_UNKNOWN``): ``retry`` is
            False; the runner must find out whether the transaction committed, and if it
            did not, follow :meth:`not_committed`.
        exhausted: the budget (attempts or deadline) is spent; False when the stop comes
            from the verdict itself.
    """

    retry: bool
    wait: float
    reason: str
    policy: RetryPolicy = dataclasses.field(repr=False)  # its history repeats the verdict
    verdict: Verdict
    deadline: float | None
    needs_outcome: bool = False
    exhausted: bool = False

    @property
    def attempt(self) -> Attempt:
        """The failed attempt this decision is about."""
        return self.policy.history[-1]

    def not_committed(self, now: float) -> Decision:
        """The decision once the runner has found, at ``now``, that the COMMIT did not happen.

        The work is then as good as rolled back: it is retried if the budget allows, with
        the wait shortened so that it still ends by the deadline (resolving the outcome
        took time). Only for a decision with ``needs_outcome``: ValueError otherwise.
        """
        if not self.needs_outcome:
            raise ValueError(
                "not_committed() applies only to a decision with needs_outcome=True "
                f"(this one: {self.reason})"
            )
        now = _check_now(now)
        policy = self.policy
        history = policy.history
        spent = policy._spent(len(history), now)
        wait = 0.0 if spent is not None else _clip(self.wait, now, self.deadline)
        policy = dataclasses.replace(
            policy, history=(*history[:-1], dataclasses.replace(history[-1], wait=wait))
        )
        if spent is not None:
            return dataclasses.replace(
                self,
                wait=0.0,
                reason=f"not committed, but {spent}",
                policy=policy,
                needs_outcome=False,
                exhausted=True,
            )
        return dataclasses.replace(
            self,
            retry=True,
            wait=wait,
            reason=f"not committed: retry {len(history)} in {wait:.3f} s: {self.verdict.reason}",
            policy=policy,
            needs_outcome=False,
        )


# ------------------------------------------------------------ tenacity and stamina


def tenacity_retry(*, idempotent: bool = False) -> tenacity.retry_if_exception:
    """A tenacity retry strategy (``retry=``) retrying what :func:`~pgfailover.is_retryable`
    allows.

    A ``tenacity.retry_if_exception``, so it combines with tenacity's ``|`` and ``&``.
    Imports tenacity when called: tenacity is an optional dependency.
    """
    import tenacity  # noqa: PLC0415 - optional dependency, imported only when asked for

    if idempotent:
        return tenacity.retry_if_exception(_is_retryable_idempotent)
    return tenacity.retry_if_exception(is_retryable)


def _is_retryable_idempotent(exc: BaseException) -> bool:
    return is_retryable(exc, idempotent=True)


class RetryState(Protocol):
    """What the tenacity helpers read of tenacity's ``RetryCallState``."""

    @property
    def attempt_number(self) -> int:
        """How many attempts were made (1 after the first failure)."""
        ...  # pragma: no cover - protocol

    @property
    def seconds_since_start(self) -> float | None:
        """Seconds from the first attempt to the last outcome."""
        ...  # pragma: no cover - protocol


@dataclass(frozen=True, slots=True)
class TenacityWait:
    """A tenacity wait strategy (``wait=``) applying the policy's full-jitter backoff.

    Called with tenacity's ``RetryCallState`` after the ``attempt_number``-th failure, it
    returns ``policy.backoff(attempt_number)`` (the formula of :class:`RetryPolicy`), clipped
    so that the wait ends by ``policy.timeout`` after the first attempt; 0 in testing mode.
    A plain callable: tenacity accepts it wherever it takes a wait strategy.
    """

    policy: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    random: RandomFn = _default_random

    def __call__(self, retry_state: RetryState) -> float:
        wait = self.policy.backoff(max(1, retry_state.attempt_number), self.random)
        elapsed = retry_state.seconds_since_start
        timeout = self.policy.timeout
        if timeout is not None and elapsed is not None:
            wait = _clip(wait, elapsed, timeout)
        return wait


@dataclass(frozen=True, slots=True)
class TenacityStop:
    """A tenacity stop strategy (``stop=``) enforcing the policy's attempts and timeout.

    Stops once ``attempt_number`` reaches ``policy.attempts`` (capped in testing mode) or
    ``policy.timeout`` seconds have passed since the first attempt.
    """

    policy: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)

    def __call__(self, retry_state: RetryState) -> bool:
        limit = _attempts_limit(self.policy.attempts)
        if limit is not None and retry_state.attempt_number >= limit:
            return True
        elapsed = retry_state.seconds_since_start
        timeout = self.policy.timeout
        return timeout is not None and elapsed is not None and elapsed >= timeout


def tenacity_wait(
    policy: RetryPolicy | None = None, *, random: RandomFn = _default_random
) -> TenacityWait:
    """A tenacity wait strategy with ``policy``'s backoff (the default policy if None)."""
    return TenacityWait(RetryPolicy() if policy is None else policy, random)


def tenacity_stop(policy: RetryPolicy | None = None) -> TenacityStop:
    """A tenacity stop strategy with ``policy``'s attempts and timeout (default if None)."""
    return TenacityStop(RetryPolicy() if policy is None else policy)
