"""pgfailover.Connection / AsyncConnection on a real cluster: poisoning, events, probes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row

import pgfailover
from pgfailover import AsyncConnection, Connection, FailoverEvent, Kind, RetryCondition, Role
from pgfailover.testing import LocalCluster
from pgfailover.testing.simulate import araise_recovery_error, raise_recovery_error


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


def _event_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pgfailover.events"]


# ---------------------------------------------------------------- failover through PgBouncer
@pytest.mark.parametrize("shape", ["plain-insert-25006", "begin-read-write-0A000"])
def test_first_failing_write_after_failover_poisons_the_connection(
    pgfailover_cluster: LocalCluster,
    events: list[FailoverEvent],
    caplog: pytest.LogCaptureFixture,
    shape: str,
) -> None:
    """Through PgBouncer after a failover, the first failing write (25006 or 0A000) marks the
    connection poisoned with a READ_ONLY verdict and logs one event naming the standby."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    table = _table(cluster)
    old_primary = cluster.primary
    conn = Connection.connect(cluster.pgbouncer.dsn(), prepare_threshold=None, autocommit=True)
    with conn:
        report = pgfailover.probe(conn)
        assert report.via_pooler is True
        assert report.server_address == old_primary.address
        cluster.failover()
        if shape == "begin-read-write-0A000":
            conn.autocommit = False
            conn.read_only = False
        caplog.set_level(logging.WARNING, logger="pgfailover")
        expected = errors.FeatureNotSupported if "0A000" in shape else errors.ReadOnlySqlTransaction
        with pytest.raises(expected):
            conn.execute(f"INSERT INTO {table} (note) VALUES ('x')")
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.READ_ONLY
        assert conn.poisoned.retry is RetryCondition.ROLLED_BACK
        assert conn.poisoned.purge_generation
        assert not conn.closed, "the error is the driver's: the connection is left to its owner"
        # a second failure on the same connection is not a second incident
        conn.rollback()
        with pytest.raises(expected):
            conn.execute(f"INSERT INTO {table} (note) VALUES ('y')")
    assert len(events) == 1
    event = events[0]
    assert event.verdict.sqlstate == ("0A000" if "0A000" in shape else "25006")
    assert event.node.server == old_primary.address  # the standby now
    assert event.node.via_pooler is True
    assert "test_connection.py" in event.stack
    records = _event_records(caplog)
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert old_primary.address in records[0].getMessage()
    assert event.verdict.sqlstate in records[0].getMessage()


async def test_async_first_failing_write_after_failover_poisons_the_connection(
    pgfailover_cluster: LocalCluster,
    events: list[FailoverEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Async twin: after a failover through PgBouncer, plain INSERT (25006) poisons the
    connection and logs one event naming the standby; BEGIN READ WRITE gives 0A000 too."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    table = _table(cluster)
    old_primary = cluster.primary
    conn = await AsyncConnection.connect(
        cluster.pgbouncer.dsn(), prepare_threshold=None, autocommit=True
    )
    async with conn:
        assert (await pgfailover.aprobe(conn)).server_address == old_primary.address
        cluster.failover()
        caplog.set_level(logging.WARNING, logger="pgfailover")
        with pytest.raises(errors.ReadOnlySqlTransaction):
            await conn.execute(f"INSERT INTO {table} (note) VALUES ('x')")
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.READ_ONLY
        await conn.set_autocommit(False)
        await conn.set_read_only(False)
        with pytest.raises(errors.FeatureNotSupported):
            await conn.execute(f"INSERT INTO {table} (note) VALUES ('y')")
    assert len(events) == 1
    assert events[0].node.server == old_primary.address
    assert len(_event_records(caplog)) == 1


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


# ---------------------------------------------------------------- simulation on a healthy primary
def test_simulation_helper_poisons_like_the_real_error(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """The server-raised 0A000 recovery error on a healthy primary poisons the connection."""
    with Connection.connect(pgfailover_cluster.primary.dsn()) as conn:
        with pytest.raises(errors.FeatureNotSupported):
            raise_recovery_error(conn)
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.READ_ONLY
    assert len(events) == 1


async def test_async_simulation_helper_poisons_like_the_real_error(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """Async twin of the simulation helper test."""
    async with await AsyncConnection.connect(pgfailover_cluster.primary.dsn()) as conn:
        with pytest.raises(errors.FeatureNotSupported):
            await araise_recovery_error(conn)
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.READ_ONLY
    assert len(events) == 1


def test_simulate_recovery_flag_fails_every_statement_until_replaced(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """With simulate_recovery(), reads, writes and BEGIN fail with the real 0A000; ROLLBACK
    works; a new connection is healthy."""
    table = _table(pgfailover_cluster)
    with Connection.connect(pgfailover_cluster.primary.dsn()) as conn:
        conn.simulate_recovery()
        for sql in ("SELECT 1", f"INSERT INTO {table} (note) VALUES ('x')"):
            with pytest.raises(errors.FeatureNotSupported) as info:
                conn.execute(sql)
            assert info.value.diag.message_primary == pgfailover.RECOVERY_MESSAGE
            conn.rollback()
        with pytest.raises(errors.FeatureNotSupported), conn.transaction():
            conn.execute("SELECT 1")
        assert conn.poisoned is not None
    assert len(events) == 1
    with Connection.connect(pgfailover_cluster.primary.dsn(), autocommit=True) as fresh:
        fresh.execute(f"INSERT INTO {table} (note) VALUES ('ok')")
        assert fresh.poisoned is None


async def test_async_simulate_recovery_flag_fails_every_statement(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """Async twin: simulate_recovery() makes statements fail with 0A000; ROLLBACK works."""
    async with await AsyncConnection.connect(pgfailover_cluster.primary.dsn()) as conn:
        conn.simulate_recovery()
        for _ in range(2):
            with pytest.raises(errors.FeatureNotSupported):
                await conn.execute("SELECT 1")
            await conn.rollback()
        assert conn.poisoned is not None
        conn.simulate_recovery(False)
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    assert len(events) == 1


# ---------------------------------------------------------------- what must NOT poison
def test_read_only_session_hitting_25006_is_not_poisoned(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """A connection that asked for read-only (read_only=True) and writes gets 25006 from the
    primary: that is the application's error, not a failover."""
    table = _table(pgfailover_cluster)
    with Connection.connect(pgfailover_cluster.primary.dsn()) as conn:
        conn.read_only = True
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute(f"INSERT INTO {table} (note) VALUES ('x')")
        assert conn.poisoned is None
        conn.rollback()
        conn.read_only = None
        conn.execute(f"INSERT INTO {table} (note) VALUES ('ok')")
        conn.commit()
    assert events == []


async def test_async_read_only_session_hitting_25006_is_not_poisoned(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """Async twin: a read_only=True session's 25006 on the primary is not a failover."""
    table = _table(pgfailover_cluster)
    async with await AsyncConnection.connect(pgfailover_cluster.primary.dsn()) as conn:
        await conn.set_read_only(True)
        with pytest.raises(errors.ReadOnlySqlTransaction):
            await conn.execute(f"INSERT INTO {table} (note) VALUES ('x')")
        assert conn.poisoned is None
    assert events == []


async def test_async_application_errors_are_not_poisoned(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """Unique violations and syntax errors leave an async connection healthy."""
    table = _table(pgfailover_cluster)
    async with await AsyncConnection.connect(
        pgfailover_cluster.primary.dsn(), autocommit=True
    ) as conn:
        await conn.execute(f"INSERT INTO {table} (id, note) VALUES (1, 'x')")
        with pytest.raises(errors.UniqueViolation):
            await conn.execute(f"INSERT INTO {table} (id, note) VALUES (1, 'x')")
        with pytest.raises(errors.SyntaxError):
            await conn.execute("SELEC 1")
        assert conn.poisoned is None
    assert events == []


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


def test_terminated_backend_at_transaction_block_exit_is_outcome_unknown(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """A backend terminated inside a transaction() block fails at the block's COMMIT: the
    verdict says the outcome is unknown."""
    with Connection.connect(pgfailover_cluster.primary.dsn()) as conn:
        block = conn.transaction()
        block.__enter__()
        conn.execute("SELECT 1")
        with pgfailover_cluster.primary.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):
            block.__exit__(None, None, None)  # the block's COMMIT
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is RetryCondition.OUTCOME_UNKNOWN
    assert len(events) == 1


async def test_async_terminated_backend_during_commit_is_outcome_unknown(
    pgfailover_cluster: LocalCluster, events: list[FailoverEvent]
) -> None:
    """A backend terminated before COMMIT: the failure happens while COMMIT is in flight, so
    the verdict says the outcome is unknown (never retried blindly)."""
    async with await AsyncConnection.connect(pgfailover_cluster.primary.dsn()) as conn:
        await conn.execute("SELECT 1")
        with pgfailover_cluster.primary.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):
            await conn.commit()
        assert conn.poisoned is not None
        assert conn.poisoned.kind is Kind.CONNECTION_LOST
        assert conn.poisoned.retry is RetryCondition.OUTCOME_UNKNOWN
    assert len(events) == 1


# ---------------------------------------------------------------- role probes
def test_probe_direct_uses_parameter_status_after_detection(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Direct: the first probe queries and detects no pooler; later probes read
    ParameterStatus without a round trip and still tell primary from standby."""
    cluster = pgfailover_cluster
    for node, role in ((cluster.primary, Role.PRIMARY), (cluster.standbys[0], Role.STANDBY)):
        with Connection.connect(node.dsn(), autocommit=True) as conn:
            first = pgfailover.probe(conn)
            assert (first.role, first.source, first.via_pooler) == (role, "query", False)
            assert first.server_address == node.address
            assert first.writable is (role is Role.PRIMARY)
            second = pgfailover.probe(conn)
            assert (second.role, second.source) == (role, "parameter_status")


def test_probe_through_pgbouncer_always_queries_and_sees_through_stale_parameters(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Through PgBouncer the probe detects the pooler and always queries: after a failover it
    reports the standby although ParameterStatus says in_hot_standby=off, and right after
    the repoint it reports the primary."""
    cluster = pgfailover_cluster
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    with Connection.connect(bouncer.dsn(), prepare_threshold=None, autocommit=True) as conn:
        report = pgfailover.probe(conn)
        assert (report.role, report.via_pooler, report.source) == (Role.PRIMARY, True, "query")
    cluster.failover()
    with Connection.connect(bouncer.dsn(), prepare_threshold=None, autocommit=True) as conn:
        assert conn.info.parameter_status("in_hot_standby") == "off"  # stale
        report = pgfailover.probe(conn)
        assert (report.role, report.writable, report.source) == (Role.STANDBY, False, "query")
        cluster.repoint_pgbouncer(cluster.primary)
        report = pgfailover.probe(conn)
        assert (report.role, report.writable) == (Role.PRIMARY, True)
        assert report.server_address == cluster.primary.address


async def test_async_probe_matches_sync(pgfailover_cluster: LocalCluster) -> None:
    """aprobe gives the same answers as probe, directly and through PgBouncer."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    cases = [
        (cluster.primary.dsn(), Role.PRIMARY, False),
        (cluster.standbys[0].dsn(), Role.STANDBY, False),
        (cluster.pgbouncer.dsn(), Role.PRIMARY, True),
    ]
    for dsn, role, pooled in cases:
        async with await AsyncConnection.connect(dsn, prepare_threshold=None) as conn:
            report = await pgfailover.aprobe(conn)
            assert (report.role, report.via_pooler) == (role, pooled)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


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


# ---------------------------------------------------------------- psycopg behaviour is kept
def test_subclass_keeps_psycopg_behaviour(pgfailover_cluster: LocalCluster) -> None:
    """isinstance, execute, cursors, row factories, transaction(), pipeline, COPY and
    read_only behave exactly as with psycopg."""
    table = _table(pgfailover_cluster)
    with Connection.connect(pgfailover_cluster.primary.dsn(), row_factory=dict_row) as conn:
        assert isinstance(conn, psycopg.Connection)
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} (note) VALUES (%s)", ["tx"])
        with conn.pipeline(), conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} (note) VALUES (%s)", [["p1"], ["p2"]])
        with conn.cursor().copy(f"COPY {table} (note) FROM STDIN") as copy:
            copy.write_row(["copied"])
        conn.commit()
        with conn.cursor(name="server_side") as cur:
            cur.execute(f"SELECT note FROM {table} ORDER BY id")
            assert [r["note"] for r in cur] == ["tx", "p1", "p2", "copied"]
        conn.rollback()
        conn.read_only = True
        assert conn.execute("SHOW transaction_read_only").fetchone() == {
            "transaction_read_only": "on"
        }
        assert conn.poisoned is None


async def test_async_subclass_keeps_psycopg_behaviour(pgfailover_cluster: LocalCluster) -> None:
    """Async twin: isinstance, execute, row factory, transaction(), pipeline, COPY."""
    table = _table(pgfailover_cluster)
    async with await AsyncConnection.connect(
        pgfailover_cluster.primary.dsn(), row_factory=dict_row
    ) as conn:
        assert isinstance(conn, psycopg.AsyncConnection)
        assert await (await conn.execute("SELECT 1 AS one")).fetchone() == {"one": 1}
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} (note) VALUES (%s)", ["tx"])
        async with conn.pipeline(), conn.cursor() as cur:
            await cur.executemany(f"INSERT INTO {table} (note) VALUES (%s)", [["p1"], ["p2"]])
        async with conn.cursor() as cur, cur.copy(f"COPY {table} (note) FROM STDIN") as copy:
            await copy.write_row(["copied"])
        await conn.commit()
        cur2 = await conn.execute(f"SELECT note FROM {table} ORDER BY id")
        assert [r["note"] for r in await cur2.fetchall()] == ["tx", "p1", "p2", "copied"]
        assert conn.poisoned is None


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
