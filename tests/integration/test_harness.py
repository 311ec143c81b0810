"""The LocalCluster test bed produces real replication and real failovers."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors

from pgfailover.testing import LocalCluster, Node
from pgfailover.testing.plugin import ClusterFactory
from pgfailover.testing.simulate import make_read_only, raise_recovery_error

from .support import eventually


def _table(conn: psycopg.Connection[tuple[Any, ...]]) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    return name


def test_row_written_on_primary_is_readable_on_every_standby(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """A row committed on the primary is replayed and readable on each of two standbys."""
    cluster = pgfailover_cluster_factory(standbys=2, pgbouncer=None)
    with cluster.primary.connect(superuser=False) as conn:
        table = _table(conn)
        conn.execute(f"INSERT INTO {table} VALUES (1, 'replicated')")
    cluster.wait_replicated()
    for node in cluster.standbys:
        with node.connect(superuser=False) as conn:
            assert conn.execute(f"SELECT note FROM {table}").fetchall() == [("replicated",)]


def test_failover_with_two_standbys_moves_the_other_standby_to_the_new_primary(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """After failover, both the old primary and the third node stream from the new primary."""
    cluster = pgfailover_cluster_factory(standbys=2, pgbouncer=None)
    old = cluster.primary
    timings = cluster.failover()
    new = cluster.primary
    assert new is not old
    assert [cluster.role(n) for n in cluster.nodes].count("primary") == 1
    assert cluster.role(new) == "primary"
    for node in cluster.standbys:
        assert cluster.role(node) == "standby"
        assert cluster._streams_from(node, new)
    assert set(timings.phases) == {"stop", "promote", "rejoin"}
    with new.connect(superuser=False) as conn:
        table = _table(conn)
        conn.execute(f"INSERT INTO {table} VALUES (1, 'after')")
    cluster.wait_replicated()
    for node in cluster.standbys:
        with node.connect(superuser=False) as conn:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)


@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
def test_failover_through_pgbouncer_transaction_mode_reproduces_the_write_failure(
    pgfailover_cluster: LocalCluster, stop_mode: str
) -> None:
    """An old client stays open and IDLE on the standby; writes fail with 25006 and 0A000
    until PgBouncer is repointed, then succeed on the same connection."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    old_primary = cluster.primary
    conn = psycopg.connect(cluster.pgbouncer.dsn(), prepare_threshold=None, autocommit=True)
    with conn:
        table = _table(conn)
        conn.execute(f"INSERT INTO {table} VALUES (1, 'before')")
        # Replication is asynchronous: an immediate stop can lose the last commits.
        cluster.wait_replicated()

        timings = cluster.failover(stop_mode)  # type: ignore[arg-type]
        assert cluster.primary is not old_primary
        assert cluster.role(old_primary) == "standby"
        assert timings["promote"] > 0

        assert not conn.closed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with pytest.raises(errors.ReadOnlySqlTransaction) as plain:
            conn.execute(f"INSERT INTO {table} VALUES (2, 'plain')")
        assert plain.value.sqlstate == "25006"

        conn.autocommit = False
        conn.read_only = False
        with pytest.raises(errors.FeatureNotSupported) as begin_rw:
            conn.execute(f"INSERT INTO {table} VALUES (3, 'read write')")
        assert begin_rw.value.sqlstate == "0A000"
        assert (
            begin_rw.value.diag.message_primary
            == "cannot set transaction read-write mode during recovery"
        )
        assert not conn.closed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

        cluster.repoint_pgbouncer(cluster.primary)
        conn.execute(f"INSERT INTO {table} VALUES (4, 'after repoint')")
        conn.commit()
        row = conn.execute(f"SELECT inet_server_port(), count(*) FROM {table}").fetchone()
        assert row == (cluster.primary.port, 2)


def test_session_mode_client_opened_after_failover_stays_on_the_standby_after_repoint(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """Session mode: a client from before the failover is closed (57P01); one that connected
    to the standby keeps it after RELOAD (its server is only marked close_needed), so its
    writes keep failing; a new client reaches the new primary."""
    cluster = pgfailover_cluster_factory(standbys=1, pgbouncer="session")
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    early = psycopg.connect(bouncer.dsn(), autocommit=True)
    table = _table(early)
    cluster.failover()
    with pytest.raises(errors.AdminShutdown):
        early.execute("SELECT 1")
    assert early.broken

    late = psycopg.connect(bouncer.dsn(), autocommit=True)
    standby_port = cluster.standbys[0].port
    assert late.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone() == (
        standby_port,
        True,
    )
    # PgBouncer hands new clients its cached startup parameters: stale on a standby.
    assert late.info.parameter_status("in_hot_standby") == "off"

    cluster.repoint_pgbouncer(cluster.primary)
    servers = bouncer.admin("SHOW SERVERS")
    assert [(s["port"], s["close_needed"]) for s in servers] == [(standby_port, 1)]
    with pytest.raises(errors.ReadOnlySqlTransaction):
        late.execute(f"INSERT INTO {table} VALUES (1, 'late')")
    assert late.execute("SELECT inet_server_port()").fetchone() == (standby_port,)
    late.close()

    with psycopg.connect(bouncer.dsn(), autocommit=True) as fresh:
        fresh.execute(f"INSERT INTO {table} VALUES (2, 'fresh')")
        assert fresh.execute("SELECT inet_server_port()").fetchone() == (cluster.primary.port,)


def test_simulated_recovery_error_is_the_real_server_error(
    pgfailover_cluster: LocalCluster,
) -> None:
    """On a healthy primary the helper raises FeatureNotSupported with the standby's message
    and leaves the connection open and IDLE."""
    with cluster_conn(pgfailover_cluster) as conn:
        with pytest.raises(errors.FeatureNotSupported) as info:
            raise_recovery_error(conn)
        assert info.value.sqlstate == "0A000"
        assert (
            info.value.diag.message_primary
            == "cannot set transaction read-write mode during recovery"
        )
        assert not conn.closed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_read_only_flag_makes_every_write_fail_until_the_connection_is_replaced(
    pgfailover_cluster: LocalCluster,
) -> None:
    """After make_read_only, writes fail with 25006 (reads still work); a new connection writes."""
    with cluster_conn(pgfailover_cluster) as conn:
        table = _table(conn)
        make_read_only(conn)
        for i in range(2):
            with pytest.raises(errors.ReadOnlySqlTransaction):
                conn.execute(f"INSERT INTO {table} VALUES ({i}, 'x')")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    with cluster_conn(pgfailover_cluster) as fresh:
        fresh.execute(f"INSERT INTO {table} VALUES (1, 'x')")


def cluster_conn(cluster: LocalCluster) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(cluster.primary.dsn(), autocommit=True)


def test_kill_then_promote_gives_a_writable_primary(pgfailover_cluster: LocalCluster) -> None:
    """SIGKILL of the primary's postmaster, then promote: the standby accepts writes, and
    rejoin turns the crashed node into its streaming standby."""
    cluster = pgfailover_cluster
    old, standby = cluster.primary, cluster.standbys[0]
    old_pid = old.pid
    cluster.kill(old)
    assert not old.running
    assert cluster.role(old) == "down"
    assert old_pid is not None
    cluster.promote(standby)
    assert cluster.primary is standby
    assert cluster.role(standby) == "primary"
    with standby.connect(superuser=False) as conn:
        _table(conn)
    rejoin = cluster.rejoin(old)
    assert rejoin.notes["rejoin"] in {"pg_rewind", "pg_basebackup"}
    assert cluster.role(old) == "standby"


def test_two_switchovers_restore_the_original_topology(pgfailover_cluster: LocalCluster) -> None:
    """switchover() swaps roles; a second one puts node0 back as primary, PgBouncer following."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    original = cluster.primary
    cluster.switchover(repoint_pgbouncer=True)
    assert cluster.primary is not original
    assert cluster.role(original) == "standby"
    cluster.switchover(repoint_pgbouncer=True)
    assert cluster.primary is original
    assert [cluster.role(n) for n in cluster.nodes] == ["primary", "standby"]
    assert cluster.pgbouncer.target is original
    with psycopg.connect(cluster.pgbouncer.dsn(), prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (original.port,)


def test_reset_restores_topology_after_an_unrepaired_crash(
    pgfailover_cluster: LocalCluster,
) -> None:
    """After a kill + promote left node0 down and PgBouncer on it, reset() brings node0 back
    as primary, the other node as its standby, and PgBouncer pointing at node0."""
    cluster = pgfailover_cluster
    home, other = cluster.nodes
    cluster.kill(home)
    cluster.promote(other)
    cluster.reset()
    assert cluster.primary is home
    assert [cluster.role(n) for n in cluster.nodes] == ["primary", "standby"]
    assert cluster.pgbouncer is not None
    assert cluster.pgbouncer.target is home


def _lsn(text: str) -> int:
    """A pg_lsn's text form (``16/B374D848``) as a byte position."""
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


def test_reset_leaves_the_standby_holding_the_primary_wal_so_it_can_be_promoted_at_once(
    pgfailover_cluster: LocalCluster,
) -> None:
    """With the primary's WAL deep into a 16 MB segment, reset() after a switchover returns
    only once the rejoined standby has written, on the primary's timeline, the WAL the
    primary had written. (A standby that changed timelines streams that segment again from
    its start; promoted before it has, PostgreSQL 15 PANICs with "invalid magic number
    0000" and shuts down.) Promoting it right after reset() works."""
    cluster = pgfailover_cluster
    with cluster.primary.connect() as conn:
        conn.execute("SELECT pg_switch_wal()")
        # about 15 MB of WAL in one record, without a table to fill
        conn.execute(
            "SELECT pg_logical_emit_message(false, 'pgfailover-test', repeat('x', 15000000))"
        )
    cluster.switchover()
    cluster.reset()
    primary, standby = cluster.primary, cluster.standbys[0]
    with standby.connect() as conn:  # first: the primary's position can only move on
        received = conn.execute(
            "SELECT status, received_tli, written_lsn::text FROM pg_stat_wal_receiver"
        ).fetchone()
    with primary.connect() as conn:
        current = conn.execute(
            "SELECT pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text"
        ).fetchone()
    assert received is not None
    assert current is not None
    assert received[:2] == ("streaming", int(current[0][:8], 16))
    # at most what an idle primary writes between reset() and the query
    behind = _lsn(current[1]) - _lsn(received[2])
    assert behind < 1024 * 1024, f"{standby.name} wrote {received[2]}, primary at {current[1]}"
    cluster.promote(standby)
    assert cluster.role(standby) == "primary"


def test_reset_takes_a_restarted_standby_of_an_idle_primary_as_caught_up(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A standby restarted while the primary writes nothing, its WAL at a segment boundary
    (the standby's WAL receiver then has nothing to write), is taken by reset() as caught
    up and left as it is (same process, no rejoin), the roles right."""
    cluster = pgfailover_cluster
    primary, standby = cluster.primary, cluster.standbys[0]
    with primary.connect() as conn:
        conn.execute("SELECT pg_switch_wal()")
    cluster.wait_replicated()
    cluster.stop(standby)
    cluster.start(standby)
    eventually(lambda: cluster._streams_from(standby, primary), timeout=30)
    pid = standby.pid
    timings = cluster.reset()
    assert "rejoin" not in timings.phases
    assert standby.pid == pid
    assert [cluster.role(n) for n in cluster.nodes] == ["primary", "standby"]


def test_pgbouncer_waits_a_tenth_of_a_second_after_a_failed_server_login_by_default(
    pgfailover_cluster: LocalCluster,
) -> None:
    """The harness's PgBouncer runs with server_login_retry 0.1 s (PgBouncer reads the
    fraction), not 1 s: a failed login during a failover then blocks new server logins for
    a tenth of a second, as in a PgBouncer tuned for fast failover."""
    assert pgfailover_cluster.pgbouncer is not None
    config = {row["key"]: row["value"] for row in pgfailover_cluster.pgbouncer.admin("SHOW CONFIG")}
    assert config["server_login_retry"] == "0.1"


@pytest.mark.parametrize(
    ("driver", "scheme"),
    [
        ("psycopg", "postgresql+psycopg"),
        ("psycopg_async", "postgresql+psycopg"),
        ("psycopg2", "postgresql+psycopg2"),
        ("asyncpg", "postgresql+asyncpg"),
    ],
)
def test_url_carries_what_the_dsn_carries(
    pgfailover_cluster: LocalCluster, driver: str, scheme: str
) -> None:
    """node.url(driver) and pgbouncer.url(driver) are SQLAlchemy URLs for the driver's
    dialect with the DSN's user, password, host, port and database."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    for endpoint in (cluster.primary, cluster.pgbouncer):
        url = sa.make_url(endpoint.url(driver))
        dsn = psycopg.conninfo.conninfo_to_dict(endpoint.dsn())
        assert url.drivername == scheme
        assert (url.username, url.password, url.host, url.port, url.database) == (
            dsn["user"],
            dsn["password"],
            dsn["host"],
            int(str(dsn["port"])),
            dsn["dbname"],
        )
    superuser = sa.make_url(cluster.primary.url(driver, user="postgres", dbname="postgres"))
    assert (superuser.username, superuser.password, superuser.database) == (
        "postgres",
        cluster.superuser_password,
        "postgres",
    )


def test_url_connects_through_sqlalchemy(pgfailover_cluster: LocalCluster) -> None:
    """An engine built from node.url() reaches that node, and one built from
    pgbouncer.url() reaches the primary through PgBouncer, as the application user."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    query = sa.text("SELECT current_user, current_database(), inet_server_port()")
    expected = (cluster.user, cluster.dbname, cluster.primary.port)
    for url in (cluster.primary.url(), cluster.pgbouncer.url()):
        engine = sa.create_engine(url, connect_args={"prepare_threshold": None})
        try:
            with engine.connect() as conn:
                assert tuple(conn.execute(query).one()) == expected
        finally:
            engine.dispose()


def test_url_quotes_the_password_and_refuses_unknown_drivers() -> None:
    """Characters that mean something in a URL are quoted, so SQLAlchemy reads the password
    back intact; an unknown driver name is a ValueError listing the known ones."""
    cluster = LocalCluster()  # never opened: url() only formats
    cluster.password = "p@ss:w/rd %?#"
    node = Node(cluster, "node0", 5432, Path("unused"))
    url = node.url("psycopg2")
    assert "p@ss" not in url
    assert sa.make_url(url).password == "p@ss:w/rd %?#"
    with pytest.raises(ValueError, match="psycopg, psycopg_async, psycopg2, asyncpg"):
        node.url("pg8000")


def test_no_repr_shows_a_password(pgfailover_cluster: LocalCluster) -> None:
    """The cluster's, the nodes' and PgBouncer's reprs never contain a password (their
    dsn() and url() strings do, by necessity)."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    secrets = (cluster.password, cluster.superuser_password)
    for thing in (cluster, *cluster.nodes, cluster.pgbouncer):
        assert not any(secret in repr(thing) for secret in secrets), repr(thing)
    assert cluster.password in cluster.pgbouncer.url()


def _auth_file(cluster: LocalCluster) -> dict[str, str]:
    """PgBouncer's auth_file of ``cluster`` as {user: secret} (the harness writes no quotes
    inside its fields)."""
    assert cluster.pgbouncer is not None
    text = (cluster.pgbouncer.root / "userlist.txt").read_text()
    pairs = (line.split(" ", 1) for line in text.splitlines())
    return {user.strip('"'): secret.strip('"') for user, secret in pairs}


def test_pgbouncer_auth_file_holds_every_nodes_scram_secret_and_no_password(
    pgfailover_cluster: LocalCluster,
) -> None:
    """PgBouncer's auth_file holds each user's SCRAM secret exactly as every node keeps it
    (so PgBouncer can log in to any of them with the client's keys) and no password; the
    application user and the superuser log in through it, to the database and to the admin
    console."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    entries = _auth_file(cluster)
    assert sorted(entries) == sorted(["postgres", cluster.user])
    text = (cluster.pgbouncer.root / "userlist.txt").read_text()
    assert cluster.password not in text
    assert cluster.superuser_password not in text
    query = "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)"
    for node in cluster.nodes:
        with node.connect() as conn:
            assert dict(conn.execute(query, [list(entries)]).fetchall()) == entries
    assert all(secret.startswith("SCRAM-SHA-256$4096:") for secret in entries.values())
    with psycopg.connect(cluster.pgbouncer.dsn(), prepare_threshold=None) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (cluster.user,)
    superuser = cluster.pgbouncer.dsn(user="postgres", dbname="postgres")
    with psycopg.connect(superuser, prepare_threshold=None) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    assert cluster.pgbouncer.admin("SHOW VERSION")


def test_pgbouncer_auth_user_keeps_its_password_and_serves_users_not_in_the_auth_file(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """With ``auth_user`` set, that user's auth_file entry is its password (PgBouncer logs in
    as it with no client behind it), the others' stay SCRAM secrets, and a role missing from
    the auth_file logs in through PgBouncer (session mode) by PgBouncer's auth query."""
    cluster = pgfailover_cluster_factory(
        standbys=0, pgbouncer="session", pgbouncer_settings={"auth_user": "postgres"}
    )
    assert cluster.pgbouncer is not None
    entries = _auth_file(cluster)
    assert entries["postgres"] == cluster.superuser_password
    assert entries[cluster.user].startswith("SCRAM-SHA-256$")
    password = uuid.uuid4().hex
    with cluster.primary.connect() as conn:
        conn.execute(f"CREATE ROLE unlisted LOGIN PASSWORD '{password}'")
    unlisted = cluster.pgbouncer.dsn(user="unlisted", password=password)
    with psycopg.connect(unlisted, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("unlisted",)
    with psycopg.connect(cluster.pgbouncer.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (cluster.user,)
