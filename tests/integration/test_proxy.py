"""FaultProxy on a real cluster: relaying, backend switches, faults at protocol moments."""

from __future__ import annotations

import concurrent.futures
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgfailover.testing import (
    ClientMessage,
    FaultProxy,
    LocalCluster,
    Node,
    ProxyError,
)
from pgfailover.testing._ports import release_port, reserve_port
from pgfailover.testing.proxy import When, contains_commit, query_matches, split_statements

Conn = psycopg.Connection[tuple[Any, ...]]
AConn = psycopg.AsyncConnection[tuple[Any, ...]]
WHENS: list[When] = ["before", "after_forward", "after_reply"]
#: Whether the row written in the faulted transaction exists afterwards. after_forward: the
#: server gets the COMMIT then end-of-file, so it commits (the client still cannot know).
COMMITTED = {"before": False, "after_forward": True, "after_reply": True}


@pytest.fixture
def cluster(pgfailover_cluster: LocalCluster) -> LocalCluster:
    """The session cluster: node0 primary, node1 its standby."""
    return pgfailover_cluster


@pytest.fixture
def proxy(cluster: LocalCluster) -> Iterator[FaultProxy]:
    """A started proxy to the primary; closing it raises if anything failed inside."""
    with FaultProxy(cluster.primary) as p:
        yield p
    assert not p.errors


def _connect(proxy: FaultProxy, node: Node, **kwargs: Any) -> Conn:
    return psycopg.connect(proxy.dsn_for(node, connect_timeout=5), **kwargs)


def _table(cluster: LocalCluster) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    return name


def _rows(cluster: LocalCluster, table: str) -> list[int]:
    with cluster.primary.connect(superuser=False) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


def _server(conn: Conn) -> tuple[int, bool]:
    row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
    assert row is not None
    return row[0], row[1]


def _all_closed(proxy: FaultProxy) -> None:
    """Wait until both sides of every connection are closed (the backends have exited)."""
    proxy.wait_until(lambda s: s.open == 0)


def _ssl_request() -> bytes:
    return struct.pack("!ii", 8, 80877103)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"end of file after {data!r}"
        data += chunk
    return data


# ---------------------------------------------------------------- relaying
def test_relays_sync_connections_and_counts_them(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """Sync psycopg connections work through the proxy, which counts and lists them."""
    with _connect(proxy, cluster.primary) as one, _connect(proxy, cluster.primary) as two:
        assert _server(one) == (cluster.primary.port, False)
        assert two.execute("SELECT %s::text", ["x" * 200_000]).fetchone() == ("x" * 200_000,)
        stats = proxy.stats()
        assert (stats.accepted, stats.open) == (2, 2)
        listed = proxy.connections()
        assert [c.id for c in listed] == [1, 2]
        assert all(c.backend == (cluster.primary.host, cluster.primary.port) for c in listed)
        assert all(c.blind is None for c in listed)
    _all_closed(proxy)
    assert proxy.stats().bytes_to_server > 200_000


async def test_relays_async_connections(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """Async psycopg connections work through the proxy, and a COMMIT fault fires on them."""
    table = _table(cluster)
    aconn: AConn = await psycopg.AsyncConnection.connect(proxy.dsn_for(cluster.primary))
    async with aconn:
        cur = await aconn.execute("SELECT inet_server_port()")
        assert await cur.fetchone() == (cluster.primary.port,)
        await aconn.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.drop_on("after_reply")
        with pytest.raises(psycopg.OperationalError):
            await aconn.commit()
    assert [f.query for f in proxy.wait_faults(1)] == ["COMMIT"]
    assert _rows(cluster, table) == [1]


def test_parses_through_a_refused_ssl_request(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """With sslmode=prefer the server answers 'N' to the SSLRequest and parsing goes on."""
    with cluster.primary.connect() as conn:
        assert conn.execute("SHOW ssl").fetchone() == ("off",)
    table = _table(cluster)
    with psycopg.connect(proxy.dsn_for(cluster.primary, sslmode="prefer")) as conn:
        assert proxy.connections()[0].blind is None
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.drop_on("before")
        with pytest.raises(psycopg.OperationalError):
            conn.commit()
    assert len(proxy.wait_faults(1)) == 1
    assert _rows(cluster, table) == []


def test_relays_tls_blindly_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """When the backend accepts TLS ('S') the connection is relayed verbatim and marked blind."""
    port = reserve_port()
    try:
        with (
            socket.create_server(("127.0.0.1", port)) as backend,
            FaultProxy(("127.0.0.1", port)) as proxy,
            socket.create_connection((proxy.host, proxy.port), timeout=5) as client,
        ):
            proxy.drop_on("before", lambda m: True, times=None)
            client.sendall(_ssl_request())
            backend.settimeout(5)
            server, _ = backend.accept()
            with server:
                server.settimeout(5)
                assert _recv_exactly(server, 8) == _ssl_request()
                server.sendall(b"S")
                assert _recv_exactly(client, 1) == b"S"
                hello = b"\x16\x03\x01 not a startup packet"
                client.sendall(hello)
                assert _recv_exactly(server, len(hello)) == hello
                ready = b"Z\x00\x00\x00\x05I"  # looks like a message, is not parsed
                server.sendall(ready)
                assert _recv_exactly(client, len(ready)) == ready
                assert [c.blind for c in proxy.connections()] == ["TLS"]
    finally:
        release_port(port)
    assert proxy.faults == []
    assert any("relayed blindly (TLS)" in r.getMessage() for r in caplog.records)


def test_relays_cancel_requests(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """A CancelRequest, a connection of its own, reaches the server through the proxy."""
    with (
        _connect(proxy, cluster.primary, autocommit=True) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        pid = conn.info.backend_pid
        canceller = pool.submit(_cancel_once_running, cluster, conn, pid)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        canceller.result(timeout=5)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.stats().accepted == 2


def _cancel_once_running(cluster: LocalCluster, conn: Conn, pid: int) -> None:
    sql = "SELECT wait_event FROM pg_stat_activity WHERE pid = %s"
    deadline = time.monotonic() + 5
    with cluster.primary.connect() as admin:
        while admin.execute(sql, [pid]).fetchone() != ("PgSleep",):
            assert time.monotonic() < deadline, "the statement never started"
            time.sleep(0.01)
    conn.cancel_safe(timeout=5)


# ---------------------------------------------------------------- switching backends
def test_switch_keeps_existing_connections_on_the_old_backend(
    cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """After switch(), old connections still reach the primary and new ones the standby."""
    standby = cluster.standbys[0]
    with _connect(proxy, cluster.primary) as old:
        assert _server(old) == (cluster.primary.port, False)
        proxy.switch(standby.host, standby.port)
        assert proxy.target == (standby.host, standby.port)
        with _connect(proxy, standby) as new:
            assert _server(new) == (standby.port, True)
            assert _server(old) == (cluster.primary.port, False)
        proxy.wait_until(lambda s: s.open == 1)
        backends = {c.id: c.backend[1] for c in proxy.connections()}
        assert backends == {1: cluster.primary.port}
        proxy.switch(cluster.primary)  # a Node works as well
        with _connect(proxy, cluster.primary) as back:
            assert _server(back) == (cluster.primary.port, False)


def test_switch_with_drop_existing_resets_old_connections(
    cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """switch(drop_existing=True) resets existing connections; new ones reach the new backend."""
    standby = cluster.standbys[0]
    with _connect(proxy, cluster.primary) as old:
        proxy.switch(standby, drop_existing=True)
        assert proxy.stats().open == 0
        with pytest.raises(psycopg.OperationalError):
            old.execute("SELECT 1")
    with _connect(proxy, standby) as new:
        assert _server(new) == (standby.port, True)


def test_switch_to_a_dead_backend_closes_new_clients(
    cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """New connections to a backend that refuses are closed and counted as backend failures."""
    dead = reserve_port()  # reserved and bindable: nothing listens there
    try:
        proxy.switch("127.0.0.1", dead)
        with pytest.raises(psycopg.OperationalError):
            _connect(proxy, cluster.primary)
    finally:
        release_port(dead)
    stats = proxy.wait_until(lambda s: s.open == 0)
    assert (stats.accepted, stats.backend_failures) == (1, 1)


# ---------------------------------------------------------------- COMMIT faults
def _insert_in_transaction(conn: Conn, table: str, ids: list[int]) -> None:
    with conn.transaction():
        for i in ids:
            conn.execute(f"INSERT INTO {table} VALUES (%s)", [i])


def _insert_and_commit_in_pipeline(conn: Conn, table: str) -> None:
    with conn.pipeline():
        conn.execute(f"INSERT INTO {table} VALUES (%s)", [1])
        conn.commit()


@pytest.mark.parametrize("style", ["commit", "transaction"])
@pytest.mark.parametrize("when", WHENS)
def test_commit_fault(cluster: LocalCluster, proxy: FaultProxy, when: When, style: str) -> None:
    """COMMIT via commit()/transaction() drops at `when`: client error, row kept unless 'before'."""
    table = _table(cluster)
    rule = proxy.drop_on(when)
    with _connect(proxy, cluster.primary, autocommit=style == "transaction") as conn:
        if style == "commit":
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            with pytest.raises(psycopg.OperationalError):
                conn.commit()
        else:
            with pytest.raises(psycopg.OperationalError):
                _insert_in_transaction(conn, table, [1])
    (fault,) = proxy.wait_faults(1)
    assert (fault.rule, fault.when, fault.connection_id) == (rule, when, 1)
    assert (fault.message_type, fault.query) == ("Q", "COMMIT")
    assert proxy.remaining(rule) == 0
    assert proxy.rules == []
    _all_closed(proxy)
    assert _rows(cluster, table) == ([1] if COMMITTED[when] else [])


@pytest.mark.parametrize("when", WHENS)
def test_pipeline_commit_fault(cluster: LocalCluster, proxy: FaultProxy, when: When) -> None:
    """In pipeline mode COMMIT goes as Parse/Bind/Describe/Execute + Sync and still matches."""
    table = _table(cluster)
    proxy.drop_on(when)
    with _connect(proxy, cluster.primary) as conn, pytest.raises(psycopg.OperationalError):
        _insert_and_commit_in_pipeline(conn, table)
    (fault,) = proxy.wait_faults(1)
    assert (fault.message_type, fault.query) == ("P", "COMMIT")
    _all_closed(proxy)
    assert _rows(cluster, table) == ([1] if COMMITTED[when] else [])


def test_pipeline_transaction_block_commit_fault(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """A transaction() block in pipeline mode: after_reply fires on its COMMIT, row committed."""
    table = _table(cluster)
    proxy.drop_on("after_reply")
    with (
        _connect(proxy, cluster.primary, autocommit=True) as conn,
        pytest.raises(psycopg.OperationalError),
        conn.pipeline(),
    ):
        _insert_in_transaction(conn, table, [1, 2])
    (fault,) = proxy.wait_faults(1)
    assert (fault.message_type, fault.query) == ("P", "COMMIT")
    assert _rows(cluster, table) == [1, 2]


@pytest.mark.parametrize("when", ["before", "after_reply"])
def test_multi_statement_query_with_commit(
    cluster: LocalCluster, proxy: FaultProxy, when: When
) -> None:
    """A simple query 'INSERT ...; COMMIT' matches: 'before' never runs it at all."""
    table = _table(cluster)
    proxy.drop_on(when)
    with _connect(proxy, cluster.primary) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            conn.execute(f"INSERT INTO {table} VALUES (2); /* done */ commit")
    (fault,) = proxy.wait_faults(1)
    assert fault.query == f"INSERT INTO {table} VALUES (2); /* done */ commit"
    _all_closed(proxy)
    assert _rows(cluster, table) == ([1, 2] if when == "after_reply" else [])


def test_prepared_commit_matches_its_bind(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """A prepared COMMIT matches on the Bind that runs it, not on the Parse that prepares it."""
    table = _table(cluster)
    proxy.drop_on("before")
    with _connect(proxy, cluster.primary) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("COMMIT", prepare=True)
    (fault,) = proxy.wait_faults(1)
    assert (fault.message_type, fault.query) == ("B", "COMMIT")
    assert _rows(cluster, table) == []


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("COMMIT", True),
        ("end", True),
        ("  commit and chain", True),
        ("SELECT 1; COMMIT", True),
        ("-- note\nCOMMIT;", True),
        ("/* c */ end transaction", True),
        ("COMMIT PREPARED 'x'", True),
        ("SELECT 'x; COMMIT'", False),
        ('SELECT 1 AS "a;commit"', False),
        ("SELECT $$; commit$$", False),
        ("SELECT 1 -- ; COMMIT", False),
        ("INSERT INTO commits VALUES (1)", False),
        ("SELECT endpoint FROM t", False),
        ("ROLLBACK", False),
    ],
)
def test_commit_detection(sql: str, expected: bool) -> None:
    """The default matcher finds a COMMIT/END statement, not one inside quotes or comments."""
    assert contains_commit(sql) is expected


def test_split_statements() -> None:
    """Statements are split on ';' outside quotes and comments, stripped, empties dropped."""
    assert split_statements("a; 'b;c' ;; -- d;\n e /* ; */") == ["a", "'b;c'", "e"]


# ---------------------------------------------------------------- rules
def test_custom_matcher_sees_every_client_message(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """A custom matcher gets every typed client message and can drop before an INSERT."""
    table = _table(cluster)
    seen: list[ClientMessage] = []

    def insert_of_two(message: ClientMessage) -> bool:
        seen.append(message)
        return message.type == "Q" and "VALUES (2)" in (message.query or "")

    proxy.drop_on("before", insert_of_two)
    with _connect(proxy, cluster.primary, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert [m.type for m in seen][-2:] == ["Q", "Q"]
    assert all(m.connection_id == 1 for m in seen)
    assert "payload" not in repr(seen[-1])
    _all_closed(proxy)
    assert _rows(cluster, table) == [1]


def test_rule_fires_the_given_number_of_times(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """times=2 drops two matching statements, then lets the third through."""
    table = _table(cluster)
    rule = proxy.drop_on("after_forward", query_matches(r"^INSERT"), times=2)
    for i in range(3):
        with _connect(proxy, cluster.primary, autocommit=True) as conn:
            if i < 2:
                with pytest.raises(psycopg.OperationalError):
                    conn.execute(f"INSERT INTO {table} VALUES ({i})")
            else:
                conn.execute(f"INSERT INTO {table} VALUES ({i})")
    assert [f.connection_id for f in proxy.faults] == [1, 2]
    assert proxy.remaining(rule) == 0
    _all_closed(proxy)
    assert _rows(cluster, table) == [0, 1, 2]


def test_scope_new_spares_connections_opened_before(
    cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """A rule scoped 'new' fires on connections accepted after it, not on older ones."""
    with _connect(proxy, cluster.primary) as old:
        proxy.drop_on("before", query_matches("SELECT 42"), scope="new", times=None)
        assert old.execute("SELECT 42").fetchone() == (42,)
        with _connect(proxy, cluster.primary) as new, pytest.raises(psycopg.OperationalError):
            new.execute("SELECT 42")
        assert old.execute("SELECT 42").fetchone() == (42,)
    assert [f.connection_id for f in proxy.faults] == [2]
    assert len(proxy.rules) == 1


def test_matcher_errors_are_surfaced(cluster: LocalCluster) -> None:
    """An exception in a matcher is recorded and logged, and close() raises ProxyError."""

    def broken(message: ClientMessage) -> bool:
        raise RuntimeError("matcher bug")

    proxy = FaultProxy(cluster.primary).start()
    try:
        proxy.drop_on("before", broken)
        with _connect(proxy, cluster.primary) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert any("matcher bug" in str(e) for e in proxy.errors)
    finally:
        with pytest.raises(ProxyError, match="matcher bug"):
            proxy.close()


def test_a_dead_proxy_thread_is_reported(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the proxy thread dies, later calls and close() raise ProxyError naming the cause."""
    proxy = FaultProxy(cluster.primary).start()

    def crash() -> None:
        raise RuntimeError("loop bug")

    monkeypatch.setattr(proxy, "_pump_all", crash)
    try:
        proxy.latency(0)  # answered, then the thread dies
        with pytest.raises(ProxyError, match="died: RuntimeError"):
            proxy.wait_until(lambda s: False)
        with pytest.raises(ProxyError, match="loop bug"):
            proxy.drop_all()
    finally:
        with pytest.raises(ProxyError, match="died"):
            proxy.close()
    assert proxy._thread is not None
    assert not proxy._thread.is_alive()


# ---------------------------------------------------------------- network faults


def test_blackhole_holds_everything_until_restore(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """Blackholed, a statement and a new connection get nothing; after restore() both finish."""
    with (
        _connect(proxy, cluster.primary) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        socket.create_connection((proxy.host, proxy.port), timeout=5) as raw,
    ):
        raw.sendall(_ssl_request())
        assert raw.recv(1) == b"N"  # the probe works before the blackhole
        raw.close()
        proxy.blackhole()
        try:
            assert proxy.blackholed
            pending = pool.submit(lambda: conn.execute("SELECT 7").fetchone())
            with pytest.raises(concurrent.futures.TimeoutError):
                pending.result(timeout=0.3)  # the statement's client-side timeout
            with socket.create_connection((proxy.host, proxy.port), timeout=5) as probe:
                proxy.wait_until(lambda s: s.accepted == 3)
                probe.sendall(_ssl_request())
                probe.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    probe.recv(1)
                proxy.restore()
                probe.settimeout(5)
                assert probe.recv(1) == b"N"
        finally:
            proxy.restore()  # else the pending statement would keep the executor waiting
        assert pending.result(timeout=5) == (7,)
        assert conn.execute("SELECT 8").fetchone() == (8,)


def test_latency_delays_each_direction(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """latency(s) makes a round trip take at least 2*s; latency(0) removes it."""
    with _connect(proxy, cluster.primary, autocommit=True) as conn:
        conn.execute("SELECT 1")
        proxy.latency(0.15)
        start = time.perf_counter()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert time.perf_counter() - start >= 0.3
        proxy.latency(0)
        start = time.perf_counter()
        conn.execute("SELECT 1")
        assert time.perf_counter() - start < 0.15


def test_drop_all_resets_every_connection(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """drop_all() closes every current connection at once; the proxy keeps accepting."""
    with _connect(proxy, cluster.primary) as one, _connect(proxy, cluster.primary) as two:
        assert proxy.drop_all() == 2
        assert proxy.stats().open == 0
        for conn in (one, two):
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    with _connect(proxy, cluster.primary) as three:
        assert three.execute("SELECT 1").fetchone() == (1,)


def test_close_stops_the_thread_and_frees_everything(cluster: LocalCluster) -> None:
    """close() closes the connections and the port and joins the thread; it is idempotent."""
    proxy = FaultProxy(cluster.primary)
    before = set(threading.enumerate())
    with proxy:
        conn = _connect(proxy, cluster.primary)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert len(set(threading.enumerate()) - before) == 1
        assert "password" not in repr(proxy)
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((proxy.host, proxy.port), timeout=2),
    ):
        pass
    proxy.close()
    with pytest.raises(ProxyError, match="closed"):
        proxy.drop_all()
