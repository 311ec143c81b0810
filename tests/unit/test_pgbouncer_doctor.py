"""The doctor's rules as pure functions: each fires on a bad configuration and stays silent
on a good one; version gating; file + console merging; the report's shapes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgfailover.pgbouncer.admin import ConfigItem, DatabaseRow, Version
from pgfailover.pgbouncer.doctor import (
    ASSUMED_VERSION,
    RULE_IDS,
    RULES,
    BouncerConfig,
    config_from_admin,
    config_from_ini,
    dead_server_seconds,
    diagnose,
    findings_json,
    format_findings,
    merge,
)
from pgfailover.pgbouncer.ini import DatabaseEntry, parse_ini

#: Settings with which no rule fires, in any pool mode but transaction on PgBouncer < 1.21.
GOOD = {
    "server_login_retry": "0.5",
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
    "server_reset_query_always": "1",
    "max_prepared_statements": "200",
}
DB = DatabaseEntry("app", {"host": "10.0.0.1", "port": "5432", "dbname": "app"})


V124 = Version(1, 24, 0)


def _config(mode: str = "session", version: Version | None = V124, **changes: str) -> BouncerConfig:
    settings = {**GOOD, "pool_mode": mode, **changes}
    return BouncerConfig(settings, (DB,), (), version)


def _rules(config: BouncerConfig) -> set[str]:
    return {f.rule for f in diagnose(config)}


def test_rule_ids_name_every_rule_once() -> None:
    """RULE_IDS lists one id per rule, in RULES order (the CLI's --skip accepts them)."""
    assert len(RULE_IDS) == len(RULES) == len(set(RULE_IDS))


@pytest.mark.parametrize("mode", ["session", "transaction", "statement"])
def test_good_configuration_is_silent(mode: str) -> None:
    """No rule fires on the good settings, whatever the pool mode (PgBouncer 1.24)."""
    assert diagnose(_config(mode)) == []


def test_defaults_fire_the_setting_rules() -> None:
    """PgBouncer 1.18's defaults (no setting given) hurt: login retry 15 s, select 1 check
    every 30 s, no fast close in session mode, keepalive left to the OS, no user timeout,
    query_wait_timeout 120 s."""
    config = BouncerConfig({}, (DB,), (), Version(1, 18, 0))
    assert _rules(config) == {
        "login-retry",
        "check-query",
        "check-delay",
        "fast-close",
        "keepalive",
        "user-timeout",
        "query-wait",
    }


@pytest.mark.parametrize(
    ("rule", "changes", "mode"),
    [
        ("login-retry", {"server_login_retry": "15"}, "session"),
        ("check-query", {"server_check_query": "select 1"}, "session"),
        ("check-query", {"server_check_query": ""}, "session"),
        ("check-delay", {"server_check_delay": "30"}, "session"),
        ("fast-close", {"server_fast_close": "0"}, "session"),
        ("prepared-statements", {"max_prepared_statements": "0"}, "transaction"),
        ("keepalive", {"tcp_keepalive": "0"}, "session"),
        ("keepalive", {"tcp_keepidle": "0"}, "session"),
        ("user-timeout", {"tcp_user_timeout": "0"}, "session"),
        ("user-timeout", {"tcp_user_timeout": "600000"}, "session"),
        ("query-wait", {"query_wait_timeout": "0"}, "session"),
        ("query-wait", {"query_wait_timeout": "120"}, "session"),
        ("read-only-leak", {"server_reset_query_always": "0"}, "transaction"),
    ],
)
def test_each_setting_rule_fires_alone_on_its_bad_value(
    rule: str, changes: dict[str, str], mode: str
) -> None:
    """One bad setting over the good ones fires exactly its rule, with the fix line naming
    the setting the rule is about."""
    findings = diagnose(BouncerConfig({**GOOD, "pool_mode": mode, **changes}, (DB,), (), V124))
    assert [f.rule for f in findings] == [rule]
    assert findings[0].fix
    assert findings[0].failover


def test_mode_rules_stay_silent_in_the_other_mode() -> None:
    """Session-only and transaction-only rules do not fire in the other pool mode."""
    assert diagnose(_config("transaction", server_fast_close="0")) == []
    assert diagnose(_config("session", max_prepared_statements="0")) == []
    assert diagnose(_config("session", server_reset_query_always="0")) == []


def test_per_database_pool_mode_is_seen() -> None:
    """A database's own pool_mode counts: a session-mode database under a transaction-mode
    PgBouncer fires fast-close for that database."""
    db = DatabaseEntry("sess", {"host": "10.0.0.1", "pool_mode": "session"})
    settings = {**GOOD, "pool_mode": "transaction", "server_fast_close": "0"}
    config = BouncerConfig(settings, (db,), (), V124)
    findings = diagnose(config)
    assert [(f.rule, f.databases) for f in findings] == [("fast-close", ("sess",))]


def test_user_pool_mode_is_seen() -> None:
    """A ``[users]`` entry's pool_mode counts for every database."""
    config = BouncerConfig(
        {**GOOD, "server_fast_close": "0", "pool_mode": "transaction"},
        (DB,),
        ("session",),
        Version(1, 24, 0),
    )
    assert _rules(config) == {"fast-close"}


def test_prepared_statements_before_1_21_advise_the_client() -> None:
    """On 1.18 (no max_prepared_statements) transaction pooling gets the client-side fix,
    prepare_threshold=None, and never a max_prepared_statements line."""
    findings = diagnose(_config("transaction", version=Version(1, 18, 0)))
    assert [f.rule for f in findings] == ["prepared-statements"]
    assert findings[0].section == "client"
    assert "prepare_threshold=None" in findings[0].fix


def test_max_prepared_statements_default_follows_the_version() -> None:
    """Unset max_prepared_statements is 0 on 1.21-1.23 (fires) and 200 from 1.24 (silent)."""
    for version, fires in ((Version(1, 21, 0), True), (Version(1, 24, 0), False)):
        settings = {k: v for k, v in GOOD.items() if k != "max_prepared_statements"}
        config = BouncerConfig({**settings, "pool_mode": "transaction"}, (DB,), (), version)
        assert ("prepared-statements" in _rules(config)) is fires


def test_user_timeout_not_reported_before_1_13() -> None:
    """tcp_user_timeout does not exist before 1.13: no finding about it there."""
    assert "user-timeout" not in _rules(_config(version=Version(1, 12, 0), tcp_user_timeout="0"))


def test_fast_close_not_reported_before_1_10() -> None:
    """server_fast_close does not exist before 1.10: no finding about it there."""
    assert "fast-close" not in _rules(_config(version=Version(1, 9, 0), server_fast_close="0"))


def test_unknown_version_is_judged_as_the_oldest_supported() -> None:
    """Without a version (the file alone) the rules judge 1.18 and the report says so."""
    config = _config("transaction", version=None)
    assert config.effective_version == ASSUMED_VERSION == (1, 18, 0)
    findings = diagnose(config)
    assert [f.section for f in findings] == ["client"]
    assert "judged as 1.18.0" in format_findings(findings, config)
    assert findings_json(findings, config)["version"] is None


@pytest.mark.parametrize(
    ("host", "fires"),
    [
        ("db.example.com", True),
        ("10.0.0.1", False),
        ("::1", False),
        ("/var/run/postgresql", False),
        ("10.0.0.1,db2.example.com", True),
    ],
)
def test_dns_ttl_fires_only_for_names(host: str, fires: bool) -> None:
    """dns-ttl fires for a host given as a DNS name (one of a list too) with a long
    dns_max_ttl; never for addresses or socket directories."""
    db = DatabaseEntry("app", {"host": host})
    config = BouncerConfig({**GOOD, "dns_max_ttl": "15"}, (db,), (), Version(1, 24, 0))
    assert ("dns-ttl" in _rules(config)) is fires
    short = BouncerConfig({**GOOD, "dns_max_ttl": "1"}, (db,), (), Version(1, 24, 0))
    assert "dns-ttl" not in _rules(short)


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("connect_query", "SET default_transaction_read_only = on"),
        ("connect_query", "set default_transaction_read_only to 'on'"),
        ("connect_query", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
        ("options", "-c default_transaction_read_only=on"),
    ],
)
def test_read_only_database_fires_on_read_only_sessions(key: str, text: str) -> None:
    """A database whose connect_query or options make sessions read-only is reported, with
    its entry rewritten without that key as the fix."""
    db = DatabaseEntry("app", {"host": "10.0.0.1", "dbname": "app", key: text})
    findings = diagnose(BouncerConfig(GOOD, (db,), (), Version(1, 24, 0)))
    assert [f.rule for f in findings] == ["read-only-database"]
    assert findings[0].fix == "app = host=10.0.0.1 dbname=app"


def test_read_only_database_silent_on_other_queries() -> None:
    """A connect_query that sets something else, or turns read-only off, is not reported."""
    for text in ("SET search_path = app", "SET default_transaction_read_only = off"):
        db = DatabaseEntry("app", {"host": "10.0.0.1", "connect_query": text})
        assert diagnose(BouncerConfig(GOOD, (db,), (), Version(1, 24, 0))) == []


def test_a_standby_safe_check_query_is_accepted() -> None:
    """Check queries that look at the role are not reported."""
    for query in ("select 1 / (1 - pg_is_in_recovery()::int)", "SELECT txid_current()"):
        assert "check-query" not in _rules(_config(server_check_query=query))


@settings(deadline=None)  # pure and fast, but the test machine may be loaded
@given(
    st.floats(min_value=0, max_value=10_000, allow_nan=False),
    st.floats(min_value=0, max_value=1_000, allow_nan=False),
    st.integers(min_value=0, max_value=20),
)
def test_keepalive_fires_exactly_when_detection_is_slow(
    idle: float, interval: float, count: int
) -> None:
    """The keepalive rule fires exactly when idle + interval x count (Linux defaults for 0)
    exceeds 60 s."""
    config = _config(tcp_keepidle=f"{idle}", tcp_keepintvl=f"{interval}", tcp_keepcnt=str(count))
    seconds = dead_server_seconds(config)
    assert seconds is not None
    expected = (idle or 7200) + (interval or 75) * (count or 9)
    assert seconds == pytest.approx(expected)
    assert ("keepalive" in _rules(config)) is (expected > 60)


@settings(deadline=None)  # pure and fast, but the test machine may be loaded
@given(st.floats(min_value=0, max_value=1_000, allow_nan=False))
def test_login_retry_threshold(value: float) -> None:
    """login-retry fires exactly above 1 s."""
    assert ("login-retry" in _rules(_config(server_login_retry=f"{value}"))) is (value > 1)


def test_unparseable_numbers_do_not_fire() -> None:
    """A value PgBouncer would refuse is not judged (PgBouncer itself would not start)."""
    assert diagnose(_config(server_login_retry="soon", query_wait_timeout="x")) == []


def test_admin_config_and_merge() -> None:
    """The console's settings and databases make a configuration (its own pgbouncer
    database left out); merged over a file's, the running values win and the file's
    connect_query stays."""
    items = {
        "pool_mode": ConfigItem("pool_mode", "transaction", "session", True),
        "server_login_retry": ConfigItem("server_login_retry", "15", "15", True),
        "auth_user": ConfigItem("auth_user", None, None, True),
    }
    rows = [
        DatabaseRow("app", "10.0.0.2", 5433, "app", None, False, False),
        DatabaseRow("pgbouncer", None, 6432, "pgbouncer", "statement", False, False),
    ]
    running = config_from_admin(items, rows, Version(1, 18, 0))
    assert [db.name for db in running.databases] == ["app"]
    assert "auth_user" not in running.settings
    ini = parse_ini(
        "[databases]\napp = host=10.0.0.1 connect_query='SET default_transaction_read_only=on'\n"
        "[pgbouncer]\nserver_login_retry = 1\npool_mode = session\n"
    )
    merged = merge(config_from_ini(ini), running)
    assert merged.get("server_login_retry") == "15"
    assert merged.get("pool_mode") == "transaction"
    assert merged.databases[0].params["host"] == "10.0.0.2"
    assert "connect_query" in merged.databases[0].params
    assert merged.version == (1, 18, 0)
    assert "read-only-database" in _rules(merged)


def test_report_shapes() -> None:
    """Text names each rule, setting and fix line; JSON round-trips with every field; a
    clean configuration says so."""
    config = _config("session", server_login_retry="15", tcp_keepalive="0")
    findings = diagnose(config)
    text = format_findings(findings, config)
    assert "PgBouncer 1.24.0: 2 finding(s)" in text
    assert "    server_login_retry = 1" in text
    assert "    tcp_keepalive = 1" in text
    data = json.loads(json.dumps(findings_json(findings, config)))
    assert [f["rule"] for f in data["findings"]] == ["login-retry", "keepalive"]
    assert set(data["findings"][0]) == {
        "rule",
        "severity",
        "setting",
        "value",
        "databases",
        "failover",
        "fix",
        "section",
    }
    assert "no setting found" in format_findings([], _config())
