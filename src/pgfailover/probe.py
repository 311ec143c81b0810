"""Role probes: is the server behind a connection a primary that accepts writes?

Two sources, and when each can be trusted:

- **ParameterStatus** (``in_hot_standby``, ``default_transaction_read_only``, PG14+): the
  server pushes these to the session, so reading them costs no round trip. They are exact
  on a *direct* connection (a TCP forwarder such as HAProxy or a Kubernetes Service counts
  as direct: it relays the server's own messages). Through a *multiplexing pooler*
  (PgBouncer and the like) a client receives the pooler's cached startup parameters, which
  can stay stale for the pool's whole life: a client on a standby can read
  ``in_hot_standby=off``.
- **One query** (:data:`PROBE_SQL`): always exact; costs one round trip.

How pgfailover knows which case it is in: by configuration when you say so
(``pooler=False``: direct, trust ParameterStatus; ``pooler=True``: always query), and
otherwise by detection. A multiplexing pooler cannot give the client the server's real
backend PID (the client is not bound to one server process), so the first probe asks for
``pg_backend_pid()`` in the same query as the role and compares it with the PID the
connection was given at start-up: equal means direct. The answer is cached on the
connection, so later probes of a direct connection cost no round trip.

The decisions (:func:`role_from_parameters`, :func:`report_from_row`) are pure; the query is
an I/O-free generator that :func:`probe` and :func:`aprobe` drive with ``conn.wait()``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg.abc import PQGen
from psycopg.pq import TransactionStatus

from ._protocol import row_of, simple_query
from .connection import _FailoverAware

#: One round trip that tells the role, read-only-ness, the real server PID and address.
PROBE_SQL = (
    "SELECT pg_catalog.pg_is_in_recovery(), "
    "pg_catalog.current_setting('transaction_read_only') = 'on', "
    "pg_catalog.pg_backend_pid(), "
    "host(pg_catalog.inet_server_addr()), pg_catalog.inet_server_port()"
)


class Role(enum.Enum):
    """What the server behind a connection is."""

    PRIMARY = "primary"  #: not in recovery
    STANDBY = "standby"  #: in recovery (hot standby): cannot write


@dataclass(frozen=True, slots=True)
class RoleReport:
    """The result of a probe.

    ``writable`` is False on a standby and on a primary whose sessions default to read-only
    (``default_transaction_read_only=on``, e.g. during maintenance). ``source`` says where the
    answer came from. ``via_pooler`` is True when a multiplexing pooler sits between client
    and server, False when the connection is direct, None when unknown (ParameterStatus was
    trusted by configuration and nothing was checked). ``server_pid`` and ``server_address``
    (``host:port``, None over a Unix socket) are the real server's, when a query ran.
    """

    role: Role
    writable: bool
    source: Literal["parameter_status", "query"]
    via_pooler: bool | None
    server_pid: int | None = None
    server_address: str | None = None


def role_from_parameters(get: Callable[[str], str | None]) -> RoleReport | None:
    """Decide from ParameterStatus values (``get(name)``) alone; None if the server sends none.

    Only meaningful on a direct connection (see the module docstring).
    """
    hot_standby = get("in_hot_standby")
    if hot_standby is None:  # before PostgreSQL 14
        return None
    standby = hot_standby == "on"
    read_only = get("default_transaction_read_only") == "on"
    return RoleReport(
        role=Role.STANDBY if standby else Role.PRIMARY,
        writable=not standby and not read_only,
        source="parameter_status",
        via_pooler=None,
    )


def report_from_row(row: Sequence[Any], client_pid: int | None) -> RoleReport:
    """Decide from a :data:`PROBE_SQL` row and the backend PID the client was given.

    ``client_pid`` None or 0 means unknown: ``via_pooler`` is then None.
    """
    in_recovery, read_only, server_pid = bool(row[0]), bool(row[1]), int(row[2])
    via_pooler = None if not client_pid else server_pid != client_pid
    address = f"{row[3]}:{row[4]}" if len(row) > 4 and row[3] is not None else None
    return RoleReport(
        role=Role.STANDBY if in_recovery else Role.PRIMARY,
        writable=not in_recovery and not read_only,
        source="query",
        via_pooler=via_pooler,
        server_pid=server_pid,
        server_address=address,
    )


def _trusted_parameters(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], pooler: bool | None
) -> RoleReport | None:
    """The ParameterStatus answer when configuration or an earlier probe says it is exact."""
    if pooler is None:
        pooler = getattr(conn, "via_pooler", None)
    if pooler is not False:
        return None
    report = role_from_parameters(conn.info.parameter_status)
    if report is not None and getattr(conn, "via_pooler", None) is False:
        return RoleReport(report.role, report.writable, report.source, via_pooler=False)
    return report


def _known(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], pooler: bool | None
) -> RoleReport | None:
    """The answer without a round trip when ParameterStatus can be trusted, else None after
    checking that a query may run now (``ProgrammingError`` if not)."""
    trusted = _trusted_parameters(conn, pooler)
    if trusted is not None:
        return trusted
    status = conn.info.transaction_status
    if status == TransactionStatus.INERROR:
        raise psycopg.ProgrammingError(
            "cannot probe a connection in a failed transaction: roll back first"
        )
    if status == TransactionStatus.ACTIVE:
        raise psycopg.ProgrammingError("cannot probe a connection while a query runs")
    return None


_PROBE_QUERY = PROBE_SQL.encode()


def _probe_gen(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> PQGen[RoleReport]:
    """Send :data:`PROBE_SQL` as one simple-protocol query and decide from its row: an
    I/O-free generator driven by the connection's own ``wait()`` (so a pgfailover
    connection classifies a failure here like any other).

    Outside a transaction the query runs in its own implicit one: no BEGIN, no ROLLBACK,
    one round trip whatever the connection's autocommit setting; inside a transaction it
    runs there and leaves it open.
    """
    client_pid = conn.pgconn.backend_pid
    results = yield from simple_query(conn, _PROBE_QUERY)
    text = row_of(results[-1])
    row = (
        text[0] == b"t",
        text[1] == b"t",
        int(text[2] or 0),
        None if text[3] is None else bytes(text[3]).decode(),
        None if text[4] is None else int(text[4]),
    )
    return report_from_row(row, client_pid)


def _remember(conn: object, report: RoleReport) -> RoleReport:
    """Cache what a query learnt on a pgfailover connection (plain psycopg ones are left as is)."""
    if isinstance(conn, _FailoverAware):
        if report.via_pooler is not None:
            conn.via_pooler = report.via_pooler
        conn.server_address = report.server_address
    return report


def probe(conn: psycopg.Connection[Any], *, pooler: bool | None = None) -> RoleReport:
    """Tell whether ``conn``'s server is a primary that accepts writes.

    ``pooler``: None detects (one query the first time, then free on a direct
    ``pgfailover.Connection``); False trusts ParameterStatus (no round trip); True always
    queries. The query opens no transaction and leaves the connection's transaction state
    as it found it; raises ``psycopg.ProgrammingError`` on a connection in a failed
    transaction or running a query. Connection errors propagate.
    """
    known = _known(conn, pooler)
    if known is not None:
        return known
    with conn.lock:
        return _remember(conn, conn.wait(_probe_gen(conn)))


async def aprobe(conn: psycopg.AsyncConnection[Any], *, pooler: bool | None = None) -> RoleReport:
    """:func:`probe` for an ``AsyncConnection``: the same exchange, awaited."""
    known = _known(conn, pooler)
    if known is not None:
        return known
    async with conn.lock:
        return _remember(conn, await conn.wait(_probe_gen(conn)))
