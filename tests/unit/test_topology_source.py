"""The shared source shell without I/O: caching, invalidation, max_age, leaderless retries,
errors shared by waiting callers. Discovery is scripted by a subclass."""

from __future__ import annotations

import threading
import time

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgfailover.topology import Member, NoLeader, Topology, TopologySource, TopologyUnavailable
from pgfailover.topology.source import NO_LEADER_RETRY


class Scripted(TopologySource):
    """A source whose discoveries return (or raise) what the test queued."""

    def __init__(self, *answers: Topology | TopologyUnavailable, max_age: float | None) -> None:
        super().__init__(conninfo="dbname=app", timeout=1.0, max_age=max_age)
        self.answers = list(answers)
        self.calls = 0
        self.entered = 0
        self.gate: threading.Event | None = None

    def refresh(self, *, newer_than: float | None = None, conninfo: str | None = None) -> Topology:
        self.entered += 1
        return super().refresh(newer_than=newer_than, conninfo=conninfo)

    def _discover(self, previous: Topology | None) -> Topology:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, TopologyUnavailable):
            raise answer
        return Topology(
            answer.members, answer.leader, answer.source, answer.origin, time.monotonic()
        )


def _topology(leader: str | None = "a") -> Topology:
    members = (Member("a", "h1", 5432, "leader"), Member("b", "h2", 5432, "replica"))
    return Topology(members, leader, "patroni", "test", 0.0)


def test_conninfo_for_leader_uses_the_cache_until_invalidated() -> None:
    """The first call refreshes, later calls use the cache (no discovery), invalidate()
    makes the next call refresh once; the caller's parameters are kept."""
    source = Scripted(_topology(), max_age=None)
    assert source.current() is None
    conninfo = source.conninfo_for_leader("dbname=app user=u password=p")
    assert conninfo_to_dict(conninfo) == {
        "dbname": "app",
        "user": "u",
        "password": "p",
        "host": "h1",
        "port": "5432",
    }
    source.conninfo_for_leader("dbname=app")
    assert source.calls == 1
    source.invalidate()
    source.conninfo_for_leader("dbname=app")
    source.conninfo_for_leader("dbname=app")
    assert source.calls == 2


def test_max_age_bounds_how_old_the_cache_gets() -> None:
    """A cache older than max_age is refreshed by the next conninfo_for_leader."""
    source = Scripted(_topology(), max_age=0.05)
    source.conninfo_for_leader("")
    deadline = time.monotonic() + 5
    while source.current() is not None and source.current().age(time.monotonic()) < 0.05:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    source.conninfo_for_leader("")
    assert source.calls == 2


def test_a_leaderless_topology_is_retried_at_most_every_interval() -> None:
    """Without a leader conninfo_for_leader raises NoLeader; it asks again only once the
    leaderless answer is NO_LEADER_RETRY old, and uses the leader once one appears."""
    moved = Topology((Member("b", "h2", 5432, "leader"),), "b", "patroni", "test", 0.0)
    source = Scripted(_topology(None), moved, max_age=None)
    with pytest.raises(NoLeader):
        source.conninfo_for_leader("")
    with pytest.raises(NoLeader):
        source.conninfo_for_leader("")
    assert source.calls == 1
    deadline = time.monotonic() + 5
    while source.current().age(time.monotonic()) < NO_LEADER_RETRY:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert conninfo_to_dict(source.conninfo_for_leader(""))["host"] == "h2"
    assert source.calls == 2


def test_callers_waiting_on_a_failed_refresh_get_its_error_without_retrying() -> None:
    """Callers that queued behind a refresh that failed get the same typed error, without a
    discovery of their own; newer_than skips I/O for an observation already recent."""
    source = Scripted(TopologyUnavailable("down", {"u": "HTTP 500"}), max_age=None)
    source.gate = threading.Event()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            source.refresh()
        except TopologyUnavailable as ex:
            errors.append(ex)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while source.calls == 0 or source.entered < 4:  # one discovering, the others queued
        assert time.monotonic() < deadline
        time.sleep(0.005)
    source.gate.set()
    for thread in threads:
        thread.join(10)
    assert len(errors) == 4
    assert all(isinstance(e, TopologyUnavailable) and "HTTP 500" in str(e) for e in errors)
    assert source.calls == 1

    ok = Scripted(_topology(), max_age=None)
    first = ok.refresh()
    assert ok.refresh(newer_than=first.observed_at) is first
    assert ok.calls == 1
