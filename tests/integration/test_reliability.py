"""The reliability scenarios at CI size: the same code ``make reliability`` runs at full size
(``benchmarks/reliability``), through eight stacks (pool, pool + runner, instrumented engine,
engine + runner; sync and async) writing unique keys, every acknowledged key checked on the
final primary. Crashes with synchronous and asynchronous replication, a blackhole and a
freeze of the primary, switchover churn.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import pgfailover
from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from reliability.report import LOSS_WINDOW, lost_window
from reliability.scenarios import ScenarioResult, churn, crash, hang
from reliability.workload import (
    ENGINE_WATCHDOG,
    FAILED,
    OK,
    UNKNOWN,
    Record,
    Settings,
    StackRun,
    Workload,
    verify,
)

#: CI-sized stacks: one worker each, small watchdog bounds (0.5 s silence, 2 s per probe:
#: libpq's minimum connect_timeout), so that a hang lasts 6.5 s instead of 13.
SETTINGS = Settings(
    workers=1,
    rate=25.0,
    runner_timeout=15.0,
    pool_timeout=3.0,
    silence_limit=0.5,
    probe_timeout=2.0,
)


def _with_monitor_thread(cluster: LocalCluster) -> LocalCluster:
    """``cluster``, once the process monitor's thread runs: it starts with the first pool
    registered with the monitor (the default) and is kept for the life of the process, as
    the watchdog's is, so a scenario that counts its threads must not see it as a stack's
    leak. A pool of no connection opens and closes (its watch ends with it)."""
    with pgfailover.ConnectionPool[Any](cluster.multihost_dsn(), min_size=0, max_size=1) as pool:
        assert pool.failover_state.monitored
    return cluster


@pytest.fixture(scope="module")
def sync_cluster(pgfailover_cluster_factory: ClusterFactory) -> LocalCluster:
    """Primary + standby, synchronous replication, no PgBouncer (direct multi-host DSN)."""
    cluster = pgfailover_cluster_factory(standbys=1, pgbouncer=None, synchronous=True)
    return _with_monitor_thread(cluster)


@pytest.fixture(scope="module")
def async_cluster(pgfailover_cluster_factory: ClusterFactory) -> LocalCluster:
    """Primary + standby, asynchronous replication (PostgreSQL's default), no PgBouncer."""
    cluster = pgfailover_cluster_factory(standbys=1, pgbouncer=None, synchronous=False)
    return _with_monitor_thread(cluster)


def _assert_clean(result: ScenarioResult, *, leaks_known: bool = False) -> None:
    """Nothing duplicated, no row without a call, nothing stuck, no session left once the
    garbage collector has run (a session freed only by it is reported, see the report's
    checks), threads back, every stack made progress."""
    detail = result.as_dict()
    assert result.total("duplicated") == 0, detail
    assert result.total("phantom_unexplained") == 0, detail
    assert result.total("stuck") == 0, detail
    assert leaks_known or result.leaked == 0, result.notes
    assert result.threads_after <= result.threads_before, detail
    notes = [n for n in result.notes if not n.startswith("session left")]
    assert not notes, notes
    assert all(s.acked > 0 for s in result.stacks), detail
    if result.leaked_until_gc:
        print(f"{result.scenario}: {result.leaked_until_gc} session(s) freed only by the GC")


def test_the_checker_files_each_key_by_what_its_caller_was_told() -> None:
    """The verification, on made-up outcomes: an acknowledged key missing is lost, a key
    present twice duplicated, a present key of a failed or unknown call a phantom of that
    kind, a present key of a call still in flight unexplained and that call stuck."""
    workload = Workload(lambda _: None, "t", SETTINGS)  # type: ignore[arg-type,return-value]
    record = Record(bound=1.0)
    for outcome in (OK, OK, FAILED, UNKNOWN, FAILED, UNKNOWN, OK):
        begun = record.begin()
        assert begun is not None
        record.end(begun[0], begun[1], outcome, None)
    record.begin()  # call 7: still in flight
    workload.runs["s"] = StackRun("s", "pool", "sync", [record])
    counts = {"s-0-0": 1, "s-0-1": 2, "s-0-3": 1, "s-0-4": 1, "s-0-7": 1}
    [result] = verify(workload, counts)
    record.close()
    assert (result.calls, result.acked, result.failed, result.unknown) == (8, 3, 2, 2)
    assert (result.lost, result.lost_keys) == (1, ["s-0-6"])
    assert result.duplicated == 1
    assert (result.phantom_failed, result.phantom_unknown) == (1, 1)
    assert result.phantom_unexplained == 1
    assert result.stuck == 1


def test_crashes_with_synchronous_replication_lose_and_duplicate_nothing(
    sync_cluster: LocalCluster,
) -> None:
    """Three crashes of the primary (SIGKILL, immediate stop, SIGKILL) while every stack
    commits, each followed by promote + rejoin: no acknowledged key is missing on the final
    primary, none is written twice, a row exists only for a call that was acknowledged,
    failed or raised CommitOutcomeUnknown, no call is stuck and no session is leaked; the
    crashes reached the bare stacks as failures, and the runner stacks saw neither a
    failure nor a CommitOutcomeUnknown (the WAL marker settles every lost COMMIT)."""
    result = crash(sync_cluster, 3, SETTINGS, more=2)
    _assert_clean(result)
    assert result.total("lost") == 0, [s.lost_keys for s in result.stacks]
    bare = [s for s in result.stacks if "runner" not in s.stack]
    assert sum(s.failed + s.unknown for s in bare) > 0, "no crash reached a bare stack"
    runners = [s for s in result.stacks if "runner" in s.stack]
    assert all(s.failed == s.unknown == 0 for s in runners), runners


def test_crashes_with_asynchronous_replication_never_lose_a_write_silently(
    async_cluster: LocalCluster,
) -> None:
    """The same crashes with asynchronous replication: nothing is duplicated, stuck or
    leaked, and an acknowledged write is lost only inside the standby's replication
    window (acknowledged at most LOSS_WINDOW s before the crash that lost it): what the
    old primary acknowledged and never shipped, which no client can surface. Any other
    missing key belongs to a call that failed or raised CommitOutcomeUnknown."""
    result = crash(async_cluster, 3, SETTINGS, more=2)
    _assert_clean(result)
    window = lost_window(result)
    assert window is None or 0.0 <= window <= LOSS_WINDOW, [
        (s.stack, s.lost, s.lost_before_fault_s) for s in result.stacks
    ]
    print(f"acknowledged writes lost with asynchronous replication: {result.total('lost')}")


@pytest.mark.parametrize("fault", ["blackhole", "freeze"])
def test_a_silent_primary_ends_each_bare_call_within_the_bound(
    sync_cluster: LocalCluster, fault: str
) -> None:
    """The primary goes silent (each stack's proxy blackholed, or the primary frozen) for
    the stated bound + 2 s: a bare pool's call during the silence ends within
    silence_limit + 2 x probe_timeout (+ 2 s of scheduling slack: 1 s was overrun by
    0.6 s on a 2-core machine at load 18), the runner stacks retry until the primary
    answers and lose nothing, and nothing is stuck or leaked. An instrumented engine has
    the same bound when instrument() takes the watchdog's settings. Sessions left on the
    server after a freeze (idle sessions opened during the freeze that no client closes,
    seen in about one run of three) make the test an expected failure, not a pass."""
    result = hang(sync_cluster, 1, SETTINGS, fault=fault, more=2)
    _assert_clean(result, leaks_known=fault == "freeze")
    assert result.total("lost") == 0, [s.lost_keys for s in result.stacks]
    bound = SETTINGS.hang_bound + 2.0
    for name in ("pool (sync)", "pool (async)"):
        stack = result.stack(name)
        assert 0 < stack.fault_to_end_s <= bound, (name, stack)
    for name in ("pool + runner (sync)", "pool + runner (async)"):
        assert result.stack(name).failed == 0, result.stack(name)
    engines = [result.stack(n) for n in ("engine (sync)", "engine (async)")]
    if ENGINE_WATCHDOG:
        for stack in engines:
            assert 0 < stack.fault_to_end_s <= bound, stack
    else:
        over = [(s.stack, round(s.fault_to_end_s, 2)) for s in engines if s.fault_to_end_s > bound]
        if over:
            pytest.xfail(f"instrument() has no watchdog in this version: {over}")
    if result.leaked:  # seen after a freeze only, in about one run of three: a known defect
        pytest.xfail(f"sessions left on the server after a {fault}: {result.notes}")


def test_switchover_churn_loses_nothing_and_leaks_nothing(sync_cluster: LocalCluster) -> None:
    """Five switchovers back and forth under load: no acknowledged write lost, none
    duplicated, no call of a runner stack fails (a lost COMMIT may still be reported as
    CommitOutcomeUnknown), no session left on the servers once the stacks close, and no
    thread added between the first switchover and the last."""
    result = churn(sync_cluster, 5, SETTINGS, more=2)
    _assert_clean(result)
    assert result.total("lost") == 0, [s.lost_keys for s in result.stacks]
    for stack in result.stacks:
        if "runner" in stack.stack:
            assert stack.failed == 0, stack
    assert result.threads_end <= result.threads_warm, result.as_dict()
