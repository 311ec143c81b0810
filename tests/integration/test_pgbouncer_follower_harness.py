"""The harness's PgBouncer follower (``LocalCluster(follower=True)``,
``PatroniCluster(follower=True)``): the real ``pgfailover pgbouncer follow`` process keeps
PgBouncer on the primary through failovers that nobody repoints by hand."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from pgfailover.drill.stacks import Endpoint, NaivePool, ProtectedPoolRunner, Stack
from pgfailover.pgbouncer.admin import AdminConsole
from pgfailover.pgbouncer.repoint import repoint
from pgfailover.testing import LocalCluster, PatroniCluster
from pgfailover.testing._follower import FollowerProcess
from pgfailover.testing.cluster import SUPERUSER
from pgfailover.testing.plugin import ClusterFactory, PatroniFactory

from .support import eventually

_clusters: dict[str, LocalCluster | PatroniCluster] = {}


@pytest.fixture
def cluster(pgfailover_cluster_factory: ClusterFactory) -> LocalCluster:
    """Primary + standby + PgBouncer (transaction mode) + the follower, shared by this
    file's tests and reset (the follower, not the harness, puts PgBouncer back)."""
    cluster = _clusters.get("local")
    if cluster is None:
        cluster = pgfailover_cluster_factory(standbys=1, pgbouncer="transaction", follower=True)
        _clusters["local"] = cluster
    assert isinstance(cluster, LocalCluster)
    cluster.reset()
    return cluster


@pytest.fixture
def patroni(pgfailover_patroni_factory: PatroniFactory) -> PatroniCluster:
    """etcd + 2 Patroni members + PgBouncer (transaction mode) + the follower (--patroni)."""
    cluster = _clusters.get("patroni")
    if cluster is None:
        cluster = pgfailover_patroni_factory(nodes=2, pgbouncer="transaction", follower=True)
        _clusters["patroni"] = cluster
    assert isinstance(cluster, PatroniCluster)
    cluster.reset()
    return cluster


def _create_table(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("DROP TABLE IF EXISTS follower_writes")
    conn.execute("CREATE TABLE follower_writes (k bigint NOT NULL, stack text NOT NULL)")


@dataclass
class _Writers:
    """One writer thread per stack, each writing a new key in a loop and recording the
    keys acknowledged and the failures it saw, with ``time.monotonic()`` instants."""

    stacks: list[Stack]
    acked: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    failed: dict[str, list[str]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _key(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def _run(self, stack: Stack) -> None:
        while not self.stop.is_set():
            key = self._key()
            try:
                stack.write(key)
            except Exception as ex:  # what the application sees, recorded
                self.failed[stack.name].append(f"{type(ex).__name__}: {ex}")
            else:
                self.acked[stack.name].append((time.monotonic(), key))
            self.stop.wait(0.02)

    def __enter__(self) -> _Writers:
        for stack in self.stacks:
            self.acked[stack.name], self.failed[stack.name] = [], []
            thread = threading.Thread(target=self._run, args=(stack,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def finish(self) -> None:
        """Stop the writers (an operation in progress ends first) and close the stacks;
        idempotent."""
        if self.stop.is_set():
            return
        self.stop.set()
        for thread in self._threads:
            thread.join(60)
        for stack in self.stacks:
            stack.close()

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def acked_after(self, name: str, instant: float) -> bool:
        return any(at > instant for at, _ in list(self.acked[name]))


@pytest.fixture
def writers(cluster: LocalCluster) -> Iterator[_Writers]:
    """A plain psycopg_pool app and pgfailover's pool under the runner, writing through
    the cluster's PgBouncer into a fresh table."""
    with cluster.primary.connect(superuser=False) as conn:
        _create_table(conn)
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    endpoint = Endpoint(
        [(bouncer.host, bouncer.port)], cluster.dbname, cluster.user, cluster.password, False
    )
    stacks: list[Stack] = [
        NaivePool(endpoint, "follower_writes", 2),
        ProtectedPoolRunner(endpoint, "follower_writes", 2),
    ]
    with _Writers(stacks) as running:
        yield running


def _confirmed(follower: FollowerProcess, mark: int, address: str) -> str:
    """The follower's log from ``mark`` once it says ``SHOW DATABASES`` confirmed the new
    address. The line comes after the repoint's settle wait (1 s), so clients may already
    write there before it is logged: poll for it (15 s), then return the log."""
    expected = f"SHOW DATABASES: app, postgres at {address}"
    try:
        eventually(lambda: expected in follower.log_text(mark), timeout=15)
    except AssertionError:
        raise AssertionError(
            f"no {expected!r} in the follower's log:\n{follower.log_text(mark)}"
        ) from None
    return follower.log_text(mark)


def test_failover_without_manual_repoint_local(cluster: LocalCluster, writers: _Writers) -> None:
    """After ``failover()`` nobody repoints PgBouncer but the follower process: a plain
    psycopg_pool application writes through PgBouncer again, and pgfailover's pool under the
    retry runner sees no failed transaction and loses no acknowledged row."""
    assert cluster.follower is not None
    assert cluster.follower.running
    old = cluster.primary
    mark = cluster.follower.log_size()
    eventually(lambda: writers.acked_after("pgfailover pool + runner", 0.0), timeout=30)
    timings = cluster.failover()
    new = cluster.primary
    assert new is not old
    promoted = timings.ended_at["promote"]
    eventually(lambda: writers.acked_after("psycopg_pool", promoted), timeout=30)
    eventually(lambda: writers.acked_after("pgfailover pool + runner", promoted), timeout=30)
    writers.finish()
    log = _confirmed(cluster.follower, mark, new.address)
    assert cluster.password not in log
    assert cluster.superuser_password not in log
    assert writers.failed["pgfailover pool + runner"] == []
    acked = [key for _, key in writers.acked["pgfailover pool + runner"]]
    with new.connect(superuser=False) as conn:
        rows = conn.execute(
            "SELECT k, count(*) FROM follower_writes WHERE stack = %s GROUP BY k",
            ["pgfailover pool + runner"],
        ).fetchall()
    found = {int(k): int(n) for k, n in rows}
    assert [k for k in acked if found.get(k, 0) != 1] == []  # none lost, none twice


def test_two_followers_one_repoint(cluster: LocalCluster) -> None:
    """A second follower process next to the cluster's own, both watching the same hosts
    and PgBouncer: a failover is repointed once (one file rewrite between them), and
    neither moves PgBouncer again afterwards (no flapping)."""
    first, bouncer, root = cluster.follower, cluster.pgbouncer, cluster.root
    assert first is not None
    assert bouncer is not None
    assert root is not None
    second = FollowerProcess(
        root / "follower2",
        admin_dsn=first.argv[first.argv.index("--admin") + 1],
        source=["--hosts", ",".join(n.address for n in cluster.nodes)],
        check_dsn=f"dbname=postgres user={SUPERUSER}",
        passwords={SUPERUSER: cluster.superuser_password},
        interval=0.1,
    )
    try:
        second.start(30)
        both = (first, second)
        marks = [f.log_size() for f in both]
        cluster.failover()
        new = cluster.primary
        cluster.wait_pgbouncer_points_at(new, timeout=30)
        done = [f"points at {new.address}", f"SHOW DATABASES: app, postgres at {new.address}"]
        done.append(f"already pointing app, postgres at {new.address}")
        # each has finished its look at PgBouncer since: it says where PgBouncer points
        eventually(
            lambda: all(
                any(text in f.log_text(m) for text in done)
                for f, m in zip(both, marks, strict=True)
            ),
            timeout=30,
        )
        logs = [f.log_text(m) for f, m in zip(both, marks, strict=True)]
        rewrites = [line for log in logs for line in log.splitlines() if ": rewrote " in line]
        assert len(rewrites) == 1, logs
        assert all(new.address in line for line in rewrites)
        settled = [f.log_size() for f in both]
        config = bouncer.config_path.read_text()
        # about ten more rounds of each: PgBouncer stays on the new primary, nothing moves
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            assert bouncer.config_path.read_text() == config
            time.sleep(0.1)
        cluster.wait_pgbouncer_points_at(new, timeout=5)
        later = [f.log_text(s) for f, s in zip(both, settled, strict=True)]
        assert not any("rewrote" in log or "RELOAD" in log for log in later), later
    finally:
        assert second.stop(15) == 0


def test_patroni_switchover_followed(patroni: PatroniCluster) -> None:
    """A Patroni switchover, no manual repoint: the follower, watching the members' REST
    API (``follow --patroni``), points PgBouncer at the new leader, and a new client of
    PgBouncer writes there."""
    assert patroni.follower is not None
    assert patroni.pgbouncer is not None
    old = patroni.wait_leader()
    with old.connect(superuser=False) as conn:
        _create_table(conn)
    mark = patroni.follower.log_size()
    timings = patroni.switchover()
    new = patroni.node(timings.notes["new_leader"])
    assert new is not old
    patroni.wait_pgbouncer_points_at(new, timeout=30)
    with psycopg.connect(
        patroni.pgbouncer.dsn(), autocommit=True, prepare_threshold=None, connect_timeout=5
    ) as conn:
        conn.execute("INSERT INTO follower_writes (k, stack) VALUES (1, 'patroni')")
        row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
    assert row == (False, new.port)
    _confirmed(patroni.follower, mark, new.address)


def test_repoint_with_pause_holds_then_resumes(cluster: LocalCluster) -> None:
    """``repoint(pause=...)`` sends PAUSE for each database before the rewrite and RESUME
    after the RELOAD: PgBouncer takes the new address and no database stays paused (the
    cluster's follower then puts PgBouncer back on the primary)."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    standby = cluster.standbys[0]
    lines: list[str] = []
    with AdminConsole(bouncer.admin_dsn()) as admin:
        result = repoint(admin, standby.host, standby.port, pause=5.0, log=lines.append)
        assert result.paused == ["app", "postgres"]
        assert result.reloaded
        assert result.waiting == 0  # SHOW POOLS: no client left queued for a server
        rows = {row.name: row for row in admin.databases()}
    assert lines.index("PAUSE app") < lines.index("RELOAD") < lines.index("RESUME app"), lines
    assert not any(row.paused for row in rows.values())
    cluster.wait_pgbouncer_points_at(cluster.primary, timeout=30)


def test_repoint_pause_that_cannot_complete_is_withdrawn(cluster: LocalCluster) -> None:
    """A client inside a transaction holds its server connection, so PAUSE cannot
    complete: after the bound the pause is withdrawn (RESUME), the repoint goes on without
    it, and the database is not left paused."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    standby = cluster.standbys[0]
    lines: list[str] = []
    with psycopg.connect(bouncer.dsn(), prepare_threshold=None, connect_timeout=5) as holder:
        holder.execute("SELECT 1")  # a transaction stays open: its server stays linked
        with AdminConsole(bouncer.admin_dsn()) as admin:
            result = repoint(admin, standby.host, standby.port, pause=0.5, log=lines.append)
            rows = {row.name: row for row in admin.databases()}
        holder.rollback()
    assert "app" not in result.paused
    assert any("PAUSE app did not complete within 0.5 s" in line for line in lines), lines
    assert result.reloaded  # repoint() checked with SHOW DATABASES that it took
    assert not rows["app"].paused
    cluster.wait_pgbouncer_points_at(cluster.primary, timeout=30)
