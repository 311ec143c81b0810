# pgfailover: generate-sync
"""Run a unit of work in a transaction, and run it again when that is safe.

.. code-block:: python

    runner = pgfailover.TransactionRunner(pool, timeout=30)
    runner(pay, order_id, note="...")           # runs pay(conn, order_id, note="...")

    @pgfailover.transaction(pool, timeout=30)
    def pay(conn, order_id): ...

    # async targets: AsyncTransactionRunner, await runner(...), decorate an async def

The target is where connections come from: a psycopg_pool pool (pgfailover's or plain),
a SQLAlchemy ``Engine`` (the work receives a ``Connection``) or ``sessionmaker`` (it
receives a ``Session``), or their async twins (``AsyncConnectionPool``, ``AsyncEngine``,
``async_sessionmaker``). The runner is configured once (the target, a
:class:`~pgfailover.policy.RetryPolicy` or its options by name, ``check_committed``);
calling it runs ``work(conn, *args, **kwargs)`` with the caller's arguments passed through
untouched. Each attempt takes a fresh connection, begins a transaction, runs the work and
commits. On failure the policy (exponential backoff with full jitter under a deadline)
decides from the classifier's verdict: retried are failures that never reached the server
or that the server rolled back (a standby's 25006/0A000, a lost connection before COMMIT,
a serialization failure...). Application errors propagate at once, unchanged.

**A lost COMMIT is never run again without checking.** When the transaction begins, the
runner records its xid, the system identifier, the timeline, the WAL position and the
server's time (:func:`~pgfailover.outcome.record_sql`; with psycopg pools this rides in
the same round trip as BEGIN; on SQLAlchemy targets it is one more statement). If the
connection is lost while COMMIT is in flight, the runner asks the current primary
(:func:`~pgfailover.outcome.resolve`): committed -> the work's result is returned, as if
nothing happened; not committed -> retried; cannot tell ->
:class:`~pgfailover.errors.CommitOutcomeUnknown`, never a guess. After an asynchronous
failover "committed" can be ambiguous (the xid may have been reused): pass
``check_committed=``, a function that looks for the work's own effect (an idempotency key,
a row it inserted) on a connection to the new primary, to settle it.

With ``idempotent=True`` (the work may safely run twice: an upsert keyed by the caller)
nothing is recorded, the transaction begins exactly as it would without a runner, and a
lost COMMIT is simply retried: the fast path.

Every failure produces a :class:`~pgfailover.events.RetryEvent` (logged, and delivered to
:func:`~pgfailover.events.subscribe` hooks). When the runner gives up, the last driver
error propagates, with a note saying how many attempts were made.

``TransactionRunner`` and ``run_transaction`` live in :mod:`pgfailover.retry`,
``AsyncTransactionRunner`` and ``arun_transaction`` in :mod:`pgfailover.retry_async`:
``retry_async.py`` is the source, ``tools/async_to_sync.py`` generates ``retry.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import psycopg
from psycopg.rows import tuple_row

from . import _runner
from ._runner import Failed, Run, conclude, needs_check
from .classify import Phase, classify
from .connection import _FailoverAware
from .outcome import OBSERVE_SQL, CommitRecord, Observation, Outcome
from .policy import RetryPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._runner import PolicyOptions

__all__ = ["AsyncTransactionRunner", "arun_transaction"]

logger = logging.getLogger("pgfailover.retry")

T = TypeVar("T")
P = ParamSpec("P")


class AsyncTransactionRunner:
    """Runs work in a transaction on ``target`` and retries what is safe (see the module
    doc). Configure once, call many times: ``runner(work, *args, **kwargs)`` (awaited for
    the async runner).

    Args:
        target: a psycopg_pool pool (pgfailover's or plain, subclasses included), a
            SQLAlchemy engine (``OptionEngine`` included) or sessionmaker, on PostgreSQL,
            of the runner's kind (sync or async). Anything else raises ``TypeError`` now.
        policy: the :class:`~pgfailover.policy.RetryPolicy` to follow; or give its options
            by name instead (``timeout=30``, ``attempts=5``, ``idempotent=True``, ...);
            neither: the default policy (45 s deadline, no attempt limit).
        check_committed: ``check_committed(conn)`` settles an ambiguous lost COMMIT by
            looking for the work's effect on a connection to the current primary (True: it
            committed). None: an ambiguous outcome raises
            :class:`~pgfailover.errors.CommitOutcomeUnknown`.
    """

    def __init__(
        self,
        target: Any,
        /,
        *,
        policy: RetryPolicy | None = None,
        check_committed: Callable[[Any], Awaitable[bool]] | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        self.policy = _runner.make_policy(policy, options)
        self.check_committed = check_committed
        self.target = target
        self._shell = _shell(target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.target).__name__}, policy={self.policy!r})"

    async def __call__(
        self,
        work: Callable[Concatenate[Any, P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``work(conn, *args, **kwargs)`` until it commits or the policy gives up.

        Returns what ``work`` returned. Raises the last driver error when giving up, the
        work's own exceptions unchanged, or
        :class:`~pgfailover.errors.CommitOutcomeUnknown`.
        """
        if True:  # ASYNC
            pass
        else:
            _runner.check_sync_work(work)
        shell, idempotent = self._shell, self.policy.idempotent
        started, timeout = time.monotonic(), self.policy.timeout
        run: Run | None = None  # made at the first failure: the happy path needs none
        while True:
            try:
                return await shell.attempt(  # type: ignore[no-any-return]
                    work, args, kwargs, timeout, idempotent
                )
            except Failed as failed:
                if run is None:
                    run = Run(self.policy, started)
                decision = run.decide(failed)
                if decision.needs_outcome:
                    outcome, detail = await self._settle(run, failed)
                    followed = run.settled(decision, failed, outcome, detail)
                    if followed is None:  # it committed: the work is done
                        return cast("T", failed.result)
                    decision = followed
                if not decision.retry or run.no_time_after(decision.wait):
                    raise run.give_up(decision, failed) from None
                run.report(decision, failed, "retry")
                await asyncio.sleep(decision.wait)
                run.policy = decision.policy
                timeout = run.remaining()

    def wraps(self, work: Callable[Concatenate[Any, P], Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """``work`` bound to this runner: calling the result runs ``self(work, ...)``."""

        @functools.wraps(work)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self(work, *args, **kwargs)

        return run

    async def _settle(self, run: Run, failed: Failed) -> tuple[Outcome, str]:
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
                seen, checked = await self._shell.observe(record, remaining, self.check_committed)
            except Exception as ex:  # no primary yet: wait and ask again
                if not classify(ex).is_failover and not isinstance(ex, TimeoutError):
                    return Outcome.UNKNOWN, f"asking the primary failed: {ex}"
                last = f"the primary could not be asked: {type(ex).__name__}: {ex}"
                await asyncio.sleep(_runner.PENDING_POLL)
                continue
            outcome, why = conclude(record, seen, checked)
            if outcome is not Outcome.PENDING:
                return outcome, why
            last = why
            await asyncio.sleep(_runner.PENDING_POLL)


async def arun_transaction(
    target: Any,
    work: Callable[Concatenate[Any, P], Awaitable[T]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run ``work(conn, *args, **kwargs)`` on ``target`` with the default policy.

    Every argument after ``work`` goes to ``work`` untouched. For other policy options or
    ``check_committed``, configure a runner (``TransactionRunner``,
    ``AsyncTransactionRunner``).
    """
    return await AsyncTransactionRunner(target)(work, *args, **kwargs)


# ------------------------------------------------------------------ the target shells


def _shell(target: Any) -> _PoolShell | _EngineShell:
    """The shell for ``target``; ``TypeError`` for a target of the other kind (sync/async)."""
    kind, is_async = _runner.target_kind(target)
    if True:  # ASYNC
        use = "pgfailover.TransactionRunner or run_transaction()"
        if not is_async:
            raise TypeError(f"{type(target).__name__} is sync: use {use}")
    else:
        use = "pgfailover.AsyncTransactionRunner or await arun_transaction()"
        if is_async:
            raise TypeError(f"{type(target).__name__} is async: use {use}")
    if kind == "pool":
        return _PoolShell(target)
    return _EngineShell(target, sessions=kind == "sessions")


async def _record(conn: psycopg.AsyncConnection[Any], idempotent: bool) -> _runner.Recorded | None:
    """BEGIN and the record in one round trip (see :func:`_runner.begin_and_record`); None
    when nothing is recorded. psycopg reads the transaction status from the server's
    replies, so it sends no BEGIN of its own afterwards, whatever the connection's
    autocommit setting, and ``commit()`` sends COMMIT."""
    if idempotent and not conn.autocommit:
        return None  # psycopg begins with the work's first statement, as without a runner
    sql, known = _runner.begin_statement(conn, idempotent)
    async with conn.lock:
        row, unmarked = await conn.wait(_runner.begin_and_record(conn, sql))
    return _runner.remember(conn, row, None if unmarked else known)


async def _observe(conn: psycopg.AsyncConnection[Any], xid: str) -> Observation:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(OBSERVE_SQL, {"xid": xid}, prepare=False)
        row = await cur.fetchone()
    await conn.rollback()
    assert row is not None
    return Observation.from_row(row)


async def _run_work(work: Callable[..., Awaitable[T]], conn: Any, args: Any, kwargs: Any) -> T:
    """The work's result; ``TypeError`` for a result of the wrong kind (an async runner
    needs an awaitable, a sync one must not get one)."""
    if True:  # ASYNC
        result = work(conn, *args, **kwargs)
        if not asyncio.iscoroutine(result) and not isinstance(result, Awaitable):
            raise TypeError(
                f"{getattr(work, '__qualname__', work)!r} did not return an awaitable: "
                "run a plain function with a sync target and TransactionRunner"
            )
        return await result
    else:
        result = work(conn, *args, **kwargs)
        _runner.sync_result(result, work)
        return result


class _PoolShell:
    """psycopg_pool pools (pgfailover's or plain): the work gets a psycopg connection
    inside a transaction."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def attempt(
        self,
        work: Callable[..., Awaitable[Any]],
        args: Any,
        kwargs: Any,
        timeout: float | None,
        idempotent: bool,
    ) -> Any:
        phase, recorded, result, used = Phase.CONNECT, None, None, None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                phase, used = Phase.TRANSACTION, conn
                if deadline is not None and isinstance(conn, _FailoverAware):
                    conn._pgf_deadline = deadline  # the watchdog cuts a statement past it
                recorded = await _record(conn, idempotent)
                result = await _run_work(work, conn, args, kwargs)
                # Leaving the block commits (psycopg's connection context: COMMIT on the
                # way out, ROLLBACK after an exception), and the pool takes it back.
                phase = Phase.COMMIT
        except Exception as ex:
            record = _runner.parse_recorded(recorded, used)
            read_only = bool(getattr(used, "read_only", False))
            raise Failed(ex, phase, record, result, used, read_only) from ex
        finally:
            if isinstance(used, _FailoverAware) and used._pgf_deadline is deadline:
                used._pgf_deadline = None  # pgfailover's pools clear it on return already
        return result

    async def observe(
        self, record: CommitRecord, timeout: float | None, check: Any
    ) -> tuple[Observation, bool | None]:
        async with self.pool.connection(timeout=timeout) as conn:
            seen = await _observe(conn, record.xid)
            verdict = None
            if check is not None and needs_check(record, seen):
                verdict = bool(await check(conn))
                await conn.rollback()
            return seen, verdict


class _EngineShell:
    """SQLAlchemy engines (the work gets a ``Connection``) and sessionmakers (a
    ``Session``)."""

    def __init__(self, target: Any, sessions: bool) -> None:
        self.target = target
        self.sessions = sessions

    @contextlib.asynccontextmanager
    async def _unit(self) -> AsyncIterator[tuple[Any, Any]]:
        """(what the work receives, the SQLAlchemy Connection it runs on)."""
        if self.sessions:
            async with self.target() as session:
                await session.begin()
                yield session, await session.connection()
        else:
            async with self.target.connect() as conn:
                await conn.begin()
                yield conn, conn

    async def attempt(
        self,
        work: Callable[..., Awaitable[Any]],
        args: Any,
        kwargs: Any,
        timeout: float | None,
        idempotent: bool,
    ) -> Any:
        phase, record, result, read_only = Phase.CONNECT, None, None, False
        watched = None
        try:
            async with self._unit() as (handle, conn):
                phase, read_only = Phase.TRANSACTION, _runner.sqlalchemy_read_only(conn)
                if timeout is not None:  # the watchdog cuts a statement past the deadline
                    watched = _runner.watched_of(conn, time.monotonic() + timeout)
                if not (read_only or idempotent):
                    if True:  # ASYNC
                        record = await conn.run_sync(_runner.record_sqlalchemy)
                    else:
                        record = _runner.record_sqlalchemy(conn)
                result = await _run_work(work, handle, args, kwargs)
                if self.sessions:
                    await handle.flush()
                phase = Phase.COMMIT
                await handle.commit()
                return result
        except Exception as ex:
            raise Failed(ex, phase, record, result, read_only=read_only) from ex
        finally:
            if watched is not None:
                watched._pgf_deadline = None  # the deadline ends with the attempt

    async def observe(
        self, record: CommitRecord, timeout: float | None, check: Any
    ) -> tuple[Observation, bool | None]:
        async with self._unit() as (handle, conn):
            row = await conn.exec_driver_sql(
                _runner.observe_sql(conn), _runner.observe_params(conn, record.xid)
            )
            seen = Observation.from_row(tuple(row.one()))
            verdict = None
            if check is not None and needs_check(record, seen):
                verdict = bool(await check(handle))
            await handle.rollback()
            return seen, verdict
