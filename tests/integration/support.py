"""Helpers shared by the integration tests: workloads, polling, clusters behind PgBouncer."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory

#: Concurrent writers in recovery workloads.
WRITERS = 4


@dataclass
class Workload:
    """Outcomes of concurrent writers: monotonic timestamps of successes and failures."""

    ok: list[float] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def first_ok_after(self, instant: float) -> float:
        later = [t for t in self.ok if t > instant]
        assert later, "no successful write after the instant"
        return min(later) - instant

    def oks_after(self, instant: float) -> int:
        return len([t for t in self.ok if t > instant])


def table(cluster: LocalCluster) -> str:
    """A new table ``(id serial, writer int)`` owned by the cluster's application user."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, writer int)")
    return name


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


async def eventually_async(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Async twin of :func:`eventually`."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def no_server_left_on(cluster: LocalCluster, port: int) -> Callable[[], bool]:
    """A check: PgBouncer holds no server connection to ``port``."""

    def check() -> bool:
        assert cluster.pgbouncer is not None
        return all(s["port"] != port for s in cluster.pgbouncer.admin("SHOW SERVERS"))

    return check


_bouncer_clusters: dict[str, LocalCluster] = {}


def bouncer_cluster(factory: ClusterFactory, mode: str) -> LocalCluster:
    """A cluster behind PgBouncer in ``mode``, reset, with PgBouncer's login retry at 0.1 s.

    After a failed server login PgBouncer refuses new ones for ``server_login_retry`` (the
    harness's default is 0.1 s, PgBouncer's own 15 s): these tests measure the client, so
    they say the short wait explicitly. One cluster per mode is shared by every test of the
    session.
    """
    cluster = _bouncer_clusters.get(mode)
    if cluster is None:
        cluster = factory(standbys=1, pgbouncer=mode, server_login_retry=0.1)
        _bouncer_clusters[mode] = cluster
    cluster.reset()
    return cluster


def statement_calls(cluster: LocalCluster) -> int:
    """Statements the application user ran on the primary since the last reset."""
    with psycopg.connect(cluster.primary.dsn(user="postgres"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_roles r"
            " ON r.oid = s.userid WHERE r.rolname = %s",
            [cluster.user],
        ).fetchone()
        assert row is not None
        return int(row[0])


def reset_statements(cluster: LocalCluster) -> None:
    """Zero the primary's pg_stat_statements counters."""
    with psycopg.connect(cluster.primary.dsn(user="postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def count_key(cluster: LocalCluster, table: str, key: str) -> int:
    """How many rows of ``table`` on the primary have ``k = key``."""
    with cluster.primary.connect(superuser=False) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE k = %s", [key]).fetchone()
    assert row is not None
    return int(row[0])


def interruptible() -> None:
    """``preexec_fn`` for a child process the test will send SIGINT: SIGINT back to its
    default, which Python then turns into KeyboardInterrupt. A shell started in the
    background (``cmd &``, ``nohup``) ignores SIGINT, and an ignored signal is inherited
    through exec: the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
