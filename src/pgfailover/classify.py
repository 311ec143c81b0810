"""Tell failover errors from application errors, and say whether the work may run again.

:func:`classify` turns any exception raised while talking to PostgreSQL into a
:class:`Verdict`: what kind of failure it is (:class:`Kind`), whether and under what
condition the unit of work may be run again (:class:`RetryCondition`), and what to do with the
connection and the idea of where the primary is.

The module is pure: it performs no I/O and never imports psycopg2, asyncpg or SQLAlchemy.
It recognises their exceptions by duck typing (``sqlstate``/``pgcode`` attributes, the
``.orig`` of SQLAlchemy wrappers) and by the module their classes are defined in.

:func:`classify` is total: whatever it is given, it returns a verdict and never raises
(an exception it cannot inspect is an :attr:`Kind.APPLICATION` error, never retried).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import socket
import sys
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import pq

__all__ = [
    "RECOVERY_MESSAGE",
    "Kind",
    "Phase",
    "RetryCondition",
    "Verdict",
    "classify",
    "is_failover_error",
    "is_retryable",
    "read_only_hosts",
    "sqlstate_of",
]

#: What a hot standby answers (SQLSTATE 0A000) to ``BEGIN READ WRITE`` or
#: ``SET TRANSACTION READ WRITE``: the tell-tale that the node is in recovery.
RECOVERY_MESSAGE: Final = "cannot set transaction read-write mode during recovery"

logger = logging.getLogger("pgfailover.classify")


class Kind(enum.Enum):
    """What kind of failure an exception is."""

    #: The node is a standby, in recovery or read-only: it cannot serve writes.
    READ_ONLY = "read_only"
    #: The connection is gone (network failure, terminated backend, broken connection).
    CONNECTION_LOST = "connection_lost"
    #: The server is shutting down, starting up, not accepting connections yet, or full.
    SERVER_UNAVAILABLE = "server_unavailable"
    #: The server rolled the work back: serialization failure, deadlock, lock not
    #: available, conflict with recovery. Running the transaction again may succeed.
    TRANSIENT = "transient"
    #: Authentication failed, the database is missing, the conninfo is invalid:
    #: never retried, fail fast.
    CONFIGURATION = "configuration"
    #: Everything else, including unknown SQLSTATEs, non-database exceptions and
    #: interrupts/cancellations: never retried.
    APPLICATION = "application"


class Phase(enum.Enum):
    """What the caller was doing when the error happened (only the caller knows)."""

    #: Opening a connection: nothing of the unit of work was sent.
    CONNECT = "connect"
    #: A statement (or BEGIN) inside an explicit transaction, not COMMIT.
    TRANSACTION = "transaction"
    #: A statement outside a transaction (autocommit): it may have taken effect.
    AUTOCOMMIT = "autocommit"
    #: COMMIT (or RELEASE, PREPARE TRANSACTION, COMMIT PREPARED...) was in flight.
    COMMIT = "commit"
    #: The caller did not say.
    UNKNOWN = "unknown"


class RetryCondition(enum.Enum):
    """Under what condition the unit of work may be run again."""

    #: Never: running it again cannot help.
    NEVER = "never"
    #: The work never reached the server: retry freely.
    NOT_SENT = "not_sent"
    #: The server rolled it back, nothing durable happened: retry the whole transaction.
    ROLLED_BACK = "rolled_back"
    #: It may have taken effect (lost during an autocommit statement, or in an unknown
    #: phase): retry only if running it twice is harmless.
    IF_IDEMPOTENT = "if_idempotent"
    #: A COMMIT was in flight: find out whether it committed before any retry.
    OUTCOME_UNKNOWN = "outcome_unknown"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The classification of one exception.

    Attributes:
        kind: what kind of failure it is.
        sqlstate: the SQLSTATE the verdict is based on, ``None`` if the error had none.
        message: the error's primary message (the first line of ``str(exc)`` for errors
            without a server diagnostic), with passwords scrubbed (``password=...`` and
            the ``user:pass@`` part of URLs become ``***``).
        retry: under what condition the unit of work may be run again.
        discard_connection: this connection must not be used again.
        purge_generation: every connection opened to the same endpoint before now is
            suspect and should be closed rather than reused.
        rediscover_primary: where the primary is must be found out again.
        reason: one short sentence saying why, for logs.
    """

    kind: Kind
    sqlstate: str | None
    message: str
    retry: RetryCondition
    discard_connection: bool
    purge_generation: bool
    rediscover_primary: bool
    reason: str

    @property
    def is_failover(self) -> bool:
        """True if the error is a symptom of failover: READ_ONLY, CONNECTION_LOST or
        SERVER_UNAVAILABLE."""
        kind = self.kind  # identity tests: Enum.__hash__ is Python code, slow in a set
        return (
            kind is Kind.READ_ONLY
            or kind is Kind.CONNECTION_LOST
            or kind is Kind.SERVER_UNAVAILABLE
        )

    @property
    def retryable(self) -> bool:
        """True if the unit of work may run again unconditionally: the work was not
        sent (NOT_SENT) or the server rolled it back (ROLLED_BACK)."""
        retry = self.retry
        return retry is RetryCondition.NOT_SENT or retry is RetryCondition.ROLLED_BACK

    def may_retry(self, *, idempotent: bool = False) -> bool:
        """True if the unit of work may run again.

        It may if it is :attr:`retryable`, or if its outcome is unknown only because
        it was lost outside a COMMIT (IF_IDEMPOTENT) and the caller says running it twice
        is harmless (``idempotent=True``). A lost COMMIT (OUTCOME_UNKNOWN) is never
        retried here: the outcome must be resolved first.
        """
        retry = self.retry
        return (
            retry is RetryCondition.NOT_SENT
            or retry is RetryCondition.ROLLED_BACK
            or (retry is RetryCondition.IF_IDEMPOTENT and idempotent is True)
        )


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: a cheap cache key
class _Rule:
    kind: Kind
    retry: RetryCondition | None  # None: decided by the phase, as for a lost connection
    discard: bool
    purge: bool
    rediscover: bool
    reason: str


def _lost(reason: str, *, purge: bool = True, retry: RetryCondition | None = None) -> _Rule:
    return _Rule(Kind.CONNECTION_LOST, retry, True, purge, purge, reason)


def _transient(reason: str, *, discard: bool = False) -> _Rule:
    return _Rule(Kind.TRANSIENT, RetryCondition.ROLLED_BACK, discard, False, False, reason)


def _config(reason: str) -> _Rule:
    return _Rule(Kind.CONFIGURATION, RetryCondition.NEVER, True, False, False, reason)


def _application(reason: str) -> _Rule:
    return _Rule(Kind.APPLICATION, RetryCondition.NEVER, False, False, False, reason)


# Bounded memo tables (cleared when full): rules and verdicts are immutable, so
# sharing them is safe, and building a frozen dataclass costs more than a lookup.
_CACHE_MAX: Final = 1024
_CODE_RULES: dict[str, _Rule] = {}


def _rule_for_unlisted(code: str) -> _Rule:
    """The rule for a SQLSTATE without an entry in ``_BY_SQLSTATE``, made once per code."""
    rule = _CODE_RULES.get(code)
    if rule is None:
        if code.startswith("08"):
            rule = _lost(f"{code}: connection exception: the connection is gone")
        else:
            rule = _application(f"{code}: an application error, not a failover")
        if len(_CODE_RULES) >= _CACHE_MAX:
            _CODE_RULES.clear()
        _CODE_RULES[code] = rule
    return rule


_READ_ONLY_RECOVERY: Final = _Rule(
    Kind.READ_ONLY,
    RetryCondition.ROLLED_BACK,
    True,
    True,
    True,
    "0A000 with the recovery message: the node is a hot standby",
)
_RECOVERY_IN_PROGRESS: Final = _Rule(
    Kind.READ_ONLY,
    RetryCondition.ROLLED_BACK,
    True,
    True,
    True,
    "55000 'recovery is in progress' (a WAL or xid function on a hot standby): the node is "
    "a standby",
)
_FEATURE_NOT_SUPPORTED: Final = _application(
    "0A000 without the recovery message: a feature the server does not support"
)
_READ_ONLY_TRANSACTION: Final = _Rule(
    Kind.READ_ONLY,
    RetryCondition.ROLLED_BACK,
    True,
    True,
    True,
    "25006: a write reached a read-only node (a standby or a primary made read-only)",
)
_READ_ONLY_ASKED: Final = _application(
    "25006 in a session that asked for read-only: the program tried to write"
)
_STANDBYS_ONLY: Final = _Rule(
    Kind.READ_ONLY,
    RetryCondition.NOT_SENT,
    True,
    True,
    True,
    "libpq refused every host of the conninfo as read-only (target_session_attrs): the "
    "hosts answer, none is a writable primary",
)
_CANNOT_CONNECT_NOW: Final = _Rule(
    Kind.SERVER_UNAVAILABLE,
    RetryCondition.NOT_SENT,
    True,
    True,
    True,
    "57P03: the server is starting up, shutting down or not yet accepting connections",
)
_TOO_MANY_CONNECTIONS: Final = _Rule(
    Kind.SERVER_UNAVAILABLE,
    RetryCondition.NOT_SENT,
    True,
    False,
    False,
    "53300: the server has no free connection slot",
)
_ADMIN_SHUTDOWN: Final = _lost(
    "57P01: the server terminated the connection (administrator command or shutdown)"
)
_CRASH_SHUTDOWN: Final = _lost(
    "57P02: the server terminated the connection after another server process crashed"
)
_SERIALIZATION: Final = _transient("40001: serialization failure: the server rolled back")
_RECOVERY_CONFLICT: Final = _transient(
    "40001 with a recovery-conflict message: a standby cancelled it to replay WAL"
)
_RECOVERY_CONFLICT_TERMINATED: Final = _transient(
    "40001: a standby terminated the session to replay WAL (conflict with recovery)",
    discard=True,
)
_DEADLOCK: Final = _transient("40P01: deadlock detected: the server rolled back")
_DEADLOCK_RECOVERY: Final = _transient(
    "40P01 with a recovery-conflict message: a standby cancelled it to replay WAL"
)

_BY_SQLSTATE: Final[dict[str, _Rule]] = {
    "0A000": _FEATURE_NOT_SUPPORTED,  # READ_ONLY only with the recovery message
    "25006": _READ_ONLY_TRANSACTION,  # APPLICATION if the session asked for read-only
    "57P01": _ADMIN_SHUTDOWN,
    "57P02": _CRASH_SHUTDOWN,
    "57P03": _CANNOT_CONNECT_NOW,
    "53300": _TOO_MANY_CONNECTIONS,
    "57P05": _lost(
        "57P05: the server closed the connection after idle_session_timeout", purge=False
    ),
    "25P03": _lost(
        "25P03: the server closed the connection after "
        "idle_in_transaction_session_timeout, rolling the transaction back",
        purge=False,
    ),
    "08000": _lost("08000: connection exception: the connection is gone"),
    "08001": _lost(
        "08001: the client could not establish the connection", retry=RetryCondition.NOT_SENT
    ),
    "08003": _lost("08003: the connection does not exist"),
    "08004": _lost("08004: the server rejected the connection", retry=RetryCondition.NOT_SENT),
    "08006": _lost("08006: connection failure: the connection is gone"),
    "08007": _lost("08007: the connection failed, transaction resolution unknown"),
    "08P01": _lost("08P01: protocol violation: the connection is unusable"),
    "40001": _SERIALIZATION,
    "40P01": _DEADLOCK,
    "55P03": _transient("55P03: lock not available: the transaction must be run again"),
    "28000": _config("28000: the server refused the authorization (pg_hba.conf or role)"),
    "28P01": _config("28P01: password authentication failed"),
    "3D000": _config("3D000: the database does not exist"),
    "57P04": _config("57P04: the database was dropped"),
}

# Messages that identify the error when the SQLSTATE was lost (psycopg and psycopg2
# report connection-time failures as OperationalError without one). Substrings of the
# lower-cased ``str(exc)`` (all lines: psycopg lists every host it tried), checked in
# order: a configuration error wins, it will not go away by retrying.
_CONFIG_BY_MESSAGE: Final = _config(
    "no SQLSTATE, but the message says authentication failed or the role or database does not exist"
)
_MESSAGE_RULES: Final[tuple[tuple[tuple[str, ...], _Rule], ...]] = (
    (
        (
            "authentication failed",
            "no pg_hba.conf entry",
            "pg_hba.conf rejects",
            "no password supplied",
        ),
        _CONFIG_BY_MESSAGE,
    ),
    (
        (
            "the database system is starting up",
            "the database system is shutting down",
            "the database system is in recovery mode",
            "the database system is not yet accepting connections",
            "the database system is not accepting connections",
        ),
        _Rule(
            Kind.SERVER_UNAVAILABLE,
            RetryCondition.NOT_SENT,
            True,
            True,
            True,
            "no SQLSTATE, but the message says the server is not accepting connections (as 57P03)",
        ),
    ),
    (
        (
            "too many clients already",
            "remaining connection slots are reserved",
            "too many connections for",
        ),
        _Rule(
            Kind.SERVER_UNAVAILABLE,
            RetryCondition.NOT_SENT,
            True,
            False,
            False,
            "no SQLSTATE, but the message says the server has no free connection slot (as 53300)",
        ),
    ),
    (
        (
            # a value libpq cannot use (psycopg 3.3 reports port=abc as OperationalError)
            "invalid integer value",
            "invalid value for parameter",
            "invalid sslmode value",
            "invalid target_session_attrs value",
            # a name that does not resolve: a wrong host name, not an outage
            "failed to resolve host",
            "could not translate host name",
            # TLS demanded of a server that does not offer it, or the reverse
            "server does not support ssl, but ssl was required",
            "ssl connection is required",
            # not a PostgreSQL server on that port
            "received invalid response to ssl negotiation",
            "expected authentication request from server",
            "invalid length of startup packet",
            "unsupported frontend protocol",
            # PgBouncer refusing a login: its admin console for a user that is neither in
            # admin_users nor in stats_users, a database or user it does not know
            "fatal:  not allowed",
            "no such database:",
            "no such user:",
        ),
        _config(
            "no SQLSTATE, but the message says the connection's configuration cannot work "
            "(a bad value, an unresolvable host, a TLS mismatch, or not a PostgreSQL server)"
        ),
    ),
    (
        ("terminating connection due to administrator command",),
        _lost("no SQLSTATE, but the message says the server terminated the connection (as 57P01)"),
    ),
    (
        ("terminating connection because of crash",),
        _lost(
            "no SQLSTATE, but the message says the server terminated the connection after "
            "a crash (as 57P02)"
        ),
    ),
)
# PgBouncer refuses a login with SQLSTATE 08P01 (what asyncpg reports; libpq drops it):
# its admin console for a user in neither admin_users nor stats_users, an unknown database
# or user. A configuration error, not a lost connection.
_PGBOUNCER_REFUSALS: Final = ("not allowed", "no such database:", "no such user:")
_PGBOUNCER_REFUSED: Final = _config("08P01 from PgBouncer: it refuses this user or database")
_MISSING_ROLE_OR_DB_RE: Final = re.compile(r'(?:role|database) "[^"\n]*" does not exist')

# libpq's complaints about a malformed conninfo, raised as ProgrammingError.
_CONNINFO_MESSAGES: Final = (
    "invalid dsn",
    "invalid connection option",
    'missing "=" after',
    "in connection info string",
    "invalid uri query parameter",
    "invalid connection string",
    "bad value for connect_timeout",
    "invalid integer value",
    "invalid port number",
    # libpq's URL parser (its message quotes the URL: see pgfailover.InvalidConninfo)
    "in uri",
    "percent-encoded",
    "unterminated quoted string",
    # pgfailover.InvalidConninfo
    "cannot parse the connection string",
)
_INVALID_VALUE_RE: Final = re.compile(r"invalid [a-z_]+ value")
_CONNINFO: Final = _config("invalid connection parameters: fix the configuration")
_CLIENT_CONFIG: Final = _config("asyncpg ClientConfigurationError: invalid connection parameters")
_PGCONN_BAD: Final = _lost("psycopg error without SQLSTATE on a BAD pgconn: the connection is gone")
_CONN_BROKEN: Final = _lost("error without SQLSTATE on a connection that reports it is broken")
_WRAPPER_DISCONNECT: Final = _lost(
    "error without SQLSTATE that the wrapper judged a disconnect (connection_invalidated)"
)
_ASYNCPG_CLOSED: Final = _lost("asyncpg InterfaceError: the connection is closed")
_USED_CLOSED: Final = _application("the program used a connection it had closed")
_PIPELINE_ABORTED: Final = _application(
    "PipelineAborted: an earlier statement of the pipeline failed; classify that error"
)

_RECOVERY_LOWER: Final = RECOVERY_MESSAGE.lower()
_BAD: Final = pq.ConnStatus.BAD
_MAX_DEPTH: Final = 16

# Passwords in messages: conninfo ``password=...`` (also quoted) and URL userinfo.
_PASSWORD_RE: Final = re.compile(
    r"""((?:password|passwd|pwd)["']?\s*[=:]\s*)('(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s&;,]+)""",
    re.IGNORECASE,
)
_USERINFO_RE: Final = re.compile(r"""([a-z][a-z0-9+.\-]*://[^\s:/@'"]*):[^\s'"]*@""", re.IGNORECASE)


# ------------------------------------------------------------------- type facts


@dataclass(frozen=True, slots=True, eq=False)
class _TypeInfo:
    """What the class of an exception says, computed once per class."""

    interrupt: bool  # not an Exception: KeyboardInterrupt, SystemExit, CancelledError...
    driver: bool  # from psycopg, psycopg2 or asyncpg, or a builtin socket failure
    psycopg: bool  # a psycopg 3 Error
    diag: bool  # has ``.diag.message_primary`` (psycopg 3, psycopg2)
    lost: bool  # without a SQLSTATE, the type alone says the connection is gone
    conninfo: bool  # a ProgrammingError that may be about a malformed conninfo
    asyncpg_interface: bool  # asyncpg InterfaceError ("connection is closed")
    client_config: bool  # asyncpg ClientConfigurationError
    pipeline_aborted: bool  # psycopg PipelineAborted
    psycopg2_code: str | None  # SQLSTATE of a psycopg2.errors class (hand-built: no pgcode)
    plain: _Rule  # the rule when nothing but the type is known


_BUILTIN_LOST: Final = (
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    EOFError,
    socket.gaierror,
)
_ASYNCPG_LOST_NAMES: Final = frozenset(
    {"ConnectionDoesNotExistError", "ConnectionFailureError", "PostgresConnectionError"}
)
_TYPE_CACHE: dict[type, _TypeInfo] = {}
_psycopg2_codes: dict[type, str] | None = None


def _module_of(cls: type) -> str:
    module = getattr(cls, "__module__", "")
    return module if isinstance(module, str) else ""


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _psycopg2_code(cls: type) -> str | None:
    """The SQLSTATE of a ``psycopg2.errors`` class, from the table psycopg2 itself uses.

    Only psycopg2 modules that are already imported are consulted (``psycopg2.errors``
    and the ``sqlstate_errors`` table its ``lookup()`` reads); the reverse map is built
    once, on first need.
    """
    global _psycopg2_codes  # noqa: PLW0603 - a cache built once, lazily
    codes = _psycopg2_codes
    if codes is None:
        if sys.modules.get("psycopg2.errors") is None:
            return None
        extension = sys.modules.get("psycopg2._psycopg")
        table = getattr(extension, "sqlstate_errors", None)
        if not isinstance(table, dict):
            return None
        codes = {}
        for code, klass in table.items():
            if isinstance(code, str) and isinstance(klass, type):
                codes.setdefault(klass, code)
        # The two psycopg2.extensions bases that stand for a SQLSTATE of their own.
        for name, code in (("QueryCanceledError", "57014"), ("TransactionRollbackError", "40000")):
            klass = getattr(extension, name, None)
            if isinstance(klass, type):
                codes.setdefault(klass, code)
        _psycopg2_codes = codes
    return codes.get(cls)


def _type_info(cls: type) -> _TypeInfo:
    info = _TYPE_CACHE.get(cls)
    if info is None:
        try:
            info = _compute_type_info(cls)
        except Exception:  # a class that cannot be introspected is no driver class
            info = _type_facts(cls)
        if len(_TYPE_CACHE) >= _CACHE_MAX:
            _TYPE_CACHE.clear()
        _TYPE_CACHE[cls] = info
    return info


def _type_name(cls: type) -> str:
    try:
        name = cls.__name__
    except Exception:  # a metaclass may break even this
        return "exception"
    return name if isinstance(name, str) else "exception"


def _type_facts(
    cls: type,
    *,
    interrupt: bool = False,
    driver: bool = False,
    psycopg: bool = False,
    diag: bool = False,
    lost: bool = False,
    conninfo: bool = False,
    asyncpg_interface: bool = False,
    client_config: bool = False,
    pipeline_aborted: bool = False,
    psycopg2_code: str | None = None,
) -> _TypeInfo:
    name = _type_name(cls)
    if interrupt:
        plain = _application(f"{name} is an interrupt or a cancellation, never retried")
    elif not driver:
        plain = _application(f"{name} is not a database error")
    elif lost:
        plain = _lost(f"{name} without SQLSTATE: the connection is gone")
    else:
        plain = _application(f"{name} without SQLSTATE: an application error")
    return _TypeInfo(
        interrupt,
        driver,
        psycopg,
        diag,
        lost,
        conninfo,
        asyncpg_interface,
        client_config,
        pipeline_aborted,
        psycopg2_code,
        plain,
    )


def _compute_type_info(cls: type) -> _TypeInfo:
    if not issubclass(cls, Exception):
        return _type_facts(cls, interrupt=True)
    is_psycopg = issubclass(cls, psycopg.Error)
    pipeline_aborted = issubclass(cls, psycopg.errors.PipelineAborted)
    lost = issubclass(cls, _BUILTIN_LOST) or (
        issubclass(cls, psycopg.OperationalError) and not pipeline_aborted
    )
    conninfo = issubclass(cls, psycopg.ProgrammingError)
    is_psycopg2 = is_asyncpg = asyncpg_interface = client_config = False
    for klass in cls.__mro__:
        module = _module_of(klass)
        name = _type_name(klass)
        if _in_package(module, "psycopg2"):
            is_psycopg2 = True
            if module == "psycopg2":
                lost = lost or name == "OperationalError"
                conninfo = conninfo or name == "ProgrammingError"
        elif _in_package(module, "asyncpg"):
            is_asyncpg = True
            lost = lost or name in _ASYNCPG_LOST_NAMES
            asyncpg_interface = asyncpg_interface or name == "InterfaceError"
            client_config = client_config or name == "ClientConfigurationError"
    own_psycopg2 = is_psycopg2 and _in_package(_module_of(cls), "psycopg2")
    return _type_facts(
        cls,
        driver=is_psycopg or is_psycopg2 or is_asyncpg or lost,
        psycopg=is_psycopg,
        diag=is_psycopg or is_psycopg2,
        lost=lost,
        conninfo=conninfo,
        asyncpg_interface=asyncpg_interface,
        client_config=client_config,
        pipeline_aborted=pipeline_aborted,
        psycopg2_code=_psycopg2_code(cls) if own_psycopg2 else None,
    )


# --------------------------------------------------------------------- helpers


def _attr(obj: object, name: str) -> object:
    """``getattr(obj, name, None)`` that never raises."""
    try:
        return getattr(obj, name, None)
    except Exception:  # attributes of foreign objects may raise anything
        return None


_SQLSTATES: dict[str, str | None] = {}


def _valid_sqlstate(value: object) -> str | None:
    """``value`` as a SQLSTATE (five ASCII letters or digits, upper-cased), else None."""
    if type(value) is not str:  # str subclasses could lie about their contents
        return None
    code = _SQLSTATES.get(value, "")
    if code == "":
        code = value.upper() if len(value) == 5 and value.isascii() and value.isalnum() else None
        if len(_SQLSTATES) >= _CACHE_MAX:
            _SQLSTATES.clear()
        _SQLSTATES[value] = code
    return code


def _own_sqlstate(exc: BaseException, info: _TypeInfo) -> str | None:
    """The SQLSTATE carried by ``exc`` itself (not by what it wraps)."""
    # psycopg 3 (its Error.__init__ copies diag.sqlstate here for codes without a class),
    # asyncpg, SQLAlchemy's adapted asyncpg errors
    value = _attr(exc, "sqlstate")
    if value is not None:
        code = _valid_sqlstate(value)
        if code is not None:
            return code
    value = _attr(exc, "pgcode")  # psycopg2
    if value is not None:
        code = _valid_sqlstate(value)
        if code is not None:
            return code
    return info.psycopg2_code


def _text(exc: BaseException) -> str:
    """``str(exc)``, or the class name if that fails or is blank."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not break classification
        text = ""
    return text if text and not text.isspace() else _type_name(type(exc))


def _first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped ("" if it has none)."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped:
            return stripped
    return ""


def _primary_message(exc: BaseException, info: _TypeInfo) -> str:
    if info.diag:
        try:
            primary = exc.diag.message_primary  # type: ignore[attr-defined]
        except Exception:  # a foreign subclass may break diag: fall back to str()
            primary = None
        if isinstance(primary, str) and primary:
            return primary
    return _first_line(_text(exc))


def _scrub(message: str) -> str:
    """Remove passwords: ``password=...`` values and the password of URL userinfo."""
    lowered = message.lower()
    if "pass" in lowered or "pwd" in lowered:
        message = _PASSWORD_RE.sub(r"\1***", message)
    if "@" in message and "://" in message:
        message = _USERINFO_RE.sub(r"\1:***@", message)
    return message


def _next_in_chain(node: BaseException) -> object:
    """What ``node`` was raised from: ``__cause__``, else ``__context__`` unless suppressed."""
    inner = _attr(node, "__cause__")
    if inner is None and _attr(node, "__suppress_context__") is not True:
        inner = _attr(node, "__context__")
    return inner


def _select(exc: BaseException) -> tuple[BaseException, str | None, _TypeInfo]:
    """Find the exception to classify in the chain that starts at ``exc``.

    Wrappers (anything with an exception in ``.orig``: SQLAlchemy's ``DBAPIError``, the
    asyncpg dialect's adapted errors) are always looked into. The walk stops at the
    first other exception that has a SQLSTATE, or at the first driver-level exception
    without one (its own type says what happened: an error raised while handling
    another describes the present, not the past). Other exceptions are looked through
    via ``__cause__``, then ``__context__``. If the walk finds nothing, the innermost
    wrapper's own SQLSTATE, else the outermost driver-level exception, else ``exc``
    itself is classified. Bounded and cycle-safe; interrupts are never looked through.
    """
    info = _type_info(type(exc))
    if info.interrupt:
        return exc, None, info
    code = _own_sqlstate(exc, info)
    inner = _attr(exc, "orig")
    if inner is None and (code is not None or info.driver or _next_in_chain(exc) is None):
        return exc, code, info  # the common case: no wrapper, no chain
    node: BaseException = exc
    seen = {id(exc)}
    fallback: tuple[BaseException, str | None, _TypeInfo] | None = None
    driver_fallback: tuple[BaseException, str | None, _TypeInfo] | None = None
    for _ in range(_MAX_DEPTH):
        if isinstance(inner, Exception) and id(inner) not in seen:
            if code is not None:
                fallback = (node, code, info)  # the wrapper's own copy, if all else fails
            elif info.driver and driver_fallback is None:
                driver_fallback = (node, None, info)  # the outermost driver-level error
        else:
            if code is not None or info.driver:
                return node, code, info
            inner = _next_in_chain(node)
            if not isinstance(inner, Exception) or id(inner) in seen:
                break
        node = inner
        seen.add(id(node))
        info = _type_info(type(node))
        code = _own_sqlstate(node, info)
        inner = _attr(node, "orig")
    else:
        if code is not None or info.driver:
            return node, code, info
    return fallback or driver_fallback or (exc, None, _type_info(type(exc)))


def _session_read_only(read_only: bool | None, conn: object | None) -> bool:
    if read_only is True:
        return True
    if read_only is False or conn is None:
        return False
    return _attr(conn, "read_only") is True


def _conn_broken(conn: object | None) -> bool:
    if conn is None:
        return False
    if _attr(conn, "broken") is True:
        return True
    closed = _attr(conn, "closed")
    return isinstance(closed, int) and not isinstance(closed, bool) and closed >= 2


def _conn_closed_by_program(conn: object | None) -> bool:
    return conn is not None and _attr(conn, "closed") is True and _attr(conn, "broken") is False


def _rule_for_sqlstate(
    code: str, message: str, read_only: bool | None, conn: object | None
) -> _Rule:
    rule = _BY_SQLSTATE.get(code)
    if rule is None:
        if code == "55000" and message.lower().startswith("recovery is in progress"):
            return _RECOVERY_IN_PROGRESS
        return _rule_for_unlisted(code)
    if rule is _FEATURE_NOT_SUPPORTED:
        if _RECOVERY_LOWER in message.lower():
            rule = _READ_ONLY_RECOVERY
    elif rule is _READ_ONLY_TRANSACTION:
        if _session_read_only(read_only, conn):
            rule = _READ_ONLY_ASKED
    elif rule is _SERIALIZATION or rule is _DEADLOCK:
        lowered = message.lower()
        if "conflict with recovery" in lowered:
            if "terminating connection" in lowered:
                rule = _RECOVERY_CONFLICT_TERMINATED
            else:
                rule = _RECOVERY_CONFLICT if rule is _SERIALIZATION else _DEADLOCK_RECOVERY
    elif code == "08P01" and message.lower().startswith(_PGBOUNCER_REFUSALS):
        rule = _PGBOUNCER_REFUSED
    return rule


def _message_rule(lowered: str) -> _Rule | None:
    for needles, rule in _MESSAGE_RULES:
        for needle in needles:
            if needle in lowered:
                return rule
        if (
            rule is _CONFIG_BY_MESSAGE
            and '" does not exist' in lowered
            and _MISSING_ROLE_OR_DB_RE.search(lowered) is not None
        ):
            return rule
    return None


# What libpq says of a host it reached but refused for ``target_session_attrs``
# (read-write: ``session is read-only``; primary: ``server is in hot standby mode``).
_READ_ONLY_REFUSALS: Final = ("session is read-only", "server is in hot standby mode")
# One host's connection failure in libpq's message: ``connection to server at "h" (addr),
# port p failed: reason`` or ``connection to server on socket "path" failed: reason``.
_ATTEMPT_RE: Final = re.compile(
    r'connection to server (?:at "(?P<host>[^"]*)"(?: \([^)]*\))?, port (?P<port>\d+)'
    r'|on socket "(?P<socket>[^"]*)") failed: (?P<reason>[^\n]*)'
)
# psycopg's summary when it tried several hosts (its own multi-host loop): one line per
# attempt follows, the first line repeats the last attempt.
_ATTEMPTS_SUMMARY: Final = "Multiple connection attempts failed. All failures were:"


def read_only_hosts(message: str) -> tuple[str, ...] | None:
    """The hosts (``host:port``, or the socket path) of a failed connection attempt when
    libpq reached every one and refused each as read-only, None otherwise.

    ``message`` is the text of the connection error (``str(exc)``): libpq's, or psycopg's
    summary of one attempt per host. Each attempt must end with ``session is read-only``
    (``target_session_attrs=read-write``) or ``server is in hot standby mode``
    (``=primary``); one host down, refused for another reason or unparsable makes it None
    (the endpoint then counts as down). A host listed twice is named once, in order.
    """
    if _ATTEMPTS_SUMMARY in message:
        lines = message.split(_ATTEMPTS_SUMMARY, 1)[1].splitlines()
        attempts = [line for line in lines if line.startswith("- ")]
    else:
        attempts = [message]
    hosts: list[str] = []
    for attempt in attempts:
        found = _ATTEMPT_RE.search(attempt)
        if found is None or found["reason"].strip() not in _READ_ONLY_REFUSALS:
            return None
        host = found["socket"] or f"{found['host']}:{found['port']}"
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts) or None


def _is_conninfo_message(lowered: str) -> bool:
    for needle in _CONNINFO_MESSAGES:
        if needle in lowered:
            return True
    return "invalid" in lowered and _INVALID_VALUE_RE.search(lowered) is not None


def _rule_without_sqlstate(  # noqa: PLR0911 - a decision list, checked in order
    exc: BaseException, info: _TypeInfo, text: str, conn: object | None
) -> _Rule:
    if not info.driver:
        return info.plain
    if "failed: s" in text and read_only_hosts(text) is not None:  # cheap test first
        return _STANDBYS_ONLY
    lowered = text.lower()
    rule = _message_rule(lowered)
    if rule is not None:
        return rule
    if info.conninfo and _is_conninfo_message(lowered):
        return _CONNINFO
    if info.client_config:
        return _CLIENT_CONFIG
    if info.pipeline_aborted:
        return _PIPELINE_ABORTED
    if info.lost:
        if (
            info.psycopg
            and lowered.startswith("the connection is closed")
            and _conn_closed_by_program(conn)
        ):
            return _USED_CLOSED
        return info.plain
    if info.asyncpg_interface and (
        "connection is closed" in lowered or "connection was closed" in lowered
    ):
        return _ASYNCPG_CLOSED
    if info.psycopg and _attr(_attr(exc, "pgconn"), "status") == _BAD:
        return _PGCONN_BAD
    if _conn_broken(conn):
        return _CONN_BROKEN
    return info.plain


_VERDICTS: dict[tuple[_Rule, str | None, str, int], Verdict] = {}


def _verdict(rule: _Rule, code: str | None, message: str, phase: Phase) -> Verdict:
    retry = rule.retry
    if retry is None:  # a lost connection: what the caller was doing decides
        if phase is Phase.CONNECT:
            retry = RetryCondition.NOT_SENT
        elif phase is Phase.TRANSACTION:
            retry = RetryCondition.ROLLED_BACK
        elif phase is Phase.COMMIT:
            retry = RetryCondition.OUTCOME_UNKNOWN
        else:  # AUTOCOMMIT, UNKNOWN, or anything else passed as a phase
            retry = RetryCondition.IF_IDEMPOTENT
    key = (rule, code, message, id(retry))  # id(): Enum.__hash__ is slow Python code
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = Verdict(
            rule.kind,
            code,
            _scrub(message),
            retry,
            rule.discard,
            rule.purge,
            rule.rediscover,
            rule.reason,
        )
        if len(_VERDICTS) >= _CACHE_MAX:
            _VERDICTS.clear()
        _VERDICTS[key] = verdict
    return verdict


#: The attribute under which a connection (or an instrumented engine) leaves on an exception
#: the verdict it reached with what it knew (the phase, the connection's state): a bare
#: :func:`classify` call later reaches the same verdict.
VERDICT_ATTRIBUTE = "_pgfailover_verdict"


def attach_verdict(exc: BaseException, verdict: Verdict) -> None:
    """Leave ``verdict`` on ``exc`` for later bare :func:`classify` calls (best effort: an
    exception that refuses attributes keeps none)."""
    try:
        setattr(exc, VERDICT_ATTRIBUTE, verdict)
    except Exception:  # a read-only or slotted exception: classify from scratch later
        logger.debug("cannot attach the verdict to %s", type(exc).__qualname__)


def _classify(
    exc: BaseException, conn: object | None, read_only: bool | None, phase: Phase
) -> Verdict:
    node, code, info = _select(exc)
    if conn is None and read_only is None and phase is Phase.UNKNOWN:
        attached = _attr(node, VERDICT_ATTRIBUTE)
        if isinstance(attached, Verdict):
            return attached
    if code is not None:
        message = _primary_message(node, info)
        return _verdict(_rule_for_sqlstate(code, message, read_only, conn), code, message, phase)
    text = _text(node)
    rule = _rule_without_sqlstate(node, info, text, conn)
    if rule is info.plain and node is not exc and _attr(exc, "connection_invalidated") is True:
        # SQLAlchemy invalidated the connection: its dialect, or a handle_error listener
        # that saw the connection, judged it a disconnect (e.g. psycopg's "received 2
        # results" when a pooler delivered a dead server's FATAL with the next reply).
        rule = _WRAPPER_DISCONNECT
    return _verdict(rule, None, _first_line(text), phase)


# ----------------------------------------------------------------------- public

_UNINSPECTABLE_VERDICT: Final = Verdict(
    Kind.APPLICATION,
    None,
    "<exception that could not be inspected>",
    RetryCondition.NEVER,
    False,
    False,
    False,
    "the exception could not be inspected: treated as an application error",
)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE that :func:`classify` would base its verdict on, or ``None``.

    Driver-agnostic: psycopg 3 ``.sqlstate`` (psycopg copies ``diag.sqlstate`` there),
    asyncpg ``.sqlstate``, psycopg2 ``.pgcode`` (or, on hand-built psycopg2 errors, the
    code of their ``psycopg2.errors`` class); anything else with a five-character
    ``sqlstate``/``pgcode`` attribute too. SQLAlchemy wrappers are looked into through
    ``.orig``, other exceptions through ``__cause__``/``__context__``. Never raises.
    """
    try:
        if not isinstance(exc, Exception):
            return None
        return _select(exc)[1]
    except Exception:  # total by contract
        return None


def classify(
    exc: BaseException,
    *,
    conn: object | None = None,
    read_only: bool | None = None,
    phase: Phase = Phase.UNKNOWN,
) -> Verdict:
    """Classify ``exc`` and say whether, and on what condition, the work may run again.

    Args:
        exc: the exception raised (psycopg 3, psycopg2, asyncpg, SQLAlchemy-wrapped, or
            anything else).
        conn: the connection it was raised on, if known. Its ``read_only`` says whether
            the session asked for read-only (see ``read_only``); ``broken is True``
            (psycopg 3) or ``closed >= 2`` (psycopg2) marks an error without SQLSTATE
            as a lost connection.
        read_only: whether the session asked for read-only transactions. ``None`` (the
            default) means "ask ``conn.read_only``". A 25006 error in a session that
            asked for read-only is an application error, otherwise the node is
            read-only (a standby): a failover.
        phase: what the caller was doing. It decides the retry condition of a lost
            connection: CONNECT -> NOT_SENT, TRANSACTION -> ROLLED_BACK, COMMIT ->
            OUTCOME_UNKNOWN, AUTOCOMMIT and UNKNOWN -> IF_IDEMPOTENT. Other verdicts do
            not depend on it (a standby, a server rollback: ROLLED_BACK; a refused
            connection: NOT_SENT; application and configuration errors: NEVER).

    Total: never raises. Interrupts (KeyboardInterrupt, SystemExit,
    asyncio.CancelledError) and unknown errors are APPLICATION errors, never retried.
    """
    try:
        return _classify(exc, conn, read_only, phase)
    except Exception:  # total by contract: anything odd is an application error
        return _UNINSPECTABLE_VERDICT


def is_failover_error(exc: BaseException) -> bool:
    """True if ``exc`` is a symptom of failover (``classify(exc).is_failover``).

    Not a retry predicate: a connection lost during COMMIT is a failover symptom whose
    work may have committed. To decide whether to run work again, use
    :func:`is_retryable`.
    """
    return classify(exc).is_failover


def is_retryable(exc: BaseException, /, *, idempotent: bool = False) -> bool:
    """True if the work may run again as is: the one retry predicate, for
    ``tenacity.retry_if_exception(is_retryable)`` and ``stamina.retry(on=is_retryable)``.

    True when the work never reached the server or the server rolled it back
    (``classify(exc).retryable``); with ``idempotent=True`` (bind it with
    ``functools.partial``) also when it may have taken effect outside a COMMIT (a connection
    lost during an autocommit statement). Never true for a lost COMMIT (its work may have
    committed: only the transaction runner can look the outcome up) nor for application and
    configuration errors. Always a real bool (stamina takes other numbers as a backoff).

    An error raised on a :class:`pgfailover.Connection` (or through an engine instrumented
    by :func:`pgfailover.sqlalchemy.instrument`) carries the verdict the connection reached
    knowing what was in flight, so a connection lost inside a transaction is retryable and
    one lost during COMMIT is not; on a plain connection the phase is unknown and a
    connection lost mid-statement is not retryable.
    """
    return classify(exc).may_retry(idempotent=idempotent)
