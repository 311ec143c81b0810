"""``pgfailover probe DSN``: what is behind each host of a (multi-host) DSN, right now.

For every host of a libpq conninfo string or URL (``host=a,b port=x,y``, ``postgresql://a:1,b:2``,
``hostaddr`` lists; one port applies to every host, like libpq) the survey connects on its own,
concurrently, and reports:

- the **role**: ``primary`` or ``standby`` by query (``pg_is_in_recovery()``), or
  ``unreachable`` (with the error);
- the **``in_hot_standby`` ParameterStatus** the server sent at login (PostgreSQL >= 14) and
  whether it *agrees* with the query. Through PgBouncer the value a client receives is the
  pool's cached copy of what the first server connection reported: measured with PgBouncer
  1.18, it stays ``on`` after the standby behind it is promoted (the server connection survives
  a promotion), so it *disagrees*;
- whether a **multiplexing pooler** (PgBouncer) sits in between: the backend PID the client got
  at login differs from ``pg_backend_pid()`` (see :mod:`pgfailover.probe`), and the real server
  behind it (``inet_server_addr():inet_server_port()``);
- for standbys, the **replication lag**: seconds since the last replayed transaction (it grows
  while the primary is idle), bytes received but not replayed, and bytes behind the primary's
  current WAL position when the survey reached exactly one primary server;
- the server version, the connect time and, for failures, a typed one-line error
  (``auth``, ``refused``, ``timeout``...) with its SQLSTATE. Passwords never appear in reports.

The decisions are pure (:func:`split_hosts`, :func:`assess`, :func:`notes`,
:func:`format_report`, :func:`to_json`, :func:`exit_code`); :func:`survey` does the I/O;
:func:`add_command` and :func:`run_command` are the CLI glue.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row

from ._secrets import scrub, secret_candidates
from .errors import InvalidConninfo
from .probe import PROBE_SQL, Role, report_from_row, role_from_parameters

#: Seconds the survey waits past ``timeout`` for a host that connected to answer its query.
GRACE = 0.5
#: ``application_name`` of the survey's connections when the DSN sets none.
APPLICATION_NAME = "pgfailover-probe"

#: :data:`pgfailover.probe.PROBE_SQL` (role, read-only, server PID, server address) followed by
#: the server version, the postmaster start time, the primary's current WAL position and, on
#: a standby, the last received and replayed WAL positions and the seconds since the last
#: replayed transaction. One round trip; every function is available to any user.
SURVEY_SQL = (
    PROBE_SQL
    + ", pg_catalog.current_setting('server_version')"
    + ", pg_catalog.pg_postmaster_start_time()::text"
    + ", CASE WHEN NOT pg_catalog.pg_is_in_recovery()"
    " THEN pg_catalog.pg_current_wal_lsn()::text END" + ", CASE WHEN pg_catalog.pg_is_in_recovery()"
    " THEN pg_catalog.pg_last_wal_receive_lsn()::text END"
    + ", CASE WHEN pg_catalog.pg_is_in_recovery()"
    " THEN pg_catalog.pg_last_wal_replay_lsn()::text END"
    + ", CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.date_part('epoch',"
    " pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp())::float8 END"
)
_PROBE_COLUMNS = 5  # the leading columns that are PROBE_SQL's

HostRole = Literal["primary", "standby", "unreachable"]
Agreement = Literal["agrees", "disagrees", "not reported"]
ErrorKind = Literal[
    "auth", "no-database", "refused", "timeout", "dns", "unavailable", "lost", "other"
]

# Conninfo keywords whose value is a secret.
# Multi-host routing options that would make a single-host probe refuse a host.
_ROUTING_KEYS = ("target_session_attrs", "load_balance_hosts")


@dataclass(frozen=True, slots=True)
class HostTarget:
    """One host of a DSN, with the conninfo to reach that host alone.

    ``host`` is a host name, an IP address or a Unix-socket directory (an absolute path);
    None means libpq's default (``PGHOST``, else the default socket directory). ``hostaddr``
    is the numeric address to connect to (``host`` is then only used for TLS and
    authentication), None if not given. ``port`` is None when the DSN gives none: libpq's
    default (``PGPORT``, else 5432). ``conninfo`` keeps every other parameter of the DSN,
    the password included (it is left out of ``repr``); multi-host routing options
    (``target_session_attrs``, ``load_balance_hosts``) are dropped so that every host can be
    probed whatever its role.
    """

    host: str | None
    port: int | None
    hostaddr: str | None = None
    conninfo: str = field(default="", repr=False, compare=False)

    @property
    def address(self) -> str:
        """``host:port`` for display (``[v6]:port``; no port when the DSN gives none)."""
        name = self.host or self.hostaddr or "(default host)"
        if self.host and self.hostaddr and self.hostaddr != self.host:
            name = f"{self.host} ({self.hostaddr})"
        elif ":" in name and not name.startswith("/"):
            name = f"[{name}]"
        return name if self.port is None else f"{name}:{self.port}"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a host could not be probed.

    ``kind``: ``auth`` (SQLSTATE class 28: bad password, no pg_hba.conf entry, unknown role),
    ``no-database`` (3D000), ``refused`` (nothing listens), ``timeout`` (no answer within the
    timeout), ``dns`` (the name does not resolve), ``unavailable`` (starting up, shutting
    down, too many connections: 57P03/53300), ``lost`` (connected, then the connection broke
    during the query), ``other``. ``sqlstate`` is the server's code when the driver has one;
    psycopg reports connection-time failures without one, so it is then inferred from the
    message (``08001`` for refused, timed out and unresolvable hosts), None if nothing fits.
    ``sqlstate_class`` names the class (``"28 invalid authorization specification"``).
    ``message`` is one line without a password.
    """

    kind: ErrorKind
    sqlstate: str | None
    sqlstate_class: str | None
    message: str


@dataclass(frozen=True, slots=True)
class HostObservation:
    """What one connection attempt saw, before any judgement (input of :func:`assess`).

    ``connect_ms`` is the time from the start of the attempt until the connection was made or
    failed, in milliseconds (None if unknown). ``client_pid`` is the backend PID the client was
    given at login (a pooler's made-up key behind PgBouncer). ``parameters`` holds the
    ParameterStatus values the server sent at login (``in_hot_standby``,
    ``default_transaction_read_only``, ``server_version``; a name is absent when not sent).
    ``row`` is the :data:`SURVEY_SQL` row, None when the query did not run; ``error`` says why.
    """

    target: HostTarget
    connect_ms: float | None = None
    client_pid: int | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    row: tuple[Any, ...] | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class HostReport:
    """The assessed state of one host of the DSN.

    - ``address``: the host as listed in the DSN (``host:port``).
    - ``role``: ``primary`` / ``standby`` by ``pg_is_in_recovery()``, ``unreachable`` when the
      query got no answer (``error`` says why).
    - ``writable``: a primary whose sessions are not read-only by default; None if unreachable.
    - ``via_pooler``: True when a multiplexing pooler (PgBouncer) answered for the server,
      False when direct, None when unknown (unreachable, or no backend PID at login).
    - ``server_address``: ``ip:port`` of the PostgreSQL server that ran the query (behind a
      pooler: the pooler's target); None over a Unix socket or when unreachable.
    - ``server_version``: the server's ``server_version`` (``"15.18 (Debian ...)"``), None if
      unknown.
    - ``connect_ms``: time to connect (name resolution, TCP, TLS, authentication) or to fail,
      in milliseconds; None if unknown.
    - ``in_hot_standby``: the ParameterStatus value received at login (``"on"``/``"off"``),
      None when not reported (PostgreSQL < 14, or unreachable).
    - ``parameter_status``: ``agrees`` / ``disagrees``: whether ``in_hot_standby`` tells the
      same role as the query; ``not reported``: no ``in_hot_standby``; None if unreachable.
    - ``lag_seconds`` (standbys): ``now() - pg_last_xact_replay_timestamp()`` in seconds; it
      grows while the primary writes nothing, so read it with the byte lags. None on a
      primary, or when no transaction was replayed since the standby started.
    - ``unreplayed_bytes`` (standbys): WAL received but not yet replayed
      (``pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn()``, floored at 0); None when no
      WAL receiver runs (e.g. recovery from an archive) or on a primary.
    - ``behind_primary_bytes`` (standbys): the primary's ``pg_current_wal_lsn()`` minus this
      standby's replay position, floored at 0 (the two are read a few milliseconds apart);
      None unless the survey reached exactly one primary server.
    - ``wal_lsn``: the primary's current WAL position, or the standby's replay position.
    - ``started_at``: ``pg_postmaster_start_time()``; with ``server_address`` it tells whether
      two hosts (a pooler and a direct address) are the same server.
    - ``error``: why the host could not be probed, None when it was.
    """

    address: str
    role: HostRole
    writable: bool | None = None
    via_pooler: bool | None = None
    server_address: str | None = None
    server_version: str | None = None
    connect_ms: float | None = None
    in_hot_standby: str | None = None
    parameter_status: Agreement | None = None
    lag_seconds: float | None = None
    unreplayed_bytes: int | None = None
    behind_primary_bytes: int | None = None
    wal_lsn: str | None = None
    started_at: str | None = None
    error: ErrorInfo | None = None

    @property
    def server_key(self) -> tuple[str, str | None]:
        """What identifies the server that answered: its address (the DSN's when the server
        gives none, over a Unix socket) and its start time."""
        return (self.server_address or self.address, self.started_at)


# ------------------------------------------------------------------------------- parsing


def split_hosts(conninfo: str) -> list[HostTarget]:
    """Split a conninfo string or URL into one :class:`HostTarget` per host, in order.

    Follows libpq: ``host`` and ``hostaddr`` are comma-separated lists of equal length (either
    may be absent), ``port`` is one value for every host or one per host; an empty entry means
    libpq's default. A DSN without any host gives one target with ``host=None``. Environment
    variables are not read (libpq applies them when connecting). Raises
    :class:`InvalidConninfo` on a string libpq cannot parse, mismatched lists, a port that is
    not a number in 1-65535, or a ``hostaddr`` that is not a numeric IP address.
    """
    error: InvalidConninfo | None = None
    try:
        params: dict[str, Any] = conninfo_to_dict(conninfo)
    except psycopg.Error as ex:
        reason = _first_line(str(ex)) or type(ex).__name__
        error = InvalidConninfo(
            "cannot parse the connection string: " + scrub(reason, secret_candidates(conninfo))
        )
    if error is not None:  # raised here: psycopg's error, which quotes the DSN, is no context
        raise error
    hosts = _split(params.get("host"))
    hostaddrs = _split(params.get("hostaddr"))
    ports = _split(params.get("port"))
    if hosts and hostaddrs and len(hosts) != len(hostaddrs):
        raise InvalidConninfo(
            f"{len(hosts)} host names but {len(hostaddrs)} hostaddr values: give one each"
        )
    count = max(len(hosts), len(hostaddrs), 1)
    if len(ports) > 1 and len(ports) != count:
        raise InvalidConninfo(
            f"{len(ports)} ports for {count} hosts: give one port for all, or one per host"
        )
    if len(ports) == 1:
        ports *= count
    for key in (*_ROUTING_KEYS, "host", "hostaddr", "port"):
        params.pop(key, None)
    targets = []
    for i in range(count):
        host = (hosts[i] if hosts else "") or None
        hostaddr = (hostaddrs[i] if hostaddrs else "") or None
        port = _port(ports[i]) if ports else None
        if hostaddr is not None:
            _check_hostaddr(hostaddr)
        single = {**params, "host": host, "hostaddr": hostaddr, "port": port}
        targets.append(HostTarget(host, port, hostaddr, make_conninfo("", **single)))
    return targets


def _split(value: object) -> list[str]:
    return str(value).split(",") if value not in (None, "") else []


def _port(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise InvalidConninfo(f"invalid port {text!r}: expected a number in 1-65535")
    return int(text)


def _check_hostaddr(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidConninfo(
            f"invalid hostaddr {value!r}: expected a numeric IP address (use host= for names)"
        ) from None


# Where passwords hide in a raw DSN: keyword values (quoted or not) and URL userinfo.
# ------------------------------------------------------------------------------ decisions


def lsn_to_int(lsn: str) -> int:
    """A ``pg_lsn`` text (``"16/B374D848"``) as a byte position."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def assess(observations: Sequence[HostObservation]) -> list[HostReport]:
    """Judge every observation, then compute the standbys' lag behind the primary.

    ``behind_primary_bytes`` is set only when the observations hold exactly one primary
    server (a pooler and a direct address of the same server count once).
    """
    reports = [_assess_one(obs) for obs in observations]
    primaries = {r.server_key: r for r in reports if r.role == "primary"}
    if len(primaries) != 1:
        return reports
    (primary,) = primaries.values()
    if primary.wal_lsn is None:
        return reports
    current = lsn_to_int(primary.wal_lsn)
    return [
        dataclasses.replace(r, behind_primary_bytes=max(0, current - lsn_to_int(r.wal_lsn)))
        if r.role == "standby" and r.wal_lsn is not None
        else r
        for r in reports
    ]


def _assess_one(obs: HostObservation) -> HostReport:
    address = obs.target.address
    if obs.row is None:
        error = obs.error or ErrorInfo("other", None, None, "no answer")
        return HostReport(address, "unreachable", connect_ms=obs.connect_ms, error=error)
    row = obs.row
    by_query = report_from_row(row[:_PROBE_COLUMNS], obs.client_pid)
    by_parameters = role_from_parameters(obs.parameters.get)
    agreement: Agreement = "not reported"
    if by_parameters is not None:
        agreement = "agrees" if by_parameters.role is by_query.role else "disagrees"
    version, started, current_lsn, receive_lsn, replay_lsn, lag = row[_PROBE_COLUMNS:]
    standby = by_query.role is Role.STANDBY
    unreplayed = None
    if standby and receive_lsn is not None and replay_lsn is not None:
        unreplayed = max(0, lsn_to_int(receive_lsn) - lsn_to_int(replay_lsn))
    return HostReport(
        address=address,
        role="standby" if standby else "primary",
        writable=by_query.writable,
        via_pooler=by_query.via_pooler,
        server_address=by_query.server_address,
        server_version=version or obs.parameters.get("server_version"),
        connect_ms=obs.connect_ms,
        in_hot_standby=obs.parameters.get("in_hot_standby"),
        parameter_status=agreement,
        lag_seconds=float(lag) if standby and lag is not None else None,
        unreplayed_bytes=unreplayed,
        wal_lsn=replay_lsn if standby else current_lsn,
        started_at=started,
    )


def primary_servers(reports: Sequence[HostReport]) -> list[HostReport]:
    """One report per distinct primary server reached (the first host that showed it)."""
    seen: dict[tuple[str, str | None], HostReport] = {}
    for report in reports:
        if report.role == "primary":
            seen.setdefault(report.server_key, report)
    return list(seen.values())


def exit_code(reports: Sequence[HostReport]) -> int:
    """0 when exactly one primary server was reached, 1 when none or several."""
    return 0 if len(primary_servers(reports)) == 1 else 1


def notes(reports: Sequence[HostReport]) -> list[str]:
    """Findings that need a reader's attention, most serious first (empty when all is well)."""
    found: list[str] = []
    primaries = primary_servers(reports)
    if not primaries:
        found.append("no primary reachable: writes will fail")
    elif len(primaries) > 1:
        names = ", ".join(_server_name(p) for p in primaries)
        found.append(f"{len(primaries)} primaries: split brain? ({names})")
    for r in reports:
        if r.role == "standby" and r.via_pooler:
            found.append(
                f"{r.address}: PgBouncer (a pooler) in front of a standby"
                f" ({r.server_address or 'unknown server'}): writes will fail"
            )
        if r.role == "primary" and r.writable is False:
            found.append(
                f"{r.address}: primary, but read-only by default"
                " (default_transaction_read_only=on): writes will fail"
            )
        if r.parameter_status == "disagrees":
            where = "a pooler's cached value" if r.via_pooler else "changed since login"
            found.append(
                f"{r.address}: in_hot_standby={r.in_hot_standby} disagrees with"
                f" pg_is_in_recovery() ({r.role}): {where}; clients that trust ParameterStatus"
                " (libpq target_session_attrs) are misled"
            )
        if (
            r.role == "standby"
            and r.lag_seconds is not None
            and r.lag_seconds >= 1
            and r.behind_primary_bytes == 0
        ):
            found.append(
                f"{r.address}: last replayed transaction {r.lag_seconds:.1f} s ago but 0 bytes"
                " behind the primary: the primary is idle, the standby is caught up"
            )
        if r.role != "unreachable" and r.via_pooler is None:
            found.append(f"{r.address}: cannot tell whether a pooler is in between")
    unreachable = sum(r.role == "unreachable" for r in reports)
    if unreachable:
        found.append(f"{unreachable} of {len(reports)} hosts unreachable")
    return found


def _server_name(report: HostReport) -> str:
    if report.via_pooler and report.server_address:
        return f"{report.server_address} via {report.address}"
    return report.server_address or report.address


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{value} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _row(report: HostReport) -> list[str]:
    if report.via_pooler:
        via = f"pooler -> {report.server_address or '?'}"
    else:
        via = {False: "direct", None: "-" if report.role == "unreachable" else "?"}[
            report.via_pooler
        ]
    if report.parameter_status is None:
        hot = "-"
    elif report.in_hot_standby is None:
        hot = "not reported"
    else:
        hot = f"{report.in_hot_standby}, {report.parameter_status}"
    version = report.server_version.split()[0] if report.server_version else "-"
    connect = f"{report.connect_ms:.1f} ms" if report.connect_ms is not None else "-"
    lag = f"{report.lag_seconds:.3f} s" if report.lag_seconds is not None else "-"
    role: str = report.role
    if report.role == "primary" and report.writable is False:
        role = "primary (read-only)"
    return [
        report.address,
        role,
        via,
        hot,
        version,
        connect,
        lag,
        _bytes(report.unreplayed_bytes),
        _bytes(report.behind_primary_bytes),
    ]


_HEADER = [
    "HOST",
    "ROLE",
    "VIA",
    "IN_HOT_STANDBY",
    "VERSION",
    "CONNECT",
    "REPLAY_LAG",
    "UNREPLAYED",
    "BEHIND_PRIMARY",
]


def format_report(reports: Sequence[HostReport]) -> str:
    """A fixed-width table (one line per host), then the errors and the :func:`notes`.

    ``REPLAY_LAG`` is ``lag_seconds``, ``UNREPLAYED`` ``unreplayed_bytes``, ``BEHIND_PRIMARY``
    ``behind_primary_bytes``; ``-`` means not applicable or unknown.
    """
    rows = [_HEADER, *(_row(r) for r in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    errors = [r for r in reports if r.error is not None]
    if errors:
        lines += ["", "errors:"]
        for r in errors:
            assert r.error is not None
            code = ""
            if r.error.sqlstate:
                name = (r.error.sqlstate_class or "")[3:]
                code = f" [{r.error.sqlstate}{' ' + name if name else ''}]"
            lines.append(f"  {r.address}: {r.error.kind}{code}: {r.error.message}")
    found = notes(reports)
    if found:
        lines += ["", "notes:", *(f"  - {n}" for n in found)]
    return "\n".join(lines)


def to_json(reports: Sequence[HostReport]) -> str:
    """The reports as a JSON document (2-space indent).

    ``{"hosts": [HostReport fields, error as an object or null], "primaries": [``ip:port`` of
    each distinct primary server reached, the pooler's target for a pooler], "notes": [...],
    "exit_code": 0 or 1}``.
    Lags are numbers (seconds, bytes) or null.
    """
    document = {
        "hosts": [dataclasses.asdict(r) for r in reports],
        "primaries": [r.server_address or r.address for r in primary_servers(reports)],
        "notes": notes(reports),
        "exit_code": exit_code(reports),
    }
    return json.dumps(document, indent=2)


# ---------------------------------------------------------------------------------- errors

_CLASSES = {
    "08": "connection exception",
    "28": "invalid authorization specification",
    "3D": "invalid catalog name",
    "53": "insufficient resources",
    "57": "operator intervention",
}
# Connection-time messages (psycopg gives no SQLSTATE then) -> (kind, SQLSTATE), in order.
_MESSAGE_CODES: tuple[tuple[str, ErrorKind, str], ...] = (
    ("password authentication failed", "auth", "28P01"),
    ("sasl authentication failed", "auth", "28P01"),
    ("authentication failed", "auth", "28000"),
    ("no password supplied", "auth", "28P01"),
    ("no pg_hba.conf entry", "auth", "28000"),
    ("pg_hba.conf rejects", "auth", "28000"),
    ('role "', "auth", "28000"),  # role "x" does not exist
    ('database "', "no-database", "3D000"),  # database "x" does not exist
    ("no such database", "no-database", "3D000"),  # PgBouncer's wording
    ("fatal:  not allowed", "auth", "28000"),  # PgBouncer's admin console refusing the user
    ("no such user", "auth", "28000"),  # PgBouncer's wording
    ("the database system is", "unavailable", "57P03"),
    ("too many clients", "unavailable", "53300"),
    ("remaining connection slots", "unavailable", "53300"),
    ("no more connections allowed", "unavailable", "53300"),  # PgBouncer's max_client_conn
    ("connection refused", "refused", "08001"),
    ("timeout expired", "timeout", "08001"),
    ("timed out", "timeout", "08001"),
    ("failed to resolve host", "dns", "08001"),
    ("could not translate host name", "dns", "08001"),
    ("name or service not known", "dns", "08001"),
)
_SERVER_FAILED_RE = re.compile(r"connection to server (?:at|on socket) .*? failed: (.*)$")


def error_info(exc: BaseException, secrets: Iterable[str] = (), *, connected: bool) -> ErrorInfo:
    """Describe ``exc`` in one line without any of ``secrets`` (the DSN's passwords).

    ``connected`` says whether the connection was made before the failure: a connection
    error after it is ``lost``.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    failures = [m.group(1) for line in lines if (m := _SERVER_FAILED_RE.search(line))]
    message = failures[-1] if failures else (lines[0] if lines else type(exc).__name__)
    message = scrub(" ".join(message.split()), secrets)
    lowered = str(exc).lower()
    sqlstate = getattr(exc, "sqlstate", None)
    kind: ErrorKind = "other"
    if isinstance(exc, psycopg.errors.ConnectionTimeout):
        kind, sqlstate = "timeout", sqlstate or "08001"
    elif sqlstate:
        kind = _kind_of_sqlstate(sqlstate, connected=connected)
    else:
        for needle, needle_kind, code in _MESSAGE_CODES:
            if needle in lowered:
                kind, sqlstate = needle_kind, code
                break
        if connected and kind in ("other", "refused", "timeout"):
            kind = "lost"
    cls = _CLASSES.get(sqlstate[:2]) if sqlstate else None
    return ErrorInfo(kind, sqlstate, f"{sqlstate[:2]} {cls}" if sqlstate and cls else None, message)


def _kind_of_sqlstate(sqlstate: str, *, connected: bool) -> ErrorKind:
    if sqlstate.startswith("28"):
        return "auth"
    if sqlstate.startswith("3D"):
        return "no-database"
    if sqlstate in ("57P03", "53300"):
        return "unavailable"
    if connected and sqlstate.startswith(("08", "57P")):  # connection failure, shutdown, crash
        return "lost"
    return "other"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# -------------------------------------------------------------------------------------- I/O


def _observe(target: HostTarget, timeout: float, secrets: Sequence[str]) -> HostObservation:
    """Connect to one target, read its login parameters, run :data:`SURVEY_SQL`. Never raises."""
    extra: dict[str, Any] = {"connect_timeout": str(max(2, math.ceil(timeout)))}  # libpq: >= 2
    if psycopg.pq.version() >= 120000:  # libpq 12+: drop a host that stops acknowledging
        extra["tcp_user_timeout"] = str(max(1, round(timeout * 1000)))
    if "application_name" not in conninfo_to_dict(target.conninfo):
        extra["application_name"] = APPLICATION_NAME
    started = time.perf_counter()
    try:
        conn = psycopg.connect(target.conninfo, autocommit=True, prepare_threshold=None, **extra)
    except Exception as ex:  # the report says what it was
        elapsed = (time.perf_counter() - started) * 1000
        return HostObservation(target, elapsed, error=error_info(ex, secrets, connected=False))
    connect_ms = (time.perf_counter() - started) * 1000
    try:
        with conn:
            # Read at login, before any query: a pooler may forward a fresher value later.
            parameters = {
                name: value
                for name in ("in_hot_standby", "default_transaction_read_only", "server_version")
                if (value := conn.info.parameter_status(name)) is not None
            }
            client_pid = conn.info.backend_pid
            with conn.cursor(row_factory=tuple_row) as cur:
                row = cur.execute(SURVEY_SQL, prepare=False).fetchone()
    except Exception as ex:  # the report says what it was
        return HostObservation(target, connect_ms, error=error_info(ex, secrets, connected=True))
    return HostObservation(target, connect_ms, client_pid, parameters, row)


def survey(conninfo: str, *, timeout: float = 3.0) -> list[HostReport]:
    """Probe every host of ``conninfo`` concurrently; one :class:`HostReport` per host, in order.

    ``timeout`` (seconds, > 0) bounds each host's connection (libpq's ``connect_timeout``,
    rounded up, at least 2 s) and the whole survey: it returns within ``timeout`` +
    :data:`GRACE` seconds even if a host never answers; such a host is reported
    ``unreachable`` with a ``timeout`` error (its thread, a daemon, is abandoned and ends
    on its own). Raises :class:`InvalidConninfo` for a DSN that cannot be split, ValueError
    for a bad ``timeout``; connection errors are reported, never raised.
    """
    if not timeout > 0 or math.isinf(timeout):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    targets = split_hosts(conninfo)
    secrets = secret_candidates(conninfo)
    results: dict[int, HostObservation] = {}
    done = threading.Condition()

    def work(index: int, target: HostTarget) -> None:
        observation = _observe(target, timeout, secrets)
        with done:
            results[index] = observation
            done.notify_all()

    started = time.perf_counter()
    for index, target in enumerate(targets):
        threading.Thread(
            target=work, args=(index, target), name=f"pgfailover-probe-{index}", daemon=True
        ).start()
    with done:
        done.wait_for(lambda: len(results) == len(targets), timeout=timeout + GRACE)
        finished = dict(results)
    waited_ms = (time.perf_counter() - started) * 1000
    late = ErrorInfo(
        "timeout", "08001", "08 connection exception", f"no answer within {timeout:g} s"
    )
    observations = [
        finished.get(i) or HostObservation(target, waited_ms, error=late)
        for i, target in enumerate(targets)
    ]
    return assess(observations)


# -------------------------------------------------------------------------------------- CLI


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``probe`` sub-command: ``probe DSN [--timeout SECONDS] [--json]``."""
    parser = subparsers.add_parser(
        "probe",
        help="report the role, lag and pooler of every host of a DSN",
        description=(
            "Connect to each host of a (multi-host) libpq DSN or URL and report its role "
            "(pg_is_in_recovery() and the in_hot_standby ParameterStatus), replication lag, "
            "whether PgBouncer sits in front of it, its version and connect time. Exit status: "
            "0 when exactly one primary was reached, 1 when none or several, 2 for bad input."
        ),
    )
    parser.add_argument(
        "dsn",
        help="libpq conninfo or URL, e.g. 'host=db1,db2 port=5432 dbname=app user=app'; "
        "prefer PGPASSWORD or a passfile to a password on the command line",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=3.0,
        metavar="SECONDS",
        help=f"per-host connect timeout in seconds; the probe ends within it plus {GRACE:g} s "
        "(default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_command(
    args: argparse.Namespace,
    out: Callable[[str], None] = print,
    *,
    err: Callable[[str], None] | None = None,
) -> int:
    """Run ``probe`` with parsed ``args`` (``dsn``, ``timeout``, ``json``); the exit code.

    Prints the table (or JSON with ``--json``) through ``out``: 0 when exactly one primary
    server was reached, 1 when none or several. Bad input (unparseable DSN, timeout not > 0)
    prints one line through ``err`` (default: standard error) and returns 2.
    """
    if err is None:

        def err(line: str) -> None:
            print(line, file=sys.stderr)

    timeout = getattr(args, "timeout", 3.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        err(f"pgfailover probe: timeout must be a number of seconds, got {timeout!r}")
        return 2
    try:
        reports = survey(str(args.dsn), timeout=float(timeout))
    except ValueError as ex:  # InvalidConninfo included
        err(f"pgfailover probe: {ex}")
        return 2
    out(to_json(reports) if getattr(args, "json", False) else format_report(reports))
    return exit_code(reports)
