"""The follower's pace: ``interval`` apart while all is well, fast rounds while something is
amiss, for a bounded time."""

from __future__ import annotations

import threading
import types

import pytest

from pgfailover.pgbouncer import follow
from pgfailover.pgbouncer.follow import FAST_INTERVAL, Follower
from pgfailover.topology import HostListTopology


class _Recorder(threading.Event):
    """An event that records every wait and sets itself after ``rounds`` of them."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.waits: list[float] = []
        self._rounds = rounds

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        if len(self.waits) >= self._rounds:
            self.set()
        return self.is_set()


class _Scripted(Follower):
    """A follower whose rounds answer from a script instead of looking at anything."""

    def __init__(self, outcomes: list[bool], interval: float) -> None:
        super().__init__(
            HostListTopology("host=a,b port=5432 dbname=x"),
            ["host=pgbouncer port=6432"],
            interval=interval,
        )
        self.outcomes = outcomes

    def step(self) -> bool:
        return self.outcomes.pop(0)


def test_rounds_are_fast_while_amiss_and_back_to_interval_once_followed() -> None:
    """After a round that found something amiss the next comes FAST_INTERVAL later, until a
    round ends with every PgBouncer on the leader; then ``interval`` again."""
    follower = _Scripted([True, False, False, True, True], interval=0.5)
    stop = _Recorder(5)
    follower.run(stop)
    assert stop.waits == [0.5, FAST_INTERVAL, FAST_INTERVAL, 0.5, 0.5]


def test_fast_rounds_end_after_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something amiss for longer than FAST_WINDOW (a PgBouncer down for good): rounds go
    back to ``interval`` instead of hammering the servers for ever."""
    clock = iter([0.0, 10.0, follow.FAST_WINDOW + 1.0, follow.FAST_WINDOW + 2.0])
    # only the follower module's clock is scripted
    fake = types.SimpleNamespace(monotonic=lambda: next(clock))
    monkeypatch.setattr("pgfailover.pgbouncer.follow.time", fake)
    follower = _Scripted([False, False, False, False], interval=0.5)
    stop = _Recorder(4)
    follower.run(stop)
    assert stop.waits == [FAST_INTERVAL, FAST_INTERVAL, 0.5, 0.5]


def test_an_interval_shorter_than_the_fast_one_is_kept() -> None:
    """With ``interval`` below FAST_INTERVAL, rounds never slow down when amiss."""
    follower = _Scripted([False, True], interval=0.01)
    stop = _Recorder(2)
    follower.run(stop)
    assert stop.waits == [0.01, 0.01]
