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

from ..connection import RECOVERY_ERROR_SQL

#: The statement that makes every later transaction of the session read-only.
READ_ONLY_SQL = "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"


def raise_recovery_error(conn: psycopg.Connection[Any]) -> NoReturn:
    """Raise the server's own 0A000 recovery error on ``conn`` (a psycopg connection)."""
    conn.execute(RECOVERY_ERROR_SQL)
    raise AssertionError("the server did not raise the recovery error")  # pragma: no cover


async def araise_recovery_error(conn: psycopg.AsyncConnection[Any]) -> NoReturn:
    """Async twin of :func:`raise_recovery_error`."""
    await conn.execute(RECOVERY_ERROR_SQL)
    raise AssertionError("the server did not raise the recovery error")  # pragma: no cover


def make_read_only(conn: psycopg.Connection[Any]) -> None:
    """Make every later write on ``conn`` fail with the server's 25006, until it is closed.

    Runs outside any transaction of the caller: ``conn`` must be idle.
    """
    _require_idle(conn)
    conn.execute(READ_ONLY_SQL)
    if not conn.autocommit:
        conn.commit()


async def amake_read_only(conn: psycopg.AsyncConnection[Any]) -> None:
    """Async twin of :func:`make_read_only`."""
    _require_idle(conn)
    await conn.execute(READ_ONLY_SQL)
    if not conn.autocommit:
        await conn.commit()


def _require_idle(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise psycopg.ProgrammingError(
            "make_read_only needs an idle connection: commit or roll back first"
        )
