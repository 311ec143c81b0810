"""``pgfailover probe`` (pgfailover.survey) against real servers and a real PgBouncer.

Marked ``integration`` by tests/conftest.py, like every module of this directory.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfailover import survey as survey_module
from pgfailover.survey import HostReport, exit_code, format_report, notes, survey, to_json
from pgfailover.testing import LocalCluster
from pgfailover.testing._ports import release_port, reserve_port

from .support import table

TIMEOUT = 2.0


def _with_hosts(dsn: str, *endpoints: tuple[str, int]) -> str:
    """``dsn`` with ``endpoints`` appended to its host and port lists."""
    params = conninfo_to_dict(dsn)
    hosts = str(params["host"]).split(",")
    ports = str(params["port"]).split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    params["host"] = ",".join([*hosts, *(h for h, _ in endpoints)])
    params["port"] = ",".join([*ports, *(str(p) for _, p in endpoints)])
    return make_conninfo("", **params)


def _by_address(reports: list[HostReport]) -> dict[str, HostReport]:
    return {r.address: r for r in reports}


def _commit_and_replicate(cluster: LocalCluster) -> None:
    """A committed write, replayed by every standby (so its replay timestamp is set)."""
    table(cluster)  # a transaction that writes WAL: its commit is flushed, not deferred
    cluster.wait_replicated()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (reserved by binding, then closed)."""
    port = reserve_port()
    yield port
    release_port(port)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never answers (a blackhole)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def test_multihost_dsn_shows_one_primary_and_one_standby_with_lag(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Over primary + standby: one writable primary, one standby with lag figures, both
    direct, in_hot_standby agreeing with the query; no password in the output."""
    cluster = pgfailover_cluster
    _commit_and_replicate(cluster)
    reports = survey(cluster.multihost_dsn(), timeout=TIMEOUT)
    primary, standby = reports
    assert (primary.address, standby.address) == (
        cluster.primary.address,
        cluster.standbys[0].address,
    )
    assert (primary.role, primary.writable, primary.via_pooler) == ("primary", True, False)
    assert (standby.role, standby.writable, standby.via_pooler) == ("standby", False, False)
    assert (primary.in_hot_standby, standby.in_hot_standby) == ("off", "on")
    assert (primary.parameter_status, standby.parameter_status) == ("agrees", "agrees")
    assert primary.server_address == cluster.primary.address
    assert standby.lag_seconds is not None
    assert 0 <= standby.lag_seconds < 60
    assert standby.unreplayed_bytes is not None
    assert standby.behind_primary_bytes is not None
    assert standby.behind_primary_bytes < 16 * 1024 * 1024
    assert primary.lag_seconds is None
    assert cluster.bin is not None
    for report in reports:
        assert report.error is None
        assert report.connect_ms is not None
        assert 0 < report.connect_ms < TIMEOUT * 1000
        assert report.server_version is not None
        assert report.server_version.startswith(f"{cluster.bin.major}.")
    assert exit_code(reports) == 0
    # the one note allowed: a loaded machine may take a second between the commit above and
    # the survey, and the standby's replay age then says the primary is idle (it is)
    assert [n for n in notes(reports) if "the primary is idle" not in n] == []
    for text in (format_report(reports), to_json(reports)):
        assert cluster.password not in text


def test_pgbouncer_in_front_of_the_primary_is_detected(pgfailover_cluster: LocalCluster) -> None:
    """Through PgBouncer: detected as a pooler (backend PID mismatch), role primary, its server
    named; listed with the primary itself it is the same server: one primary, exit 0."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    (pooled,) = survey(cluster.pgbouncer.dsn(), timeout=TIMEOUT)
    assert (pooled.role, pooled.writable, pooled.via_pooler) == ("primary", True, True)
    assert pooled.address == cluster.pgbouncer.address
    assert pooled.server_address == cluster.primary.address
    assert (pooled.in_hot_standby, pooled.parameter_status) == ("off", "agrees")
    dsn = _with_hosts(cluster.multihost_dsn(), (cluster.pgbouncer.host, cluster.pgbouncer.port))
    reports = survey(dsn, timeout=TIMEOUT)
    assert [r.via_pooler for r in reports] == [False, False, True]
    assert exit_code(reports) == 0
    assert f"pooler -> {cluster.primary.address}" in format_report(reports)


def test_pgbouncer_in_front_of_a_standby_is_flagged(pgfailover_cluster: LocalCluster) -> None:
    """PgBouncer repointed at the standby: reported as a pooler in front of a standby, with
    the note that writes will fail; with no other host, no primary: exit 1."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    standby = cluster.standbys[0]
    cluster.repoint_pgbouncer(standby)
    (pooled,) = survey(cluster.pgbouncer.dsn(), timeout=TIMEOUT)
    assert (pooled.role, pooled.via_pooler, pooled.server_address) == (
        "standby",
        True,
        standby.address,
    )
    found = notes([pooled])
    assert "no primary reachable: writes will fail" in found
    assert (
        f"{cluster.pgbouncer.address}: PgBouncer (a pooler) in front of a standby"
        f" ({standby.address}): writes will fail"
    ) in found
    assert exit_code([pooled]) == 1


def test_pgbouncer_forwards_a_stale_in_hot_standby_after_promotion(
    pgfailover_cluster: LocalCluster,
) -> None:
    """PgBouncer's server connection to a standby survives its promotion, and PgBouncer keeps
    sending new clients the in_hot_standby=on it cached: 'disagrees'. The old primary still
    runs: two primaries, a split-brain note, exit 1 (the fixture resets the cluster)."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    standby = cluster.standbys[0]
    cluster.repoint_pgbouncer(standby)
    with psycopg.connect(cluster.pgbouncer.dsn(), autocommit=True, prepare_threshold=None) as c:
        c.execute("SELECT 1")  # PgBouncer opens (and keeps) a server connection
    cluster.promote(standby)
    dsn = _with_hosts(cluster.multihost_dsn(), (cluster.pgbouncer.host, cluster.pgbouncer.port))
    reports = survey(dsn, timeout=TIMEOUT)
    pooled = _by_address(reports)[cluster.pgbouncer.address]
    assert (pooled.role, pooled.via_pooler, pooled.server_address) == (
        "primary",
        True,
        standby.address,
    )
    assert (pooled.in_hot_standby, pooled.parameter_status) == ("on", "disagrees")
    direct = _by_address(reports)[standby.address]
    assert (direct.in_hot_standby, direct.parameter_status) == ("off", "agrees")
    assert exit_code(reports) == 1
    text = format_report(reports)
    assert "2 primaries: split brain?" in text
    assert "on, disagrees" in text


def test_unreachable_host_is_reported_and_the_others_too(
    pgfailover_cluster: LocalCluster, closed_port: int
) -> None:
    """A closed port between the two nodes: refused at once, the nodes still reported."""
    cluster = pgfailover_cluster
    primary, standby = cluster.primary, cluster.standbys[0]
    params = conninfo_to_dict(cluster.multihost_dsn())
    params["host"] = "127.0.0.1,127.0.0.1,127.0.0.1"
    params["port"] = f"{primary.port},{closed_port},{standby.port}"
    started = time.monotonic()
    reports = survey(make_conninfo("", **params), timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT + 1
    assert [r.role for r in reports] == ["primary", "unreachable", "standby"]
    down = reports[1]
    assert down.address == f"127.0.0.1:{closed_port}"
    assert down.error is not None
    assert (down.error.kind, down.error.sqlstate) == ("refused", "08001")
    assert exit_code(reports) == 0
    assert "1 of 3 hosts unreachable" in notes(reports)


def test_host_that_never_answers_times_out_within_the_timeout(
    pgfailover_cluster: LocalCluster, silent_port: int
) -> None:
    """A host that accepts TCP but never answers: 'timeout' within timeout + 1 s (here 0.5 s,
    below libpq's 2 s floor), and the primary is still reported."""
    cluster = pgfailover_cluster
    dsn = _with_hosts(cluster.primary.dsn(), ("127.0.0.1", silent_port))
    started = time.monotonic()
    reports = survey(dsn, timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5
    assert [r.role for r in reports] == ["primary", "unreachable"]
    assert reports[1].error is not None
    assert reports[1].error.kind == "timeout"
    assert reports[1].error.message == "no answer within 0.5 s"


def test_wrong_password_is_an_auth_error_without_the_password(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A wrong password, direct and through PgBouncer: auth error 28P01; the password is in
    no output (table, JSON, CLI) and the exit code is 1."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    wrong = "Wr0ng-" + cluster.password
    dsn = _with_hosts(
        cluster.primary.dsn(password=wrong), (cluster.pgbouncer.host, cluster.pgbouncer.port)
    )
    reports = survey(dsn, timeout=TIMEOUT)
    for report in reports:
        assert report.role == "unreachable"
        assert report.error is not None
        assert (report.error.kind, report.error.sqlstate) == ("auth", "28P01")
        assert "authentication failed" in report.error.message
    lines: list[str] = []
    args = argparse.Namespace(dsn=dsn, timeout=TIMEOUT, json=False)
    assert survey_module.run_command(args, lines.append, err=lines.append) == 1
    args.json = True
    assert survey_module.run_command(args, lines.append, err=lines.append) == 1
    for text in (format_report(reports), to_json(reports), *lines):
        assert wrong not in text
        assert cluster.password not in text


def test_cli_glue_end_to_end(pgfailover_cluster: LocalCluster) -> None:
    """add_command + run_command: exit 0 with one primary (table and JSON), 1 without, 2 for
    an unparseable DSN."""
    cluster = pgfailover_cluster
    parser = argparse.ArgumentParser(prog="pgfailover")
    survey_module.add_command(parser.add_subparsers(dest="command", required=True))
    out: list[str] = []
    err: list[str] = []

    def run(*argv: str) -> int:
        return survey_module.run_command(parser.parse_args(argv), out.append, err=err.append)

    assert run("probe", cluster.multihost_dsn(), "--timeout", "2") == 0
    assert out[-1].splitlines()[0].split()[:3] == ["HOST", "ROLE", "VIA"]
    assert run("probe", cluster.multihost_dsn(), "--json") == 0
    document = json.loads(out[-1])
    assert document["primaries"] == [cluster.primary.address]
    assert [h["role"] for h in document["hosts"]] == ["primary", "standby"]
    assert run("probe", cluster.standbys[0].dsn()) == 1
    assert "no primary reachable" in out[-1]
    assert run("probe", "host=127.0.0.1 port=1,2,3") == 2
    assert err == ["pgfailover probe: 3 ports for 1 hosts: give one port for all, or one per host"]
    assert all(cluster.password not in line for line in out + err)
