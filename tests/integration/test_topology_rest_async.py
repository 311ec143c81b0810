# pgfailover: generate-sync
"""The Patroni topology source against a real HTTP server serving canned ``/cluster``
answers (bad input of every kind) and the real session cluster behind it.

The server (``http.server`` in a thread, on loopback) answers what each test scripts: a
good member list naming the harness's real nodes, HTTP 500, text that is not JSON, a member
list without a leader, or nothing at all (a request it never answers). Written once, async;
``tools/async_to_sync.py`` generates ``test_topology_rest.py``.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import pgfailover
from pgfailover.events import TopologyEvent
from pgfailover.testing import LocalCluster
from pgfailover.testing._ports import release_port, reserve_port
from pgfailover.topology import NoLeader, TopologyUnavailable
from pgfailover.topology.patroni_async import AsyncPatroniTopology
from pgfailover.topology.source_async import GRACE

TIMEOUT = 1.0
#: A fault must end within the source's bound plus this much (a loaded 2-core machine).
SLACK = 3.0


@dataclass
class Script:
    """What the canned server answers: ``status`` and ``body``, or nothing (``hang``)."""

    status: int = 200
    body: bytes = b""
    hang: bool = False
    trickle: bool = False
    delay: float = 0.0
    requests: int = 0
    release: threading.Event = field(default_factory=threading.Event)


class CannedServer:
    """A loopback HTTP server answering every GET with its :class:`Script`."""

    def __init__(self) -> None:
        self.script = Script()
        self.closed = False
        script = self.script

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                script.requests += 1
                if script.hang:
                    script.release.wait(30)  # a server that never answers (until teardown)
                    return
                if script.delay:
                    script.release.wait(script.delay)  # a slow server
                if script.trickle:  # headers, then a byte now and then, never the end
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    while not script.release.wait(0.05):
                        try:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                self.send_response(script.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(script.body)))
                self.end_headers()
                self.wfile.write(script.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, document: object, status: int = 200) -> None:
        self.script.hang = False
        self.script.status = status
        self.script.body = (
            document if isinstance(document, bytes) else json.dumps(document).encode()
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.script.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def rest() -> Iterator[CannedServer]:
    server = CannedServer()
    yield server
    server.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on."""
    port = reserve_port()
    yield port
    release_port(port)


@pytest.fixture
def topology_events() -> Iterator[list[TopologyEvent]]:
    seen: list[TopologyEvent] = []

    def hook(event: Any) -> None:
        if isinstance(event, TopologyEvent):
            seen.append(event)

    unsubscribe = pgfailover.subscribe(hook)
    yield seen
    unsubscribe()


def cluster_document(
    cluster: LocalCluster, leader: str | None = "primary", api_urls: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Patroni-like /cluster document for the harness's nodes; ``leader`` names the
    leader: ``primary`` (the real one), a node name, or None (no leader)."""
    members = []
    for node in cluster.nodes:
        is_leader = node is cluster.primary if leader == "primary" else node.name == leader
        member: dict[str, Any] = {
            "name": node.name,
            "role": "leader" if is_leader else "replica",
            "state": "running" if is_leader else "streaming",
            "host": node.host,
            "port": node.port,
            "timeline": 1,
        }
        if api_urls and node.name in api_urls:
            member["api_url"] = api_urls[node.name] + "/patroni"
        if not is_leader:
            member["lag"] = 0
        members.append(member)
    return {"members": members}


def base_conninfo(cluster: LocalCluster) -> str:
    """The application's conninfo: everything but the host and port matters."""
    return cluster.primary.dsn()


async def _gather(source: AsyncPatroniTopology, count: int) -> list[Any]:
    if True:  # ASYNC
        return list(await asyncio.gather(*(source.refresh() for _ in range(count))))
    else:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - sync twin only

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: source.refresh(), range(count)))


async def _connect(conninfo: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


# ------------------------------------------------------------------------------ the tests


async def test_unreachable_api_without_known_members_is_a_typed_error(
    closed_port: int,
) -> None:
    """A REST API nobody listens on gives TopologyUnavailable naming the URL and 'refused',
    at once."""
    source = AsyncPatroniTopology(f"http://127.0.0.1:{closed_port}", timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(TopologyUnavailable, match="connection refused") as info:
        await source.refresh()
    assert time.monotonic() - started < TIMEOUT + SLACK
    assert list(info.value.errors) == [f"http://127.0.0.1:{closed_port}"]
    assert source.current() is None


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (500, b'{"error": "boom"}', "HTTP 500"),
        (200, b"<html>not json</html>", "not JSON"),
        (200, b'{"members": "nobody"}', "'members' must be a list"),
        (404, b"", "HTTP 404"),
    ],
)
async def test_bad_answers_without_known_members_are_typed_errors(
    rest: CannedServer, status: int, body: bytes, said: str
) -> None:
    """HTTP 500, invalid JSON, a wrong schema, a 404: TopologyUnavailable saying what the
    URL answered, and nothing cached."""
    rest.answer(body, status)
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT)
    with pytest.raises(TopologyUnavailable, match=said):
        await source.refresh()
    assert source.current() is None


async def test_a_server_that_never_answers_ends_within_the_timeout(rest: CannedServer) -> None:
    """A REST API that accepts the request and never answers costs at most the timeout
    (plus the grace), then is reported as unanswered."""
    rest.script.hang = True
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(TopologyUnavailable, match="no answer"):
        await source.refresh()
    assert time.monotonic() - started < TIMEOUT + GRACE + SLACK
    assert rest.script.requests == 1


async def test_waiting_for_the_rest_api_lets_other_work_run(rest: CannedServer) -> None:
    """While a refresh waits for a REST API that never answers, other tasks (async: the
    event loop is never blocked; sync: other threads) keep running."""
    rest.script.hang = True
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT)
    ticks: list[float] = []
    done = threading.Event()

    async def tick() -> None:
        while not done.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    if True:  # ASYNC
        ticker: Any = asyncio.create_task(tick())
    else:
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    try:
        started = time.monotonic()
        with pytest.raises(TopologyUnavailable):
            await source.refresh()
        ended = time.monotonic()
    finally:
        done.set()
        if True:  # ASYNC
            await ticker
        else:
            ticker.join()
    assert len([t for t in ticks if started < t < ended]) >= 5


async def test_a_server_that_trickles_its_answer_ends_within_the_timeout(
    rest: CannedServer,
) -> None:
    """A REST API that sends headers, then a byte every 50 ms and never the end, costs at
    most the timeout (plus the grace): the whole read has one deadline."""
    rest.script.trickle = True
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(TopologyUnavailable, match="within"):
        await source.refresh()
    assert time.monotonic() - started < TIMEOUT + GRACE + SLACK


async def test_good_answer_leads_new_connections_to_the_leader(
    rest: CannedServer, pgfailover_cluster: LocalCluster
) -> None:
    """A good /cluster answer: members, leader, timelines and lag are read; the leader's
    conninfo keeps the caller's parameters and reaches the real primary, which validate()
    accepts; a standby is refused without being called fenced."""
    cluster = pgfailover_cluster
    rest.answer(cluster_document(cluster))
    source = AsyncPatroniTopology([rest.url], timeout=TIMEOUT)
    topology = await source.refresh()
    assert topology.leader == cluster.primary.name
    assert [m.name for m in topology.members] == [n.name for n in cluster.nodes]
    assert {m.timeline for m in topology.members} == {1}
    assert topology.member(cluster.standbys[0].name).lag == 0  # type: ignore[union-attr]
    conninfo = await source.conninfo_for_leader(
        cluster.multihost_dsn(target_session_attrs="any", application_name="topo")
    )
    async with await _connect(conninfo) as conn:
        assert conn.info.port == cluster.primary.port
        assert conn.info.parameter_status("application_name") == "topo"
        verdict = await source.validate(conn)
        assert verdict.accepted, verdict.reason
    async with await _connect(cluster.standbys[0].dsn()) as conn:
        verdict = await source.validate(conn)
        assert (verdict.accepted, verdict.fenced) == (False, False)
    assert rest.script.requests == 1  # conninfo_for_leader used the cache


async def test_a_writable_node_the_store_does_not_name_is_fenced_and_reported_once(
    rest: CannedServer,
    pgfailover_cluster: LocalCluster,
    topology_events: list[TopologyEvent],
) -> None:
    """When the store names another member leader, the real writable primary is refused
    (fenced) however it answers in-band, and reported once as a 'fenced' event."""
    cluster = pgfailover_cluster
    standby = cluster.standbys[0]
    rest.answer(cluster_document(cluster, leader=standby.name))
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT)
    await source.refresh()
    for _ in range(2):
        async with await _connect(cluster.primary.dsn()) as conn:
            verdict = await source.validate(conn)
        assert (verdict.accepted, verdict.fenced) == (False, True)
        assert f"names {standby.name}" in verdict.reason
    fenced = [e for e in topology_events if e.action == "fenced"]
    assert len(fenced) == 1
    assert fenced[0].leader == standby.address
    assert cluster.password not in fenced[0].summary()


async def test_a_member_list_without_a_leader_means_no_write_target(
    rest: CannedServer, pgfailover_cluster: LocalCluster
) -> None:
    """A valid answer without a leader (an election under way) is no failure and no
    fallback: conninfo_for_leader raises NoLeader, even though a node answers in-band as a
    writable primary."""
    cluster = pgfailover_cluster
    rest.answer(cluster_document(cluster, leader=None))
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT, conninfo=base_conninfo(cluster))
    topology = await source.refresh()
    assert (topology.source, topology.leader) == ("patroni", None)
    with pytest.raises(NoLeader, match="no leader"):
        await source.conninfo_for_leader(base_conninfo(cluster))


async def test_api_failures_fall_back_in_band_once_and_recover(
    rest: CannedServer,
    pgfailover_cluster: LocalCluster,
    topology_events: list[TopologyEvent],
) -> None:
    """After a good answer, HTTP 500, invalid JSON and a server that never answers each
    fall back to in-band checks of the last known members
    (the real primary is found, within the bounds), reported by one 'in-band fallback'
    event for the whole episode; a good answer ends it with 'REST API answers again'."""
    cluster = pgfailover_cluster
    rest.answer(cluster_document(cluster))
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT)
    await source.refresh()
    base = base_conninfo(cluster)
    for status, body, hang in ((500, b"oops", False), (200, b"{", False), (200, b"", True)):
        rest.answer(body, status)
        rest.script.hang = hang
        started = time.monotonic()
        topology = await source.refresh(conninfo=base)
        assert time.monotonic() - started < 2 * TIMEOUT + 2 + GRACE + SLACK
        assert (topology.source, topology.leader) == ("in-band fallback", cluster.primary.name)
        conninfo = await source.conninfo_for_leader(base)
        async with await _connect(conninfo) as conn:
            assert conn.info.port == cluster.primary.port
    assert [e.action for e in topology_events] == ["in-band fallback"]
    assert "HTTP 500" in topology_events[0].detail
    assert cluster.password not in topology_events[0].summary()
    rest.script.release.set()
    rest.answer(cluster_document(cluster))
    topology = await source.refresh()
    assert topology.source == "patroni"
    assert [e.action for e in topology_events] == ["in-band fallback", "REST API answers again"]


async def test_the_member_list_follows_the_cluster(
    pgfailover_cluster: LocalCluster,
) -> None:
    """The api_urls of the last answer are tried too: when the configured URL goes away the
    source keeps reading /cluster from a member it learnt about; a member dropped from the
    answer is dropped from the topology and its API is no longer asked."""
    cluster = pgfailover_cluster
    first, second = CannedServer(), CannedServer()
    try:
        urls = {cluster.nodes[0].name: first.url, cluster.nodes[1].name: second.url}
        first.answer(cluster_document(cluster, api_urls=urls))
        second.answer(cluster_document(cluster, api_urls=urls))
        source = AsyncPatroniTopology(first.url, timeout=TIMEOUT)
        assert (await source.refresh()).origin == first.url
        assert source.urls_to_try() == [first.url, second.url]
        first.close()
        topology = await source.refresh()
        assert (topology.origin, topology.source) == (second.url, "patroni")
        smaller = cluster_document(cluster, api_urls=urls)
        smaller["members"] = [m for m in smaller["members"] if m["name"] != "node1"]
        second.answer(smaller)
        topology = await source.refresh()
        assert [m.name for m in topology.members] == ["node0"]
        assert source.urls_to_try() == [first.url]
    finally:
        first.close()
        second.close()


async def test_concurrent_refreshes_share_one_request(
    rest: CannedServer, pgfailover_cluster: LocalCluster
) -> None:
    """Many callers refreshing at once (a failover seen by every connection) share one
    refresh: a slow server sees one request and every caller gets the same topology;
    ``newer_than`` an observation already made costs no request."""
    rest.answer(cluster_document(pgfailover_cluster))
    rest.script.delay = 0.3
    source = AsyncPatroniTopology(rest.url, timeout=TIMEOUT + 1)
    results = await _gather(source, 8)
    assert rest.script.requests == 1
    assert all(r is results[0] for r in results)
    assert await source.refresh(newer_than=results[0].observed_at) is results[0]
    assert rest.script.requests == 1
