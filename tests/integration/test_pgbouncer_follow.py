"""``pgfailover pgbouncer follow`` against a real cluster and PgBouncer: a failover with no
manual repoint, writes through PgBouncer back without anyone repointing it; SIGTERM ends the
process with status 0; with no leader in sight nothing changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgfailover.pgbouncer.follow import Follower
from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory
from pgfailover.topology import HostListTopology

from .support import bouncer_cluster, eventually, table


@pytest.fixture
def cluster(pgfailover_cluster_factory: ClusterFactory) -> Iterator[LocalCluster]:
    """The session's transaction-mode cluster, reset; afterwards the harness is told its
    PgBouncer's target is unknown, so that the next reset rewrites the file."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "transaction")
    yield cluster
    assert cluster.pgbouncer is not None
    cluster.pgbouncer.target = None


class _Process:
    """A follower process with its output lines collected by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgfailover.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # this test's own process, by its PID
            self.proc.wait(10)
        self._reader.join(10)


def _writes(cluster: LocalCluster, name: str) -> bool:
    """Whether a new client of PgBouncer can insert into ``name`` right now."""
    assert cluster.pgbouncer is not None
    try:
        with psycopg.connect(
            cluster.pgbouncer.dsn(), autocommit=True, prepare_threshold=None, connect_timeout=3
        ) as conn:
            conn.execute(f"INSERT INTO {name} (writer) VALUES (1)")
    except psycopg.Error:
        return False
    return True


def test_follower_repoints_after_a_failover_and_ends_on_sigterm(cluster: LocalCluster) -> None:
    """The follower first finds PgBouncer already on the leader and changes nothing; after
    a failover (no manual repoint) it confirms the new leader in-band and repoints, writes
    through PgBouncer succeed again; SIGTERM ends it with status 0. No password in its
    output."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    name = table(cluster)
    old, new = cluster.primary, cluster.standbys[0]
    follower = _Process(
        [
            "pgbouncer",
            "follow",
            "--admin",
            bouncer.admin_dsn(),
            "--hosts",
            f"{old.address},{new.address}",
            "--check-dsn",
            old.dsn(),
            "--interval",
            "0.2",
        ]
    )
    try:
        eventually(lambda: follower.said(f"points at {old.address}"), timeout=30)
        cluster.failover()
        eventually(lambda: _writes(cluster, name), timeout=30)
        # the follower's last lines of the repoint may still be on their way
        eventually(lambda: follower.said(f"SHOW DATABASES: app, postgres at {new.address}"), 30)
        assert follower.said("RELOAD")
        follower.proc.send_signal(signal.SIGTERM)
        assert follower.proc.wait(15) == 0
    finally:
        follower.end()
    assert follower.lines[-1].endswith("stopped (SIGTERM)")
    output = "\n".join(follower.lines)
    assert cluster.password not in output
    assert cluster.superuser_password not in output


def test_follower_without_a_leader_changes_nothing(cluster: LocalCluster) -> None:
    """A host list with no primary in it (only the standby): the follower logs that there
    is no leader, once, and leaves PgBouncer's file and running configuration alone."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    standby = cluster.standbys[0]
    before = bouncer.config_path.read_text()
    lines: list[str] = []
    follower = Follower(
        HostListTopology(standby.dsn()),
        [bouncer.admin_dsn()],
        check_conninfo=standby.dsn(),
        log=lines.append,
    )
    assert follower.step() is False
    assert follower.step() is False
    assert len(lines) == 1
    assert lines[0].startswith("no leader")
    assert lines[0].endswith("nothing changed")
    assert bouncer.config_path.read_text() == before
    dbs = {row["name"]: row for row in bouncer.admin("SHOW DATABASES")}
    assert dbs["app"]["port"] == cluster.primary.port


def test_two_followers_at_once_repoint_once(cluster: LocalCluster) -> None:
    """Two followers of one PgBouncer running a round at the same moment after a failover:
    one rewrites the file (the lock makes them take turns: one rewrite, no flapping), the
    other finds it done; both end with PgBouncer on the new leader, and writes through it
    work."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    name = table(cluster)
    old, new = cluster.primary, cluster.standbys[0]
    cluster.failover()
    logs: list[list[str]] = [[], []]
    followers = [
        Follower(
            HostListTopology(
                make_conninfo(
                    old.dsn(), host=f"{old.host},{new.host}", port=f"{old.port},{new.port}"
                )
            ),
            [bouncer.admin_dsn()],
            check_conninfo=old.dsn(),
            log=log.append,
        )
        for log in logs
    ]
    barrier = threading.Barrier(2)
    results: list[bool] = []

    def round_of(follower: Follower) -> None:
        barrier.wait(10)
        results.append(follower.step())

    threads = [threading.Thread(target=round_of, args=(f,)) for f in followers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [True, True]
    lines = [line for log in logs for line in log]
    assert len([line for line in lines if ": rewrote " in line]) == 1, lines
    # The second may still RELOAD (harmless: the file is already right) when PgBouncer had
    # not applied the first one's yet when it looked; never more than once each.
    assert 1 <= len([line for line in lines if line.endswith(": RELOAD")]) <= 2, lines
    eventually(lambda: _writes(cluster, name), timeout=30)
