"""Property tests for pgfailover.classify: total, and never retrying what must not be retried."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import itertools
import socket
from collections.abc import Iterator
from typing import Any

import asyncpg.exceptions
import psycopg
import psycopg.errors
import psycopg2
import psycopg2.errors
import sqlalchemy.exc
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pgfailover.classify import (
    RECOVERY_MESSAGE,
    Kind,
    Phase,
    RetryCondition,
    Verdict,
    classify,
    is_failover_error,
    is_retryable,
    sqlstate_of,
)

RETRYING_KINDS = {Kind.READ_ONLY, Kind.CONNECTION_LOST, Kind.SERVER_UNAVAILABLE, Kind.TRANSIENT}


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _constructible(candidates: list[type]) -> list[type[BaseException]]:
    """The exception classes that can be built from a single message."""
    usable: list[type[BaseException]] = []
    for cls in candidates:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        if inspect.isabstract(cls) or cls.__name__.startswith("_"):
            continue
        try:
            cls("message")
        except Exception:  # noqa: S112 - classes that need other arguments are skipped
            continue
        usable.append(cls)
    return sorted(set(usable), key=lambda c: f"{c.__module__}.{c.__qualname__}")


BUILTIN_TYPES = _constructible(
    [getattr(builtins, name) for name in dir(builtins)]
    + [asyncio.CancelledError, asyncio.TimeoutError, socket.gaierror]
)
PSYCOPG_TYPES = _constructible([psycopg.Error, *_subclasses(psycopg.Error)])
PSYCOPG2_TYPES = _constructible(
    [getattr(psycopg2.errors, name) for name in dir(psycopg2.errors)]
    + [getattr(psycopg2, name) for name in dir(psycopg2)]
)
ASYNCPG_TYPES = _constructible(
    [getattr(asyncpg.exceptions, name) for name in dir(asyncpg.exceptions)]
)
DRIVER_TYPES = PSYCOPG_TYPES + PSYCOPG2_TYPES + ASYNCPG_TYPES

INTERESTING = [
    RECOVERY_MESSAGE,
    "conflict with recovery",
    "terminating connection due to administrator command",
    "the database system is starting up",
    "sorry, too many clients already",
    'password authentication failed for user "app"',
    'role "x" does not exist',
    "the connection is closed",
    "connection is closed",
    'invalid dsn: missing "=" after',
    "password=secret",
    "postgresql://u:secret@h/db",
    "\n",
]
KNOWN_CODES = [
    "0A000", "25006", "57P01", "57P02", "57P03", "53300", "57P05", "25P03", "08000",
    "08001", "08003", "08004", "08006", "08007", "08P01", "08XYZ", "40001", "40P01",
    "55P03", "28000", "28P01", "3D000", "57P04", "42501", "23505", "42P01", "57014",
    "XX000", "22012",
]  # fmt: skip

weird_text = st.text(
    alphabet=st.characters(exclude_categories=[]),  # includes surrogates and controls
    max_size=40,
)
messages = st.one_of(
    weird_text,
    st.lists(st.one_of(st.sampled_from(INTERESTING), weird_text), max_size=4).map("".join),
)
sqlstates: st.SearchStrategy[object] = st.one_of(
    st.sampled_from(KNOWN_CODES),
    st.text(max_size=6),
    st.none(),
    st.integers(),
    st.binary(max_size=5),
)
# The first text strategy to be drawn from makes Hypothesis build its table of Unicode
# categories: a pass over all 1.1M code points (0.4-1.5 s here, seconds on a busy machine),
# cached under .hypothesis/, which a fresh checkout does not have. Inside a test's first draw
# that time counts against the too_slow health check. Validating the strategies builds the
# table now, at import, where no health check is timing.
messages.validate()
sqlstates.validate()


class Coded(Exception):
    """A non-driver exception carrying driver-like attributes (set per instance)."""


class Hostile(Exception):
    """An exception whose every inspection raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    @property
    def sqlstate(self) -> str:
        raise RuntimeError("no sqlstate")

    @property
    def pgcode(self) -> str:
        raise RuntimeError("no pgcode")

    @property
    def orig(self) -> BaseException:
        raise RuntimeError("no orig")


class Raising:
    """A descriptor that raises on access."""

    def __get__(self, obj: object, objtype: type | None = None) -> object:
        raise RuntimeError("raising attribute")


def _set(exc: BaseException, name: str, value: object) -> None:
    with contextlib.suppress(Exception):  # some classes refuse attributes: keep them as is
        setattr(exc, name, value)


# Strategies are built once: building them inside a composite makes every draw slow.
builtin_types = st.sampled_from(BUILTIN_TYPES)
driver_types = st.sampled_from(DRIVER_TYPES)
wrapped_types = st.sampled_from(DRIVER_TYPES + BUILTIN_TYPES)
choices = st.sampled_from(["builtin", "driver", "coded", "hostile", "sqlalchemy"])
links = st.sampled_from(["__cause__", "__context__", "orig"])


@st.composite
def single_exceptions(draw: st.DrawFn) -> BaseException:
    message = draw(messages)
    choice = draw(choices)
    if choice == "builtin":
        return draw(builtin_types)(message)
    if choice == "driver":
        return draw(driver_types)(message)
    if choice == "hostile":
        return Hostile(message)
    if choice == "sqlalchemy":
        inner = draw(wrapped_types)(message)
        return sqlalchemy.exc.OperationalError("SELECT 1", {}, inner)
    exc = Coded(message)
    for name in ("sqlstate", "pgcode"):
        if draw(st.booleans()):
            _set(exc, name, draw(sqlstates))
    return exc


@st.composite
def exceptions(draw: st.DrawFn) -> BaseException:
    """One to four exceptions linked by __cause__, __context__ or .orig, maybe in a cycle."""
    chain = draw(st.lists(single_exceptions(), min_size=1, max_size=4))
    for outer, inner in itertools.pairwise(chain):
        _set(outer, draw(links), inner)
        if draw(st.booleans()):
            _set(outer, "__suppress_context__", True)
    if len(chain) > 1 and draw(st.booleans()):
        _set(chain[-1], draw(links), chain[0])
    return chain[0]


conn_values: st.SearchStrategy[object] = st.sampled_from([None, True, False, 0, 1, 2, "raise"])


@st.composite
def conns(draw: st.DrawFn) -> object:
    if draw(st.booleans()):
        return None
    namespace: dict[str, Any] = {}
    for name in ("read_only", "broken", "closed"):
        value = draw(conn_values)
        if value == "raise":
            namespace[name] = Raising()
        elif value is not None or draw(st.booleans()):
            namespace[name] = value
    return type("Conn", (), namespace)()


phases = st.sampled_from(list(Phase))
read_only_args = st.sampled_from([None, True, False])


@settings(max_examples=400)
@given(exc=exceptions(), conn=conns(), read_only=read_only_args, phase=phases)
def test_classify_is_total_and_only_failures_it_understands_are_retried(
    exc: BaseException, conn: object, read_only: bool | None, phase: Phase
) -> None:
    """classify never raises; only failover and transient verdicts may ever be retried."""
    verdict = classify(exc, conn=conn, read_only=read_only, phase=phase)
    assert isinstance(verdict, Verdict)
    assert isinstance(verdict.kind, Kind)
    assert isinstance(verdict.retry, RetryCondition)
    assert isinstance(verdict.message, str)
    assert isinstance(verdict.reason, str)
    assert verdict.reason
    assert "\n" not in verdict.message
    code = verdict.sqlstate
    assert code is None or (len(code) == 5 and code.isascii() and code.isalnum())
    assert code is None or code == code.upper()
    if verdict.retryable or verdict.may_retry(idempotent=True):
        assert verdict.kind in RETRYING_KINDS
    if verdict.kind in {Kind.APPLICATION, Kind.CONFIGURATION}:
        assert verdict.retry is RetryCondition.NEVER
        assert not verdict.may_retry(idempotent=True)
    if verdict.retry is RetryCondition.OUTCOME_UNKNOWN:
        assert phase is Phase.COMMIT
    if verdict.retryable:
        assert verdict.may_retry(idempotent=False)
    if verdict.may_retry(idempotent=False):
        assert verdict.may_retry(idempotent=True)
    assert verdict.is_failover is (
        verdict.kind in {Kind.READ_ONLY, Kind.CONNECTION_LOST, Kind.SERVER_UNAVAILABLE}
    )
    if not isinstance(exc, Exception):
        assert verdict.kind is Kind.APPLICATION
    assert classify(exc, conn=conn, read_only=read_only, phase=phase) == verdict


@given(exc=exceptions())
def test_predicates_and_sqlstate_of_agree_with_classify(exc: BaseException) -> None:
    """is_failover_error, is_retryable and sqlstate_of are total and agree with classify."""
    verdict = classify(exc)
    assert is_failover_error(exc) is verdict.is_failover
    assert is_retryable(exc) is verdict.retryable
    code = sqlstate_of(exc)
    assert code is None or (isinstance(code, str) and len(code) == 5)
    assert code == verdict.sqlstate


@given(exc=exceptions(), conn=conns(), read_only=read_only_args, phase=phases)
def test_wrapping_in_sqlalchemy_does_not_change_the_verdict(
    exc: BaseException, conn: object, read_only: bool | None, phase: Phase
) -> None:
    """A SQLAlchemy DBAPIError around an exception is classified like the exception."""
    assume(isinstance(exc, Exception))
    assert isinstance(exc, Exception)
    wrapped = sqlalchemy.exc.OperationalError("SELECT 1", {}, exc)
    plain = classify(exc, conn=conn, read_only=read_only, phase=phase)
    through = classify(wrapped, conn=conn, read_only=read_only, phase=phase)
    assert (through.kind, through.retry, through.sqlstate) == (
        plain.kind,
        plain.retry,
        plain.sqlstate,
    )


SECRET = "S3cr3tV4lue"


@given(
    before=st.text(max_size=30).filter(lambda s: "\n" not in s),
    after=messages,
    form=st.sampled_from(
        [
            f"password={SECRET}",
            f"PASSWORD = '{SECRET} x'",
            f'password="{SECRET}"',
            f"postgresql://app:{SECRET}@db:5432/x",
            f"postgres://app:{SECRET}@h1,h2/x?sslmode=require",
            f"postgresql://h/x?user=app&password={SECRET}&sslmode=require",
        ]
    ),
    driver=st.sampled_from([psycopg.OperationalError, psycopg2.OperationalError, ValueError]),
)
def test_passwords_never_reach_the_verdict(
    before: str, after: str, form: str, driver: type[Exception]
) -> None:
    """Whatever surrounds it, a conninfo or URL password is scrubbed from the verdict."""
    assume(SECRET not in before + after)
    verdict = classify(driver(f"{before} {form} {after}"))
    assert SECRET not in verdict.message
    assert SECRET not in verdict.reason
