"""pgfailover.Connection on a real cluster: what the event says about the node, standby
errors other than writes, lost connections, probes of plain psycopg connections, passwords.

The tests that hold for sync and async connections alike are written once in
``test_poison_async.py``, the source of ``test_poison.py``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

import pgfailover
from pgfailover import Connection, FailoverEvent, Kind, RetryCondition, Role
from pgfailover.testing import LocalCluster
from pgfailover.testing.simulate import raise_recovery_error


@pytest.fixture
def events() -> Iterator[list[FailoverEvent]]:
    """Every FailoverEvent emitted during the test."""
    seen: list[FailoverEvent] = []

    def hook(event: pgfailover.Event) -> None:
        if isinstance(event, FailoverEvent):
            seen.append(event)

    unsubscribe = pgfailover.subscribe(hook)
    yield seen
    unsubscribe()


def _table(cluster: LocalCluster) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, note text)")
    cluster.wait_replicated()
    return name


# ---------------------------------------------------------------- what a standby error says
def test_direct_connection_event_names_the_node(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """A direct connection to the demoted node reports the node's own host:port and pid."""
    cluster = pgfailover_cluster
    table = _table(cluster)
    old_primary = cluster.primary
    cluster.failover()
    # a direct connection to the old primary now lands on a standby
    with Connection.connect(old_primary.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute(f"INSERT INTO {table} (note) VALUES ('x')")
    assert len(events) == 1
    assert (events[0].node.host, events[0].node.port) == (old_primary.host, old_primary.port)
    assert events[0].node.backend_pid == pid


def test_wal_function_on_a_standby_poisons_as_read_only(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """The real server's 55000 'recovery is in progress' (a WAL function on a hot standby)
    poisons the connection as a standby, like a failing write would."""
    standby = pgfailover_cluster.standbys[0]
    with Connection.connect(standby.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.ObjectNotInPrerequisiteState):
            conn.execute("SELECT pg_current_wal_lsn()")
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.READ_ONLY
    assert len(events) == 1


# ---------------------------------------------------------------- lost connections
def test_terminated_backend_is_classified_as_lost(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """pg_terminate_backend (57P01) is noticed at the next use: the connection is poisoned as
    CONNECTION_LOST; inside a transaction the retry condition is ROLLED_BACK."""
    with Connection.connect(pgfailover_cluster.primary.dsn()) as conn:
        conn.execute("SELECT 1")  # opens a transaction
        with pgfailover_cluster.primary.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT 1")
        assert info.value.sqlstate in {"57P01", None}
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is RetryCondition.ROLLED_BACK
        assert conn.broken
    assert len(events) == 1


# ---------------------------------------------------------------- role probes
def test_probe_on_plain_psycopg_connection_and_configured_trust(
    pgfailover_cluster: LocalCluster,
) -> None:
    """probe works on a plain psycopg connection; pooler=False trusts ParameterStatus (no
    query), pooler=True always queries."""
    with psycopg.connect(pgfailover_cluster.standbys[0].dsn()) as conn:
        assert pgfailover.probe(conn, pooler=False).source == "parameter_status"
        report = pgfailover.probe(conn, pooler=True)
        assert (report.role, report.source, report.via_pooler) == (Role.STANDBY, "query", False)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


# ---------------------------------------------------------------- no password anywhere
def test_password_never_appears_in_events_logs_reprs_or_notes(
    pgfailover_cluster: LocalCluster,
    events: list[FailoverEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a DSN holding a password, nothing pgfailover produces contains it."""
    cluster = pgfailover_cluster
    password = cluster.password
    caplog.set_level(logging.DEBUG, logger="pgfailover")
    with Connection.connect(cluster.primary.dsn(), autocommit=True) as conn:
        with pytest.raises(errors.FeatureNotSupported) as info:
            raise_recovery_error(conn)
        texts: list[Any] = [
            repr(conn),
            str(info.value),
            "\n".join(getattr(info.value, "__notes__", [])),
            repr(conn.poisoned),
        ]
    texts += [repr(e) for e in events] + [e.summary() for e in events]
    texts += [r.getMessage() for r in caplog.records]
    assert events
    assert len(password) >= 12
    for text in texts:
        assert password not in text
