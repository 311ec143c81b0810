"""Protocol exchanges written once for sync and async: I/O-free generators that a
connection's own ``wait()`` drives (psycopg's ``generators.py`` pattern).

``conn.wait(simple_query(conn, sql))`` on a ``psycopg.Connection``, ``await conn.wait(...)``
on an ``AsyncConnection``: the same bytes on the wire, and on a ``pgfailover.Connection``
a failure is classified like any other operation's.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.abc import PQGen
from psycopg.generators import execute
from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGresult

_OK = (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK)


def simple_query(conn: Any, sql: bytes) -> PQGen[list[PGresult]]:
    """Send ``sql`` (one or more statements) as one simple-protocol message and return the
    results, one per statement.

    No cursor, no BEGIN of psycopg's own: outside a transaction each statement runs in its
    own implicit one (or the transaction ``sql`` begins itself). A server error is raised
    inside the generator as psycopg's own exception class, as psycopg's cursors do; a result
    that is neither a command nor rows raises ``psycopg.InternalError``.
    """
    pgconn = conn.pgconn
    pgconn.send_query(sql)
    results: list[PGresult] = yield from execute(pgconn)
    for result in results:
        if result.status == ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        if result.status not in _OK:
            raise psycopg.InternalError(f"unexpected result status: {result.status!r}")
    return results


def row_of(result: PGresult) -> list[bytes | None]:
    """The single row of ``result`` as the server's text values; ``InternalError`` unless
    there is exactly one."""
    if result.ntuples != 1:
        raise psycopg.InternalError(f"expected one row, got {result.ntuples}")
    return [result.get_value(0, i) for i in range(result.nfields)]
