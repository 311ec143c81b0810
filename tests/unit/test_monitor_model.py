"""The monitor's pure decisions: endpoints, what a look changes, when to look, the spread."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgfailover import _pool_common
from pgfailover.monitor import Monitor
from pgfailover.monitor.model import (
    GRANTS_PER_OWN_LOOK,
    JITTER,
    MAX_SPREAD,
    SPREAD_STEP,
    Change,
    Endpoint,
    EndpointWatch,
    Look,
    Status,
    spread,
)
from pgfailover.policy import RECONNECT_POLICY

EP = Endpoint("db1,db2", "5432", "app")


def test_endpoint_defaults_and_address() -> None:
    """An endpoint takes libpq's defaults for what the parameters lack, names each host with
    its port, and never carries a password."""
    assert Endpoint.of({}) == Endpoint("localhost", "5432", "")
    assert Endpoint.of({"user": "bob"}).dbname == "bob"
    endpoint = Endpoint.of({"host": "a,b", "port": "1,2", "dbname": "d", "password": "s3cret"})
    assert endpoint.address == "a:1,b:2"
    assert str(endpoint) == "a:1,b:2/d"
    assert "s3cret" not in repr(endpoint)
    assert EP.address == "db1:5432,db2:5432"


def test_watch_target_of_a_pool_conninfo() -> None:
    """A pool's string conninfo (keyword arguments override it) gives the endpoint; a
    callable conninfo or kwargs gives none (the pool keeps probing by itself)."""
    target = _pool_common.watch_target("host=h port=6432 dbname=d password=pw", {"port": 7000})
    assert target is not None
    assert target.endpoint == Endpoint("h", "7000", "d")
    assert "pw" not in repr(target)
    assert _pool_common.watch_target(lambda: "host=h", None) is None
    assert _pool_common.watch_target("host=h", lambda: {}) is None


def test_lost_then_back() -> None:
    """The first look that finds no writable primary says LOST (once); more bad looks say
    nothing new; the first writable look after them says BACK and ends the outage."""
    watch = EndpointWatch(EP)
    assert watch.observe(Status.WRITABLE, "primary", 1.0, 100.0) is None
    assert watch.outage_since is None
    assert watch.observe(Status.DOWN, "down: refused", 2.0, 101.0) is Change.LOST
    assert watch.outage_since == 2.0
    assert watch.observe(Status.READ_ONLY, "standby", 2.1, 101.1) is None
    assert watch.news  # the finding changed: the pools' errors must say "standby" now
    assert watch.observe(Status.READ_ONLY, "standby", 2.2, 101.2) is None
    assert not watch.news
    assert watch.observe(Status.WRITABLE, "primary", 3.0, 102.0) is Change.BACK
    assert watch.outage_since is None
    assert (watch.checks, watch.since, watch.since_wall) == (5, 3.0, 102.0)


def test_a_first_look_that_finds_no_primary_is_a_loss() -> None:
    """Pools may hold connections made before the monitor's first look: an endpoint first
    seen down is LOST, one first seen writable changes nothing."""
    assert EndpointWatch(EP).observe(Status.DOWN, "down", 0.0, 0.0) is Change.LOST
    assert EndpointWatch(EP).observe(Status.WRITABLE, "primary", 0.0, 0.0) is None


def test_next_delay() -> None:
    """Healthy: the interval with +/- JITTER; in an outage: the outage interval; when a pool
    suspects a failure: now; misconfigured: the healthy interval (faster cannot help)."""
    rng = random.Random(1)  # noqa: S311 - jitter, not security
    watch = EndpointWatch(EP, interval=2.0, outage_interval=0.05)
    watch.observe(Status.WRITABLE, "primary", 0.0, 0.0)
    delays = [watch.next_delay(rng) for _ in range(200)]
    assert all(2.0 * (1 - JITTER) <= d <= 2.0 * (1 + JITTER) for d in delays)
    assert len(set(delays)) > 100  # jittered, not constant
    watch.suspect()
    assert watch.next_delay(rng) == 0.0
    watch.observe(Status.DOWN, "down", 1.0, 1.0)
    assert not watch.suspected
    assert watch.next_delay(rng) == 0.05
    watch.observe(Status.MISCONFIGURED, "auth", 2.0, 2.0)
    assert watch.next_delay(rng) >= 2.0 * (1 - JITTER)


def test_health_says_why() -> None:
    """Health is writable only on a writable primary; otherwise the reason is the finding,
    and since/checked_at are the wall-clock times given."""
    watch = EndpointWatch(EP)
    health = watch.health()
    assert (health.writable, health.role, health.since, health.checked_at) == (
        False,
        "unknown",
        None,
        None,
    )
    watch.observe(Status.READ_ONLY, "standby (server 10.0.0.2:5432)", 5.0, 1000.0)
    watch.observe(Status.READ_ONLY, "standby (server 10.0.0.2:5432)", 6.0, 1001.0)
    health = watch.health()
    assert not health.writable
    assert health.role == "read-only"
    assert health.reason == "standby (server 10.0.0.2:5432)"
    assert (health.since, health.checked_at) == (1000.0, 1001.0)
    assert health.endpoint == "db1:5432,db2:5432/app"
    watch.observe(Status.WRITABLE, "primary", 7.0, 1002.0)
    assert watch.health().as_dict() == {
        "writable": True,
        "endpoint": "db1:5432,db2:5432/app",
        "role": "primary",
        "since": 1002.0,
        "checked_at": 1002.0,
        "reason": "",
        "monitored": True,
    }


@given(st.lists(st.sampled_from(list(Status)[1:]), max_size=60))
def test_lost_and_back_alternate(statuses: list[Status]) -> None:
    """Whatever the looks find, LOST and BACK alternate, starting with LOST, and an outage
    is under way exactly between a LOST and the next BACK."""
    watch = EndpointWatch(EP)
    changes = []
    for i, status in enumerate(statuses):
        change = watch.observe(status, status.value, float(i), float(i))
        if change is not None:
            changes.append(change)
        assert (watch.outage_since is not None) == (status is not Status.WRITABLE)
    assert changes == [Change.LOST, Change.BACK] * (len(changes) // 2) + (
        [Change.LOST] if len(changes) % 2 else []
    )


@given(st.integers(min_value=0, max_value=500), st.integers())
def test_spread_is_bounded_and_never_crowded(count: int, seed: int) -> None:
    """Wake-up offsets: one per pool, the first at 0, SPREAD_STEP apart up to MAX_SPREAD
    (a few pools wake together: no stampede to fear, no delay to pay), and from the count
    that fills MAX_SPREAD on, no 50 ms window holds more than a quarter of the pools."""
    offsets = spread(count, random.Random(seed))  # noqa: S311 - not security
    assert len(offsets) == count
    assert all(0.0 <= o <= MAX_SPREAD + 1e-9 for o in offsets)
    if count:
        assert min(offsets) == 0.0
    if count > 1:
        assert max(offsets) <= (count - 1) * SPREAD_STEP + 1e-9
    if count >= MAX_SPREAD / SPREAD_STEP + 1:
        ordered = sorted(offsets)
        for i, start in enumerate(ordered):
            inside = sum(1 for o in ordered[i:] if o < start + 0.05)
            assert inside <= count / 4


def test_one_pool_wakes_at_once() -> None:
    """A single pool is woken without delay: the spread costs nothing when nothing crowds."""
    assert spread(1, random.Random()) == [0.0]  # noqa: S311 - not security


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"interval": 0}, ValueError),
        ({"outage_interval": -1}, ValueError),
        ({"probe_timeout": "1"}, TypeError),
        ({"connect_timeout": True}, TypeError),
    ],
)
def test_monitor_rejects_bad_timings(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Each timing must be a positive number of seconds: anything else is a typed error
    naming the option."""
    with pytest.raises(error, match=next(iter(kwargs))):
        Monitor(**kwargs)


def test_pool_monitor_argument_is_checked() -> None:
    """A pool's monitor= takes True, False or a Monitor; anything else is a TypeError."""
    from pgfailover.pool import ConnectionPool  # noqa: PLC0415 - the pool extra

    with pytest.raises(TypeError, match="monitor must be True"):
        ConnectionPool[Any]("", open=False, monitor="yes")  # type: ignore[arg-type]
    assert ConnectionPool[Any]("", open=False, monitor=Monitor()).failover_state is not None


def test_a_slow_role_query_is_not_a_loss_until_the_next_one_is_slow_too() -> None:
    """A writable endpoint whose role query gets no answer in time is not lost at once: the
    watch looks again now; a second slow answer in a row is a loss (DOWN, LOST); an answer
    in between starts the count again; while not writable, a slow answer is DOWN at once."""
    watch = EndpointWatch(EP)
    watch.observe(Status.WRITABLE, "primary", 0.0, 0.0)
    assert watch.observe_slow("down: slow", 1.0, 1.0) is None
    assert watch.status is Status.WRITABLE
    rng = random.Random(0)  # noqa: S311 - jitter, not security
    assert watch.next_delay(rng) == 0.0  # look again at once
    watch.observe(Status.WRITABLE, "primary", 1.1, 1.1)  # answered: the count restarts
    assert watch.observe_slow("down: slow", 2.0, 2.0) is None
    assert watch.observe_slow("down: slow", 2.1, 2.1) is Change.LOST
    assert (watch.status, watch.finding) == (Status.DOWN, "down: slow")
    assert watch.observe_slow("down: slow", 2.2, 2.2) is None  # still down, no new change
    assert watch.health().role == "down"
    assert watch.checks == 6


def test_grants_during_an_outage_with_an_own_look_between() -> None:
    """During an outage, with a pool waiting, the looks are granted pool attempts, with one
    of the watch's own after GRANTS_PER_OWN_LOOK that failed; no pool waiting, or no outage:
    the watch's own. A granted attempt that connected is BACK."""
    watch = EndpointWatch(EP)
    assert watch.next_look(waiting=True) is Look.OWN  # never looked
    watch.observe(Status.WRITABLE, "primary", 0.0, 0.0)
    assert watch.next_look(waiting=True) is Look.OWN  # healthy
    watch.observe(Status.READ_ONLY, "standby", 1.0, 1.0)
    assert watch.next_look(waiting=False) is Look.OWN
    looks = []
    for i in range(2 * (GRANTS_PER_OWN_LOOK + 1)):
        look = watch.next_look(waiting=True)
        looks.append(look)
        if look is Look.GRANT:
            assert watch.granted(False, 2.0 + i, 2.0 + i) is None
        else:
            watch.observe(Status.READ_ONLY, "standby", 2.0 + i, 2.0 + i)
    assert looks == ([Look.GRANT] * GRANTS_PER_OWN_LOOK + [Look.OWN]) * 2
    assert (watch.status, watch.grants) == (Status.READ_ONLY, 2 * GRANTS_PER_OWN_LOOK)
    assert watch.next_look(waiting=True) is Look.GRANT
    assert watch.granted(True, 20.0, 20.0) is Change.BACK
    assert (watch.status, watch.outage_since) == (Status.WRITABLE, None)
    watch.observe(Status.MISCONFIGURED, "auth", 21.0, 21.0)
    assert watch.next_look(waiting=True) is Look.OWN  # faster cannot help


@given(
    st.lists(
        st.tuples(st.sampled_from(["own", "slow", "granted"]), st.sampled_from(list(Status)[1:])),
        max_size=60,
    )
)
def test_lost_and_back_alternate_with_grants_and_slow_looks(
    looks: list[tuple[str, Status]],
) -> None:
    """Whatever mix of own looks, slow answers and granted attempts: LOST and BACK
    alternate, starting with LOST, and a granted attempt changes nothing unless it
    connected."""
    watch = EndpointWatch(EP)
    changes = []
    for i, (kind, status) in enumerate(looks):
        before = watch.status
        if kind == "own":
            change = watch.observe(status, status.value, float(i), float(i))
        elif kind == "slow":
            change = watch.observe_slow("down: slow", float(i), float(i))
        else:
            ok = status is Status.WRITABLE
            change = watch.granted(ok, float(i), float(i))
            if not ok:
                assert (change, watch.status) == (None, before)
        if change is not None:
            changes.append(change)
    assert changes == [Change.LOST, Change.BACK] * (len(changes) // 2) + (
        [Change.LOST] if len(changes) % 2 else []
    )


def test_look_delay_during_an_outage() -> None:
    """During an outage the pause after a look without a login is the outage interval less
    the look's duration (0 once it took longer); after the n-th look with a login, the
    wait of a lone pool before its n-th reconnection attempt (drawn below the policy's
    cap, as the pool's own), at least the outage interval (never more attempts than one
    pool's prober), counted again from 1 in the next outage; healthy, the jittered
    interval."""
    rng = random.Random(2)  # noqa: S311 - jitter, not security
    watch = EndpointWatch(EP, interval=1.0, outage_interval=0.05)
    watch.observe(Status.DOWN, "down", 0.0, 0.0)
    assert watch.look_delay(rng, 10.0, 10.02, login=False) == pytest.approx(0.03)
    assert watch.look_delay(rng, 10.0, 10.2, login=False) == 0.0
    waits = [watch.look_delay(rng, 10.0, 10.2, login=True) for _ in range(200)]
    caps = [max(0.05, RECONNECT_POLICY.cap(n)) for n in range(1, 201)]
    assert all(0.05 <= wait <= cap for wait, cap in zip(waits, caps, strict=True))
    assert waits[0] == 0.05  # the first cap is the outage interval itself
    assert max(waits) > 0.15  # drawn up to the grown cap (200 ms), not pinned to the floor
    watch.observe(Status.WRITABLE, "primary", 1.0, 1.0)
    assert watch.look_delay(rng, 10.0, 10.5, login=False) >= 1.0 * (1 - JITTER)
    watch.observe(Status.READ_ONLY, "standby", 2.0, 2.0)
    assert watch.look_delay(rng, 10.0, 10.2, login=True) == 0.05  # a new outage
