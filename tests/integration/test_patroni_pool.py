"""pgfailover's pool with ``PatroniTopology`` against a real etcd + Patroni cluster.

- A leader crash under write load with ``synchronous_mode`` on: under the retry runner no
  transaction fails, none is lost or written twice, no outcome is left unknown.
- A split brain: after the crash, the old primary is started by hand (without Patroni) and
  accepts writes. Nothing written through pgfailover lands on it (Patroni names another
  leader), while a naive multi-host conninfo that lists it first writes there: the hazard
  this guards against.

One crash serves both (each costs about Patroni's ``ttl``). Timings live in
``benchmarks/`` (the Patroni failover benchmark), not here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgfailover
from pgfailover.pool import ConnectionPool
from pgfailover.testing import PatroniCluster
from pgfailover.testing._process import ServerProcess
from pgfailover.testing.patroni import PatroniNode

WORKERS = 4


def _app_conninfo(cluster: PatroniCluster) -> str:
    """The application's conninfo without host and port (the topology supplies them)."""
    leader = cluster.wait_leader()
    params = conninfo_to_dict(leader.dsn())
    del params["host"], params["port"]
    return make_conninfo("", **params, connect_timeout=2)


def _patch_config(cluster: PatroniCluster, changes: dict[str, Any]) -> None:
    """PATCH Patroni's dynamic configuration (stored in etcd, applied by every member)."""
    status, body = cluster.wait_leader().api("/config", "PATCH", changes, timeout=5)
    assert status == 200, body


def _wait_synchronous(cluster: PatroniCluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(m.role == "sync_standby" for m in cluster.members()):
        assert time.monotonic() < deadline, "no synchronous standby appeared"
        time.sleep(0.1)


@pytest.fixture
def synchronous(pgfailover_patroni_cluster: PatroniCluster) -> Iterator[PatroniCluster]:
    """The session Patroni cluster with ``synchronous_mode`` on for the test."""
    cluster = pgfailover_patroni_cluster
    _patch_config(cluster, {"synchronous_mode": True})
    _wait_synchronous(cluster)
    try:
        yield cluster
    finally:
        cluster.reset()
        _patch_config(cluster, {"synchronous_mode": False})


class Writers:
    """Threads inserting unique keys through the runner; what each call was told."""

    def __init__(self, pool: ConnectionPool[Any], table: str) -> None:
        self.pool, self.table = pool, table
        self.acked: set[str] = set()
        self.failed: dict[str, str] = {}
        self.unknown: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(WORKERS)]

    def _run(self, worker: int) -> None:
        runner = pgfailover.TransactionRunner(self.pool, timeout=60)
        i = 0
        while not self._stop.is_set():
            i += 1
            key = f"{worker}-{i}"
            try:
                runner(self._insert, key)
                self.acked.add(key)
            except pgfailover.CommitOutcomeUnknown:
                self.unknown.add(key)
            except Exception as ex:
                self.failed[key] = f"{type(ex).__name__}: {ex}"
            time.sleep(0.005)

    def _insert(self, conn: psycopg.Connection[Any], key: str) -> None:
        conn.execute(f"INSERT INTO {self.table} (k) VALUES (%s)", [key])

    def more(self, n: int, timeout: float = 60.0) -> None:
        target = len(self.acked) + n
        deadline = time.monotonic() + timeout
        while len(self.acked) < target:
            assert time.monotonic() < deadline, f"no progress: {self.failed or self.unknown}"
            time.sleep(0.02)

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def _keys(node: PatroniNode, table: str) -> dict[str, int]:
    with node.connect(superuser=False) as conn:
        rows = conn.execute(f"SELECT k, count(*) FROM {table} GROUP BY k").fetchall()
    return {str(k): int(n) for k, n in rows}


def _start_by_hand(cluster: PatroniCluster, node: PatroniNode) -> ServerProcess:
    """Start ``node``'s PostgreSQL without Patroni, as an operator might after a crash: it
    was the primary, so it comes up as a writable primary on its old timeline. Its
    synchronous standbys are gone, so the operator clears ``synchronous_standby_names``
    (else every commit there waits forever, which is a hazard of its own)."""
    runtime = cluster._rt
    argv = [runtime.bin.path("postgres"), "-D", str(node.datadir)]
    process = ServerProcess(
        runtime.osuser.wrap([*argv, "-c", "synchronous_standby_names="]),
        log_path=node.root / "by-hand.log",
        cwd=node.root,
        env=cluster._env(node.root),
        description=f"postgres {node.name} started by hand",
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with node.connect(connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and row[0] is False:
                    return process
        except psycopg.OperationalError:
            pass
        assert process.running, process.log_tail(20)
        assert time.monotonic() < deadline, "the node started by hand never accepted writes"
        time.sleep(0.1)


def test_leader_crash_under_load_and_a_split_brain(synchronous: PatroniCluster) -> None:
    """Four writers under the runner through a pool with PatroniTopology: across a kill -9
    of the leader (synchronous_mode) every call succeeds, every acknowledged key is on the
    new leader exactly once, none is unknown. Then the old primary is started by hand and
    accepts writes: pgfailover keeps writing only to Patroni's leader (0 rows on the
    impostor), while a naive multi-host conninfo listing the impostor first writes there."""
    cluster = synchronous
    table = f"p_{uuid.uuid4().hex[:10]}"
    with cluster.wait_leader().connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {table} (k text PRIMARY KEY)")
    topology = pgfailover.PatroniTopology([n.rest_url for n in cluster.nodes], timeout=1.0)
    with ConnectionPool[Any](
        _app_conninfo(cluster), topology=topology, min_size=4, max_size=8, timeout=60
    ) as pool:
        with Writers(pool, table) as writers:
            writers.more(20)
            old = cluster.wait_leader()
            cluster.kill_leader()
            writers.more(40)
        new = cluster.wait_leader()
        assert new is not old
        assert not writers.failed, writers.failed
        assert not writers.unknown, writers.unknown
        on_leader = _keys(new, table)
        assert not {k: n for k, n in on_leader.items() if n > 1}
        assert writers.acked <= on_leader.keys(), sorted(writers.acked - on_leader.keys())[:5]

        impostor = _start_by_hand(cluster, old)
        try:
            for i in range(20):
                pgfailover.TransactionRunner(pool, timeout=30)(writers._insert, f"after-{i}")
            # the way Patroni's docs connect: every member, read-write wanted; the
            # impostor happens to be listed first
            ordered = [old] + [n for n in cluster.nodes if n is not old]
            naive = make_conninfo(
                cluster.multihost_dsn(target_session_attrs="read-write"),
                host=",".join(n.host for n in ordered),
                port=",".join(str(n.port) for n in ordered),
            )
            with psycopg.connect(naive, autocommit=True) as conn:
                conn.execute(f"INSERT INTO {table} (k) VALUES ('naive')")
            on_impostor = _keys(old, table)
            on_leader = _keys(new, table)
        finally:
            impostor.signal(15)
            impostor.wait(30)
    after = {f"after-{i}" for i in range(20)}
    assert after <= on_leader.keys()
    assert not after & on_impostor.keys(), "pgfailover wrote to the node Patroni does not name"
    assert "naive" in on_impostor, "the naive conninfo did not reach the impostor"
    assert "naive" not in on_leader
