"""Make a healthy primary produce the real failover errors, without a failover.

- :func:`raise_recovery_error` asks the server to raise exactly what a standby raises for
  ``BEGIN READ WRITE``: ``FeatureNotSupported`` (0A000) "cannot set transaction read-write
  mode during recovery". The connection stays open and IDLE afterwards, like the real thing.
- :func:`make_read_only` flags a connection so that every later write on it fails with the
  real ``ReadOnlySqlTransaction`` (25006), as on a standby, until the connection is replaced;
  reads keep working, as they do on a standby. Use it on direct connections: through
  PgBouncer in transaction mode a session setting can leak to other clients.

``pgfailover.Connection`` also has a flag of its own that makes every operation raise the
0A000 error (see its ``simulate_recovery``).
"""

from __future__ import annotations

from typing import Any, NoReturn

import psycopg

from .._protocol import simple_query
from ..connection import RECOVERY_ERROR_SQL

#: The statement that makes every later transaction of the session read-only.
READ_ONLY_SQL = "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"

_RECOVERY_ERROR = RECOVERY_ERROR_SQL.encode()
_READ_ONLY = READ_ONLY_SQL.encode()


def raise_recovery_error(conn: psycopg.Connection[Any]) -> NoReturn:
    """Raise the server's own 0A000 recovery error on ``conn`` (a psycopg connection)."""
    with conn.lock:
        conn.wait(simple_query(conn, _RECOVERY_ERROR))
    raise AssertionError("the server did not raise the recovery error")  # pragma: no cover


async def araise_recovery_error(conn: psycopg.AsyncConnection[Any]) -> NoReturn:
    """:func:`raise_recovery_error` on an ``AsyncConnection``: the same exchange, awaited."""
    async with conn.lock:
        await conn.wait(simple_query(conn, _RECOVERY_ERROR))
    raise AssertionError("the server did not raise the recovery error")  # pragma: no cover


def make_read_only(conn: psycopg.Connection[Any]) -> None:
    """Make every later write on ``conn`` fail with the server's 25006, until it is closed.

    Runs outside any transaction of the caller (one statement in its own implicit
    transaction, whatever the autocommit setting): ``conn`` must be idle.
    """
    _require_idle(conn)
    with conn.lock:
        conn.wait(simple_query(conn, _READ_ONLY))


async def amake_read_only(conn: psycopg.AsyncConnection[Any]) -> None:
    """:func:`make_read_only` on an ``AsyncConnection``: the same exchange, awaited."""
    _require_idle(conn)
    async with conn.lock:
        await conn.wait(simple_query(conn, _READ_ONLY))


def _require_idle(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise psycopg.ProgrammingError(
            "make_read_only needs an idle connection: commit or roll back first"
        )
