"""Event delivery and formatting in pgfailover.events."""

from __future__ import annotations

import logging

import psycopg.errors
import pytest

from pgfailover import classify, events
from pgfailover.events import FailoverEvent, NodeInfo


def _event() -> FailoverEvent:
    exc = psycopg.errors.lookup("25006")("cannot execute INSERT in a read-only transaction")
    return FailoverEvent(
        verdict=classify(exc),
        node=NodeInfo("127.0.0.1", 6432, 123, True, "127.0.0.1:5433"),
        action="connection poisoned",
        error_type="psycopg.errors.ReadOnlySqlTransaction",
        stack=events.caller_stack(),
    )


def test_emit_logs_once_at_warning_with_the_facts(caplog: pytest.LogCaptureFixture) -> None:
    """One WARNING record on pgfailover.events with SQLSTATE, node, verdict, action, stack."""
    caplog.set_level(logging.DEBUG, logger="pgfailover")
    events._emit(_event())
    records = [r for r in caplog.records if r.name == "pgfailover.events"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    for fact in ("25006", "127.0.0.1:6432", "server 127.0.0.1:5433", "read_only", "poisoned"):
        assert fact in message
    assert "test_events.py" in message  # the caller's stack


def test_hooks_receive_events_and_can_unsubscribe() -> None:
    """A subscribed hook gets each event once (even if subscribed twice) until unsubscribed."""
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    events.subscribe(seen.append)
    events._emit(_event())
    unsubscribe()
    events._emit(_event())
    assert len(seen) == 1


def test_a_failing_hook_is_logged_and_does_not_stop_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook that raises is logged with its traceback; later hooks still run."""
    seen: list[events.Event] = []

    def broken(event: events.Event) -> None:
        raise RuntimeError("hook bug")

    undo_broken = events.subscribe(broken)
    undo_seen = events.subscribe(seen.append)
    try:
        events._emit(_event())
    finally:
        undo_broken()
        undo_seen()
    assert len(seen) == 1
    assert any("hook bug" in (r.exc_text or "") for r in caplog.records)


def test_caller_stack_drops_library_frames() -> None:
    """The stack ends at the caller's frame, not inside pgfailover or psycopg."""
    stack = events.caller_stack()
    assert stack.rstrip().splitlines()[-2].strip().startswith('File "')
    assert "test_caller_stack_drops_library_frames" in stack.rstrip().splitlines()[-2]


def test_node_info_string_names_the_server_behind_a_pooler() -> None:
    """Through a pooler the node string has the endpoint, the pid and the real server."""
    assert str(NodeInfo("h", 1, 2, True, "s:3")) == "h:1 pid 2 via pooler (server s:3)"
    assert str(NodeInfo("h", 1, None, False, None)) == "h:1 direct"
    assert str(NodeInfo(None, None, None, None)) == "unknown node"
