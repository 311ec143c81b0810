"""The PatroniCluster test bed runs a real etcd + Patroni cluster and produces Patroni's own
failovers: a crashed leader, a hung leader, a planned switchover, and a clean teardown.

One session cluster serves every test (healed in between by ``pgfailover_patroni_cluster``);
each leader loss costs about ``ttl`` (10 s), so the file provokes only two of them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from pgfailover.testing import (
    HarnessError,
    PatroniCluster,
    PatroniError,
    PatroniNode,
    PatroniTimeout,
    live_pids,
)
from pgfailover.testing._ports import reserve_port
from pgfailover.testing.patroni import _poll

DEADLINE = 60.0


def _state(pid: int) -> str:
    """The process state letter of ``pid`` (``X`` once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat[stat.rindex(")") + 2]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (zombies, which nobody may reap here, count as gone)."""
    return _state(pid) not in ("Z", "X")


def _processes_mentioning(root: Path) -> list[int]:
    """Live processes whose command line or working directory lies under ``root``: those of
    a cluster in that directory. (A bare PID proves nothing: PIDs wrap at 32768 here and a
    busy machine reuses them within a minute.)"""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (str(root) + "/" in argv or cwd.startswith(str(root))) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _table(node: PatroniNode) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with node.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    return name


def _wait_row(node: PatroniNode, table: str, row_id: int) -> None:
    def check() -> bool | None:
        with node.connect(superuser=False, connect_timeout=2) as conn:
            row = conn.execute(f"SELECT 1 FROM {table} WHERE id = %s", [row_id]).fetchone()
        return True if row else None

    _poll(f"row {row_id} of {table} on {node.name}", check, DEADLINE)


def test_cluster_has_one_leader_whose_writes_reach_every_replica(
    pgfailover_patroni_cluster: PatroniCluster,
) -> None:
    """Exactly one member leads; a row written on it is replayed on both replicas, and the
    multi-host conninfo (read-write) and PgBouncer both reach the leader."""
    cluster = pgfailover_patroni_cluster
    members = cluster.members()
    assert [m.role for m in members].count("leader") == 1
    leader = cluster.leader()
    assert leader is not None
    assert next(m for m in members if m.role == "leader").name == leader.name
    table = _table(leader)
    with leader.connect(superuser=False) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'replicated')")
    for node in cluster.nodes:
        if node is not leader:
            _wait_row(node, table, 1)
            with node.connect(superuser=False) as conn:
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    with psycopg.connect(
        cluster.multihost_dsn(target_session_attrs="read-write", connect_timeout=5)
    ) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (leader.port,)
    assert cluster.pgbouncer is not None
    with psycopg.connect(cluster.pgbouncer.dsn(), prepare_threshold=None, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (2, 'through pgbouncer')")
        assert conn.execute("SELECT inet_server_port()").fetchone() == (leader.port,)


def test_members_lists_every_node_with_its_addresses_timeline_and_lag(
    pgfailover_patroni_cluster: PatroniCluster,
) -> None:
    """members() reports each node once, with its PostgreSQL address, REST URL, a running
    state, the leader's timeline, and a numeric lag for replicas only."""
    cluster = pgfailover_patroni_cluster
    members = cluster.members()
    assert [m.name for m in members] == [n.name for n in cluster.nodes]
    leader = next(m for m in members if m.role == "leader")
    for member in members:
        node = cluster.node(member.name)
        assert (member.host, member.port) == (node.host, node.port)
        assert member.api_url.startswith(node.rest_url + "/")
        assert member.state in ("running", "streaming")
        assert member.timeline == leader.timeline
        if member is leader:
            assert member.lag is None
        else:
            assert member.role in ("replica", "sync_standby")
            assert isinstance(member.lag, int)
            assert member.lag >= 0
    status, body = cluster.node(leader.name).api("/primary")
    assert status == 200
    assert body["role"] in ("master", "primary")
    assert cluster.etcd_url.startswith("http://127.0.0.1:")


def test_kill_leader_elects_a_new_leader_and_the_old_one_heals_back_as_replica(
    pgfailover_patroni_cluster: PatroniCluster,
) -> None:
    """SIGKILL of the leader's Patroni and postmaster: another member leads and takes writes
    within a few ttl; healed, the old leader streams from it and replays its writes."""
    cluster = pgfailover_patroni_cluster
    old = cluster.leader()
    assert old is not None
    old_pids = old.pids()
    timings = cluster.kill_leader()
    assert list(timings.phases) == ["killed", "elected", "writable"]
    assert timings["elected"] < 3 * cluster.ttl  # a generous bound on the outage
    assert old_pids
    assert old.pids() == []
    new = cluster.leader()
    assert new is not None
    assert new is not old
    assert timings.notes == {"old_leader": old.name, "new_leader": new.name}
    assert old.killed
    assert cluster.wait_leader() is new
    table = _table(new)
    with new.connect(superuser=False) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'after the crash')")

    healed = cluster.heal(old)
    assert "restart" in healed.phases
    assert not old.killed
    # heal() returns once the member runs again: its WAL receiver may still be starting
    _poll(
        f"{old.name} streaming from {new.name}", lambda: cluster._streams_from(old, new), DEADLINE
    )
    _wait_row(old, table, 1)
    repointed = cluster.repoint_pgbouncer(new)
    assert "reload" in repointed.phases
    assert cluster.pgbouncer is not None
    with psycopg.connect(cluster.pgbouncer.dsn(), prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (new.port,)


def test_switchover_moves_leadership_to_the_chosen_candidate(
    pgfailover_patroni_cluster: PatroniCluster,
) -> None:
    """A switchover through the REST API to a named replica: it leads and takes writes, and
    the old leader streams from it."""
    cluster = pgfailover_patroni_cluster
    old = cluster.leader()
    assert old is not None
    candidate = [n for n in cluster.nodes if n is not old][-1]
    timings = cluster.switchover(candidate)
    assert list(timings.phases) == ["writable", "confirmed", "rejoin"]
    assert cluster.leader() is candidate
    assert cluster.writable(candidate)
    assert not cluster.writable(old)
    assert cluster._streams_from(old, candidate)
    with pytest.raises(PatroniError, match="already the leader"):
        cluster.switchover(candidate)


def test_frozen_leader_loses_leadership_and_rejoins_after_thaw(
    pgfailover_patroni_cluster: PatroniCluster,
) -> None:
    """A leader whose every process is SIGSTOPped loses its key: another member leads and
    takes writes while it hangs; thawed and healed, it is a member of one healthy cluster
    again (replica, or leader if Patroni 3.0.2 let it take its key back)."""
    cluster = pgfailover_patroni_cluster
    old = cluster.leader()
    assert old is not None
    frozen = cluster.freeze(old)
    assert "frozen" in frozen.phases
    assert old.frozen
    assert old.pids()
    assert all(_state(pid) in ("t", "T") for pid in old.pids())

    new = cluster.wait_leader(timeout=DEADLINE)
    assert new is not old
    with new.connect(superuser=False) as conn:
        assert conn.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,)

    thawed = cluster.thaw(old)
    assert "thawed" in thawed.phases
    assert not old.frozen
    cluster.heal(old)
    cluster.reset()
    leader = cluster.leader()
    assert leader is not None
    assert cluster.writable(leader)
    for node in cluster.nodes:
        if node is not leader:
            assert cluster._streams_from(node, leader)
            assert not cluster.writable(node)


def test_synchronous_cluster_closes_without_leaving_any_process() -> None:
    """A synchronous_mode cluster names a sync standby, the default switchover candidate;
    after close(), no process of it (etcd, Patroni, postgres, PgBouncer) is alive, a frozen
    member included, and its directory is gone."""
    cluster = PatroniCluster(nodes=2, synchronous_mode=True, pgbouncer="transaction")
    with cluster:
        root = cluster.root
        assert root is not None
        leader = cluster.wait_leader()
        replica = next(n for n in cluster.nodes if n is not leader)
        roles = _poll(
            "a sync_standby in /cluster",
            lambda: (
                {m.name: m.role for m in cluster.members()}.get(replica.name) == "sync_standby"
                or None
            ),
            DEADLINE,
        )
        assert roles
        with leader.connect() as conn:
            row = conn.execute("SHOW synchronous_standby_names").fetchone()
        assert row is not None
        assert replica.name in row[0]
        cluster.switchover()  # the default candidate is the synchronous standby
        assert cluster.leader() is replica
        leader, replica = replica, leader
        pids = cluster.pids()
        assert cluster.etcd is not None
        assert cluster.etcd.process is not None
        assert cluster.pgbouncer is not None
        assert cluster.pgbouncer.process is not None
        started = {
            cluster.etcd.process.pid,
            cluster.pgbouncer.process.pid,
            *(n.patroni_pid for n in cluster.nodes),
            *(n.postmaster_pid for n in cluster.nodes),
        }
        assert None not in started
        assert started <= set(pids)
        cluster.freeze(replica)
    assert _processes_mentioning(root) == []
    assert not root.exists()
    assert not set(live_pids()) & set(pids)
    cluster.close()  # idempotent


def test_a_cluster_never_closed_is_ended_at_interpreter_exit() -> None:
    """A program that opens a cluster and exits without closing it leaves no process of it
    and no directory: the exit hook ends them."""
    program = (
        "from pgfailover.testing import PatroniCluster\n"
        "cluster = PatroniCluster(nodes=1)\n"
        "cluster.open()\n"
        "print(cluster.root)\n"
        "print(' '.join(str(pid) for pid in cluster.pids()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    root_line, pids_line = result.stdout.splitlines()[-2:]
    root = Path(root_line)
    pids = [int(pid) for pid in pids_line.split()]
    assert len(pids) >= 3  # etcd, Patroni, the postmaster and its children
    assert _processes_mentioning(root) == []
    assert not root.exists()


def test_open_failing_on_a_taken_etcd_port_leaves_no_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """etcd cannot listen on its client port (another socket holds it): open() raises with
    etcd's log, and nothing of the cluster is left running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        monkeypatch.setattr(
            "pgfailover.testing.patroni.reserve_port", lambda: next(ports, None) or reserve_port()
        )
        cluster = PatroniCluster(nodes=1)
        with pytest.raises(HarnessError, match="etcd exited during start-up"):
            cluster.open()
    root = cluster.root
    assert root is not None
    assert _processes_mentioning(root) == []
    assert not root.exists()


def test_open_interrupted_mid_bootstrap_ends_every_process_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C while Patroni bootstraps (once a postmaster runs) propagates from open(), and
    no process of the cluster is left behind."""

    def interrupt(self: PatroniCluster, exclude: object, timeout: float) -> PatroniNode:
        _poll(
            "a postmaster started by Patroni's bootstrap",
            lambda: any(n.postmaster_pid for n in self.nodes) or None,
            DEADLINE,
            interval=0.01,
        )
        raise KeyboardInterrupt

    monkeypatch.setattr(PatroniCluster, "_wait_writable_leader", interrupt)
    cluster = PatroniCluster(nodes=2)
    with pytest.raises(KeyboardInterrupt):
        cluster.open()
    root = cluster.root
    assert root is not None
    assert _processes_mentioning(root) == []
    assert not root.exists()
    with pytest.raises(HarnessError, match="already opened"):
        cluster.open()


def test_bad_timing_profile_is_refused_before_anything_starts() -> None:
    """A profile breaking Patroni's rule loop_wait + 2 * retry_timeout <= ttl is a ValueError
    that names the rule; so are nodes < 1 and synchronous_mode with one node."""
    with pytest.raises(ValueError, match=r"loop_wait \+ 2 \* retry_timeout must be <= ttl"):
        PatroniCluster(ttl=5, loop_wait=1, retry_timeout=3)
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        PatroniCluster(nodes=0)
    with pytest.raises(ValueError, match="synchronous_mode needs at least 2 nodes"):
        PatroniCluster(nodes=1, synchronous_mode=True)
    assert issubclass(PatroniTimeout, PatroniError)
