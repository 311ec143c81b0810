"""A small client for PgBouncer's admin console (the ``pgbouncer`` database), over psycopg.

The console speaks only the simple query protocol: every command here is sent without
parameters, on an autocommit connection with ``prepare_threshold=None``, which psycopg sends
as a simple query. Results come back typed (:class:`Version`, :class:`ConfigItem`,
:class:`DatabaseRow`, :class:`ServerRow`, :class:`PoolRow`). Errors are
:class:`AdminError` subclasses whose messages never hold the password.
"""

from __future__ import annotations

import re
import select
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._secrets import scrub, secret_candidates

#: Seconds a connection attempt to the console may take when the caller gives none.
DEFAULT_CONNECT_TIMEOUT = 5.0
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$.-]*")
_AUTH_MARKERS = (
    "password authentication failed",
    "sasl authentication failed",
    "authentication failed",
    "not allowed",
    "no such user",
    "password supplied",
    "no password",
)
_NOT_CONSOLE_MARKERS = ("no such database", "does not exist", "unrecognized configuration")


class AdminError(Exception):
    """The admin console could not be used; the message says why, without the password."""


class AdminInvalidDsn(AdminError, ValueError):
    """The admin DSN cannot be parsed."""


class AdminUnreachable(AdminError):
    """No connection to the console: refused, timed out, no such host."""


class AdminAuthError(AdminError):
    """PgBouncer refused the login: wrong password, or a user that is not in
    ``admin_users`` (``not allowed``)."""


class NotAdminConsole(AdminError):
    """The server reached is not a PgBouncer admin console (a PostgreSQL server, or a
    PgBouncer database other than ``pgbouncer``)."""


class PauseTimeout(AdminError):
    """``PAUSE`` did not complete in time (clients hold server connections: a transaction in
    progress, or any client at all in session pooling); the pause was withdrawn with
    ``RESUME``."""


class Version(NamedTuple):
    """PgBouncer's version, comparable as a tuple: ``Version(1, 18, 0) < (1, 21)``."""

    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_version(text: str) -> Version | None:
    """The version in ``SHOW VERSION``'s text (``PgBouncer 1.18.0``, ``PgBouncer 1.21.0
    ...``); None when the text is not PgBouncer's."""
    match = re.match(r"\s*PgBouncer\s+(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return Version(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))


@dataclass(frozen=True)
class ConfigItem:
    """One ``SHOW CONFIG`` row: the running ``value`` (None when unset), PgBouncer's
    ``default`` (None when the console does not say, before 1.18 or for some keys) and
    whether RELOAD can change it (``changeable``)."""

    key: str
    value: str | None
    default: str | None
    changeable: bool


@dataclass(frozen=True)
class DatabaseRow:
    """One ``SHOW DATABASES`` row: ``host`` is None for the console itself and for a Unix
    socket default; ``pool_mode`` is None when the database uses the global one."""

    name: str
    host: str | None
    port: int
    database: str
    pool_mode: str | None
    paused: bool
    disabled: bool


@dataclass(frozen=True)
class ServerRow:
    """One ``SHOW SERVERS`` row: a server connection of ``database`` in ``state``
    (``active``, ``idle``, ``used``, ``tested``, ``new``) to ``addr:port``; ``close_needed``
    when PgBouncer will close it once its client releases it."""

    user: str
    database: str
    state: str
    addr: str | None
    port: int | None
    close_needed: bool


@dataclass(frozen=True)
class PoolRow:
    """One ``SHOW POOLS`` row: clients of ``database`` (as ``user``) linked to a server
    (``cl_active``) or waiting for one (``cl_waiting``), and server connections by state."""

    database: str
    user: str
    cl_active: int
    cl_waiting: int
    sv_active: int
    sv_idle: int
    sv_used: int
    sv_login: int


def _quote_name(name: str) -> str:
    """A database name as the console's parser takes it; :class:`ValueError` for a name it
    could not express."""
    if _NAME_RE.fullmatch(name):
        return name
    if '"' in name or any(ch.isspace() or not ch.isprintable() for ch in name):
        raise ValueError(f"database name {name!r} cannot be passed to the admin console")
    return f'"{name}"'


def _flag(value: object) -> bool:
    return str(value).strip().lower() in ("1", "yes", "true", "on", "t")


def _int(value: object, default: int = 0) -> int:
    try:
        return int(str(value))
    except ValueError:
        return default


class AdminConsole:
    """A connection to PgBouncer's admin console.

    ``dsn`` is a libpq conninfo or URL for the console; when it names no ``dbname``,
    ``pgbouncer`` is used. ``connect_timeout`` bounds the connection attempt, in seconds
    (rounded up to whole seconds, libpq's unit; at least 1). Opening raises
    :class:`AdminInvalidDsn`, :class:`AdminUnreachable`, :class:`AdminAuthError` or
    :class:`NotAdminConsole` (the console is confirmed with ``SHOW VERSION``). Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, dsn: str, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self._secrets = secret_candidates(dsn)
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error as ex:
            raise AdminInvalidDsn(f"cannot parse the admin DSN: {self._clean(ex)}") from None
        if not params.get("dbname"):
            dsn = make_conninfo(dsn, dbname="pgbouncer")
        self._dsn = dsn  # kept to open a second console (pause); never shown
        self._connect_timeout = max(1, int(-(-connect_timeout // 1)))
        self._conn = self._connect()
        try:
            self.version_text = self._version_text()
        except BaseException:
            self._conn.close()
            raise
        version = parse_version(self.version_text)
        if version is None:
            self._conn.close()
            raise NotAdminConsole(
                f"not a PgBouncer admin console: SHOW VERSION answered {self.version_text!r}"
            )
        #: PgBouncer's version, from ``SHOW VERSION`` at connection time.
        self.version: Version = version

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self._dsn,
                autocommit=True,
                prepare_threshold=None,
                connect_timeout=self._connect_timeout,
            )
        except psycopg.Error as ex:
            message = self._clean(ex)
            lowered = message.lower()
            if any(marker in lowered for marker in _AUTH_MARKERS):
                raise AdminAuthError(f"PgBouncer refused the login: {message}") from None
            if any(marker in lowered for marker in _NOT_CONSOLE_MARKERS):
                raise NotAdminConsole(f"not a PgBouncer admin console: {message}") from None
            raise AdminUnreachable(f"cannot connect to the admin console: {message}") from None

    def _clean(self, ex: BaseException) -> str:
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        return scrub(first, self._secrets)

    def _version_text(self) -> str:
        try:
            rows = self._rows("SHOW VERSION")
        except AdminError as ex:
            raise NotAdminConsole(f"not a PgBouncer admin console: {ex}") from None
        if not rows or "version" not in rows[0]:
            raise NotAdminConsole("not a PgBouncer admin console: SHOW VERSION returned no row")
        return str(rows[0]["version"])

    def _rows(self, command: str) -> list[dict[str, Any]]:
        try:
            cur = self._conn.execute(command)  # no parameters: the simple query protocol
            if cur.description is None:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except psycopg.Error as ex:
            raise AdminError(f"{command}: {self._clean(ex)}") from None

    # ------------------------------------------------------------------ commands
    def config(self) -> dict[str, ConfigItem]:
        """``SHOW CONFIG``: every setting by lowercased key."""
        items: dict[str, ConfigItem] = {}
        for row in self._rows("SHOW CONFIG"):
            key = str(row["key"]).lower()
            value, default = row.get("value"), row.get("default")
            items[key] = ConfigItem(
                key,
                None if value is None else str(value),
                None if default is None else str(default),
                _flag(row.get("changeable", "no")),
            )
        return items

    def settings(self) -> dict[str, str]:
        """``SHOW CONFIG`` as ``key -> value`` (unset values left out)."""
        return {k: item.value for k, item in self.config().items() if item.value is not None}

    def databases(self) -> list[DatabaseRow]:
        """``SHOW DATABASES``, the console's own ``pgbouncer`` entry included."""
        return [
            DatabaseRow(
                name=str(row["name"]),
                host=None if row.get("host") is None else str(row["host"]),
                port=_int(row.get("port"), 5432),
                database=str(row.get("database") or row["name"]),
                pool_mode=None if row.get("pool_mode") is None else str(row["pool_mode"]),
                paused=_flag(row.get("paused", 0)),
                disabled=_flag(row.get("disabled", 0)),
            )
            for row in self._rows("SHOW DATABASES")
        ]

    def servers(self) -> list[ServerRow]:
        """``SHOW SERVERS``: every server connection PgBouncer holds."""
        return [
            ServerRow(
                user=str(row.get("user")),
                database=str(row.get("database")),
                state=str(row.get("state")),
                addr=None if row.get("addr") is None else str(row["addr"]),
                port=None if row.get("port") is None else _int(row["port"]),
                close_needed=_flag(row.get("close_needed", 0)),
            )
            for row in self._rows("SHOW SERVERS")
        ]

    def pools(self) -> list[PoolRow]:
        """``SHOW POOLS``: one row per database and user."""
        return [
            PoolRow(
                database=str(row.get("database")),
                user=str(row.get("user")),
                cl_active=_int(row.get("cl_active")),
                cl_waiting=_int(row.get("cl_waiting")),
                sv_active=_int(row.get("sv_active")),
                sv_idle=_int(row.get("sv_idle")),
                sv_used=_int(row.get("sv_used")),
                sv_login=_int(row.get("sv_login")),
            )
            for row in self._rows("SHOW POOLS")
        ]

    def reload(self) -> None:
        """``RELOAD``: re-read the configuration file (a database whose connection string
        changed gets its servers reconnected as they are released)."""
        self._rows("RELOAD")

    def _on(self, verb: str, database: str | None) -> None:
        self._rows(verb if database is None else f"{verb} {_quote_name(database)}")

    def pause(self, database: str | None = None, *, timeout: float | None = None) -> None:
        """``PAUSE [db]``: wait for server connections to be released, then hold new
        queries until :meth:`resume` (None: every database).

        ``timeout`` None waits for as long as PgBouncer takes (in session pooling, until
        every client of the database disconnects). A number of seconds bounds the wait:
        past it the pause is withdrawn (``RESUME`` from a second console connection), this
        console is reconnected, and :class:`PauseTimeout` is raised.
        """
        if timeout is None:
            self._on("PAUSE", database)
            return
        command = "PAUSE" if database is None else f"PAUSE {_quote_name(database)}"
        if self._bounded(command, timeout):
            return
        stuck, self._conn = self._conn, self._connect()
        try:
            self._on("RESUME", database)
        finally:
            stuck.close()
        raise PauseTimeout(
            f"{command} did not complete within {timeout:g} s (clients hold server "
            "connections); withdrawn with RESUME"
        )

    def _bounded(self, command: str, timeout: float) -> bool:
        """Send ``command`` and wait up to ``timeout`` seconds for its answer; False when
        none came (the command is still pending on this connection)."""
        pgconn = self._conn.pgconn
        deadline = time.monotonic() + timeout
        try:
            pgconn.send_query(command.encode())  # no parameters: the simple query protocol
            while True:
                pgconn.consume_input()
                if not pgconn.is_busy():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                select.select([pgconn.socket], [], [], min(remaining, 0.05))
            errors = []
            while (result := pgconn.get_result()) is not None:
                if result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
                    errors.append(result.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY))
        except (psycopg.Error, OSError) as ex:
            raise AdminError(f"{command}: {self._clean(ex)}") from None
        if errors:
            text = (errors[0] or b"").decode(errors="replace")
            raise AdminError(f"{command}: {scrub(text, self._secrets)}")
        return True

    def resume(self, database: str | None = None) -> None:
        """``RESUME [db]`` after :meth:`pause` or :meth:`kill` (None: every database)."""
        self._on("RESUME", database)

    def reconnect(self, database: str | None = None) -> None:
        """``RECONNECT [db]`` (PgBouncer 1.15+): close each server connection once it is
        released (per the pool mode), new ones connecting afresh (None: every database)."""
        self._on("RECONNECT", database)

    def kill(self, database: str) -> None:
        """``KILL db``: drop every client and server connection of ``database`` at once;
        new clients wait until :meth:`resume`."""
        self._on("KILL", database)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> AdminConsole:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        info = self._conn.info
        return f"<AdminConsole {info.host}:{info.port} PgBouncer {self.version}>"
