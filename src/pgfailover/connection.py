"""``Connection`` and ``AsyncConnection``: psycopg connections that know when their node can
no longer write.

They are real subclasses of :class:`psycopg.Connection` and :class:`psycopg.AsyncConnection`
(``isinstance`` holds, every psycopg behaviour is kept). Every operation psycopg performs on
a connection (statements, BEGIN, COMMIT, COPY, pipeline syncs, server-side cursor fetches)
runs through ``wait()``; these classes override it to classify a failure when one happens.
When the verdict says the connection must not be used again (its node is read-only or in
recovery, the connection is lost, the server is shutting down), the connection marks itself
:attr:`~Connection.poisoned` with the verdict, adds a note to the exception (Python 3.11+)
and emits one :class:`~pgfailover.events.FailoverEvent`. The exception itself propagates
unchanged: ``except psycopg.errors.ReadOnlySqlTransaction`` keeps working.

The happy path costs one ``try`` block and one attribute read per operation: no extra
round trip, no allocation.

What a connection knows about the operation that failed (for the retry condition):
COMMIT (from ``commit()``, a ``transaction()`` block's exit, or two-phase commit) is
tracked; a COMMIT sent as text through ``execute("COMMIT")`` is not, and is classified as a
statement inside a transaction. Use ``commit()`` or ``transaction()``.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar, cast

import psycopg
from psycopg._connection_base import BaseConnection
from psycopg.abc import ConnDict, PQGen
from psycopg.pq import TransactionStatus
from psycopg.rows import Row

from . import _watchdog
from ._secrets import scrub, secret_candidates
from .classify import RECOVERY_MESSAGE, Phase, Verdict, attach_verdict, classify
from .errors import InvalidConninfo
from .events import FailoverEvent, NodeInfo, _emit, caller_stack, diagnostics_of

RV = TypeVar("RV")

#: The statement that makes a healthy primary raise a standby's 0A000 recovery error.
RECOVERY_ERROR_SQL = (
    f"DO $$ BEGIN RAISE EXCEPTION '{RECOVERY_MESSAGE}' "
    "USING ERRCODE = 'feature_not_supported'; END $$"
)

#: What :meth:`_FailoverAware.simulate_recovery` lets through: commit() and rollback().
_PASSTHROUGH = frozenset(
    {BaseConnection._commit_gen.__code__, BaseConnection._rollback_gen.__code__}
)

#: psycopg's generator for internal commands (BEGIN, COMMIT, PREPARE TRANSACTION, ...).
_EXEC_COMMAND = BaseConnection._exec_command.__code__
_COMMITS = (b"COMMIT", b"commit", b"PREPARE TRANSACTION")

_IDLE = TransactionStatus.IDLE
_INERROR = TransactionStatus.INERROR
_IN_BLOCK = (TransactionStatus.INTRANS, TransactionStatus.INERROR)


def _is_commit(command: object) -> bool:
    if isinstance(command, str):
        command = command.encode()
    # a Composable not rendered yet: the failure came before anything was sent
    return isinstance(command, bytes) and command.startswith(_COMMITS)


def _failed_during_commit(gen: object, ex: BaseException) -> bool:
    """Whether ``ex``, raised while ``wait()`` drove ``gen``, interrupted a COMMIT (from
    commit(), a transaction() block's exit, tpc_prepare() or tpc_commit()).

    Found after the fact, so the happy path pays nothing: psycopg sends all those COMMITs
    with its ``_exec_command`` generator. An error raised inside it went through its frame
    (in the traceback, with its ``command`` local); an error raised by the wait loop itself
    (the socket failed) leaves it suspended in ``gen``'s ``yield from`` chain. A COMMIT
    queued in pipeline mode fails later, at the sync, as before: not a COMMIT here.
    """
    tb = ex.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _EXEC_COMMAND:
            return _is_commit(tb.tb_frame.f_locals.get("command"))
        tb = tb.tb_next
    while gen is not None:
        if getattr(gen, "gi_code", None) is _EXEC_COMMAND:
            frame = getattr(gen, "gi_frame", None)
            return frame is not None and _is_commit(frame.f_locals.get("command"))
        gen = getattr(gen, "gi_yieldfrom", None)
    return False


class _FailoverAware(BaseConnection[Row]):
    """State and decisions shared by the sync and async connections (no I/O here)."""

    #: The verdict that made this connection unusable, or None while it is healthy. Pools
    #: discard a poisoned connection instead of reusing it.
    poisoned: Verdict | None = None
    #: Whether a multiplexing pooler sits between this connection and the server: None until
    #: known (set by :func:`pgfailover.probe.probe` or by the user; see :mod:`pgfailover.probe`).
    via_pooler: bool | None = None
    #: ``host:port`` of the PostgreSQL server behind the connection as of the last query probe
    #: (useful behind a pooler, where :attr:`info` names the pooler), else None.
    server_address: str | None = None

    #: Set by pgfailover pools: the pool generation the connection was made or last checked in.
    pool_generation: int = 0
    #: Set by pgfailover pools: ``time.monotonic()`` when the connection was last returned.
    pool_returned_at: float = 0.0

    # Instance attributes are a budget on CPython 3.11: an object keeps its attributes in a
    # compact array shared with its class only while the class's keys number under 30; past
    # it the object gets a real __dict__ and every attribute access on the connection,
    # psycopg's own included, becomes a dict lookup (measured: about 2 % more instructions
    # per pooled transaction). psycopg sets 19 and psycopg_pool 3: the attributes below are
    # written only when they change, never on every operation for nothing.

    #: Seconds a statement may run with no sign of life before the process's watchdog asks
    #: the server, on a new side connection, whether it is alive; if it does not answer
    #: within :attr:`probe_timeout`, the statement's connection is cut (its waiter wakes
    #: with a connection error). A live server's slow statement is never cut. None: never
    #: ask. So a statement in flight on a dead, blackholed or frozen server ends within
    #: about ``silence_limit + 2 * probe_timeout`` seconds (see :mod:`pgfailover._watchdog`).
    silence_limit: float | None = 5.0
    #: Bound, in seconds, of the side connection's connect and of its ``SELECT 1``.
    probe_timeout: float = 3.0

    _pgf_ops: int = 0  # operations waited for: the watchdog sees progress by it
    _pgf_deadline: float | None = None  # monotonic; the watchdog cuts an operation after it
    _pgf_cut_reason: str | None = None  # why the watchdog cut this connection
    _pgf_simulating: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _watchdog.watch(self)

    def simulate_recovery(self, enabled: bool = True) -> None:
        """Behave as if the node had just entered recovery (a test aid).

        While enabled, every operation except COMMIT and ROLLBACK (and any operation inside an
        already failed transaction) is replaced by a statement that makes the server raise its real
        ``FeatureNotSupported`` (0A000) "cannot set transaction read-write mode during
        recovery"; the connection then poisons itself as it would on a standby. It lasts
        until the connection is replaced or this is called with ``enabled=False``.
        """
        self._pgf_simulating = enabled

    def _pgf_maybe_simulate(self, gen: PQGen[RV], before: int) -> PQGen[RV]:
        if getattr(gen, "gi_code", None) in _PASSTHROUGH or before == _INERROR:
            return gen
        gen.close()
        return cast("PQGen[RV]", super()._exec_command(RECOVERY_ERROR_SQL))

    def _pgf_phase(self, before: int, committing: bool) -> Phase:
        if committing:
            return Phase.COMMIT
        if before == _IDLE:
            return Phase.AUTOCOMMIT if self.autocommit else Phase.TRANSACTION
        if before in _IN_BLOCK:
            return Phase.TRANSACTION
        return Phase.UNKNOWN

    def _pgf_failed(self, ex: psycopg.Error, before: int, gen: object) -> None:
        """Classify a failure of ``gen``; poison the connection and emit an event if it must
        go."""
        phase = self._pgf_phase(before, _failed_during_commit(gen, ex))
        verdict = classify(ex, conn=self, phase=phase)
        attach_verdict(ex, verdict)
        if not verdict.discard_connection:
            return
        node = self._pgf_node()
        action = "connection poisoned: it will not be reused"
        if verdict.purge_generation:
            action += "; connections opened before now to this endpoint are suspect"
        if verdict.rediscover_primary:
            action += "; the primary must be found again"
        if sys.version_info >= (3, 11):
            ex.add_note(f"pgfailover: {verdict.kind.value} on {node}: {verdict.reason}")
            if self._pgf_cut_reason is not None:
                ex.add_note(f"pgfailover: the watchdog cut this connection: {self._pgf_cut_reason}")
        if self.poisoned is not None:
            return  # one event per connection
        self.poisoned = verdict
        _emit(
            FailoverEvent(
                verdict=verdict,
                node=node,
                action=action,
                error_type=f"{type(ex).__module__}.{type(ex).__qualname__}",
                diagnostics=diagnostics_of(ex),
                stack=caller_stack(),
            )
        )

    def _pgf_node(self) -> NodeInfo:
        try:
            info = self.info
            return NodeInfo(
                info.host,
                info.port,
                info.backend_pid or None,
                self.via_pooler,
                self.server_address,
            )
        except psycopg.Error:  # the connection is already finished
            return NodeInfo(None, None, None, self.via_pooler, self.server_address)


def _invalid_conninfo(ex: psycopg.ProgrammingError, conninfo: str) -> InvalidConninfo:
    """psycopg's parse error for ``conninfo`` as :class:`InvalidConninfo`, without the
    password (libpq's URL errors quote the whole URL)."""
    reason = " ".join(str(ex).split())
    secrets = secret_candidates(conninfo) if isinstance(conninfo, str) else []
    return InvalidConninfo("cannot parse the connection string: " + scrub(reason, secrets))


# The parents' wait(), bound once: a plain function call is cheaper than super() on every
# operation of every connection.
_sync_wait = psycopg.Connection.wait
_async_wait = psycopg.AsyncConnection.wait


class Connection(_FailoverAware[Row], psycopg.Connection[Row]):
    """A :class:`psycopg.Connection` that poisons itself when its node can no longer write.

    Use it wherever psycopg takes a connection class: ``pgfailover.Connection.connect(...)``,
    ``psycopg_pool.ConnectionPool(connection_class=pgfailover.Connection)``, SQLAlchemy's
    ``creator``. See :attr:`poisoned`, :attr:`via_pooler`, :meth:`simulate_recovery`.
    """

    @classmethod
    def _get_connection_params(cls, conninfo: str, **kwargs: Any) -> ConnDict:
        # A conninfo psycopg cannot parse raises InvalidConninfo without the password,
        # raised outside the handler: psycopg's error (which quotes it) is not its context.
        try:
            return super()._get_connection_params(conninfo, **kwargs)
        except psycopg.ProgrammingError as ex:
            error = _invalid_conninfo(ex, conninfo)
        raise error

    def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        before = self.pgconn.transaction_status
        self._pgf_ops += 1
        if self._pgf_simulating:
            gen = self._pgf_maybe_simulate(gen, before)
        try:
            return _sync_wait(self, gen, *args, **kwargs)
        except psycopg.Error as ex:
            self._pgf_failed(ex, before, gen)
            raise


class AsyncConnection(_FailoverAware[Row], psycopg.AsyncConnection[Row]):
    """Async twin of :class:`Connection`, a real :class:`psycopg.AsyncConnection`."""

    @classmethod
    async def _get_connection_params(cls, conninfo: str, **kwargs: Any) -> ConnDict:
        # A conninfo psycopg cannot parse raises InvalidConninfo without the password,
        # raised outside the handler: psycopg's error (which quotes it) is not its context.
        try:
            return await super()._get_connection_params(conninfo, **kwargs)
        except psycopg.ProgrammingError as ex:
            error = _invalid_conninfo(ex, conninfo)
        raise error

    async def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        before = self.pgconn.transaction_status
        self._pgf_ops += 1
        if self._pgf_simulating:
            gen = self._pgf_maybe_simulate(gen, before)
        try:
            return await _async_wait(self, gen, *args, **kwargs)
        except psycopg.Error as ex:
            self._pgf_failed(ex, before, gen)
            raise
