"""Run a unit of work in a transaction, and run it again when that is safe.

.. code-block:: python

    @pgfailover.transaction(pool, timeout=30)
    def pay(conn, order_id): ...

    pay(42)                                        # or: run_transaction(pool, pay, 42)

The target is where connections come from: a psycopg_pool pool (pgfailover's or plain),
a SQLAlchemy ``Engine`` (the work receives a ``Connection``) or ``sessionmaker`` (it
receives a ``Session``), or their async twins (``AsyncConnectionPool``, ``AsyncEngine``,
``async_sessionmaker``; decorate an ``async def``). Each attempt takes a fresh connection,
begins a transaction, runs ``work(conn, *args, **kwargs)`` and commits. On failure the
:class:`~pgfailover.policy.RetryPolicy` (exponential backoff with full jitter under a
deadline) decides from the classifier's verdict: retried are failures that never reached
the server or that the server rolled back (a standby's 25006/0A000, a lost connection
before COMMIT, a serialization failure...). Application errors propagate at once,
unchanged.

**A lost COMMIT is never run again without checking.** When the transaction begins, the
runner records its xid, the system identifier, the timeline, the WAL position and the
server's time (:func:`~pgfailover.outcome.record_sql`; with psycopg pools this rides in
the same round trip as BEGIN, so it costs no extra round trip; on SQLAlchemy targets it is
one more statement). The system identifier is read from the control file once per
connection and server, not per transaction. If the connection is lost while COMMIT is in
flight, the runner asks the current primary (:func:`~pgfailover.outcome.resolve`):
committed -> the work's result is returned, as if nothing happened; not committed ->
retried; cannot tell -> :class:`~pgfailover.errors.CommitOutcomeUnknown`, never a guess.
After an asynchronous failover "committed" can be ambiguous (the xid may have been
reused): pass ``check_committed=``, a function that looks for the work's own effect (an
idempotency key, a row it inserted) on a connection to the new primary, to settle it.

Every failure produces a :class:`~pgfailover.events.RetryEvent` (logged, and delivered to
:func:`~pgfailover.events.subscribe` hooks). When the runner gives up, the last driver
error propagates, with a note saying how many attempts were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import sys
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import psycopg
from psycopg.abc import PQGen
from psycopg.generators import execute
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.pq.abc import PGconn
from psycopg.rows import tuple_row

from .classify import Phase, Verdict, classify
from .errors import CommitOutcomeUnknown
from .events import RetryEvent, caller_stack, emit
from .outcome import (
    OBSERVE_SQL,
    CommitRecord,
    Observation,
    Outcome,
    ServerIdentity,
    parse_record,
    record_sql,
    resolve,
)
from .policy import Decision, RetryPolicy

__all__ = ["arun_transaction", "run_transaction", "transaction"]

logger = logging.getLogger("pgfailover.retry")

T = TypeVar("T")
P = ParamSpec("P")

#: Wait between two looks at a transaction still "in progress" on the same server.
PENDING_POLL = 0.05
#: An attempt is not started with less time than this left before the deadline: the last
#: real error is raised instead of a timeout of the attempt itself.
MIN_ATTEMPT_TIME = 0.01


@dataclass
class _Failed(Exception):
    """An attempt failed: the driver's error, what was in flight, what was recorded."""

    error: BaseException
    phase: Phase
    record: CommitRecord | None
    result: object = None  # the work's result, when only the COMMIT failed
    conn: object = None  # the driver connection it failed on, if any (broken or not)
    read_only: bool = False  # a read-only transaction: a lost COMMIT lost nothing


# ------------------------------------------------------------------ the target shells


#: The server each psycopg connection last recorded on (see outcome.record_sql).
_identities: weakref.WeakKeyDictionary[Any, ServerIdentity] = weakref.WeakKeyDictionary()


def _endpoint(conn: Any) -> str:
    try:
        return f"{conn.info.host}:{conn.info.port}"
    except Exception:  # a finished or foreign connection cannot say
        return ""


@functools.lru_cache(maxsize=256)
def _begin_sql(begin: bytes, known: ServerIdentity | None, same_server: bool) -> bytes:
    return begin + b"; " + record_sql(known, same_server=same_server).encode()


def _tx_start(conn: Any) -> bytes:
    """The BEGIN psycopg itself would send on ``conn``: with its isolation level, read-only
    and deferrable settings (psycopg's own, cached; :func:`_build_tx_start` if a psycopg
    version lacks the private method)."""
    get = getattr(conn, "_get_tx_start_command", None)
    if get is not None:
        return bytes(get())
    return _build_tx_start(conn.isolation_level, conn.read_only, conn.deferrable)


def _build_tx_start(
    isolation_level: int | None, read_only: bool | None, deferrable: bool | None
) -> bytes:
    """BEGIN with psycopg's words for these settings (None: the server's default)."""
    parts = ["BEGIN"]
    if isolation_level is not None:
        level = psycopg.IsolationLevel(isolation_level).name.replace("_", " ")
        parts.append(f"ISOLATION LEVEL {level}")
    if read_only is not None:
        parts.append("READ ONLY" if read_only else "READ WRITE")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()


def _direct(conn: Any) -> bool:
    """Whether ``conn`` is known to reach its server without a pooler (a pgfailover
    connection whose probe said so): then its server cannot change under it."""
    return getattr(conn, "via_pooler", None) is False


def _begin_and_record(conn: Any, sql: bytes) -> PQGen[_Row | None]:
    """Send BEGIN and the record as one simple-protocol message; return the record's row
    (None if ``sql`` is a BEGIN alone).

    Driven by the connection's own ``wait()``, so a pgfailover connection classifies a
    failure here like any other (a server error is raised inside the generator, as
    psycopg's cursors do). The row is the bytes the server sent: no cursor, no loaders;
    it is parsed only if the COMMIT is lost (:func:`_parse_recorded`).
    """
    pgconn: PGconn = conn.pgconn
    pgconn.send_query(sql)
    results = yield from execute(pgconn)
    for result in results:
        if result.status == ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        if result.status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
            raise psycopg.InternalError(f"unexpected result for the record: {result.status!r}")
    if len(results) == 1:
        return None
    if len(results) != 2 or results[1].ntuples != 1:
        raise psycopg.InternalError("BEGIN and the record did not return one row")
    row = results[1]
    return [row.get_value(0, i) for i in range(row.nfields)]


_Row = list[Any]  # the record's columns as bytes (or None), straight from the result
_Recorded = tuple[_Row, "ServerIdentity | None"]


def _remember(conn: Any, row: _Row, known: ServerIdentity | None) -> _Recorded:
    """Keep a new server identity (the record read one: the server changed) for the next
    record on ``conn``; the happy path parses nothing."""
    if row[-1] is not None:
        _, _identities[conn] = _parse(row, None, "")
    return row, known


def _parse(row: _Row, known: ServerIdentity | None, endpoint: str) -> tuple[CommitRecord, Any]:
    values = [None if value is None else bytes(value).decode("ascii") for value in row]
    return parse_record(values, known, endpoint)


def _parse_recorded(recorded: _Recorded | None, conn: Any) -> CommitRecord | None:
    """The :class:`CommitRecord` of an attempt that failed, None if nothing was recorded
    (or the server sent something that is not a record: then the outcome cannot be told)."""
    if recorded is None:
        return None
    try:
        return _parse(recorded[0], recorded[1], _endpoint(conn))[0]
    except (ValueError, UnicodeDecodeError):
        logger.warning("the commit record cannot be read: %r", recorded[0], exc_info=True)
        return None


def _begin_statement(conn: Any) -> tuple[bytes, ServerIdentity | None]:
    """What to send to begin: psycopg's own BEGIN (isolation level, read-only, deferrable
    kept) followed by the record, or alone in a read-only transaction (it cannot assign an
    xid, and a lost COMMIT of it lost nothing)."""
    begin = _tx_start(conn)
    if conn.read_only:
        return begin, None
    known = _identities.get(conn)
    return _begin_sql(begin, known, _direct(conn)), known


def _record_psycopg(conn: psycopg.Connection[Any]) -> _Recorded | None:
    """BEGIN and the record in one round trip (see :func:`_begin_and_record`); None in a
    read-only transaction. psycopg reads the transaction status from the server's replies,
    so it sends no BEGIN of its own afterwards, whatever the connection's autocommit
    setting, and ``commit()`` sends COMMIT."""
    sql, known = _begin_statement(conn)
    with conn.lock:
        row = conn.wait(_begin_and_record(conn, sql))
    return None if row is None else _remember(conn, row, known)


async def _arecord_psycopg(conn: psycopg.AsyncConnection[Any]) -> _Recorded | None:
    sql, known = _begin_statement(conn)
    async with conn.lock:
        row = await conn.wait(_begin_and_record(conn, sql))
    return None if row is None else _remember(conn, row, known)


def _observe_psycopg(conn: psycopg.Connection[Any], xid: str) -> Observation:
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(OBSERVE_SQL, {"xid": xid}, prepare=False).fetchone()
    conn.rollback()
    assert row is not None
    return Observation.from_row(row)


async def _aobserve_psycopg(conn: psycopg.AsyncConnection[Any], xid: str) -> Observation:
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(OBSERVE_SQL, {"xid": xid}, prepare=False)
        row = await cur.fetchone()
    await conn.rollback()
    assert row is not None
    return Observation.from_row(row)


@contextlib.contextmanager
def _transactional(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """On the way out of an attempt, a transaction left open is rolled back."""
    try:
        yield
    finally:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error:  # the connection broke: the pool discards it
                logger.debug("cannot roll back after an attempt", exc_info=True)


@contextlib.asynccontextmanager
async def _atransactional(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """Async twin of :func:`_transactional`."""
    try:
        yield
    finally:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                await conn.rollback()
            except psycopg.Error:  # the connection broke: the pool discards it
                logger.debug("cannot roll back after an attempt", exc_info=True)


class _PoolShell:
    """psycopg_pool.ConnectionPool (pgfailover's or plain): the work gets a psycopg
    connection inside a transaction."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def attempt(
        self, work: Callable[..., Any], args: Any, kwargs: Any, timeout: float | None
    ) -> Any:
        phase, recorded, result, used = Phase.CONNECT, None, None, None
        try:
            with self.pool.connection(timeout=timeout) as conn:
                phase, used = Phase.TRANSACTION, conn
                with _transactional(conn):
                    recorded = _record_psycopg(conn)
                    result = work(conn, *args, **kwargs)
                    phase = Phase.COMMIT
                    conn.commit()
                    return result
        except Exception as ex:
            record = _parse_recorded(recorded, used)
            read_only = bool(getattr(used, "read_only", False))
            raise _Failed(ex, phase, record, result, used, read_only) from ex

    def observe(
        self, record: CommitRecord, timeout: float | None, check: Any
    ) -> tuple[Observation, bool | None]:
        with self.pool.connection(timeout=timeout) as conn:
            seen = _observe_psycopg(conn, record.xid)
            verdict = None
            if check is not None and resolve(record, seen)[0] is Outcome.UNKNOWN:
                verdict = bool(check(conn))
                conn.rollback()
            return seen, verdict


class _AsyncPoolShell:
    """Async twin of :class:`_PoolShell`."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def attempt(
        self, work: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, timeout: float | None
    ) -> Any:
        phase, recorded, result, used = Phase.CONNECT, None, None, None
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                phase, used = Phase.TRANSACTION, conn
                async with _atransactional(conn):
                    recorded = await _arecord_psycopg(conn)
                    result = await work(conn, *args, **kwargs)
                    phase = Phase.COMMIT
                    await conn.commit()
                    return result
        except Exception as ex:
            record = _parse_recorded(recorded, used)
            read_only = bool(getattr(used, "read_only", False))
            raise _Failed(ex, phase, record, result, used, read_only) from ex

    async def observe(
        self, record: CommitRecord, timeout: float | None, check: Any
    ) -> tuple[Observation, bool | None]:
        async with self.pool.connection(timeout=timeout) as conn:
            seen = await _aobserve_psycopg(conn, record.xid)
            verdict = None
            if check is not None and resolve(record, seen)[0] is Outcome.UNKNOWN:
                verdict = bool(await check(conn))
                await conn.rollback()
            return seen, verdict


class _EngineShell:
    """SQLAlchemy ``Engine`` (the work gets a ``Connection``) or ``sessionmaker`` (a
    ``Session``)."""

    def __init__(self, target: Any, sessions: bool) -> None:
        self.target = target
        self.sessions = sessions

    @contextlib.contextmanager
    def _unit(self) -> Iterator[tuple[Any, Any]]:
        """(what the work receives, the SQLAlchemy Connection it runs on)."""
        if self.sessions:
            with self.target() as session:
                session.begin()
                yield session, session.connection()
        else:
            with self.target.connect() as conn:
                conn.begin()
                yield conn, conn

    def attempt(
        self, work: Callable[..., Any], args: Any, kwargs: Any, timeout: float | None
    ) -> Any:
        phase, record, result, read_only = Phase.CONNECT, None, None, False
        try:
            with self._unit() as (handle, conn):
                phase, read_only = Phase.TRANSACTION, _read_only(conn)
                record = None if read_only else _record_sqlalchemy(conn)
                result = work(handle, *args, **kwargs)
                if self.sessions:
                    handle.flush()
                phase = Phase.COMMIT
                handle.commit()
                return result
        except Exception as ex:
            raise _Failed(ex, phase, record, result, read_only=read_only) from ex

    def observe(
        self, record: CommitRecord, timeout: float | None, check: Any
    ) -> tuple[Observation, bool | None]:
        with self._unit() as (handle, conn):
            row = conn.exec_driver_sql(_pyformat(conn, OBSERVE_SQL), _params(conn, record.xid))
            seen = Observation.from_row(tuple(row.one()))
            verdict = None
            if check is not None and resolve(record, seen)[0] is Outcome.UNKNOWN:
                verdict = bool(check(handle))
            handle.rollback()
            return seen, verdict


class _AsyncEngineShell:
    """SQLAlchemy ``AsyncEngine`` or ``async_sessionmaker``."""

    def __init__(self, target: Any, sessions: bool) -> None:
        self.target = target
        self.sessions = sessions

    @contextlib.asynccontextmanager
    async def _unit(self) -> AsyncIterator[tuple[Any, Any]]:
        if self.sessions:
            async with self.target() as session:
                await session.begin()
                yield session, await session.connection()
        else:
            async with self.target.connect() as conn:
                await conn.begin()
                yield conn, conn

    async def attempt(
        self, work: Callable[..., Awaitable[Any]], args: Any, kwargs: Any, timeout: float | None
    ) -> Any:
        phase, record, result, read_only = Phase.CONNECT, None, None, False
        try:
            async with self._unit() as (handle, conn):
                phase, read_only = Phase.TRANSACTION, _read_only(conn)
                record = None if read_only else await conn.run_sync(_record_sqlalchemy)
                result = await work(handle, *args, **kwargs)
                if self.sessions:
                    await handle.flush()
                phase = Phase.COMMIT
                await handle.commit()
                return result
        except Exception as ex:
            raise _Failed(ex, phase, record, result, read_only=read_only) from ex

    async def observe(
        self, record: CommitRecord, timeout: float | None, check: Any
    ) -> tuple[Observation, bool | None]:
        async with self._unit() as (handle, conn):
            row = await conn.exec_driver_sql(
                _pyformat(conn, OBSERVE_SQL), _params(conn, record.xid)
            )
            seen = Observation.from_row(tuple(row.one()))
            verdict = None
            if check is not None and resolve(record, seen)[0] is Outcome.UNKNOWN:
                verdict = bool(await check(handle))
            await handle.rollback()
            return seen, verdict


def _read_only(conn: Any) -> bool:
    """Whether a SQLAlchemy (async) Connection runs read-only transactions
    (``postgresql_readonly``, on the engine or the connection)."""
    sync = getattr(conn, "sync_connection", None) or conn  # an AsyncConnection's own
    return bool(sync.get_execution_options().get("postgresql_readonly"))


def _record_sqlalchemy(conn: Any) -> CommitRecord:
    """The record on a SQLAlchemy Connection whose read-write transaction has begun, as one
    more statement (psycopg sends BEGIN with it; the drivers differ in how a BEGIN could be
    shared, so SQLAlchemy targets pay one round trip per transaction for the record).
    The server's identity is kept in the pooled connection's ``info``."""
    info = conn.connection.info
    known = info.get(_IDENTITY_KEY)
    row = conn.exec_driver_sql(record_sql(known)).one()
    values = [None if value is None else str(value) for value in row]
    record, info[_IDENTITY_KEY] = parse_record(values, known)
    return record


_IDENTITY_KEY = "pgfailover.server_identity"


def _pyformat(conn: Any, sql: str) -> str:
    """OBSERVE_SQL in the paramstyle of the connection's driver."""
    style = conn.dialect.paramstyle
    if style == "pyformat":
        return sql
    if style == "numeric_dollar":  # asyncpg
        return sql.replace("%(xid)s", "$1")
    if style == "format":
        return sql.replace("%(xid)s", "%s")
    return sql.replace("%(xid)s", ":xid") if style == "named" else sql


def _params(conn: Any, xid: str) -> Any:
    style = conn.dialect.paramstyle
    if style in ("pyformat", "named"):
        return {"xid": xid}
    return (xid, xid) if style == "format" else (xid,)


def _shell(target: Any) -> tuple[Any, bool]:
    """The shell for ``target`` and whether it is async."""
    module = type(target).__module__
    name = type(target).__name__
    if module.startswith(("psycopg_pool", "pgfailover.pool")):
        return (_AsyncPoolShell(target), True) if "Async" in name else (_PoolShell(target), False)
    if module.startswith("sqlalchemy"):
        if name == "AsyncEngine":
            return _AsyncEngineShell(target, sessions=False), True
        if name == "async_sessionmaker":
            return _AsyncEngineShell(target, sessions=True), True
        if name == "Engine":
            return _EngineShell(target, sessions=False), False
        if name == "sessionmaker":
            return _EngineShell(target, sessions=True), False
    raise TypeError(
        "run_transaction() takes a psycopg_pool pool (or pgfailover's), a SQLAlchemy Engine, "
        f"AsyncEngine, sessionmaker or async_sessionmaker; got {type(target)!r}"
    )


# ------------------------------------------------------------------------ the loops


def _policy(policy: RetryPolicy | None, options: dict[str, Any]) -> RetryPolicy:
    if policy is not None and options:
        raise TypeError(f"pass either policy= or policy options ({', '.join(options)}), not both")
    if policy is not None:
        return policy
    return RetryPolicy(**options) if options else _DEFAULT_POLICY


_DEFAULT_POLICY = RetryPolicy()


class _Run:
    """The state of one run_transaction() call, shared by the sync and async loops.

    The policy is started (a copy with the start time) at the first failure only: the
    happy path builds no policy object.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.started = time.monotonic()
        self._policy = policy
        self._started_policy: RetryPolicy | None = None
        self.deadline = None if policy.timeout is None else self.started + policy.timeout
        self.attempt = 0

    @property
    def policy(self) -> RetryPolicy:
        """The policy with this run's start time and history."""
        if self._started_policy is None:
            self._started_policy = self._policy.start(self.started)
        return self._started_policy

    @policy.setter
    def policy(self, policy: RetryPolicy) -> None:
        self._started_policy = policy

    def remaining(self) -> float | None:
        """Seconds left before the deadline (at least 0), None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def no_time_after(self, wait: float) -> bool:
        """Whether waiting ``wait`` would leave no time for another attempt."""
        remaining = self.remaining()
        return remaining is not None and remaining - wait <= MIN_ATTEMPT_TIME

    def decide(self, failed: _Failed) -> Decision:
        """The policy's decision; a lost COMMIT of a read-only transaction needs no outcome
        (nothing was written): it is judged as not committed."""
        self.attempt += 1
        now = time.monotonic()
        decision = self.policy.after(failed.error, now, phase=failed.phase, conn=failed.conn)
        if decision.needs_outcome and failed.read_only:
            decision = decision.not_committed(now)
        return decision

    def report(self, decision: Decision, failed: _Failed, action: str, detail: str = "") -> None:
        verdict: Verdict = decision.verdict
        emit(
            RetryEvent(
                attempt=self.attempt,
                wait=decision.wait if action == "retry" else 0.0,
                action=action,
                cause=verdict,
                error_type=f"{type(failed.error).__module__}.{type(failed.error).__qualname__}",
                elapsed=time.monotonic() - self.started,
                detail=detail,
                stack=caller_stack(("pgfailover", "psycopg", "psycopg_pool", "sqlalchemy")),
            )
        )

    def give_up(self, decision: Decision, failed: _Failed) -> BaseException:
        reason = decision.reason if not decision.retry else "deadline reached"
        self.report(decision, failed, "give up", reason)
        error = failed.error
        if sys.version_info >= (3, 11):
            error.add_note(
                f"pgfailover: gave up after {self.attempt} attempt(s) in "
                f"{time.monotonic() - self.started:.3f} s: {reason}"
            )
        return error

    def unknown(self, failed: _Failed, reason: str) -> CommitOutcomeUnknown:
        error = CommitOutcomeUnknown(reason, failed.record)
        error.__cause__ = failed.error
        return error


def run_transaction(
    target: Any,
    work: Callable[..., T],
    /,
    *args: Any,
    policy: RetryPolicy | None = None,
    check_committed: Callable[[Any], bool] | None = None,
    **kwargs: Any,
) -> T:
    """Run ``work(conn, *args, **kwargs)`` in a transaction on ``target``, retrying what is
    safe (see the module doc). Returns what ``work`` returned.

    ``policy`` is a :class:`~pgfailover.policy.RetryPolicy`; instead, its options may be
    given by name (``timeout=30``, ``attempts=5``, ...), which are then not passed to
    ``work``. ``check_committed(conn)`` settles an ambiguous lost COMMIT by looking for the
    work's effect (True: it committed). Raises the last driver error when giving up, the
    work's own exceptions unchanged, or :class:`~pgfailover.errors.CommitOutcomeUnknown`.
    """
    policy_options = {k: kwargs.pop(k) for k in list(kwargs) if k in _POLICY_FIELDS}
    shell, is_async = _shell(target)
    if is_async:
        raise TypeError("this target is async: use await arun_transaction(...)")
    run = _Run(_policy(policy, policy_options))
    while True:
        try:
            return cast("T", shell.attempt(work, args, kwargs, run.remaining()))
        except _Failed as failed:
            decision = run.decide(failed)
            if decision.needs_outcome:
                outcome, detail = _settle(shell, run, failed, check_committed)
                if outcome is Outcome.COMMITTED:
                    run.report(decision, failed, "committed", detail)
                    return cast("T", failed.result)
                if outcome is Outcome.UNKNOWN:
                    run.report(decision, failed, "give up", detail)
                    raise run.unknown(failed, detail) from failed.error
                decision = decision.not_committed(time.monotonic())
            if not decision.retry or run.no_time_after(decision.wait):
                raise run.give_up(decision, failed) from None
            run.report(decision, failed, "retry")
            time.sleep(decision.wait)
            run.policy = decision.policy


def _settle(
    shell: Any, run: _Run, failed: _Failed, check: Callable[[Any], bool] | None
) -> tuple[Outcome, str]:
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
            seen, checked = shell.observe(record, remaining, check)
        except Exception as ex:  # no primary yet: wait and ask again
            if not classify(ex).is_failover and not isinstance(ex, TimeoutError):
                return Outcome.UNKNOWN, f"asking the primary failed: {ex}"
            last = f"the primary could not be asked: {type(ex).__name__}: {ex}"
            time.sleep(PENDING_POLL)
            continue
        outcome, why = _conclude(record, seen, checked)
        if outcome is not Outcome.PENDING:
            return outcome, why
        last = why
        time.sleep(PENDING_POLL)


def _conclude(record: CommitRecord, seen: Observation, checked: bool | None) -> tuple[Outcome, str]:
    outcome, why = resolve(record, seen)
    if outcome is Outcome.UNKNOWN and checked is not None:
        if checked:
            return Outcome.COMMITTED, f"{why}; check_committed found the work's effect"
        return Outcome.NOT_COMMITTED, f"{why}; check_committed found no effect of the work"
    return outcome, why


async def arun_transaction(
    target: Any,
    work: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    policy: RetryPolicy | None = None,
    check_committed: Callable[[Any], Awaitable[bool]] | None = None,
    **kwargs: Any,
) -> T:
    """Async twin of :func:`run_transaction` for async targets (``AsyncConnectionPool``,
    ``AsyncEngine``, ``async_sessionmaker``); ``work`` and ``check_committed`` are
    coroutine functions."""
    policy_options = {k: kwargs.pop(k) for k in list(kwargs) if k in _POLICY_FIELDS}
    shell, is_async = _shell(target)
    if not is_async:
        raise TypeError("this target is sync: use run_transaction(...)")
    run = _Run(_policy(policy, policy_options))
    while True:
        try:
            return cast("T", await shell.attempt(work, args, kwargs, run.remaining()))
        except _Failed as failed:
            decision = run.decide(failed)
            if decision.needs_outcome:
                outcome, detail = await _asettle(shell, run, failed, check_committed)
                if outcome is Outcome.COMMITTED:
                    run.report(decision, failed, "committed", detail)
                    return cast("T", failed.result)
                if outcome is Outcome.UNKNOWN:
                    run.report(decision, failed, "give up", detail)
                    raise run.unknown(failed, detail) from failed.error
                decision = decision.not_committed(time.monotonic())
            if not decision.retry or run.no_time_after(decision.wait):
                raise run.give_up(decision, failed) from None
            run.report(decision, failed, "retry")
            await asyncio.sleep(decision.wait)
            run.policy = decision.policy


async def _asettle(
    shell: Any, run: _Run, failed: _Failed, check: Callable[[Any], Awaitable[bool]] | None
) -> tuple[Outcome, str]:
    """Async twin of :func:`_settle`."""
    record = failed.record
    if record is None:
        return Outcome.UNKNOWN, "nothing was recorded when the transaction began"
    last = "the primary could not be asked before the deadline"
    while True:
        remaining = run.remaining()
        if remaining is not None and remaining <= 0:
            return Outcome.UNKNOWN, last
        try:
            seen, checked = await shell.observe(record, remaining, check)
        except Exception as ex:
            if not classify(ex).is_failover and not isinstance(ex, TimeoutError):
                return Outcome.UNKNOWN, f"asking the primary failed: {ex}"
            last = f"the primary could not be asked: {type(ex).__name__}: {ex}"
            await asyncio.sleep(PENDING_POLL)
            continue
        outcome, why = _conclude(record, seen, checked)
        if outcome is not Outcome.PENDING:
            return outcome, why
        last = why
        await asyncio.sleep(PENDING_POLL)


_POLICY_FIELDS = frozenset(
    {"attempts", "timeout", "wait_initial", "wait_max", "wait_exp_base", "jitter", "idempotent"}
)


def transaction(
    target: Any,
    *,
    policy: RetryPolicy | None = None,
    check_committed: Callable[[Any], Any] | None = None,
    **policy_options: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@transaction(pool, timeout=30)`` on ``def pay(conn, order_id)`` makes
    ``pay(42)`` run through :func:`run_transaction` (an ``async def`` through
    :func:`arun_transaction`). Options as for :func:`run_transaction`; unknown option names
    raise ``TypeError`` now, not at the first call."""
    unknown = set(policy_options) - _POLICY_FIELDS
    if unknown:
        raise TypeError(f"unknown transaction() options: {sorted(unknown)}")
    chosen = _policy(policy, policy_options)

    def decorate(work: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(work):

            @functools.wraps(work)
            async def arun(*args: Any, **kwargs: Any) -> Any:
                return await arun_transaction(
                    target, work, *args, policy=chosen, check_committed=check_committed, **kwargs
                )

            return arun

        @functools.wraps(work)
        def run(*args: Any, **kwargs: Any) -> Any:
            return run_transaction(
                target, work, *args, policy=chosen, check_committed=check_committed, **kwargs
            )

        return run

    return decorate
