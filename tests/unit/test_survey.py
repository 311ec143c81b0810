"""Pure decisions of pgfailover.survey: host splitting, assessment, notes, output, CLI input."""

from __future__ import annotations

import argparse
import json
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from pgfailover import survey
from pgfailover._secrets import secret_candidates
from pgfailover.errors import InvalidConninfo
from pgfailover.survey import (
    ErrorInfo,
    HostObservation,
    HostReport,
    HostTarget,
    assess,
    error_info,
    exit_code,
    format_report,
    lsn_to_int,
    notes,
    split_hosts,
    to_json,
)

SECRET = "s3cr3t-Pa55"
STARTED = "2026-01-01 00:00:00+00"


def _params(target: HostTarget) -> dict[str, Any]:
    return conninfo_to_dict(target.conninfo)


def _row(
    *,
    standby: bool,
    pid: int = 100,
    port: int = 5432,
    read_only: bool = False,
    started: str = STARTED,
    current: str | None = "0/3000000",
    receive: str | None = "0/3000000",
    replay: str | None = "0/3000000",
    lag: float | None = 0.5,
) -> tuple[Any, ...]:
    """A SURVEY_SQL row as a server would return it."""
    return (
        standby,
        read_only or standby,
        pid,
        "127.0.0.1",
        port,
        "15.18 (Debian 15.18-0+deb12u1)",
        started,
        None if standby else current,
        receive if standby else None,
        replay if standby else None,
        lag if standby else None,
    )


def _seen(
    address_port: int,
    row: tuple[Any, ...] | None,
    *,
    pooler: bool = False,
    client_pid: int | None = None,
    hot: str | None = None,
    error: ErrorInfo | None = None,
) -> HostObservation:
    """An observation of 127.0.0.1:``address_port``; the client PID is the server's unless
    ``pooler`` (a made-up key) or ``client_pid`` says otherwise."""
    if client_pid is None and row is not None:
        client_pid = -int(row[2]) if pooler else int(row[2])
    params = {} if hot is None else {"in_hot_standby": hot}
    return HostObservation(
        HostTarget("127.0.0.1", address_port), 1.5, client_pid, params, row, error
    )


def _primary(port: int = 5432, **kwargs: Any) -> HostObservation:
    return _seen(port, _row(standby=False, port=port, **kwargs), hot="off")


def _standby(port: int = 5433, **kwargs: Any) -> HostObservation:
    return _seen(port, _row(standby=True, port=port, **kwargs), hot="on")


REFUSED = ErrorInfo("refused", "08001", "08 connection exception", "Connection refused")


# ------------------------------------------------------------------------------ split_hosts


def test_single_host_gives_one_target_with_its_parameters() -> None:
    """A single-host DSN gives one target that keeps dbname, user and password."""
    (target,) = split_hosts(f"host=db1 port=5433 dbname=app user=app password={SECRET}")
    assert (target.host, target.port, target.hostaddr) == ("db1", 5433, None)
    assert _params(target) == {
        "host": "db1",
        "port": "5433",
        "dbname": "app",
        "user": "app",
        "password": SECRET,
    }
    assert target.address == "db1:5433"


def test_one_port_applies_to_every_host() -> None:
    """Like libpq, a single port applies to every host of the list."""
    targets = split_hosts("host=a,b,c port=6000 dbname=app")
    assert [(t.host, t.port) for t in targets] == [("a", 6000), ("b", 6000), ("c", 6000)]
    assert [_params(t)["host"] for t in targets] == ["a", "b", "c"]


def test_per_host_ports_pair_up_in_order() -> None:
    """One port per host pairs up by position; an empty entry means libpq's default."""
    targets = split_hosts("host=a,b,c port=5432,,5434")
    assert [(t.host, t.port) for t in targets] == [("a", 5432), ("b", None), ("c", 5434)]
    assert "port" not in _params(targets[1])
    assert targets[1].address == "b"


def test_mismatched_port_list_is_rejected() -> None:
    """Two ports for three hosts cannot be paired: InvalidConninfo."""
    with pytest.raises(InvalidConninfo, match="2 ports for 3 hosts"):
        split_hosts("host=a,b,c port=1,2")


def test_url_form_with_several_hosts() -> None:
    """A URL with a host list gives one target per host with the URL's other parameters."""
    targets = split_hosts(f"postgresql://app:{SECRET}@h1:5432,h2:5433/app?sslmode=disable")
    assert [(t.host, t.port) for t in targets] == [("h1", 5432), ("h2", 5433)]
    assert _params(targets[1]) == {
        "host": "h2",
        "port": "5433",
        "user": "app",
        "password": SECRET,
        "dbname": "app",
        "sslmode": "disable",
    }


def test_url_host_without_port_uses_the_default() -> None:
    """In a URL host list, a host without a port gets libpq's default port."""
    targets = split_hosts("postgresql://[::1]:5432,h2/app")
    assert [(t.host, t.port) for t in targets] == [("::1", 5432), ("h2", None)]
    assert targets[0].address == "[::1]:5432"


def test_hostaddr_list_pairs_with_host_names() -> None:
    """host and hostaddr lists pair up; the address shows both."""
    targets = split_hosts("host=a,b hostaddr=127.0.0.1,127.0.0.2 port=5432")
    assert [(t.host, t.hostaddr) for t in targets] == [("a", "127.0.0.1"), ("b", "127.0.0.2")]
    assert _params(targets[1])["hostaddr"] == "127.0.0.2"
    assert targets[0].address == "a (127.0.0.1):5432"


def test_hostaddr_alone_names_the_targets() -> None:
    """Without host names, the hostaddr values are the targets."""
    targets = split_hosts("hostaddr=127.0.0.1,::1 port=1,2")
    assert [t.address for t in targets] == ["127.0.0.1:1", "[::1]:2"]
    assert all(t.host is None for t in targets)


def test_hostaddr_count_must_match_host_count() -> None:
    """Two host names with one hostaddr cannot be paired: InvalidConninfo."""
    with pytest.raises(InvalidConninfo, match="2 host names but 1 hostaddr"):
        split_hosts("host=a,b hostaddr=127.0.0.1")


def test_hostaddr_must_be_numeric() -> None:
    """A name in hostaddr is rejected with a hint to use host=."""
    with pytest.raises(InvalidConninfo, match="numeric IP address"):
        split_hosts("hostaddr=db.example.com")


def test_unix_socket_directory_is_a_target() -> None:
    """A Unix-socket directory (absolute path) is probed like any host, also in a list."""
    targets = split_hosts("host=/var/run/postgresql,127.0.0.1 port=5432 dbname=app")
    assert [t.address for t in targets] == ["/var/run/postgresql:5432", "127.0.0.1:5432"]
    assert _params(targets[0])["host"] == "/var/run/postgresql"


def test_dsn_without_host_gives_one_default_target() -> None:
    """No host at all: one target left to libpq's defaults (PGHOST or the socket directory)."""
    (target,) = split_hosts("dbname=app")
    assert (target.host, target.port, target.address) == (None, None, "(default host)")
    assert _params(target) == {"dbname": "app"}


def test_routing_options_are_dropped() -> None:
    """target_session_attrs and load_balance_hosts would refuse a host: they are dropped."""
    targets = split_hosts("host=a,b target_session_attrs=read-write load_balance_hosts=random")
    for target in targets:
        assert set(_params(target)) == {"host"}


@pytest.mark.parametrize("port", ["0", "65536", "x", "-1", "\u00b2"])
def test_bad_port_is_rejected(port: str) -> None:
    """A port outside 1-65535 or not a number is InvalidConninfo."""
    with pytest.raises(InvalidConninfo, match="invalid port"):
        split_hosts(f"host=a port={port}")


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=a password={SECRET} junk",
        f"postgresql://app:{SECRET}%zz@h/app",
        f"host=a password='{SECRET}",
        "passwrd=x",
    ],
)
def test_unparseable_dsn_is_a_typed_error_without_the_password(dsn: str) -> None:
    """libpq's parse error becomes InvalidConninfo; a quoted password is masked."""
    with pytest.raises(InvalidConninfo, match="cannot parse the connection string") as info:
        split_hosts(dsn)
    assert SECRET not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_target_repr_hides_the_conninfo() -> None:
    """repr(HostTarget) leaves out the conninfo, which holds the password."""
    (target,) = split_hosts(f"host=a password={SECRET}")
    assert SECRET not in repr(target)
    assert SECRET in target.conninfo


_HOST = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


@given(
    hosts=st.lists(_HOST, min_size=1, max_size=6),
    ports=st.lists(st.integers(1, 65535), min_size=6, max_size=6),
    one_port=st.booleans(),
)
def test_split_keeps_order_and_pairs_ports(
    hosts: list[str], ports: list[int], one_port: bool
) -> None:
    """Any host list splits into as many targets, in order, each with its port."""
    used = ports[:1] if one_port else ports[: len(hosts)]
    dsn = f"host={','.join(hosts)} port={','.join(map(str, used))} dbname=app"
    targets = split_hosts(dsn)
    expected = [(h, used[0] if one_port else used[i]) for i, h in enumerate(hosts)]
    assert [(t.host, t.port) for t in targets] == expected
    assert all(_params(t)["dbname"] == "app" for t in targets)


# ------------------------------------------------------------------------------- assessment


def test_lsn_text_is_a_byte_position() -> None:
    """'X/Y' is X * 2**32 + Y, both hexadecimal."""
    assert lsn_to_int("0/3000148") == 0x3000148
    assert lsn_to_int("16/B374D848") == (0x16 << 32) + 0xB374D848


def test_primary_and_standby_with_byte_lags() -> None:
    """A primary and a standby: roles, agreement, received-not-replayed and behind-primary."""
    reports = assess(
        [
            _primary(current="0/3000400"),
            _standby(receive="0/3000300", replay="0/3000100", lag=2.5, pid=200),
        ]
    )
    primary, standby = reports
    assert (primary.role, primary.writable, primary.via_pooler) == ("primary", True, False)
    assert (primary.lag_seconds, primary.behind_primary_bytes) == (None, None)
    assert (standby.role, standby.writable) == ("standby", False)
    assert (standby.lag_seconds, standby.unreplayed_bytes) == (2.5, 0x200)
    assert standby.behind_primary_bytes == 0x300
    assert (primary.parameter_status, standby.parameter_status) == ("agrees", "agrees")
    assert standby.server_version == "15.18 (Debian 15.18-0+deb12u1)"
    assert exit_code(reports) == 0
    assert notes(reports) == []


def test_byte_lags_are_floored_at_zero() -> None:
    """Positions read a few ms apart never give a negative lag."""
    _, standby = assess(
        [_primary(current="0/100"), _standby(receive="0/100", replay="0/200", pid=200)]
    )
    assert (standby.unreplayed_bytes, standby.behind_primary_bytes) == (0, 0)


def test_standby_without_wal_receiver_or_replayed_transaction() -> None:
    """No WAL receiver (receive lsn NULL) and no replayed transaction: those lags are None."""
    (standby,) = assess([_standby(receive=None, lag=None)])
    assert (standby.unreplayed_bytes, standby.lag_seconds) == (None, None)
    assert standby.behind_primary_bytes is None  # no primary reached


def test_parameter_status_disagreeing_with_query() -> None:
    """in_hot_standby=on on a server the query says is a primary: disagrees, with a note."""
    seen = _seen(6432, _row(standby=False, pid=100), pooler=True, hot="on")
    (report,) = assess([seen])
    assert (report.role, report.in_hot_standby, report.parameter_status) == (
        "primary",
        "on",
        "disagrees",
    )
    assert report.via_pooler is True
    assert any("disagrees" in n and "pooler's cached value" in n for n in notes([report]))


def test_parameter_status_not_reported_before_14() -> None:
    """No in_hot_standby (PostgreSQL < 14): 'not reported', the query decides."""
    (report,) = assess([_seen(5432, _row(standby=True), hot=None)])
    assert (report.role, report.in_hot_standby, report.parameter_status) == (
        "standby",
        None,
        "not reported",
    )
    assert "not reported" in format_report([report])


def test_unreachable_host_keeps_its_error() -> None:
    """An observation without a row is unreachable, with its error and connect time."""
    (report,) = assess([_seen(1, None, error=REFUSED)])
    assert (report.role, report.error, report.connect_ms) == ("unreachable", REFUSED, 1.5)
    assert (report.parameter_status, report.writable, report.via_pooler) == (None, None, None)


def test_pooler_and_direct_address_of_one_server_count_once() -> None:
    """PgBouncer in front of the primary plus the primary itself: one primary, exit 0."""
    pooled = _seen(6432, _row(standby=False), pooler=True, hot="off")
    reports = assess([_primary(), _standby(pid=200), pooled])
    assert reports[2].via_pooler is True
    assert reports[2].server_address == "127.0.0.1:5432"
    assert exit_code(reports) == 0
    assert reports[1].behind_primary_bytes == 0


def test_two_primary_servers_are_a_split_brain() -> None:
    """Two distinct primary servers: a split-brain note, exit 1, no behind-primary figure."""
    reports = assess([_primary(5432), _primary(5433, pid=7), _standby(5434, pid=8)])
    assert exit_code(reports) == 1
    assert notes(reports)[0] == "2 primaries: split brain? (127.0.0.1:5432, 127.0.0.1:5433)"
    assert reports[2].behind_primary_bytes is None


def test_restarted_server_on_same_address_is_another_server() -> None:
    """Same address, different start time (e.g. an address reused): two primaries."""
    reports = assess([_primary(), _primary(started="2026-01-02 00:00:00+00")])
    assert exit_code(reports) == 1


def test_no_primary_is_noted() -> None:
    """Only standbys and unreachable hosts: 'no primary reachable', exit 1."""
    reports = assess([_standby(), _seen(1, None, error=REFUSED)])
    assert exit_code(reports) == 1
    assert notes(reports) == [
        "no primary reachable: writes will fail",
        "1 of 2 hosts unreachable",
    ]


def test_pooler_in_front_of_a_standby_is_flagged() -> None:
    """A pooler whose server is a standby: writes through it will fail."""
    pooled = _seen(6432, _row(standby=True, port=5433), pooler=True, hot="on")
    reports = assess([_primary(), pooled])
    assert (
        "127.0.0.1:6432: PgBouncer (a pooler) in front of a standby (127.0.0.1:5433):"
        " writes will fail"
    ) in notes(reports)


def test_read_only_primary_is_flagged() -> None:
    """A primary with default_transaction_read_only=on is shown and noted as read-only."""
    reports = assess([_primary(read_only=True)])
    assert reports[0].writable is False
    assert "primary (read-only)" in format_report(reports)
    assert any("read-only by default" in n for n in notes(reports))


def test_idle_primary_caught_up_standby_is_explained() -> None:
    """Seconds of replay lag with 0 bytes behind: the primary is idle, not the standby late."""
    reports = assess([_primary(), _standby(pid=9, lag=42.0)])
    assert any("primary is idle" in n for n in notes(reports))


def test_unknown_pooler_is_noted() -> None:
    """No backend PID at login: whether a pooler is in between is unknown and said so."""
    (report,) = assess([_seen(5432, _row(standby=False), client_pid=0, hot="off")])
    assert report.via_pooler is None
    assert any("cannot tell whether a pooler" in n for n in notes([report]))


# ---------------------------------------------------------------------------------- output


def _mixed() -> list[HostReport]:
    pooled = _seen(6432, _row(standby=False), pooler=True, hot="off")
    return assess([_primary(), _standby(pid=200, lag=0.25), pooled, _seen(9, None, error=REFUSED)])


def test_table_columns_are_aligned() -> None:
    """Every table line starts each column at the same offset as the header."""
    text = format_report(_mixed())
    table = text.split("\n\n")[0].splitlines()
    header = table[0]
    starts = [header.index(name) for name in ("ROLE", "VIA", "IN_HOT_STANDBY", "CONNECT")]
    assert len(table) == 5
    for line in table[1:]:
        for start in starts:
            assert line[start - 2 : start] == "  ", line
            assert line[start] != " ", line
    assert "pooler -> 127.0.0.1:5432" in text
    assert "on, agrees" in text


def test_table_lists_errors_with_sqlstate_and_notes() -> None:
    """Errors follow the table with kind, SQLSTATE and class; then the notes."""
    text = format_report(_mixed())
    assert "errors:\n  127.0.0.1:9: refused [08001 connection exception]: Connection refused" in (
        text
    )
    assert text.endswith("notes:\n  - 1 of 4 hosts unreachable")


def test_json_shape() -> None:
    """JSON: hosts (every HostReport field, error as an object), primaries, notes, exit_code."""
    document = json.loads(to_json(_mixed()))
    assert set(document) == {"hosts", "primaries", "notes", "exit_code"}
    assert document["primaries"] == ["127.0.0.1:5432"]
    assert document["exit_code"] == 0
    hosts = document["hosts"]
    assert [h["role"] for h in hosts] == ["primary", "standby", "primary", "unreachable"]
    assert set(hosts[0]) == {f.name for f in HostReport.__dataclass_fields__.values()}
    assert hosts[1]["lag_seconds"] == 0.25
    assert hosts[1]["behind_primary_bytes"] == 0
    pooled = _seen(6432, _row(standby=False, port=5432), pooler=True, hot="off")
    assert json.loads(to_json(assess([pooled])))["primaries"] == ["127.0.0.1:5432"]
    assert hosts[3]["error"] == {
        "kind": "refused",
        "sqlstate": "08001",
        "sqlstate_class": "08 connection exception",
        "message": "Connection refused",
    }


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("message", "kind", "sqlstate"),
    [
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
            'password authentication failed for user "app"',
            "auth",
            "28P01",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 6432 failed: FATAL:  '
            "SASL authentication failed",
            "auth",
            "28P01",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
            'database "nope" does not exist',
            "no-database",
            "3D000",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection '
            "refused\n\tIs the server running on that host and accepting TCP/IP connections?",
            "refused",
            "08001",
        ),
        (
            "failed to resolve host 'nonexistent.invalid': [Errno -2] Name or service not known",
            "dns",
            "08001",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
            "the database system is starting up",
            "unavailable",
            "57P03",
        ),
        ("something odd", "other", None),
    ],
)
def test_connect_errors_are_typed(message: str, kind: str, sqlstate: str | None) -> None:
    """psycopg's SQLSTATE-less connect errors get a kind and an inferred SQLSTATE."""
    info = error_info(psycopg.OperationalError(message), connected=False)
    assert (info.kind, info.sqlstate) == (kind, sqlstate)
    assert "\n" not in info.message
    assert not info.message.startswith("connection failed")


def test_connect_timeout_is_a_timeout() -> None:
    """psycopg's ConnectionTimeout is kind 'timeout', class 08."""
    info = error_info(
        psycopg.errors.ConnectionTimeout("connection timeout expired"), connected=False
    )
    assert (info.kind, info.sqlstate, info.sqlstate_class) == (
        "timeout",
        "08001",
        "08 connection exception",
    )


def test_error_after_connecting_is_lost() -> None:
    """A connection error during the query, once connected, is kind 'lost'."""
    info = error_info(psycopg.OperationalError("server closed the connection"), connected=True)
    assert info.kind == "lost"


def test_server_sqlstate_decides_the_kind() -> None:
    """Errors that carry a SQLSTATE keep it: 28P01 is auth, 57P01 once connected is lost."""
    auth = error_info(psycopg.errors.InvalidPassword("bad"), connected=False)
    assert (auth.kind, auth.sqlstate, auth.sqlstate_class) == (
        "auth",
        "28P01",
        "28 invalid authorization specification",
    )
    shutdown = error_info(psycopg.errors.AdminShutdown("terminating"), connected=True)
    assert (shutdown.kind, shutdown.sqlstate) == ("lost", "57P01")
    other = error_info(psycopg.errors.UndefinedFunction("no such function"), connected=True)
    assert (other.kind, other.sqlstate, other.sqlstate_class) == ("other", "42883", None)


def test_error_message_never_contains_a_secret() -> None:
    """Any passed secret is masked in the message, quoted pieces included."""
    ex = psycopg.OperationalError(f'invalid percent-encoded token: "p%zz{SECRET}"')
    info = error_info(ex, [SECRET], connected=False)
    assert SECRET not in info.message
    assert info.message == 'invalid percent-encoded token: "***"'


def test_password_never_appears_in_any_output() -> None:
    """Table and JSON of reports whose errors mentioned the password do not contain it."""
    ex = psycopg.OperationalError(f"connection failed: password={SECRET} rejected")
    error = error_info(ex, secret_candidates(f"host=a password={SECRET}"), connected=False)
    reports = assess([_primary(), _seen(2, None, error=error)])
    assert SECRET not in format_report(reports)
    assert SECRET not in to_json(reports)


# ------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgfailover")
    survey.add_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_parses_dsn_timeout_and_json() -> None:
    """probe DSN --timeout 1.5 --json parses into dsn, timeout (float) and json."""
    args = _parser().parse_args(["probe", "host=a", "--timeout", "1.5", "--json"])
    assert (args.command, args.dsn, args.timeout, args.json) == ("probe", "host=a", 1.5, True)
    defaults = _parser().parse_args(["probe", "host=a"])
    assert (defaults.timeout, defaults.json) == (3.0, False)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf", "nan"])
def test_cli_rejects_a_bad_timeout(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--timeout must be a finite number > 0: argparse exits 2 with a clear message."""
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["probe", "host=a", f"--timeout={value}"])
    assert info.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_run_command_bad_dsn_exits_2_without_the_password() -> None:
    """An unparseable DSN prints one clear line (no password) and returns 2."""
    out: list[str] = []
    err: list[str] = []
    args = argparse.Namespace(dsn=f"postgresql://app:{SECRET}%zz@h/app", timeout=1.0, json=False)
    assert survey.run_command(args, out.append, err=err.append) == 2
    assert out == []
    assert len(err) == 1
    assert err[0].startswith("pgfailover probe: cannot parse the connection string")
    assert SECRET not in err[0]


def test_run_command_rejects_a_bad_timeout_value() -> None:
    """A Namespace built by hand with timeout 0 or not a number also returns 2."""
    for timeout in (0.0, "3", True):
        err: list[str] = []
        args = argparse.Namespace(dsn="host=a", timeout=timeout, json=False)
        assert survey.run_command(args, err=err.append) == 2
        assert "timeout" in err[0]


def test_survey_rejects_non_positive_timeout() -> None:
    """survey(timeout=0) is a ValueError before any connection."""
    with pytest.raises(ValueError, match="timeout"):
        survey.survey("host=a", timeout=0)
