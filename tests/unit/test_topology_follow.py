"""Following the leader while a connection attempt is pending, and the REST URL order:
the pure decisions (attempt_outdated, rest_order) and follow() of both source flavours,
driven by scripted discoveries (no I/O)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgfailover.topology import (
    AsyncTopologySource,
    LeaderMoved,
    Member,
    Topology,
    TopologySource,
    TopologyUnavailable,
    attempt_outdated,
)
from pgfailover.topology.model import rest_order

A = Member("a", "h1", 5432, "leader")
B = Member("b", "h2", 5432, "leader")


def _topology(leader: Member | None) -> Topology:
    members = (
        Member("a", "h1", 5432, "replica"),
        Member("b", "h2", 5432, "replica"),
        *((leader,) if leader else ()),
    )
    unique = {m.name: m for m in members}
    return Topology(
        tuple(unique.values()), leader.name if leader else None, "patroni", "t", time.monotonic()
    )


class Moving(TopologySource):
    """A source whose discoveries name ``self.leader`` (or raise ``self.error``)."""

    def __init__(self) -> None:
        super().__init__(conninfo="dbname=app", timeout=1.0, max_age=None)
        self.leader: Member | None = A
        self.error: TopologyUnavailable | None = None

    def _discover(self, previous: Topology | None) -> Topology:
        if self.error is not None:
            raise self.error
        return _topology(self.leader)


class AsyncMoving(AsyncTopologySource):
    """:class:`Moving` for async callers."""

    def __init__(self) -> None:
        super().__init__(conninfo="dbname=app", timeout=1.0, max_age=None)
        self.leader: Member | None = A

    async def _discover(self, previous: Topology | None) -> Topology:
        return _topology(self.leader)


class Conn:
    """What an attempt returns: the conninfo it was given, and whether it was closed."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_attempt_outdated() -> None:
    """An attempt is outdated only when a known topology names another write target than
    the attempt's known one; no leader (an election) keeps it."""
    assert not attempt_outdated(A, _topology(A))
    assert attempt_outdated(A, _topology(B))
    assert not attempt_outdated(A, _topology(None))
    assert not attempt_outdated(None, _topology(B))
    assert not attempt_outdated(A, None)


urls = st.lists(st.sampled_from([f"http://h{i}:8008" for i in range(6)]), max_size=6)


@given(urls, urls, urls)
def test_rest_order_puts_failing_urls_last(
    learned: list[str], configured: list[str], failing: list[str]
) -> None:
    """Every URL once, learnt before configured, failing ones after the others, the
    relative order kept within each part."""
    order = rest_order(learned, configured, failing)
    every = list(dict.fromkeys(learned + configured))
    assert sorted(order) == sorted(every)
    good = [u for u in order if u not in failing]
    bad = [u for u in order if u in failing]
    assert order == good + bad
    assert good == [u for u in every if u not in failing]
    assert bad == [u for u in every if u in failing]


def test_follow_abandons_an_attempt_when_another_leader_is_named() -> None:
    """A pending attempt to the old leader is abandoned at the first refresh naming
    another: the new attempt goes to the new leader and its result is returned; the
    abandoned one's connection, made after all, is closed."""
    source = Moving()
    source.refresh()
    release = threading.Event()
    made: list[Conn] = []

    def connect() -> Conn:
        conn = Conn(source.conninfo_for_leader("dbname=app"))
        made.append(conn)
        if "h1" in conn.conninfo:
            source.leader = B  # the next refresh names b while this attempt waits
            release.wait(10)
        return conn

    conn = source.follow(connect, interval=0.01)
    assert "host=h2" in conn.conninfo
    assert not conn.closed
    release.set()
    deadline = time.monotonic() + 10
    while not made[0].closed:
        assert time.monotonic() < deadline, "the abandoned attempt's connection stayed open"
        time.sleep(0.01)


def test_follow_keeps_an_attempt_while_no_leader_is_named() -> None:
    """Refreshes that name no leader, or fail, leave the attempt alone: its result (or
    its error) is what follow returns (or raises)."""
    source = Moving()
    source.refresh()

    def connect() -> Conn:
        conn = Conn(source.conninfo_for_leader("dbname=app"))
        source.leader = None
        time.sleep(0.1)
        source.error = TopologyUnavailable("down")
        time.sleep(0.1)
        return conn

    assert "host=h1" in source.follow(connect, interval=0.01).conninfo

    def fails() -> Conn:
        raise ValueError("attempt failed")

    with pytest.raises(ValueError, match="attempt failed"):
        source.follow(fails, interval=0.01)


def test_follow_gives_up_when_the_leader_keeps_moving() -> None:
    """Each attempt sees another leader named while it waits: LeaderMoved after the
    allowed restarts, not an endless loop."""
    source = Moving()
    source.refresh()

    def connect() -> Conn:
        conninfo = source.conninfo_for_leader("dbname=app")
        source.leader = B if "h1" in conninfo else A
        time.sleep(5)
        return Conn(conninfo)

    with pytest.raises(LeaderMoved):
        source.follow(connect, interval=0.01)


def test_follow_async_cancels_the_abandoned_attempt() -> None:
    """The async flavour: the attempt to the old leader is cancelled once a refresh names
    another, and the attempt to the new leader is returned."""

    async def main() -> tuple[Conn, bool]:
        source = AsyncMoving()
        await source.refresh()
        cancelled = asyncio.Event()

        async def connect() -> Conn:
            conn = Conn(await source.conninfo_for_leader("dbname=app"))
            if "h1" in conn.conninfo:
                source.leader = B
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            return conn

        conn = await source.follow(connect, interval=0.01)
        await asyncio.wait_for(cancelled.wait(), 5)
        return conn, cancelled.is_set()

    conn, cancelled = asyncio.run(main())
    assert "host=h2" in conn.conninfo
    assert cancelled


def test_follow_rejects_a_bad_interval() -> None:
    """interval must be a number of seconds > 0: a clear error, before any attempt."""
    with pytest.raises(ValueError, match="interval"):
        Moving().follow(lambda: Conn(""), interval=0)


def test_follow_async_cancelled_by_its_caller_cancels_the_attempt() -> None:
    """A caller cancelled while follow waits (a pool closing) takes the attempt with it:
    no task is left connecting in the background."""

    async def main() -> bool:
        source = AsyncMoving()
        await source.refresh()
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def connect() -> Conn:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return Conn("")

        caller = asyncio.ensure_future(source.follow(connect, interval=0.01))
        await asyncio.wait_for(started.wait(), 5)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait_for(cancelled.wait(), 5)
        return cancelled.is_set()

    assert asyncio.run(main())
