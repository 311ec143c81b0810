"""The harness's frozen server: ``LocalCluster.freeze()`` stops a node's processes (a hung
machine), ``thaw()`` resumes them, and ``reset()``/``close()`` never wait on a stopped one."""

from __future__ import annotations

import select
import shutil
import socket
import struct
from pathlib import Path

import psycopg
import pytest

from pgfailover.testing import LocalCluster
from pgfailover.testing.cluster import _descendants
from pgfailover.testing.plugin import ClusterFactory

from .support import eventually

#: An SSLRequest start-up packet: a live postmaster answers it with one byte, 'S' or 'N'.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def _ask_ssl(address: tuple[str, int]) -> socket.socket:
    """A TCP connection to ``address`` that has sent an SSLRequest (the kernel accepts it
    whether or not the server runs its accept loop)."""
    sock = socket.create_connection(address, timeout=5)
    sock.sendall(SSL_REQUEST)
    return sock


def _answer(sock: socket.socket, within: float) -> bytes | None:
    """The server's one-byte answer if it comes within ``within`` seconds, else None."""
    ready, _, _ = select.select([sock], [], [], within)
    return sock.recv(1) if ready else None


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (``T`` stopped, ``Z`` zombie...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def test_a_frozen_server_accepts_tcp_but_answers_nothing_until_thawed(
    pgfailover_cluster: LocalCluster,
) -> None:
    """Frozen, the primary's postmaster and every process under it are stopped: a new TCP
    connection is accepted by the kernel but its start-up packet gets no answer, and a new
    libpq connection times out; thawed, the pending start-up packet is answered and
    connections work again."""
    node = pgfailover_cluster.primary
    assert node.pid is not None
    pids = [node.pid, *_descendants(node.pid)]
    timings = pgfailover_cluster.freeze(node)
    try:
        assert "freeze" in timings.phases
        assert pgfailover_cluster.frozen(node)
        assert [p for p in pids if _state(p) not in ("T", None)] == []
        pending = _ask_ssl((node.host, node.port))
        assert _answer(pending, 1.0) is None, "a frozen server answered"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(node.dsn(), connect_timeout=2).close()
    finally:
        thawed = pgfailover_cluster.thaw(node)
    assert "thaw" in thawed.phases
    assert not pgfailover_cluster.frozen(node)
    with pending:
        assert _answer(pending, 10.0) in (b"S", b"N")
    with psycopg.connect(node.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reset_thaws_a_frozen_node_before_anything_else(
    pgfailover_cluster: LocalCluster,
) -> None:
    """reset() (the fixture's restore between tests) thaws a frozen primary first: it comes
    back as the primary, answering, with no node left frozen."""
    node = pgfailover_cluster.primary
    pgfailover_cluster.freeze(node)
    try:
        timings = pgfailover_cluster.reset()
    finally:
        pgfailover_cluster.thaw(node)  # a no-op once reset() did its job
    assert "thaw" in timings.phases
    assert not pgfailover_cluster.frozen(node)
    assert pgfailover_cluster.role(node) == "primary"


def test_close_of_a_cluster_with_a_frozen_node_shuts_it_down_and_leaves_no_process(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """close() thaws a frozen node before it signals it: the postmaster itself acts on the
    shutdown request (its log says so; a stopped one would have been SIGKILLed after a
    10 s wait) and no process of the node is left alive."""
    cluster = pgfailover_cluster_factory(standbys=0, pgbouncer=None, keep_dir=True)
    node = cluster.primary
    assert cluster.root is not None
    root = cluster.root
    conn = node.connect()  # a backend under the postmaster, frozen with it
    try:
        assert node.pid is not None
        pids = [node.pid, *_descendants(node.pid)]
        assert len(pids) > 2
        cluster.freeze(node)
        cluster.close()
    finally:
        conn.pgconn.finish()  # never wait on it: its server was frozen
        cluster.close()
        log = node.log_path.read_text(errors="replace")
        shutil.rmtree(root, ignore_errors=True)
    eventually(lambda: all(_state(p) in (None, "Z") for p in pids), timeout=10)
    assert "received immediate shutdown request" in log
