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
from psycopg.abc import ConnDict, PQGen, QueryNoTemplate
from psycopg.pq import Format, TransactionStatus
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

_IDLE = TransactionStatus.IDLE
_INERROR = TransactionStatus.INERROR
_IN_BLOCK = (TransactionStatus.INTRANS, TransactionStatus.INERROR)


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
    _pgf_committing: bool = False
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

    def _exec_command(
        self, command: QueryNoTemplate, result_format: Format = Format.TEXT
    ) -> PQGen[Any]:
        # COMMIT from commit() or a transaction() block passes through here as bytes (the fast
        # path, unchanged). Two-phase commit sends PREPARE TRANSACTION and COMMIT PREPARED (and
        # ROLLBACK PREPARED, no commit) as composed SQL: render it here, once, and hand the
        # bytes on, so psycopg's method does not render it again and inspecting costs nothing.
        if isinstance(command, bytes):
            is_commit = command.startswith((b"COMMIT", b"commit"))
        elif isinstance(command, psycopg.sql.Composable):
            self._check_connection_ok()  # rendering needs it: fail as psycopg would
            command = command.as_bytes(self)
            is_commit = command.startswith((b"COMMIT", b"PREPARE TRANSACTION"))
        else:  # a str: psycopg encodes it
            is_commit = command.startswith(("COMMIT", "commit", "PREPARE TRANSACTION"))
        if is_commit:
            self._pgf_committing = True  # wait() classifies a failure with it, then clears it
        return super()._exec_command(command, result_format)

    def _pgf_maybe_simulate(self, gen: PQGen[RV], before: int) -> PQGen[RV]:
        if getattr(gen, "gi_code", None) in _PASSTHROUGH or before == _INERROR:
            return gen
        gen.close()
        return cast("PQGen[RV]", super()._exec_command(RECOVERY_ERROR_SQL))

    def _pgf_phase(self, before: int) -> Phase:
        if self._pgf_committing:
            return Phase.COMMIT
        if before == _IDLE:
            return Phase.AUTOCOMMIT if self.autocommit else Phase.TRANSACTION
        if before in _IN_BLOCK:
            return Phase.TRANSACTION
        return Phase.UNKNOWN

    def _pgf_failed(self, ex: psycopg.Error, before: int) -> None:
        """Classify a failure; poison the connection and emit an event if it must go."""
        phase = self._pgf_phase(before)
        self._pgf_committing = False
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
        # A conninfo psycopg cannot parse raises InvalidConninfo without the password.
        try:
            return super()._get_connection_params(conninfo, **kwargs)
        except psycopg.ProgrammingError as ex:
            raise _invalid_conninfo(ex, conninfo) from None

    def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        before = self.pgconn.transaction_status
        self._pgf_ops += 1
        if self._pgf_simulating:
            gen = self._pgf_maybe_simulate(gen, before)
        try:
            return _sync_wait(self, gen, *args, **kwargs)
        except psycopg.Error as ex:
            self._pgf_failed(ex, before)
            raise
        finally:
            self._pgf_committing = False


class AsyncConnection(_FailoverAware[Row], psycopg.AsyncConnection[Row]):
    """Async twin of :class:`Connection`, a real :class:`psycopg.AsyncConnection`."""

    @classmethod
    async def _get_connection_params(cls, conninfo: str, **kwargs: Any) -> ConnDict:
        # A conninfo psycopg cannot parse raises InvalidConninfo without the password.
        try:
            return await super()._get_connection_params(conninfo, **kwargs)
        except psycopg.ProgrammingError as ex:
            raise _invalid_conninfo(ex, conninfo) from None

    async def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        before = self.pgconn.transaction_status
        self._pgf_ops += 1
        if self._pgf_simulating:
            gen = self._pgf_maybe_simulate(gen, before)
        try:
            return await _async_wait(self, gen, *args, **kwargs)
        except psycopg.Error as ex:
            self._pgf_failed(ex, before)
            raise
        finally:
            self._pgf_committing = False
