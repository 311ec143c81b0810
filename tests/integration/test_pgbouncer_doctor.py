"""``pgfailover pgbouncer doctor`` and the admin-console client against a real PgBouncer
(the harness's, 1.18 on Debian 12): silent on a good configuration, every rule firing on a
bad one (through the console and from the file), status 2 when the configuration cannot be
read. One cluster for the module: the bad configuration is loaded with RELOAD and undone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgfailover.cli import main
from pgfailover.pgbouncer.admin import (
    AdminAuthError,
    AdminConsole,
    NotAdminConsole,
    Version,
)
from pgfailover.pgbouncer.doctor import RULE_IDS
from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory

GOOD = {
    "server_check_query": "select 1 / (1 - pg_is_in_recovery()::int)",
    "server_check_delay": "1",
    "server_fast_close": "1",
    "dns_max_ttl": "1",
    "tcp_keepalive": "1",
    "tcp_keepidle": "10",
    "tcp_keepintvl": "5",
    "tcp_keepcnt": "3",
    "tcp_user_timeout": "15000",
    "query_wait_timeout": "30",
}
BAD = {
    "pool_mode": "transaction",
    "server_login_retry": "15",
    "server_check_query": "select 1",
    "server_check_delay": "30",
    "server_fast_close": "0",
    "dns_max_ttl": "15",
    "tcp_keepalive": "0",
    "tcp_user_timeout": "0",
    "query_wait_timeout": "0",
    "server_reset_query_always": "0",
}


@pytest.fixture(scope="module")
def cluster(pgfailover_cluster_factory: ClusterFactory) -> Iterator[LocalCluster]:
    """Primary + standby behind a session-mode PgBouncer with the good settings."""
    cluster = pgfailover_cluster_factory(
        standbys=1, pgbouncer="session", server_login_retry=0.5, pgbouncer_settings=GOOD
    )
    yield cluster
    cluster.close()


def _admin(cluster: LocalCluster) -> str:
    assert cluster.pgbouncer is not None
    return cluster.pgbouncer.admin_dsn()


def _bad_text(good: str) -> str:
    """The good pgbouncer.ini with every rule's bad case: bad settings, the app database
    behind a DNS name with read-only sessions, the postgres database in session mode."""
    text = good
    for key, value in BAD.items():
        text, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if not found:
            text += f"{key} = {value}\n"
    text = re.sub(
        r"(?m)^app = host=127\.0\.0\.1 (.*)$",
        r"app = host=localhost \1 connect_query='SET default_transaction_read_only = on'",
        text,
    )
    return re.sub(r"(?m)^(postgres = .*)$", r"\1 pool_mode=session", text)


@pytest.fixture
def bad(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The cluster with the bad configuration loaded (RELOAD), the good one restored after."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    good = bouncer.config_path.read_text()
    bouncer.config_path.write_text(_bad_text(good))
    bouncer.admin("RELOAD")
    shown = {row["key"]: row["value"] for row in bouncer.admin("SHOW CONFIG")}
    assert shown["server_login_retry"] == "15"  # PgBouncer took it
    try:
        yield cluster
    finally:
        bouncer.config_path.write_text(good)
        bouncer.admin("RELOAD")


def _doctor_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["pgbouncer", "doctor", "--json", *argv])
    return code, [f["rule"] for f in json.loads(capsys.readouterr().out)["findings"]]


def test_good_configuration_is_silent(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the good settings the doctor finds nothing, status 0, from the console (which
    also reads the conffile it names), from the file, and from both."""
    assert cluster.pgbouncer is not None
    ini = str(cluster.pgbouncer.config_path)
    for argv in (
        ["--admin", _admin(cluster)],
        ["--ini", ini],
        ["--ini", ini, "--admin", _admin(cluster)],
    ):
        assert _doctor_json(argv, capsys) == (0, [])


def test_bad_configuration_fires_every_rule(
    bad: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the bad configuration every rule fires, status 1, through the console and
    from the file alone; the text report names each rule's fix."""
    assert bad.pgbouncer is not None
    code, rules = _doctor_json(["--admin", _admin(bad)], capsys)
    assert code == 1
    assert sorted(rules) == sorted(RULE_IDS)
    code, rules = _doctor_json(["--ini", str(bad.pgbouncer.config_path)], capsys)
    assert code == 1
    assert sorted(rules) == sorted(RULE_IDS)
    assert main(["pgbouncer", "doctor", "--admin", _admin(bad)]) == 1
    text = capsys.readouterr().out
    assert text.startswith("PgBouncer 1.18.0: 11 finding(s)")
    assert "    server_fast_close = 1" in text
    assert "prepare_threshold=None" in text


def test_advised_check_query_fails_on_a_standby_only(cluster: LocalCluster) -> None:
    """The check query the doctor advises runs through PgBouncer (which loaded it) on the
    primary and fails on a standby, which is what makes PgBouncer drop such a connection."""
    assert cluster.pgbouncer is not None
    query = GOOD["server_check_query"]
    shown = {row["key"]: row["value"] for row in cluster.pgbouncer.admin("SHOW CONFIG")}
    assert shown["server_check_query"] == query
    with psycopg.connect(cluster.pgbouncer.dsn()) as conn:
        assert conn.execute(query).fetchone() == (1,)
    with cluster.standbys[0].connect() as conn, pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute(query)


def test_admin_console_typed_results(cluster: LocalCluster) -> None:
    """The client reads PgBouncer 1.18's console: version, config with the changeable flag,
    databases, servers; RELOAD, RECONNECT, PAUSE and RESUME are accepted."""
    assert cluster.pgbouncer is not None
    with psycopg.connect(cluster.pgbouncer.dsn()) as conn:  # a server connection to show
        conn.execute("SELECT 1")
        with AdminConsole(_admin(cluster)) as admin:
            assert admin.version == Version(1, 18, 0)
            config = admin.config()
            assert config["server_fast_close"].value == "1"
            assert config["server_login_retry"].default == "15"
            assert config["listen_port"].changeable is False
            assert config["pool_mode"].changeable is True
            dbs = {row.name: row for row in admin.databases()}
            assert (dbs["app"].host, dbs["app"].port) == (
                cluster.primary.host,
                cluster.primary.port,
            )
            servers = admin.servers()
            assert any(s.database == "app" and s.port == cluster.primary.port for s in servers)
            admin.reload()
            admin.reconnect("app")
            admin.pause("postgres")
            assert {row.name: row.paused for row in admin.databases()}["postgres"]
            admin.resume("postgres")
            assert not {row.name: row.paused for row in admin.databases()}["postgres"]


def test_unreadable_configuration_exits_2(
    cluster: LocalCluster, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """Status 2 with a clear message and no password for: a missing file, a directory, a
    wrong admin password, a user the console refuses, and a server that is no console."""
    admin = _admin(cluster)
    assert main(["pgbouncer", "doctor", "--ini", "/nonexistent/pgbouncer.ini"]) == 2
    assert "cannot read /nonexistent/pgbouncer.ini" in capsys.readouterr().err
    assert main(["pgbouncer", "doctor", "--ini", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    wrong = make_conninfo(admin, password="not-the-password-x1")
    assert main(["pgbouncer", "doctor", "--admin", wrong]) == 2
    err = capsys.readouterr().err
    assert "refused the login" in err
    assert "not-the-password-x1" not in err
    assert cluster.pgbouncer is not None
    app_user = cluster.pgbouncer.dsn(dbname="pgbouncer")
    assert main(["pgbouncer", "doctor", "--admin", app_user]) == 2
    err = capsys.readouterr().err
    assert "refused the login" in err
    assert cluster.password not in err
    postgres = cluster.primary.dsn(dbname="postgres")
    assert main(["pgbouncer", "doctor", "--admin", postgres]) == 2
    err = capsys.readouterr().err
    assert "not a PgBouncer admin console" in err
    assert cluster.superuser_password not in err
    with pytest.raises(AdminAuthError):
        AdminConsole(wrong)
    with pytest.raises(NotAdminConsole):
        AdminConsole(postgres)
