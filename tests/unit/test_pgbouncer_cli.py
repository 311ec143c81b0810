"""``pgfailover pgbouncer doctor|repoint`` without servers: argument checks (status 2 with
the sub-command's usage line, never a password), doctor on files, exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pgfailover.cli import main
from pgfailover.pgbouncer.cli import parse_endpoint

GOOD_INI = """\
[databases]
app = host=10.0.0.1 port=5432 dbname=app

[pgbouncer]
pool_mode = session
server_login_retry = 0.5
server_check_query = select 1 / (1 - pg_is_in_recovery()::int)
server_check_delay = 1
server_fast_close = 1
tcp_keepidle = 10
tcp_keepintvl = 5
tcp_keepcnt = 3
tcp_user_timeout = 15000
query_wait_timeout = 30
"""


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``argv``, expect status 2 from the parser; its standard error."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_parse_endpoint() -> None:
    """HOST:PORT and [v6]:PORT parse; anything else is refused with what is expected."""
    assert parse_endpoint("db1:5433") == ("db1", 5433)
    assert parse_endpoint("[::1]:6432") == ("::1", 6432)
    for bad in ("db1", "db1:0", "db1:70000", ":5432", "db1:x", "a b:1"):
        with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
            parse_endpoint(bad)


@pytest.mark.parametrize(
    ("argv", "usage", "reason"),
    [
        (["pgbouncer", "doctor"], "pgbouncer doctor", "give --ini PATH, --admin DSN"),
        (["pgbouncer", "doctor", "--skip", "nope", "--ini", "x"], "doctor", "unknown rule"),
        (["pgbouncer", "repoint", "--to", "h:1"], "pgbouncer repoint", "--admin"),
        (["pgbouncer", "repoint", "--admin", "host=h", "--to", "h"], "repoint", "HOST:PORT"),
        (["pgbouncer"], "pgfailover pgbouncer", "required"),
        (["pgbouncer", "follow", "--admin", "host=h"], "pgbouncer follow", "--hosts"),
        (["pgbouncer", "follow", "--hosts", "a:1"], "pgbouncer follow", "--admin"),
        (
            [
                "pgbouncer",
                "follow",
                "--admin",
                "host=h",
                "--hosts",
                "a:1",
                "--patroni",
                "http://p:8008",
            ],
            "follow",
            "not allowed with",
        ),
        (["pgbouncer", "follow", "--admin", "host=h", "--hosts", "a:1,b"], "follow", "HOST:PORT"),
        (
            ["pgbouncer", "follow", "--admin", "host=h", "--hosts", "a:1", "--interval", "0"],
            "follow",
            "more than 0",
        ),
        (
            ["pgbouncer", "follow", "--admin", "host=h", "--patroni", "ftp://p"],
            "follow",
            "http://host:8008",
        ),
    ],
)
def test_bad_arguments_exit_2_with_the_usage_line(
    argv: list[str], usage: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every bad argument gets status 2, the sub-command's usage line and the reason."""
    err = _refused(argv, capsys)
    assert err.startswith("usage: ")
    assert usage in err.splitlines()[0]
    assert reason in err


def test_unparseable_admin_dsn_is_refused_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An admin DSN that cannot be parsed is a usage error whose text holds no password,
    nor does a stray argument's."""
    err = _refused(["pgbouncer", "doctor", "--admin", "host=x password='s3cr3t-pw"], capsys)
    assert "usage: pgfailover pgbouncer doctor" in err
    assert "s3cr3t-pw" not in err
    err = _refused(["pgbouncer", "doctor", "--ini", "x", "password=s3cr3t-pw"], capsys)
    assert "s3cr3t-pw" not in err
    argv = ["pgbouncer", "follow", "--admin", "host=h", "--hosts", "a:1"]
    err = _refused([*argv, "--check-dsn", "password='s3cr3t-pw"], capsys)
    assert "argument --check-dsn" in err
    assert "s3cr3t-pw" not in err
    err = _refused(
        ["pgbouncer", "follow", "--admin", "host=h", "--patroni", "http://u:s3cr3t-pw@p:8008"],
        capsys,
    )
    assert "must not hold credentials" in err
    assert "s3cr3t-pw" not in err


def test_doctor_on_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A good file: status 0 and says clean; a bad one: status 1 and the findings (text and
    JSON); --skip leaves rules out; an unreadable file: status 2 naming it."""
    good = tmp_path / "good.ini"
    good.write_text(GOOD_INI)
    assert main(["pgbouncer", "doctor", "--ini", str(good)]) == 0
    assert "no setting found" in capsys.readouterr().out
    bad = tmp_path / "bad.ini"
    bad.write_text(GOOD_INI.replace("server_login_retry = 0.5", "server_login_retry = 15"))
    assert main(["pgbouncer", "doctor", "--ini", str(bad), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [f["rule"] for f in data["findings"]] == ["login-retry"]
    assert data["judged_as"] == "1.18.0"
    assert main(["pgbouncer", "doctor", "--ini", str(bad), "--skip", "login-retry"]) == 0
    capsys.readouterr()
    assert main(["pgbouncer", "doctor", "--ini", str(tmp_path / "missing.ini")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_repoint_unreachable_console_exits_2_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A console nobody listens on: status 2, a message that names the problem, no password."""
    dsn = "host=127.0.0.1 port=1 user=postgres password=s3cr3t-pw connect_timeout=2"
    assert main(["pgbouncer", "repoint", "--admin", dsn, "--to", "127.0.0.1:5432"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to the admin console" in err
    assert "s3cr3t-pw" not in err
