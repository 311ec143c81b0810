"""The event lines pgfailover logs (``pgfailover -v drill`` shows them): readable when the
error has no SQLSTATE."""

from __future__ import annotations

import psycopg
import psycopg.errors

from pgfailover import classify
from pgfailover.events import FailoverEvent, NodeInfo, RetryEvent

NODE = NodeInfo("127.0.0.1", 6432, 4242, True, "127.0.0.1:5433")


def test_event_lines_name_a_missing_sqlstate_instead_of_dashes() -> None:
    """A lost connection has no SQLSTATE: its failover and retry lines say "(no SQLSTATE)"
    where the code goes, never a row of dashes."""
    verdict = classify(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert verdict.sqlstate is None
    failover = FailoverEvent(verdict, NODE, "connection discarded", "psycopg.OperationalError")
    retry = RetryEvent(1, 0.05, "retry", verdict, "psycopg.OperationalError", 0.1)
    assert failover.summary().startswith("(no SQLSTATE) psycopg.OperationalError: server closed")
    assert "failed after 0.100 s: (no SQLSTATE) psycopg.OperationalError: " in retry.summary()
    assert "-----" not in failover.summary() + retry.summary()


def test_event_lines_start_with_the_sqlstate_when_there_is_one() -> None:
    """With a SQLSTATE the line leads with it, as before."""
    error = psycopg.errors.lookup("25006")("cannot execute INSERT in a read-only transaction")
    verdict = classify(error)
    event = FailoverEvent(verdict, NODE, "connection poisoned", "ReadOnlySqlTransaction")
    assert event.summary().startswith("25006 ReadOnlySqlTransaction: cannot execute INSERT")
