"""What the sync and async transaction runners share: no I/O of its own.

The runners (:mod:`pgfailover.retry_async`, and :mod:`pgfailover.retry` generated from it)
are thin loops around the pieces here:

- :func:`target_kind` chooses the shell for a target by ``isinstance`` (psycopg_pool and
  SQLAlchemy are looked up in ``sys.modules``, never imported here: a target of theirs
  means they are imported already);
- :func:`begin_and_record` is the protocol exchange of BEGIN + the commit record, an
  I/O-free generator driven by the connection's own ``wait()``;
- :class:`Run` is the state of one call (deadline, attempts, the policy's decisions) and
  :class:`Failed` what an attempt reports when it fails.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypedDict, TypeVar, cast

import psycopg
from psycopg.abc import PQGen

from ._protocol import row_of, simple_query
from .classify import Phase, Verdict
from .errors import CommitOutcomeUnknown
from .events import RetryEvent, _emit, caller_stack
from .outcome import (
    IDENTITY_SQL,
    MARKER_CALL,
    OBSERVE_SQL,
    UNMARKED_RECORD_SQL,
    CommitRecord,
    Observation,
    Outcome,
    ServerIdentity,
    parse_identity,
    parse_record,
    record_sql,
    resolve,
)
from .policy import Decision, RetryPolicy, Seconds

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger("pgfailover.retry")

T = TypeVar("T")
P = ParamSpec("P")

#: Wait between two looks at a transaction still "in progress" on the same server.
PENDING_POLL = 0.05
#: An attempt is not started with less time than this left before the deadline: the last
#: real error is raised instead of a timeout of the attempt itself.
MIN_ATTEMPT_TIME = 0.01


class PolicyOptions(TypedDict, total=False):
    """The :class:`~pgfailover.policy.RetryPolicy` options a runner accepts by name."""

    attempts: int | None
    timeout: Seconds | None
    wait_initial: Seconds
    wait_max: Seconds
    wait_exp_base: float
    jitter: bool
    idempotent: bool


_POLICY_FIELDS = frozenset(PolicyOptions.__annotations__)
_DEFAULT_POLICY = RetryPolicy()


def make_policy(policy: RetryPolicy | None, options: PolicyOptions) -> RetryPolicy:
    """The policy a runner follows: ``policy``, or one built from ``options``, not both.

    Unknown option names raise ``TypeError`` naming them, at construction, not at the
    first call.
    """
    unknown = set(options) - _POLICY_FIELDS
    if unknown:
        raise TypeError(
            f"unknown runner options: {sorted(unknown)}; the policy options are "
            f"{sorted(_POLICY_FIELDS)} (the work's own arguments go to the call, not here)"
        )
    if policy is not None and options:
        raise TypeError(f"pass either policy= or policy options ({', '.join(options)}), not both")
    if policy is not None:
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a pgfailover.RetryPolicy, got {type(policy)!r}")
        return policy
    return RetryPolicy(**options) if options else _DEFAULT_POLICY


# ------------------------------------------------------------------------ the targets

Kind = Literal["pool", "engine", "sessions"]


def target_kind(target: object) -> tuple[Kind, bool]:
    """What ``target`` is (a psycopg_pool pool, a SQLAlchemy engine, a sessionmaker) and
    whether it is async; ``TypeError`` for anything else or a non-PostgreSQL engine.

    Chosen by ``isinstance``, so subclasses (a user's pool subclass, SQLAlchemy's
    ``OptionEngine`` from ``engine.execution_options(...)``) are accepted.
    """
    found = _pool_kind(target) or _sqlalchemy_kind(target)
    if found is None:
        raise TypeError(
            "a transaction runner takes a psycopg_pool pool (or pgfailover's), a SQLAlchemy "
            f"Engine, AsyncEngine, sessionmaker or async_sessionmaker; got {type(target)!r}"
        )
    return found


def _pool_kind(target: object) -> tuple[Kind, bool] | None:
    pools = sys.modules.get("psycopg_pool")
    if pools is None:
        return None
    if isinstance(target, pools.AsyncConnectionPool):
        return "pool", True
    if isinstance(target, pools.ConnectionPool):
        return "pool", False
    return None


def _sqlalchemy_kind(target: object) -> tuple[Kind, bool] | None:
    engine_module = sys.modules.get("sqlalchemy.engine")
    if engine_module is None:
        return None
    if isinstance(target, engine_module.Engine):
        check_dialect(target.dialect)
        return "engine", False
    orm = sys.modules.get("sqlalchemy.orm")
    if orm is not None and isinstance(target, orm.sessionmaker):
        _check_bind(target.kw.get("bind"))
        return "sessions", False
    aio = sys.modules.get("sqlalchemy.ext.asyncio")
    if aio is not None:
        if isinstance(target, aio.AsyncEngine):
            check_dialect(target.dialect)
            return "engine", True
        if isinstance(target, aio.async_sessionmaker):
            _check_bind(target.kw.get("bind"))
            return "sessions", True
    return None


def _check_bind(bind: Any) -> None:
    """A sessionmaker's bind, when it has one, must be PostgreSQL (else it is checked on
    the first connection of each attempt)."""
    dialect = getattr(bind, "dialect", None)
    if dialect is not None:
        check_dialect(dialect)


def check_dialect(dialect: Any) -> None:
    """``TypeError`` unless ``dialect`` (a SQLAlchemy ``Dialect``) is PostgreSQL: the
    commit record and the outcome lookup are PostgreSQL's."""
    name = getattr(dialect, "name", None)
    if name != "postgresql":
        raise TypeError(
            f"the transaction runner works with PostgreSQL engines only, got the {name!r} dialect"
        )


_CO_COROUTINE = inspect.CO_COROUTINE


def check_sync_work(work: Callable[..., Any]) -> None:
    """``TypeError`` for a coroutine function given to a sync runner (it would commit an
    empty transaction and return a coroutine nobody awaits). A plain function costs one
    attribute read; anything else (a partial, a method, a callable object) is left to
    ``inspect``."""
    code = getattr(work, "__code__", None)
    if code is not None:
        is_coroutine = bool(code.co_flags & _CO_COROUTINE)
    else:
        is_coroutine = inspect.iscoroutinefunction(work)
    if is_coroutine:
        raise TypeError(
            f"{_name(work)} is a coroutine function: run it with an async target and "
            "AsyncTransactionRunner / arun_transaction"
        )


_PLAIN_RESULTS = frozenset({type(None), bool, int, float, str, bytes, tuple, list, dict})


def sync_result(result: object, work: Callable[..., Any]) -> None:
    """``TypeError`` if a sync work returned an awaitable (an async callable that
    :func:`check_sync_work` could not tell): the transaction is rolled back, not committed.
    The common results (None, numbers, strings, containers) cost one set lookup."""
    if type(result) not in _PLAIN_RESULTS and inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()  # a coroutine never awaited: close it to avoid the runtime warning
        raise TypeError(
            f"{_name(work)} returned an awaitable: run it with an async target and "
            "AsyncTransactionRunner / arun_transaction"
        )


def _name(work: Callable[..., Any]) -> str:
    return getattr(work, "__qualname__", None) or repr(work)


# ------------------------------------------------------------- BEGIN and the record

#: The server each psycopg connection last recorded on (see outcome.record_sql).
identities: weakref.WeakKeyDictionary[Any, ServerIdentity] = weakref.WeakKeyDictionary()

Row = list[Any]  # the record's columns as bytes (or None), straight from the result
Recorded = tuple[Row, "ServerIdentity | None"]


def endpoint(conn: Any) -> str:
    """``host:port`` of a psycopg connection, "" when it cannot say."""
    try:
        return f"{conn.info.host}:{conn.info.port}"
    except Exception:  # a finished or foreign connection cannot say
        return ""


_begin_cache: dict[tuple[bytes, ServerIdentity | None, bool], bytes] = {}


def _begin_sql(begin: bytes, known: ServerIdentity | None, same_server: bool) -> bytes:
    key = (begin, known, same_server)
    sql = _begin_cache.get(key)
    if sql is None:
        if len(_begin_cache) > 256:
            _begin_cache.clear()
        sql = _begin_cache[key] = (
            begin + b"; " + record_sql(known, same_server=same_server).encode()
        )
    return sql


def tx_start(conn: Any) -> bytes:
    """The BEGIN psycopg itself would send on ``conn``: with its isolation level, read-only
    and deferrable settings (psycopg's own, cached; :func:`build_tx_start` if a psycopg
    version lacks the private method)."""
    get = getattr(conn, "_get_tx_start_command", None)
    if get is not None:
        return bytes(get())
    return build_tx_start(conn.isolation_level, conn.read_only, conn.deferrable)


def build_tx_start(
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


def begin_statement(conn: Any, idempotent: bool) -> tuple[bytes, ServerIdentity | None]:
    """What to send to begin an attempt on a psycopg connection.

    psycopg's own BEGIN (isolation level, read-only, deferrable kept) followed by the
    record; BEGIN alone in a read-only transaction (it cannot assign an xid, and a lost
    COMMIT of it lost nothing) and for idempotent work on an autocommit connection (a lost
    COMMIT is simply retried; on other connections idempotent work sends nothing here:
    psycopg begins the transaction itself with the work's first statement, as it would
    without a runner).
    """
    if idempotent:
        return tx_start(conn), None  # called in autocommit mode only (see the runners)
    begin = tx_start(conn)
    if conn.read_only:
        return begin, None
    known = identities.get(conn)
    return _begin_sql(begin, known, _direct(conn)), known


def begin_and_record(conn: Any, sql: bytes) -> PQGen[tuple[Row | None, bool]]:
    """Send BEGIN and the record as one simple-protocol message; return the record's row
    (None if ``sql`` is a BEGIN alone), and whether the record was sent again without the
    WAL marker.

    Driven by the connection's own ``wait()``, so a pgfailover connection classifies a
    failure here like any other (a server error is raised inside the generator, as
    psycopg's cursors do). The row is the bytes the server sent: no cursor, no loaders;
    it is parsed only if the COMMIT is lost (:func:`parse_recorded`).

    A role that may not execute the marker's function gets a permission error for the
    record: the transaction is rolled back and begun again with the unmarked record, which
    reads the server's identity (and so the privilege) anew: the caller must then forget
    the identity it built ``sql`` with (one extra round trip, once per connection).
    """
    try:
        results = yield from simple_query(conn, sql)
    except psycopg.errors.InsufficientPrivilege:
        if MARKER_CALL not in sql:
            raise
        _warn_unmarked()
        yield from simple_query(conn, b"ROLLBACK")
        begin = sql[: sql.index(b"; SELECT ")]
        results = yield from simple_query(conn, begin + b"; " + UNMARKED_RECORD_SQL.encode())
        return _second_row(results), True
    if len(results) == 1:
        return None, False
    return _second_row(results), False


def _second_row(results: list[Any]) -> Row:
    if len(results) != 2:
        raise psycopg.InternalError("BEGIN and the record did not return two results")
    return row_of(results[1])


@functools.cache  # once per process
def _warn_unmarked() -> None:
    logger.warning(
        "this role may not execute pg_logical_emit_message: the runner records "
        "transactions without the WAL marker, and a COMMIT lost in a crash and failover "
        "may then stay unknown (grant EXECUTE on pg_logical_emit_message(boolean, text, "
        "text), or pass check_committed=)"
    )


def remember(conn: Any, row: Row | None, known: ServerIdentity | None) -> Recorded | None:
    """Keep a new server identity (the record read one: the server changed) for the next
    record on ``conn``; the happy path parses nothing."""
    if row is None:
        return None
    if row[-1] is not None:
        _, identities[conn] = _parse(row, None, "")
    return row, known


def _parse(row: Row, known: ServerIdentity | None, where: str) -> tuple[CommitRecord, Any]:
    values = [None if value is None else bytes(value).decode("ascii") for value in row]
    return parse_record(values, known, where)


def parse_recorded(recorded: Recorded | None, conn: Any) -> CommitRecord | None:
    """The :class:`CommitRecord` of an attempt that failed, None if nothing was recorded
    (or the server sent something that is not a record: then the outcome cannot be told)."""
    if recorded is None:
        return None
    try:
        return _parse(recorded[0], recorded[1], endpoint(conn))[0]
    except (ValueError, UnicodeDecodeError):
        logger.warning("the commit record cannot be read: %r", recorded[0], exc_info=True)
        return None


# ------------------------------------------------------------------ SQLAlchemy pieces

IDENTITY_KEY = "pgfailover.server_identity"


def sqlalchemy_read_only(conn: Any) -> bool:
    """Whether a SQLAlchemy (async) Connection runs read-only transactions
    (``postgresql_readonly``, on the engine or the connection)."""
    sync = getattr(conn, "sync_connection", None) or conn  # an AsyncConnection's own
    return bool(sync.get_execution_options().get("postgresql_readonly"))


def record_sqlalchemy(conn: Any) -> CommitRecord:
    """The record on a SQLAlchemy Connection whose read-write transaction has begun, as one
    more statement (psycopg sends BEGIN with it; the drivers differ in how a BEGIN could be
    shared, so SQLAlchemy targets pay one round trip per transaction for the record).
    The server's identity is kept in the pooled connection's ``info``. ``TypeError`` on a
    connection that is not PostgreSQL's (a sessionmaker bound late)."""
    check_dialect(conn.dialect)
    info = conn.connection.info
    known = info.get(IDENTITY_KEY)
    if known is None:
        # The first record on this connection: read the identity (and whether the role may
        # write the marker) first, since a denied marker would abort the caller's
        # transaction (see outcome.record_sql). One round trip, once per connection.
        known = parse_identity(str(conn.exec_driver_sql(IDENTITY_SQL).scalar_one()))
        if not known.marker:
            _warn_unmarked()
    row = conn.exec_driver_sql(record_sql(known)).one()
    values = [None if value is None else str(value) for value in row]
    record, info[IDENTITY_KEY] = parse_record(values, known)
    return record


#: Where an instrumented engine's pool record keeps the watchdog's handle of its DBAPI
#: connection (see pgfailover.sqlalchemy).
WATCHED_KEY = "pgfailover.watched"


def watched_of(conn: Any, deadline: float) -> Any | None:
    """Give the statement in flight on a SQLAlchemy (async) Connection a ``deadline``
    (``time.monotonic()``) the process's watchdog enforces; return the watched handle (to
    clear it afterwards), None when the connection is not watched (an engine not
    instrumented, or its watchdog off)."""
    sync = getattr(conn, "sync_connection", None) or conn
    try:
        info = sync.connection.info
    except Exception as ex:  # closed or invalidated: nothing to watch
        logger.debug("no pooled connection to give the deadline to: %r", ex)
        return None
    watched = info.get(WATCHED_KEY)
    if watched is not None:
        watched._pgf_deadline = deadline
    return watched


def observe_sql(conn: Any) -> str:
    """OBSERVE_SQL in the paramstyle of a SQLAlchemy connection's driver."""
    style = conn.dialect.paramstyle
    if style == "pyformat":
        return OBSERVE_SQL
    if style == "numeric_dollar":  # asyncpg
        return OBSERVE_SQL.replace("%(xid)s", "$1")
    if style == "format":
        return OBSERVE_SQL.replace("%(xid)s", "%s")
    return OBSERVE_SQL.replace("%(xid)s", ":xid") if style == "named" else OBSERVE_SQL


def observe_params(conn: Any, xid: str) -> Any:
    """The parameters of :func:`observe_sql` for ``xid``."""
    style = conn.dialect.paramstyle
    if style in ("pyformat", "named"):
        return {"xid": xid}
    return (xid, xid) if style == "format" else (xid,)


# ------------------------------------------------------------------------- the run


@dataclass
class Failed(Exception):
    """An attempt failed: the driver's error, what was in flight, what was recorded."""

    error: BaseException
    phase: Phase
    record: CommitRecord | None
    result: object = None  # the work's result, when only the COMMIT failed
    conn: object = None  # the driver connection it failed on, if any (broken or not)
    read_only: bool = False  # a read-only transaction: a lost COMMIT lost nothing


class Run:
    """The state of one runner call after its first failure, shared by the sync and async
    loops: the happy path builds neither this nor a started policy.

    ``started`` is when the call began (``time.monotonic()``): the deadline counts from it.
    """

    def __init__(self, policy: RetryPolicy, started: float) -> None:
        self.started = started
        self._policy = policy
        self._started_policy: RetryPolicy | None = None
        self.deadline = None if policy.timeout is None else self.started + policy.timeout
        self.attempt = 0
        self._outcome: Outcome | None = None  # a lost COMMIT's, for the next event

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

    def decide(self, failed: Failed) -> Decision:
        """The policy's decision. A lost COMMIT needs no outcome (it is judged as not
        committed, so retried within the budget) when nothing was written (a read-only
        transaction) or when the work is idempotent (running it again is harmless)."""
        self.attempt += 1
        now = time.monotonic()
        decision = self.policy.after(failed.error, now, phase=failed.phase, conn=failed.conn)
        if decision.needs_outcome and (failed.read_only or self._policy.idempotent):
            decision = decision.not_committed(now)
            self._outcome = Outcome.NOT_COMMITTED  # for the event that reports it
        return decision

    def report(
        self,
        decision: Decision,
        failed: Failed,
        action: str,
        detail: str = "",
        outcome: Outcome | None = None,
    ) -> None:
        """Emit the :class:`~pgfailover.events.RetryEvent` of a failed attempt (with the
        lost COMMIT's settled ``outcome``, or the one noted when it was settled before)."""
        verdict: Verdict = decision.verdict
        outcome, self._outcome = outcome or self._outcome, None
        _emit(
            RetryEvent(
                attempt=self.attempt,
                wait=decision.wait if action == "retry" else 0.0,
                action=action,
                cause=verdict,
                error_type=f"{type(failed.error).__module__}.{type(failed.error).__qualname__}",
                elapsed=time.monotonic() - self.started,
                detail=detail,
                stack=caller_stack(("pgfailover", "psycopg", "psycopg_pool", "sqlalchemy")),
                outcome=outcome,
            )
        )

    def give_up(self, decision: Decision, failed: Failed) -> BaseException:
        """The error to raise when the policy refuses another attempt, with a note."""
        reason = decision.reason if not decision.retry else "deadline reached"
        self.report(decision, failed, "give up", reason)
        error = failed.error
        if sys.version_info >= (3, 11):
            error.add_note(
                f"pgfailover: gave up after {self.attempt} attempt(s) in "
                f"{time.monotonic() - self.started:.3f} s: {reason}"
            )
        return error

    def unknown(self, failed: Failed, reason: str) -> CommitOutcomeUnknown:
        """The :class:`~pgfailover.errors.CommitOutcomeUnknown` for a lost COMMIT."""
        error = CommitOutcomeUnknown(reason, failed.record)
        error.__cause__ = failed.error
        return error

    def settled(
        self, decision: Decision, failed: Failed, outcome: Outcome, detail: str
    ) -> Decision | None:
        """Follow a lost COMMIT's settled outcome: None when it committed (the work is
        done), the decision to follow when it did not; raises when it cannot be known."""
        if outcome is Outcome.COMMITTED:
            self.report(decision, failed, "committed", detail, outcome)
            return None
        if outcome is Outcome.UNKNOWN:
            self.report(decision, failed, "give up", detail, outcome)
            raise self.unknown(failed, detail) from failed.error
        self._outcome = Outcome.NOT_COMMITTED  # for the event that reports what follows
        return decision.not_committed(time.monotonic())


def conclude(record: CommitRecord, seen: Observation, checked: bool | None) -> tuple[Outcome, str]:
    """The outcome of a lost COMMIT from what the primary said (and ``check_committed``'s
    answer, when the primary's alone is ambiguous)."""
    outcome, why = resolve(record, seen)
    if outcome is Outcome.UNKNOWN and checked is not None:
        if checked:
            return Outcome.COMMITTED, f"{why}; check_committed found the work's effect"
        return Outcome.NOT_COMMITTED, f"{why}; check_committed found no effect of the work"
    return outcome, why


def needs_check(record: CommitRecord, seen: Observation) -> bool:
    """Whether ``check_committed`` must be asked: the primary alone cannot tell."""
    return resolve(record, seen)[0] is Outcome.UNKNOWN


# ----------------------------------------------------------------------- the decorator


def transaction(
    target: Any,
    /,
    *,
    policy: RetryPolicy | None = None,
    check_committed: Callable[[Any], Any] | None = None,
    **options: Unpack[PolicyOptions],
) -> Callable[[Callable[Concatenate[Any, P], T]], Callable[P, T]]:
    """Decorator: ``@transaction(pool, timeout=30)`` on ``def pay(conn, order_id)`` makes
    ``pay(42)`` run through a :class:`~pgfailover.retry.TransactionRunner` (an async target
    and an ``async def``: an :class:`~pgfailover.retry_async.AsyncTransactionRunner`).

    Options as for the runners. The decorated function keeps its signature without the
    first parameter (the connection), for mypy too. Wrong targets, unknown options and a
    function of the wrong kind (an ``async def`` on a sync target, or the reverse) raise
    ``TypeError`` at decoration time, not at the first call.
    """
    _, is_async = target_kind(target)
    runner: Any
    if is_async:
        from .retry_async import AsyncTransactionRunner  # noqa: PLC0415 - import cycle

        runner = AsyncTransactionRunner(
            target, policy=policy, check_committed=check_committed, **options
        )
    else:
        from .retry import TransactionRunner  # noqa: PLC0415 - import cycle

        runner = TransactionRunner(
            target, policy=policy, check_committed=check_committed, **options
        )

    def decorate(work: Callable[Concatenate[Any, P], T]) -> Callable[P, T]:
        if inspect.iscoroutinefunction(work) != is_async:
            kind = "an async def" if is_async else "a plain def"
            raise TypeError(
                f"{type(target).__name__} needs {kind}; {_name(work)} is not one: "
                "async targets run coroutine functions, sync targets plain functions"
            )
        return cast("Callable[P, T]", runner.wraps(work))

    return decorate
