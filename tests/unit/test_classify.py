"""Unit tests for pgfailover.classify: SQLSTATE rules, drivers, wrappers, phases, predicates."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import asyncpg.exceptions
import psycopg
import psycopg.errors
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest
import sqlalchemy.exc
import stamina
import tenacity
from psycopg import pq
from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection,
    PGDialect_asyncpg,
)

from pgfailover.classify import (
    RECOVERY_MESSAGE,
    Kind,
    Phase,
    RetryCondition,
    Verdict,
    attach_verdict,
    classify,
    is_failover_error,
    is_retryable,
    sqlstate_of,
)

T, F = True, False


class Expected(NamedTuple):
    kind: Kind
    retry: RetryCondition  # with Phase.UNKNOWN
    discard: bool
    purge: bool
    rediscover: bool


_LOST = Expected(Kind.CONNECTION_LOST, RetryCondition.IF_IDEMPOTENT, T, T, T)
_LOST_LOCAL = Expected(Kind.CONNECTION_LOST, RetryCondition.IF_IDEMPOTENT, T, F, F)
_CONNECT_FAILED = Expected(Kind.CONNECTION_LOST, RetryCondition.NOT_SENT, T, T, T)
_READ_ONLY = Expected(Kind.READ_ONLY, RetryCondition.ROLLED_BACK, T, T, T)
_UNAVAILABLE = Expected(Kind.SERVER_UNAVAILABLE, RetryCondition.NOT_SENT, T, T, T)
_FULL = Expected(Kind.SERVER_UNAVAILABLE, RetryCondition.NOT_SENT, T, F, F)
_TRANSIENT = Expected(Kind.TRANSIENT, RetryCondition.ROLLED_BACK, F, F, F)
_CONFIG = Expected(Kind.CONFIGURATION, RetryCondition.NEVER, T, F, F)
_APP = Expected(Kind.APPLICATION, RetryCondition.NEVER, F, F, F)

EXPECTED: dict[str, Expected] = {
    "0A000": _READ_ONLY,  # built with the recovery message
    "25006": _READ_ONLY,
    "57P01": _LOST,
    "57P02": _LOST,
    "57P03": _UNAVAILABLE,
    "53300": _FULL,
    "57P05": _LOST_LOCAL,
    "25P03": _LOST_LOCAL,
    "08000": _LOST,
    "08001": _CONNECT_FAILED,
    "08003": _LOST,
    "08004": _CONNECT_FAILED,
    "08006": _LOST,
    "08007": _LOST,
    "08P01": _LOST,
    "40001": _TRANSIENT,
    "40P01": _TRANSIENT,
    "55P03": _TRANSIENT,
    "28000": _CONFIG,
    "28P01": _CONFIG,
    "3D000": _CONFIG,
    "57P04": _CONFIG,
    "42501": _APP,
    "23505": _APP,
    "42P01": _APP,
    "57014": _APP,
    "XX000": _APP,
    "22012": _APP,
}


def _message_for(code: str) -> str:
    return RECOVERY_MESSAGE if code == "0A000" else f"server said {code}"


# ------------------------------------------------------------------ drivers


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


ASYNCPG_BY_SQLSTATE: dict[str, type[Exception]] = {}
for _cls in _subclasses(asyncpg.exceptions.PostgresError):
    _code = _cls.__dict__.get("sqlstate")
    if isinstance(_code, str):
        ASYNCPG_BY_SQLSTATE.setdefault(_code, _cls)

_DIALECT_CLASS: Any = PGDialect_asyncpg  # the dialect module is not annotated
_ASYNCPG_DIALECT: Any = _DIALECT_CLASS()
_ASYNCPG_DBAPI: Any = _ASYNCPG_DIALECT.import_dbapi()


def psycopg3_error(code: str, message: str) -> Exception:
    return psycopg.errors.lookup(code)(message)


def psycopg2_error(code: str, message: str) -> Exception:
    return psycopg2.errors.lookup(code)(message)


def asyncpg_error(code: str, message: str) -> Exception:
    return ASYNCPG_BY_SQLSTATE[code](message)


def _raise(error: Exception) -> None:
    raise error


def adapt_asyncpg(error: Exception) -> Exception:
    """What SQLAlchemy's asyncpg dialect raises for ``error`` (an adapted DBAPI error)."""
    try:
        try:
            _raise(error)
        except Exception as exc:
            AsyncAdapt_asyncpg_connection._handle_exception_no_connection(_ASYNCPG_DBAPI, exc)
    except Exception as adapted:
        return adapted
    raise AssertionError("the dialect did not raise")  # pragma: no cover


def sqlalchemy_asyncpg_error(code: str, message: str) -> Exception:
    """asyncpg error -> the dialect's adapted error -> SQLAlchemy's DBAPIError."""
    adapted = adapt_asyncpg(asyncpg_error(code, message))
    return sqlalchemy.exc.DBAPIError.instance(
        "SELECT 1", {}, adapted, _ASYNCPG_DBAPI.Error, dialect=_ASYNCPG_DIALECT
    )


def sqlalchemy_psycopg3_error(code: str, message: str) -> Exception:
    return sqlalchemy.exc.DBAPIError.instance(
        "SELECT 1", {}, psycopg3_error(code, message), psycopg.Error
    )


def sqlalchemy_psycopg2_error(code: str, message: str) -> Exception:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, psycopg2_error(code, message))


def sqlalchemy_raw_asyncpg_error(code: str, message: str) -> Exception:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, asyncpg_error(code, message))


DRIVERS: dict[str, Callable[[str, str], Exception]] = {
    "psycopg": psycopg3_error,
    "psycopg2": psycopg2_error,
    "asyncpg": asyncpg_error,
    "sqlalchemy+psycopg": sqlalchemy_psycopg3_error,
    "sqlalchemy+psycopg2": sqlalchemy_psycopg2_error,
    "sqlalchemy+asyncpg-adapted": sqlalchemy_asyncpg_error,
    "sqlalchemy+asyncpg-raw": sqlalchemy_raw_asyncpg_error,
}


def _check(verdict: Verdict, expected: Expected) -> None:
    assert (
        verdict.kind,
        verdict.retry,
        verdict.discard_connection,
        verdict.purge_generation,
        verdict.rediscover_primary,
    ) == expected


# ------------------------------------------------------------- SQLSTATE table


@pytest.mark.parametrize("code", sorted(EXPECTED))
@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_sqlstate_table(driver: str, code: str) -> None:
    """Every listed SQLSTATE gets its kind, retry and flags from every driver and wrapper."""
    exc = DRIVERS[driver](code, _message_for(code))
    verdict = classify(exc)
    _check(verdict, EXPECTED[code])
    assert verdict.sqlstate == code
    assert sqlstate_of(exc) == code
    assert verdict.message == _message_for(code)
    assert verdict.reason.startswith(code)
    assert is_failover_error(exc) is (
        verdict.kind in {Kind.READ_ONLY, Kind.CONNECTION_LOST, Kind.SERVER_UNAVAILABLE}
    )
    assert is_retryable(exc) is (
        verdict.retry in {RetryCondition.NOT_SENT, RetryCondition.ROLLED_BACK}
    )


def test_sqlalchemy_asyncpg_wrapping_matches_the_dialect() -> None:
    """The dialect's adapted error keeps the asyncpg error in .orig and __cause__."""
    original = asyncpg_error("40001", "could not serialize access")
    wrapped = sqlalchemy_asyncpg_error("40001", "could not serialize access")
    assert isinstance(wrapped, sqlalchemy.exc.DBAPIError)
    adapted = wrapped.orig
    assert type(adapted).__module__ == "sqlalchemy.dialects.postgresql.asyncpg"
    assert type(adapted.orig) is type(original)  # type: ignore[union-attr]
    assert adapted.__cause__ is adapted.orig  # type: ignore[union-attr]
    assert classify(wrapped).sqlstate == "40001"


def test_hand_built_psycopg2_errors_are_reverse_mapped() -> None:
    """psycopg2 errors built by hand have pgcode None; their class gives the SQLSTATE."""
    exc = psycopg2.errors.lookup("40P01")("deadlock")
    assert exc.pgcode is None
    assert sqlstate_of(exc) == "40P01"
    assert classify(exc).kind is Kind.TRANSIENT


def test_hand_built_psycopg2_extension_bases_are_not_connection_lost() -> None:
    """psycopg2's QueryCanceledError base (an OperationalError) maps to 57014: APPLICATION."""
    exc = psycopg2.extensions.QueryCanceledError("canceling statement due to statement timeout")
    assert sqlstate_of(exc) == "57014"
    _check(classify(exc), _APP)
    assert sqlstate_of(psycopg2.extensions.TransactionRollbackError("x")) == "40000"


def test_unlisted_class_08_codes_are_connection_lost() -> None:
    """Any 08xxx SQLSTATE is a lost connection, even one no driver has a class for."""
    exc = psycopg.OperationalError("odd")
    exc.sqlstate = "08ZZZ"
    _check(classify(exc), _LOST)


def test_sqlstate_of_validates_and_normalises() -> None:
    """sqlstate_of accepts five ASCII letters/digits (upper-cased) and nothing else."""

    class Coded(Exception):
        sqlstate: object = None

    for value, expected in [
        ("40001", "40001"),
        ("0a000", "0A000"),
        ("4000", None),
        ("400011", None),
        (40001, None),
        (b"40001", None),
        ("4000\N{DIGIT ONE FULL STOP}", None),
    ]:
        exc = Coded("x")
        exc.sqlstate = value
        assert sqlstate_of(exc) == expected, value
    assert sqlstate_of(ValueError("x")) is None
    assert sqlstate_of(KeyboardInterrupt()) is None


# ------------------------------------------------------------ read-only rules


def test_recovery_message_is_postgresqls_text() -> None:
    """RECOVERY_MESSAGE is the text PostgreSQL's standby raises for BEGIN READ WRITE."""
    assert RECOVERY_MESSAGE == "cannot set transaction read-write mode during recovery"


def test_0a000_without_the_recovery_message_is_an_application_error() -> None:
    """0A000 is READ_ONLY only with the recovery message; otherwise APPLICATION."""
    verdict = classify(psycopg3_error("0A000", "cannot use this feature"))
    _check(verdict, _APP)
    assert verdict.sqlstate == "0A000"


def test_0a000_recovery_message_match_is_case_insensitive() -> None:
    """The recovery message is found inside a longer message, whatever its case."""
    exc = psycopg3_error("0A000", f"ERROR: {RECOVERY_MESSAGE.upper()} (while BEGIN)")
    _check(classify(exc), _READ_ONLY)
    assert classify(exc).reason == "0A000 with the recovery message: the node is a hot standby"


@pytest.mark.parametrize(
    ("read_only", "conn", "kind"),
    [
        (None, None, Kind.READ_ONLY),
        (True, None, Kind.APPLICATION),
        (False, None, Kind.READ_ONLY),
        (None, SimpleNamespace(read_only=True), Kind.APPLICATION),
        (None, SimpleNamespace(read_only=False), Kind.READ_ONLY),
        (None, SimpleNamespace(read_only=None), Kind.READ_ONLY),
        (None, SimpleNamespace(read_only=1), Kind.READ_ONLY),  # only `True` counts
        (None, SimpleNamespace(), Kind.READ_ONLY),
        (False, SimpleNamespace(read_only=True), Kind.READ_ONLY),  # argument wins
        (True, SimpleNamespace(read_only=False), Kind.APPLICATION),
    ],
)
def test_25006_depends_on_whether_the_session_asked_for_read_only(
    read_only: bool | None, conn: object, kind: Kind
) -> None:
    """25006 is APPLICATION only when the session asked for read-only (argument, else conn)."""
    verdict = classify(psycopg3_error("25006", "x"), conn=conn, read_only=read_only)
    assert verdict.kind is kind
    assert verdict.retryable is (kind is Kind.READ_ONLY)


def test_25006_with_a_conn_whose_read_only_raises() -> None:
    """A conn whose read_only property raises counts as not asking for read-only."""

    class Hostile:
        @property
        def read_only(self) -> bool:
            raise RuntimeError("no")

    assert classify(psycopg3_error("25006", "x"), conn=Hostile()).kind is Kind.READ_ONLY


# ------------------------------------------------------------------ phases

LOST_EXAMPLES: dict[str, Callable[[], BaseException]] = {
    "57P01": lambda: psycopg3_error("57P01", "terminating connection"),
    "08006": lambda: psycopg2_error("08006", "connection failure"),
    "25P03": lambda: asyncpg_error("25P03", "idle in transaction timeout"),
    "OperationalError": lambda: psycopg.OperationalError("server closed the connection"),
    "ConnectionResetError": lambda: ConnectionResetError(104, "Connection reset by peer"),
}

PHASE_RETRY = {
    Phase.CONNECT: RetryCondition.NOT_SENT,
    Phase.TRANSACTION: RetryCondition.ROLLED_BACK,
    Phase.COMMIT: RetryCondition.OUTCOME_UNKNOWN,
    Phase.AUTOCOMMIT: RetryCondition.IF_IDEMPOTENT,
    Phase.UNKNOWN: RetryCondition.IF_IDEMPOTENT,
}


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("example", sorted(LOST_EXAMPLES))
def test_lost_connection_retry_depends_on_the_phase(example: str, phase: Phase) -> None:
    """A lost connection's retry condition follows the phase the caller was in."""
    verdict = classify(LOST_EXAMPLES[example](), phase=phase)
    assert verdict.kind is Kind.CONNECTION_LOST
    assert verdict.retry is PHASE_RETRY[phase]
    assert verdict.may_retry(idempotent=True) is (phase is not Phase.COMMIT)
    assert verdict.may_retry() is (phase in {Phase.CONNECT, Phase.TRANSACTION})


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("code", ["0A000", "25006", "57P03", "53300", "08001", "08004", "40001"])
def test_other_retry_conditions_do_not_depend_on_the_phase(code: str, phase: Phase) -> None:
    """Standby, server rollback and refused-connection verdicts are the same in every phase."""
    verdict = classify(psycopg3_error(code, _message_for(code)), phase=phase)
    assert verdict.retry is EXPECTED[code].retry


def test_a_phase_that_is_not_a_phase_counts_as_unknown() -> None:
    """classify stays total when given a bogus phase: a lost connection is IF_IDEMPOTENT."""
    verdict = classify(psycopg3_error("57P01", "x"), phase=cast(Phase, "commit"))
    assert verdict.retry is RetryCondition.IF_IDEMPOTENT


# ------------------------------------------------------- transient and conflicts


def test_recovery_conflict_is_transient_with_its_own_reason() -> None:
    """40001 'conflict with recovery' is TRANSIENT and the reason names the standby conflict."""
    exc = psycopg3_error("40001", "canceling statement due to conflict with recovery")
    verdict = classify(exc)
    _check(verdict, _TRANSIENT)
    assert "recovery" in verdict.reason
    assert "recovery" not in classify(psycopg3_error("40001", "could not serialize")).reason


def test_recovery_conflict_that_terminated_the_session_discards_the_connection() -> None:
    """A 40001 recovery conflict that terminated the session discards the connection."""
    exc = psycopg3_error("40001", "terminating connection due to conflict with recovery")
    verdict = classify(exc)
    assert verdict.kind is Kind.TRANSIENT
    assert verdict.retry is RetryCondition.ROLLED_BACK
    assert verdict.discard_connection is True


# ------------------------------------------------- errors without a SQLSTATE


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("consuming input failed: server closed the connection"),
        psycopg2.OperationalError("server closed the connection unexpectedly"),
        psycopg.errors.ConnectionTimeout("connection timeout expired"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        ConnectionRefusedError(111, "Connect call failed"),
        TimeoutError(),
        asyncio.TimeoutError(),
        EOFError(),
        socket.gaierror(-2, "Name or service not known"),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        asyncpg.exceptions.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        ),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_driver_and_socket_errors_without_sqlstate_are_connection_lost(exc: Exception) -> None:
    """OperationalError, socket errors and asyncpg's closed-connection errors: CONNECTION_LOST."""
    _check(classify(exc), _LOST)
    assert classify(exc, phase=Phase.CONNECT).retry is RetryCondition.NOT_SENT


def test_asyncpg_interface_error_about_something_else_is_an_application_error() -> None:
    """An asyncpg InterfaceError that is not about a closed connection is APPLICATION."""
    exc = asyncpg.exceptions.InterfaceError("cannot perform operation: another is in progress")
    _check(classify(exc), _APP)


def test_psycopg_error_on_a_bad_pgconn_is_connection_lost() -> None:
    """A psycopg Error without SQLSTATE whose pgconn status is BAD is CONNECTION_LOST."""
    bad = cast(Any, SimpleNamespace(status=pq.ConnStatus.BAD))
    ok = cast(Any, SimpleNamespace(status=pq.ConnStatus.OK))
    _check(classify(psycopg.InterfaceError("boom", pgconn=bad)), _LOST)
    _check(classify(psycopg.InterfaceError("boom", pgconn=ok)), _APP)
    _check(classify(psycopg.InterfaceError("boom")), _APP)


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        (SimpleNamespace(broken=True), _LOST),
        (SimpleNamespace(broken=False), _APP),
        (SimpleNamespace(closed=2), _LOST),  # psycopg2: 2 means broken
        (SimpleNamespace(closed=1), _APP),  # psycopg2: closed by the program
        (SimpleNamespace(closed=True), _APP),  # a bool is not psycopg2's marker
        (None, _APP),
    ],
)
def test_a_broken_conn_makes_a_driver_error_without_sqlstate_connection_lost(
    conn: object, expected: Expected
) -> None:
    """conn.broken is True or conn.closed >= 2 turns a SQLSTATE-less driver error into a loss."""
    _check(classify(psycopg.InterfaceError("the connection is closed"), conn=conn), expected)
    _check(classify(psycopg2.InterfaceError("connection already closed"), conn=conn), expected)


def test_a_broken_conn_does_not_override_a_sqlstate_or_a_non_database_error() -> None:
    """A broken conn changes neither a 23505 nor a ValueError: both stay APPLICATION."""
    conn = SimpleNamespace(broken=True, closed=2)
    _check(classify(psycopg3_error("23505", "dup"), conn=conn), _APP)
    _check(classify(ValueError("bad input"), conn=conn), _APP)


def test_interface_error_on_a_closed_connection_is_an_application_error() -> None:
    """psycopg InterfaceError 'the connection is closed' alone is a program error."""
    _check(classify(psycopg.InterfaceError("the connection is closed")), _APP)


def test_operational_error_on_a_connection_the_program_closed_is_an_application_error() -> None:
    """psycopg 3.3 says OperationalError 'the connection is closed'; closed, not broken: program."""
    exc = psycopg.OperationalError("the connection is closed")
    _check(classify(exc), _LOST)
    _check(classify(exc, conn=SimpleNamespace(closed=True, broken=True)), _LOST)
    _check(classify(exc, conn=SimpleNamespace(closed=True, broken=False)), _APP)


def test_pipeline_aborted_is_an_application_error() -> None:
    """PipelineAborted (an OperationalError) reports an earlier failure: not a lost connection."""
    _check(classify(psycopg.errors.PipelineAborted("pipeline aborted")), _APP)


MULTI_HOST = (
    'connection failed: connection to server at "10.0.0.2", port 5432 failed: '
    "Connection refused\n"
    "Multiple connection attempts failed. All failures were:\n"
    "- host: 'a', port: '5432', hostaddr: '10.0.0.1': connection failed: connection to "
    'server at "10.0.0.1", port 5432 failed: FATAL:  the database system is shutting down\n'
    "- host: 'b', port: '5432', hostaddr: '10.0.0.2': connection failed: Connection refused"
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
            'FATAL:  password authentication failed for user "app"',
            _CONFIG,
        ),
        ('FATAL:  no pg_hba.conf entry for host "10.1.1.1", user "app", database "db"', _CONFIG),
        ('FATAL:  role "app" does not exist', _CONFIG),
        ('FATAL:  database "nope" does not exist', _CONFIG),
        ("FATAL:  SASL authentication failed", _CONFIG),
        ("fe_sendauth: no password supplied", _CONFIG),
        ("FATAL:  the database system is starting up", _UNAVAILABLE),
        ("FATAL:  the database system is shutting down", _UNAVAILABLE),
        ("FATAL:  the database system is not yet accepting connections", _UNAVAILABLE),
        ("FATAL:  the database system is not accepting connections", _UNAVAILABLE),
        ("FATAL:  the database system is in recovery mode", _UNAVAILABLE),
        ("FATAL:  sorry, too many clients already", _FULL),
        ("FATAL:  remaining connection slots are reserved for roles with SUPERUSER", _FULL),
        ("FATAL:  terminating connection due to administrator command", _LOST),
        ("FATAL:  terminating connection because of crash of another server process", _LOST),
        (MULTI_HOST, _UNAVAILABLE),
        ("server closed the connection unexpectedly", _LOST),
    ],
)
@pytest.mark.parametrize(
    "error_type", [psycopg.OperationalError, psycopg2.OperationalError], ids=["psycopg", "psycopg2"]
)
def test_connect_time_messages_without_sqlstate(
    error_type: type[Exception], message: str, expected: Expected
) -> None:
    """Connect errors that lost their SQLSTATE are recognised by their message."""
    verdict = classify(error_type(message), phase=Phase.CONNECT)
    assert verdict.sqlstate is None
    assert verdict.kind is expected.kind
    assert (verdict.discard_connection, verdict.purge_generation) == expected[2:4]
    assert verdict.rediscover_primary is expected.rediscover
    assert verdict.retry is (
        RetryCondition.NEVER if expected.kind is Kind.CONFIGURATION else RetryCondition.NOT_SENT
    )
    assert verdict.message == message.partition("\n")[0]


def test_connect_time_messages_do_not_apply_to_non_database_errors() -> None:
    """A ValueError that happens to say 'password authentication failed' stays APPLICATION."""
    _check(classify(ValueError("password authentication failed")), _APP)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.ProgrammingError('missing "=" after "foo" in connection info string\n'),
        psycopg.ProgrammingError('invalid connection option "bogus"\n'),
        psycopg.ProgrammingError('invalid URI query parameter: "bogus"\n'),
        psycopg.ProgrammingError('invalid sslmode value: "bad"\n'),
        psycopg.ProgrammingError("bad value for connect_timeout: 'x'"),
        psycopg2.ProgrammingError('invalid dsn: missing "=" after "foo" in connection info string'),
        psycopg2.ProgrammingError('invalid dsn: invalid connection option "bogus"'),
        asyncpg.exceptions.ClientConfigurationError("invalid port"),
    ],
    ids=lambda exc: f"{type(exc).__module__}-{str(exc)[:20]}",
)
def test_invalid_conninfo_is_a_configuration_error(exc: Exception) -> None:
    """A malformed conninfo (ProgrammingError without SQLSTATE) is CONFIGURATION, fail fast."""
    _check(classify(exc, phase=Phase.CONNECT), _CONFIG)


def test_other_programming_errors_are_application_errors() -> None:
    """A ProgrammingError that is not about the conninfo is APPLICATION."""
    exc = psycopg.ProgrammingError("the query has 1 placeholder but 2 parameters were passed")
    _check(classify(exc), _APP)


# ------------------------------------------------------- application errors


@pytest.mark.parametrize(
    "exc",
    [
        KeyboardInterrupt(),
        SystemExit(1),
        asyncio.CancelledError(),
        GeneratorExit(),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_interrupts_are_never_retried(exc: BaseException) -> None:
    """KeyboardInterrupt, SystemExit, CancelledError: APPLICATION even on a broken conn or chain."""
    exc.__context__ = psycopg3_error("40001", "could not serialize")
    conn = SimpleNamespace(broken=True)
    for phase in Phase:
        verdict = classify(exc, conn=conn, phase=phase)
        _check(verdict, _APP)
        assert not verdict.may_retry(idempotent=True)
    assert not is_retryable(exc)
    assert not is_failover_error(exc)
    assert verdict.message == type(exc).__name__ or verdict.message == str(exc)


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad"), RuntimeError("boom"), KeyError("k"), Exception(), OSError(5, "I/O error")],
    ids=lambda exc: type(exc).__name__,
)
def test_non_database_exceptions_are_application_errors(exc: Exception) -> None:
    """Non-database exceptions are APPLICATION, with the first line of str() as message."""
    verdict = classify(exc, phase=Phase.TRANSACTION)
    _check(verdict, _APP)
    assert verdict.sqlstate is None
    assert verdict.message == (str(exc).partition("\n")[0] or type(exc).__name__)


# ------------------------------------------------------------------ chains


def test_an_explicit_cause_is_classified() -> None:
    """`raise AppError from driver_error` is classified by the driver error."""
    app = RuntimeError("could not save the order")
    app.__cause__ = psycopg3_error("40001", "could not serialize")
    assert classify(app).kind is Kind.TRANSIENT
    assert sqlstate_of(app) == "40001"


def test_an_implicit_context_is_classified_unless_suppressed() -> None:
    """An error raised while handling a driver error is classified by it, unless `from None`."""
    app = RuntimeError("wrapped sloppily")
    app.__context__ = psycopg3_error("57P01", "terminating connection")
    assert classify(app).kind is Kind.CONNECTION_LOST
    app.__suppress_context__ = True
    assert classify(app).kind is Kind.APPLICATION


def test_the_outermost_error_with_a_sqlstate_wins_over_its_context() -> None:
    """A unique violation raised while handling a serialization failure is APPLICATION."""
    exc = psycopg3_error("23505", "duplicate key")
    exc.__context__ = psycopg3_error("40001", "could not serialize")
    assert classify(exc).sqlstate == "23505"
    assert classify(exc).kind is Kind.APPLICATION


def test_a_driver_error_without_sqlstate_is_not_looked_through() -> None:
    """A lost connection during rollback of a 40001 is a lost connection, not TRANSIENT."""
    exc = psycopg.OperationalError("server closed the connection unexpectedly")
    exc.__context__ = psycopg3_error("40001", "could not serialize")
    verdict = classify(exc, phase=Phase.TRANSACTION)
    assert verdict.kind is Kind.CONNECTION_LOST
    assert verdict.retry is RetryCondition.ROLLED_BACK


def test_a_wrapper_is_classified_by_its_own_sqlstate_if_its_orig_has_none() -> None:
    """A wrapper with a SQLSTATE whose .orig carries none falls back to its own code."""

    class Adapted(Exception):
        sqlstate = "40P01"

        def __init__(self, message: str, orig: Exception) -> None:
            super().__init__(message)
            self.orig = orig

    assert classify(Adapted("deadlock", ValueError("x"))).sqlstate == "40P01"


def test_chains_with_cycles_terminate() -> None:
    """Cause/context cycles and self-referencing .orig are walked once, then given up."""
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    _check(classify(a), _APP)
    wrapper = sqlalchemy.exc.OperationalError("SELECT 1", {}, ValueError("x"))
    wrapper.orig = wrapper
    _check(classify(wrapper), _APP)
    d = psycopg2.OperationalError("lost")
    d.__context__ = d
    _check(classify(d), _LOST)


def test_long_chains_are_cut_off() -> None:
    """A chain deeper than the walk's bound is an APPLICATION error, not an endless walk."""
    head = inner = RuntimeError("0")
    for i in range(1, 100):
        nxt = RuntimeError(str(i))
        inner.__cause__ = nxt
        inner = nxt
    inner.__cause__ = psycopg3_error("40001", "deep")
    _check(classify(head), _APP)


# ---------------------------------------------------------------- passwords


@pytest.mark.parametrize(
    "message",
    [
        "invalid dsn: password=secret host=db",
        "could not connect with password='se cret' and user=app",
        'conninfo: host=db PASSWORD = "secret" port=5432',
        "could not connect to postgresql://u:secret@h/db",
        "failed: postgres://app:secret@db1:5432,db2:5432/app?sslmode=require",
        "both password=secret and postgresql://u:secret@h/db",
        "url postgresql://u@h/db?password=secret&sslmode=require",
    ],
)
@pytest.mark.parametrize(
    "make",
    [
        psycopg.OperationalError,
        psycopg2.ProgrammingError,
        ValueError,
        lambda message: psycopg3_error("42601", message),
        lambda message: sqlalchemy_asyncpg_error("28P01", message),
    ],
    ids=["psycopg", "psycopg2", "ValueError", "psycopg-42601", "sqlalchemy-asyncpg-28P01"],
)
def test_passwords_are_scrubbed(make: Callable[[str], Exception], message: str) -> None:
    """Neither the message nor the reason of a verdict contains a password."""
    verdict = classify(make(message))
    assert "secret" not in verdict.message
    assert "se cret" not in verdict.message
    assert "secret" not in verdict.reason
    assert "***" in verdict.message


def test_scrubbing_keeps_the_rest_of_the_message() -> None:
    """Only the password is replaced; user, host and other options stay readable."""
    verdict = classify(
        psycopg.OperationalError("postgresql://app:pw@db:5432/x password=pw sslmode=on")
    )
    assert verdict.message == "postgresql://app:***@db:5432/x password=*** sslmode=on"


# ----------------------------------------------------------------- totality


def test_classify_survives_hostile_exceptions_and_connections() -> None:
    """Broken __str__, raising attributes and raising conn properties never escape classify."""

    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    class RaisingAttrs(Exception):
        @property
        def sqlstate(self) -> str:
            raise RuntimeError("no sqlstate")

        @property
        def orig(self) -> Exception:
            raise RuntimeError("no orig")

        @property
        def pgcode(self) -> str:
            raise RuntimeError("no pgcode")

    class BadDiag(psycopg.OperationalError):
        @property
        def diag(self) -> psycopg.errors.Diagnostic:
            raise RuntimeError("no diag")

    class BadPgconn(psycopg.InterfaceError):
        @property
        def pgconn(self) -> pq.abc.PGconn | None:
            raise RuntimeError("no pgconn")

    class WeirdStr(str):
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no eq")

        __hash__ = str.__hash__

    class WeirdCode(Exception):
        sqlstate = WeirdStr("40001")

    class HostileConn:
        def __getattr__(self, name: str) -> object:
            raise RuntimeError(name)

    bad_diag = BadDiag("lost")
    bad_diag.sqlstate = "57P01"
    exceptions: list[BaseException] = [
        BadStr(),
        RaisingAttrs("x"),
        bad_diag,
        BadDiag("no code"),
        BadPgconn("x"),
        WeirdCode("x"),
        asyncpg.exceptions.SerializationError(),  # its __str__ raises IndexError
        psycopg3_error("25006", "read-only"),
    ]
    for exc in exceptions:
        for conn in (None, HostileConn(), SimpleNamespace(read_only=True, broken=True)):
            for phase in Phase:
                verdict = classify(exc, conn=conn, phase=phase)
                assert isinstance(verdict, Verdict)
                assert isinstance(verdict.message, str)
                assert verdict.message
    assert classify(BadStr()).message == "BadStr"
    assert classify(bad_diag).kind is Kind.CONNECTION_LOST
    assert classify(asyncpg.exceptions.SerializationError()).kind is Kind.TRANSIENT
    assert classify(cast(BaseException, object())).kind is Kind.APPLICATION


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("retry", "retryable", "may_retry", "may_retry_idempotent"),
    [
        (RetryCondition.NEVER, F, F, F),
        (RetryCondition.NOT_SENT, T, T, T),
        (RetryCondition.ROLLED_BACK, T, T, T),
        (RetryCondition.IF_IDEMPOTENT, F, F, T),
        (RetryCondition.OUTCOME_UNKNOWN, F, F, F),
    ],
)
def test_verdict_retry_predicates(
    retry: RetryCondition, retryable: bool, may_retry: bool, may_retry_idempotent: bool
) -> None:
    """retryable and may_retry follow the Retry condition; OUTCOME_UNKNOWN never retries."""
    verdict = Verdict(Kind.CONNECTION_LOST, None, "m", retry, T, T, T, "r")
    assert verdict.retryable is retryable
    assert verdict.may_retry() is may_retry
    assert verdict.may_retry(idempotent=True) is may_retry_idempotent


@pytest.mark.parametrize("kind", list(Kind))
def test_verdict_is_failover(kind: Kind) -> None:
    """is_failover is true exactly for READ_ONLY, CONNECTION_LOST and SERVER_UNAVAILABLE."""
    verdict = Verdict(kind, None, "m", RetryCondition.NEVER, F, F, F, "r")
    failover = {Kind.READ_ONLY, Kind.CONNECTION_LOST, Kind.SERVER_UNAVAILABLE}
    assert verdict.is_failover is (kind in failover)


def test_verdict_is_frozen_and_enum_values_are_strings() -> None:
    """Verdicts cannot be changed; Kind, Phase and Retry values are the documented strings."""
    verdict = classify(ValueError("x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.kind = Kind.TRANSIENT  # type: ignore[misc]
    assert Kind.READ_ONLY.value == "read_only"
    assert Phase.COMMIT.value == "commit"
    assert RetryCondition.OUTCOME_UNKNOWN.value == "outcome_unknown"
    assert all(
        isinstance(member.value, str) for enum in (Kind, Phase, RetryCondition) for member in enum
    )


def test_reasons_are_single_short_sentences() -> None:
    """Every reason is one line and short enough for a log line."""
    samples: list[BaseException] = [DRIVERS["psycopg"](c, _message_for(c)) for c in EXPECTED]
    samples += [ValueError("x"), KeyboardInterrupt(), psycopg.OperationalError(MULTI_HOST)]
    for exc in samples:
        reason = classify(exc).reason
        assert reason
        assert "\n" not in reason
        assert len(reason) <= 120


# --------------------------------------------------------------- retry libs


def _failing(errors: list[BaseException]) -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def work() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "done"

    return work, calls


def test_tenacity_retries_a_40001_and_stops_on_an_application_error() -> None:
    """retry_if_exception(is_retryable) retries a 40001 once, then succeeds; stops on 23505."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_retryable),
        wait=tenacity.wait_none(),
        stop=tenacity.stop_after_attempt(5),
        reraise=True,
    )
    work, calls = _failing([psycopg3_error("40001", "could not serialize")])
    assert retrying(work) == "done"
    assert len(calls) == 2

    work, calls = _failing([psycopg3_error("23505", "duplicate key")])
    with pytest.raises(psycopg.errors.UniqueViolation):
        retrying(work)
    assert len(calls) == 1


def test_stamina_retries_a_40001_and_stops_on_an_application_error() -> None:
    """stamina.retry(on=is_retryable, attempts=2) retries a 40001, not a 23505."""
    with stamina.set_testing(True, attempts=2):
        work, calls = _failing([psycopg3_error("40001", "could not serialize")])
        assert stamina.retry(on=is_retryable, attempts=2)(work)() == "done"
        assert len(calls) == 2

        work, calls = _failing([psycopg3_error("23505", "duplicate key")])
        with pytest.raises(psycopg.errors.UniqueViolation):
            stamina.retry(on=is_retryable, attempts=2)(work)()
        assert len(calls) == 1

        errors: list[BaseException] = [psycopg3_error("40P01", "deadlock")] * 3
        work, calls = _failing(errors)
        with pytest.raises(psycopg.errors.DeadlockDetected):
            stamina.retry(on=is_retryable, attempts=2)(work)()
        assert len(calls) == 2
    assert not stamina.is_testing()


def test_wrapper_that_invalidated_the_connection_makes_an_error_without_sqlstate_a_loss() -> None:
    """A SQLSTATE-less driver error that SQLAlchemy wrapped with connection_invalidated=True
    (its dialect or a listener judged a disconnect) is a lost connection, retried by phase;
    the same error not invalidated stays what its type says."""
    inner = psycopg.InternalError("received 2 results from command 'BEGIN'")
    invalidated = sqlalchemy.exc.DBAPIError.instance(
        "BEGIN", None, inner, psycopg.Error, connection_invalidated=True
    )
    kept = sqlalchemy.exc.DBAPIError.instance("BEGIN", None, inner, psycopg.Error)
    lost = classify(invalidated, phase=Phase.TRANSACTION)
    assert lost.kind is Kind.CONNECTION_LOST
    assert lost.retry is RetryCondition.ROLLED_BACK
    assert lost.discard_connection
    assert "connection_invalidated" in lost.reason
    assert classify(invalidated, phase=Phase.COMMIT).retry is RetryCondition.OUTCOME_UNKNOWN
    assert classify(kept, phase=Phase.TRANSACTION).kind is Kind.APPLICATION


def test_wrapper_invalidation_does_not_override_a_sqlstate() -> None:
    """With a SQLSTATE the code decides, whatever the wrapper says about the connection."""
    inner = psycopg3_error("23505", "duplicate key")
    wrapped = sqlalchemy.exc.DBAPIError.instance(
        "INSERT", None, inner, psycopg.Error, connection_invalidated=True
    )
    assert classify(wrapped).kind is Kind.APPLICATION


def test_recovery_in_progress_from_a_wal_function_is_a_standby() -> None:
    """55000 'recovery is in progress' (pg_current_wal_lsn() and friends on a hot
    standby) means the node is a standby, like 0A000 with the recovery message; other
    55000 errors stay application errors."""
    verdict = classify(psycopg3_error("55000", "recovery is in progress"))
    assert verdict.kind is Kind.READ_ONLY
    assert verdict.retry is RetryCondition.ROLLED_BACK
    assert verdict.purge_generation
    other = classify(psycopg3_error("55000", "cannot drop the currently open database"))
    assert other.kind is Kind.APPLICATION


def test_a_bare_classify_reaches_the_verdict_a_connection_attached() -> None:
    """An exception carrying a connection's verdict (what was in flight, the connection's
    state) is classified the same by a bare call, and so by the retry predicate; explicit
    arguments classify from scratch."""

    class BrokenConnection:
        broken = True  # psycopg's flag once the server's FATAL closed the connection

    exc = psycopg.InternalError("received 2 results from command 'BEGIN'")
    assert not is_retryable(exc)  # alone, it reads as an application error
    rolled_back = classify(exc, conn=BrokenConnection(), phase=Phase.TRANSACTION)
    assert rolled_back.retry is RetryCondition.ROLLED_BACK
    attach_verdict(exc, rolled_back)
    assert is_retryable(exc)
    assert classify(exc) is rolled_back
    assert classify(exc, phase=Phase.COMMIT) is not rolled_back
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = exc
    assert classify(wrapped) is rolled_back
