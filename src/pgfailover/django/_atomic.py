"""``transaction.atomic`` run under pgfailover's retry policy, for Django.

The loop is the transaction runner's (:mod:`pgfailover.retry_async`) on a Django
connection: each attempt enters ``transaction.atomic(using)``, begins the transaction with
the commit record in BEGIN's round trip, runs the work and commits on the way out. On
failure the policy decides from the classifier's verdict; a connection the verdict
discards is closed so the next attempt opens a new one; a lost COMMIT is looked up on the
current primary through the record and never run again blindly (committed: the work's
result is returned; not committed: retried; cannot tell:
:class:`~pgfailover.errors.CommitOutcomeUnknown`).

It cannot run inside an outer atomic block: a retry would re-run part of the outer
transaction, whose earlier work the failure already rolled back.
:class:`NestedAtomicError` says so. Inside a Django ``TestCase`` (whose test runs in an
atomic block of its own, like ``durable=True`` treats it) the work runs once in a plain
``transaction.atomic``, without retries.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections, transaction  # type: ignore[import-untyped]
from django.db.transaction import TransactionManagementError  # type: ignore[import-untyped]
from psycopg.rows import tuple_row

from .. import _runner
from .._runner import Failed, Run, conclude, needs_check
from ..classify import Phase, classify
from ..outcome import OBSERVE_SQL, CommitRecord, Observation, Outcome
from ..policy import RetryPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .._runner import PolicyOptions

__all__ = ["AtomicRunner", "NestedAtomicError", "atomic", "run_atomic"]

T = TypeVar("T")
P = ParamSpec("P")


class NestedAtomicError(TransactionManagementError):  # type: ignore[misc]
    """A retried atomic block was entered inside another atomic block (a retry cannot re-run
    part of an outer transaction). A ``django.db.transaction.TransactionManagementError``."""


class AtomicRunner:
    """Runs work in ``transaction.atomic(using)`` and retries what is safe.

    Configure once, call many times: ``runner(work, *args, **kwargs)`` runs
    ``work(*args, **kwargs)`` (the work uses the ORM or ``connections[using]`` as usual; it
    receives no connection). :meth:`wraps` makes a decorated function of it.

    Args:
        using: the database alias (None: ``"default"``). Its backend must be PostgreSQL on
            psycopg 3 (``pgfailover.django`` or the stock one); checked at the first call.
        policy: the :class:`~pgfailover.policy.RetryPolicy`, or its options by name
            (``timeout=30``, ``attempts=5``, ``idempotent=True``, ...); neither: the default
            policy (45 s deadline, no attempt limit).
        check_committed: ``check_committed(connection)`` (``connection`` is Django's
            ``connections[using]``) settles an ambiguous lost COMMIT by looking for the
            work's effect: True if it committed. None: an ambiguous outcome raises
            :class:`~pgfailover.errors.CommitOutcomeUnknown`.
    """

    def __init__(
        self,
        using: str | None = None,
        *,
        policy: RetryPolicy | None = None,
        check_committed: Callable[[Any], bool] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        if using is not None and not isinstance(using, str):
            raise TypeError(f"using must be a database alias (str) or None, got {using!r}")
        self.using = using or DEFAULT_DB_ALIAS
        self.policy = _runner.make_policy(policy, options)
        self.check_committed = check_committed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.using!r}, policy={self.policy!r})"

    def __call__(self, work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``work(*args, **kwargs)`` in an atomic block until it commits or the policy
        gives up. Returns what ``work`` returned; raises the last database error when giving
        up (Django's wrapped error, its driver error as ``__cause__``), the work's own
        exceptions unchanged, :class:`~pgfailover.errors.CommitOutcomeUnknown`, or
        :class:`NestedAtomicError` at once inside an outer atomic block."""
        _runner.check_sync_work(work)
        wrapper = connections[self.using]
        if wrapper.in_atomic_block:
            if all(getattr(block, "_from_testcase", False) for block in wrapper.atomic_blocks):
                with transaction.atomic(using=self.using):  # a TestCase's test: run once
                    return work(*args, **kwargs)
            raise NestedAtomicError(
                f"pgfailover.django.atomic ({getattr(work, '__qualname__', work)}) was called "
                f"inside an atomic block on {self.using!r}: a retry cannot re-run part of an "
                "outer transaction; call it outside any transaction.atomic (and with "
                "ATOMIC_REQUESTS off for this view: decorate it with "
                "transaction.non_atomic_requests)"
            )
        if wrapper.vendor != "postgresql":
            raise TypeError(
                f"pgfailover.django.atomic needs a PostgreSQL database; {self.using!r} is "
                f"{wrapper.vendor}"
            )
        idempotent = self.policy.idempotent
        started = time.monotonic()
        run: Run | None = None
        while True:
            try:
                return cast("T", self._attempt(wrapper, work, args, kwargs, idempotent))
            except Failed as failed:
                if run is None:
                    run = Run(self.policy, started)
                decision = run.decide(failed)
                if decision.verdict.discard_connection:
                    _drop(wrapper)
                if decision.needs_outcome:
                    outcome, detail = self._settle(wrapper, run, failed)
                    followed = run.settled(decision, failed, outcome, detail)
                    if followed is None:  # it committed: the work is done
                        return cast("T", failed.result)
                    decision = followed
                if not decision.retry or run.no_time_after(decision.wait):
                    raise run.give_up(decision, failed) from None
                run.report(decision, failed, "retry")
                time.sleep(decision.wait)
                run.policy = decision.policy

    def wraps(self, work: Callable[P, T]) -> Callable[P, T]:
        """``work`` bound to this runner: calling the result runs ``self(work, ...)``."""

        @functools.wraps(work)
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            return self(work, *args, **kwargs)

        return run

    def _attempt(
        self, wrapper: Any, work: Callable[..., Any], args: Any, kwargs: Any, idempotent: bool
    ) -> Any:
        phase, recorded, result, raw = Phase.CONNECT, None, None, None
        try:
            wrapper.close_if_health_check_failed()  # Django's CONN_HEALTH_CHECKS, if on
            wrapper.ensure_connection()
            raw = wrapper.connection
            phase = Phase.TRANSACTION
            with transaction.atomic(using=self.using):
                recorded = _record(_psycopg(raw, self.using), idempotent)
                result = work(*args, **kwargs)
                _runner.sync_result(result, work)
                phase = Phase.COMMIT  # leaving the block commits
        except Exception as ex:
            record = _runner.parse_recorded(recorded, raw)
            read_only = bool(getattr(raw, "read_only", False))
            raise Failed(ex, phase, record, result, raw, read_only) from ex
        return result

    def _settle(self, wrapper: Any, run: Run, failed: Failed) -> tuple[Outcome, str]:
        """Ask the current primary what became of a lost COMMIT, until the deadline."""
        record = failed.record
        if record is None:
            return Outcome.UNKNOWN, "nothing was recorded when the transaction began"
        last = "the primary could not be asked before the deadline"
        while True:
            remaining = run.remaining()
            if remaining is not None and remaining <= 0:
                return Outcome.UNKNOWN, last
            try:
                seen, checked = self._observe(wrapper, record)
            except Exception as ex:  # no primary yet: wait and ask again
                if not classify(ex).is_failover:
                    return Outcome.UNKNOWN, f"asking the primary failed: {ex}"
                _drop(wrapper)
                last = f"the primary could not be asked: {type(ex).__name__}: {ex}"
                time.sleep(_runner.PENDING_POLL)
                continue
            outcome, why = conclude(record, seen, checked)
            if outcome is not Outcome.PENDING:
                return outcome, why
            last = why
            time.sleep(_runner.PENDING_POLL)

    def _observe(self, wrapper: Any, record: CommitRecord) -> tuple[Observation, bool | None]:
        wrapper.ensure_connection()
        raw = _psycopg(wrapper.connection, self.using)
        with raw.cursor(row_factory=tuple_row) as cur:
            cur.execute(OBSERVE_SQL, {"xid": record.xid}, prepare=False)
            row = cur.fetchone()
        if not raw.autocommit:
            raw.rollback()
        assert row is not None
        seen = Observation.from_row(row)
        checked = None
        if self.check_committed is not None and needs_check(record, seen):
            checked = bool(self.check_committed(wrapper))
        return seen, checked


def _psycopg(raw: Any, using: str) -> psycopg.Connection[Any]:
    if not isinstance(raw, psycopg.Connection):
        raise TypeError(
            f"pgfailover.django.atomic needs psycopg 3 connections; {using!r} gave "
            f"{type(raw).__module__}.{type(raw).__qualname__}"
        )
    return raw


def _record(conn: psycopg.Connection[Any], idempotent: bool) -> _runner.Recorded | None:
    """BEGIN and the record in one round trip on the raw connection (None when nothing is
    recorded: idempotent work begins as without a runner). psycopg reads the transaction
    status from the replies, so it sends no BEGIN of its own afterwards."""
    if idempotent and not conn.autocommit:
        return None
    sql, known = _runner.begin_statement(conn, idempotent)
    with conn.lock:
        row, unmarked = conn.wait(_runner.begin_and_record(conn, sql))
    return _runner.remember(conn, row, None if unmarked else known)


def _drop(wrapper: Any) -> None:
    """Close Django's connection after a failure whose verdict discards it (the next
    attempt opens a new one); a failure to close is the failure already being handled."""
    with contextlib.suppress(Exception):  # the connection is broken already
        wrapper.close()


@overload
def atomic(using: Callable[P, T], /) -> Callable[P, T]: ...


@overload
def atomic(
    using: str | None = None,
    /,
    *,
    policy: RetryPolicy | None = None,
    check_committed: Callable[[Any], bool] | None = None,
    **options: Unpack[PolicyOptions],
) -> Callable[[Callable[P, T]], Callable[P, T]]: ...


def atomic(
    using: Any = None,
    /,
    *,
    policy: RetryPolicy | None = None,
    check_committed: Callable[[Any], bool] | None = None,
    **options: Any,
) -> Any:
    """Decorator: the function runs in ``transaction.atomic(using)`` under the retry policy.

    ``@atomic`` (default database and policy), ``@atomic("other")``,
    ``@atomic(timeout=30)``; options as for :class:`AtomicRunner`. The decorated function
    keeps its signature. Unknown options raise ``TypeError`` at decoration time. For a
    one-off call without decorating, use :func:`run_atomic` or an :class:`AtomicRunner`.
    """
    if callable(using):
        return AtomicRunner().wraps(using)
    runner = AtomicRunner(using, policy=policy, check_committed=check_committed, **options)
    return runner.wraps


def run_atomic(work: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``work(*args, **kwargs)`` in ``transaction.atomic()`` on the default database
    with the default policy; every argument after ``work`` goes to ``work`` untouched. For
    another database, policy or ``check_committed``, configure an :class:`AtomicRunner`."""
    return AtomicRunner()(work, *args, **kwargs)
