"""Section (d) of ``benchmarks/suite.py``: a fleet of async pools in one process across a
failover behind PgBouncer, with one shared process monitor and without it.

One cluster (primary + 1 standby, PgBouncer in transaction mode, ``server_login_retry``
0.1 s). Each run, on a topology reset to node0 = primary: ``pools`` (default 100)
``pgfailover.AsyncConnectionPool`` pools (min_size 1, max_size 2, ``timeout`` 10 s) in one
event loop, all through PgBouncer, each with a light writer (an asyncio task inserting one
row every :data:`WRITE_EVERY` seconds, the first at a random offset; after a failed write
it tries again after :data:`RETRY_EVERY`); after a warm-up (:func:`_settle`),
``cluster.failover("fast")`` and, ``repoint_delay`` seconds later,
``cluster.repoint_pgbouncer(new primary)``;
"reachable" is the end of the repoint. Two variants, one after the other in each run (the
order alternates): ``monitor``, every pool registered with one private
:class:`~pgfailover.monitor.Monitor` (default timings, closed after the run), and
``no monitor`` (``monitor=False``: each pool probes on its own).

Figures:

- watches: the monitor's ``stats()["endpoints"]``, sampled every :data:`SAMPLE_EVERY`
  seconds through the run (largest value seen; the target is 1: one prober for the
  endpoint);
- connection attempts during the outage (from the call of ``failover()`` to reachable): the
  pools' own, every call of a pool's ``_connect`` (each is one of psycopg_pool's
  ``connections_num``), recorded with its start and end instants by a subclass that only
  appends a timestamp (:class:`_TimedPool`), with whether the monitor had granted it (with
  the monitor, one waiting pool's attempt at a time is the endpoint's look: the expected
  number of attempts it did not grant is 0), and
  the watch's connection attempts and looks (``stats()["connects"]``, ``["checks"]``, the
  last samples at or before the two instants);
- per pool, seconds from reachable to its first write acknowledged after the old primary
  had stopped (target: the largest <= 0.5 s);
- the reconnects: every successful call of a pool's ``_connect`` that ended after
  reachable (a connection made after it), at the instant it started (what PgBouncer sees
  arriving) and at the instant it ended (the connection made and probed); the largest
  share of them in any 50 ms window, for both instants (target: <= 25 % for both). This
  is the subclass's record, not a sampled count: every connection the pools made is in
  it, with its own instant.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import statistics
import time
from collections import Counter
from typing import Any

import psycopg
from _suite_common import fmt, log, table
from _suite_recovery import MonitorLog, error_name

import pgfailover
from pgfailover.monitor import Monitor, Status
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster

#: Seconds between two inserts of one pool's writer (100 pools: 200 transactions/s, light
#: next to what the reconnects of a recovery cost).
WRITE_EVERY = 0.5
#: Seconds before a writer tries again after a failed write.
RETRY_EVERY = 0.01
#: Seconds of writing before the failover.
WARMUP = 1.0
#: Seconds between two samples of the monitor's counters.
SAMPLE_EVERY = 0.005
#: Seconds after reachable within which every pool must have written.
TARGET_MAX = 0.5
#: Width of the window of the reconnect share, seconds, and the largest share allowed.
WINDOW = 0.05
TARGET_SHARE = 0.25
#: Watches of the one endpoint the fleet uses.
TARGET_WATCHES = 1
#: A pool that has not written within this long after reachable counts as "none in time".
GIVE_UP = 10.0
#: PgBouncer's wait after a failed server login, as in the recovery section.
SERVER_LOGIN_RETRY = 0.1
TABLE = "fleet_bench"
VARIANTS: dict[str, bool] = {"monitor": True, "no monitor": False}


class _TimedPool(AsyncConnectionPool[Any]):
    """pgfailover's async pool, unchanged, plus the instants of its connection attempts:
    ``attempts`` holds ``(start, end, ok, granted)`` per call of ``_connect``
    (``time.monotonic()`` values; ``ok`` False when it raised, counted in ``errors`` by
    SQLSTATE or class; ``granted`` True when it ran on the monitor's grant, read from the
    pool's failover state as the attempt starts)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.attempts: list[tuple[float, float, bool, bool]] = []
        self.errors: Counter[str] = Counter()  # failed attempts by error (SQLSTATE or class)
        super().__init__(*args, **kwargs)

    async def _connect(self, timeout: float | None = None) -> Any:
        start = time.monotonic()
        granted = self.failover_state._grant_running is not None
        try:
            conn = await super()._connect(timeout)
        except BaseException as ex:
            self.attempts.append((start, time.monotonic(), False, granted))
            self.errors[error_name(ex)] += 1
            raise
        self.attempts.append((start, time.monotonic(), True, granted))
        return conn


def largest_share(instants: list[float], window: float) -> float:
    """The largest fraction of ``instants`` within any half-open window ``[t, t + window)``
    (0.0 when there are none). The busiest window starts at one of the instants, so only
    those are tried."""
    if not instants:
        return 0.0
    ordered = sorted(instants)
    best = max(bisect.bisect_left(ordered, t + window) - i for i, t in enumerate(ordered))
    return best / len(ordered)


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    """Wait ``delay`` seconds, less if ``stop`` is set; whether it is."""
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return False
    return True


async def _writer(
    pool: _TimedPool,
    *,
    ok: list[float],
    failed: Counter[str],
    stop: asyncio.Event,
    wrote: asyncio.Event,
    offset: float,
) -> None:
    delay = offset
    while not await _stopped(stop, delay):
        try:
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {TABLE} DEFAULT VALUES")
            ok.append(time.monotonic())  # the COMMIT (on leaving the block) returned
            wrote.set()
            delay = WRITE_EVERY
        except Exception as ex:  # counted, never raised: the run goes on
            failed[pgfailover.sqlstate_of(ex) or type(ex).__name__] += 1
            delay = RETRY_EVERY


async def _sample(
    monitor: Monitor, samples: list[tuple[float, dict[str, int]]], stop: asyncio.Event
) -> None:
    samples.append((time.monotonic(), monitor.stats()))
    while not await _stopped(stop, SAMPLE_EVERY):
        samples.append((time.monotonic(), monitor.stats()))


async def _settle(oks: list[list[float]], wrote: asyncio.Event, monitor: Monitor | None) -> None:
    """The warm-up: :data:`WARMUP` seconds, and at least until every pool has written and
    the monitor (if any) sees the endpoint writable (opening 100 pools at once may have
    made its first look slow), so that the failover meets a fleet at rest. Gives up after
    :data:`GIVE_UP` seconds (the run then says what it saw)."""
    start = time.monotonic()
    await asyncio.sleep(WARMUP)

    def settled() -> bool:
        watched = monitor is None or all(
            (w := monitor.watch_of(e)) is not None and w.status is Status.WRITABLE
            for e in monitor.endpoints()
        )
        return watched and all(oks)

    while not settled() and time.monotonic() - start < GIVE_UP:
        wrote.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wrote.wait(), WRITE_EVERY)


def _at(samples: list[tuple[float, dict[str, int]]], instant: float, key: str) -> int:
    value = 0
    for t, stats in samples:
        if t > instant:
            break
        value = stats.get(key, 0)
    return value


async def _one_run(
    cluster: LocalCluster, n: int, repoint_delay: float, monitored: bool, rng: random.Random
) -> dict[str, Any]:
    assert cluster.pgbouncer is not None
    dsn = cluster.pgbouncer.dsn()
    monitor = Monitor() if monitored else None
    pools = [
        _TimedPool(
            dsn,
            kwargs={"prepare_threshold": None},
            min_size=1,
            max_size=2,
            timeout=GIVE_UP,
            open=False,
            name=f"fleet-{i}",
            monitor=monitor if monitor is not None else False,
        )
        for i in range(n)
    ]
    oks: list[list[float]] = [[] for _ in pools]
    failed: Counter[str] = Counter()
    stop = asyncio.Event()
    wrote = asyncio.Event()  # set at every acknowledged write
    samples: list[tuple[float, dict[str, int]]] = []
    tasks: list[asyncio.Task[None]] = []
    with MonitorLog() as changes:
        try:
            await asyncio.gather(*(p.open(wait=True, timeout=60) for p in pools))
            if monitor is not None:
                tasks.append(asyncio.create_task(_sample(monitor, samples, stop)))
            tasks += [
                asyncio.create_task(
                    _writer(
                        p,
                        ok=ok,
                        failed=failed,
                        stop=stop,
                        wrote=wrote,
                        offset=rng.uniform(0, WRITE_EVERY),
                    )
                )
                for p, ok in zip(pools, oks, strict=True)
            ]
            await _settle(oks, wrote, monitor)
            before = min(len(ok) for ok in oks)
            failover_at = time.monotonic()
            timings = await asyncio.to_thread(cluster.failover, "fast")
            await asyncio.sleep(repoint_delay)
            repointed = await asyncio.to_thread(cluster.repoint_pgbouncer, cluster.primary)
            reachable = repointed.ended_at["reload"]
            stopped = timings.ended_at["stop"]
            deadline = time.monotonic() + GIVE_UP
            while not all(ok and ok[-1] > stopped for ok in oks):
                wrote.clear()
                if deadline <= time.monotonic():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wrote.wait(), deadline - time.monotonic())
            await asyncio.sleep(2 * SAMPLE_EVERY)  # one more sample after the last instant used
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
            if monitor is not None:
                await asyncio.to_thread(monitor.close)
    firsts = []
    for ok in oks:
        later = [t for t in ok if t > stopped]
        firsts.append(later[0] - reachable if later else float("inf"))
    attempts = [a for p in pools for a in p.attempts]
    during = [a for a in attempts if failover_at <= a[0] <= reachable]
    reconnects = [a for a in attempts if a[1] > reachable and a[2]]
    starts = sorted(a[0] - reachable for a in reconnects)
    ends = sorted(a[1] - reachable for a in reconnects)
    return {
        "pools": n,
        "outage_s": reachable - failover_at,
        "promote_until_writable_s": timings["promote"],
        "writes_before_failover_min": before,
        "writes_failed": dict(failed),
        "watches_max": max((s["endpoints"] for _, s in samples), default=0),
        "watches_at_reachable": _at(samples, reachable, "endpoints"),
        "pool_attempt_errors": dict(sum((p.errors for p in pools), Counter[str]())),
        "pool_attempts_during_outage": len(during),
        "pool_attempts_failed_during_outage": sum(1 for a in during if not a[2]),
        "pool_attempts_granted_during_outage": sum(1 for a in during if a[3]),
        "watch_connects_during_outage": (
            _at(samples, reachable, "connects") - _at(samples, failover_at, "connects")
        ),
        "watch_checks_during_outage": (
            _at(samples, reachable, "checks") - _at(samples, failover_at, "checks")
        ),
        "watch_saw_writable_s": (
            None if (back := changes.first("back", failover_at)) is None else back - reachable
        ),
        "monitor_changes": changes.relative(reachable),
        "generations_purged": sum(p.get_stats().get("generations_purged", 0) for p in pools),
        "first_write_s": firsts,
        "first_write_p50_s": statistics.median(firsts),
        "first_write_max_s": max(firsts),
        "reconnects": len(reconnects),
        "reconnect_attempts_failed_after_reachable": sum(
            1 for a in attempts if a[1] > reachable and not a[2]
        ),
        "reconnect_starts_s": starts,
        "reconnect_ends_s": ends,
        "share_50ms_starts": largest_share(starts, WINDOW),
        "share_50ms_ends": largest_share(ends, WINDOW),
    }


async def connect_burst(dsn: str, n: int) -> dict[str, float]:
    """``n`` new connections to ``dsn`` opened at once from this event loop (connect with
    the authentication exchange, then ``SELECT 1``), for context: what the fleet's
    reconnects cost with no spread at all. Seconds until the last is done, and each
    one's median."""
    t0 = time.monotonic()

    async def one() -> float:
        start = time.monotonic()
        conn = await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None, autocommit=True)
        try:
            await conn.execute("SELECT 1")
        finally:
            await conn.close()
        return time.monotonic() - start

    each = await asyncio.gather(*(one() for _ in range(n)))
    return {
        "connections": n,
        "all_done_s": time.monotonic() - t0,
        "each_p50_s": statistics.median(each),
    }


def _summary(variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    outage = sum(r["outage_s"] for r in runs)
    pool_attempts = sum(r["pool_attempts_during_outage"] for r in runs)
    granted = sum(r.get("pool_attempts_granted_during_outage", 0) for r in runs)
    watch_connects = sum(r["watch_connects_during_outage"] for r in runs)
    worst_first = max(r["first_write_max_s"] for r in runs)
    share = max(max(r["share_50ms_starts"], r["share_50ms_ends"]) for r in runs)
    watches = max(r["watches_max"] for r in runs)
    monitored = VARIANTS[variant]
    return {
        "monitor": monitored,
        "runs": runs,
        "outage_s_total": outage,
        "pool_attempts": pool_attempts,
        "pool_attempts_granted": granted,
        "watch_connects": watch_connects,
        "watch_checks": sum(r["watch_checks_during_outage"] for r in runs),
        "attempts_per_s": (pool_attempts + watch_connects) / outage,
        "first_write_p50_s": statistics.median(f for r in runs for f in r["first_write_s"]),
        "first_write_max_s": worst_first,
        "share_50ms_max": share,
        "watches_max": watches,
        "watch_saw_writable_p50_s": (
            statistics.median(seen)
            if (seen := [v for r in runs if (v := r["watch_saw_writable_s"]) is not None])
            else None
        ),
        "first_write_met": worst_first <= TARGET_MAX,
        "share_met": share <= TARGET_SHARE,
        "watches_met": watches == TARGET_WATCHES if monitored else None,
        "pool_attempts_met": pool_attempts == granted if monitored else None,
    }


async def _run(runs: int, n: int, repoint_delay: float) -> dict[str, Any]:
    rng = random.Random()  # the writers' offsets
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    log("fleet: starting a cluster")
    with LocalCluster(
        standbys=1, pgbouncer="transaction", server_login_retry=SERVER_LOGIN_RETRY
    ) as cluster:
        with cluster.primary.connect(superuser=False) as conn:
            conn.execute(f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY)")
        cluster.wait_replicated()
        for i in range(runs):
            order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                await asyncio.to_thread(cluster.reset)
                r = await _one_run(cluster, n, repoint_delay, VARIANTS[variant], rng)
                results[variant].append(r)
                log(
                    f"fleet: {variant}, run {i + 1}/{runs}: first write p50 "
                    f"{fmt(r['first_write_p50_s'])} max {fmt(r['first_write_max_s'])} s; "
                    f"outage {r['outage_s']:.3f} s, attempts during it: pools "
                    f"{r['pool_attempts_during_outage']}, watch "
                    f"{r['watch_connects_during_outage']}; watches {r['watches_max']}; "
                    f"{r['reconnects']} reconnects, largest 50 ms share "
                    f"{r['share_50ms_starts']:.0%} (starts) {r['share_50ms_ends']:.0%} (ends)"
                )
        assert cluster.pgbouncer is not None
        burst = await connect_burst(cluster.pgbouncer.dsn(), n)
        log(f"fleet: {n} connections at once: all done in {burst['all_done_s']:.3f} s")
    return {
        "pools": n,
        "connect_burst": burst,
        "variants": {v: _summary(v, rs) for v, rs in results.items()},
    }


def run(runs: int, pools: int, repoint_delay: float) -> dict[str, Any]:
    """``runs`` failovers with the monitor and as many without, ``pools`` pools each; the
    raw results (see :func:`render`)."""
    return asyncio.run(_run(runs, pools, repoint_delay))


def _change(at: float, kind: str, message: str) -> str:
    """One change the monitor acted on, for a run's line: LOST with what it found."""
    if kind == "back":
        return f"BACK at {at:+.3f} s"
    found = message.split(": ", 2)[-1]  # "pgfailover monitor: <endpoint>: <finding>"
    return f"LOST ({found}) at {at:+.3f} s"


def _verdict(*checks: bool | None) -> str:
    known = [c for c in checks if c is not None]
    return "met" if all(known) else "MISSED"


def render(out: dict[str, Any], runs: int, repoint_delay: float) -> str:
    """Markdown: the targets per variant, then each run."""
    n = out["pools"]
    lines = [
        f"### (d) Fleet: {n} async pools in one process, {runs} failovers per variant",
        "",
        f"{n} `pgfailover.AsyncConnectionPool`s (min_size 1, max_size 2) in one event loop,",
        "through PgBouncer in transaction mode, each with a writer task (one insert every",
        f"{WRITE_EVERY} s, again after {RETRY_EVERY} s when one failed); a warm-up of {WARMUP} s",
        "and until every pool has written and the monitor sees the endpoint writable;",
        f"`cluster.failover('fast')`, a repoint {repoint_delay} s after it returned; reachable",
        "= end of the repoint. `monitor`: every pool registered with one private `Monitor()`",
        "(default timings); `no monitor`: `monitor=False`. Watches = the monitor's",
        f"`stats()['endpoints']`, largest value sampled (every {SAMPLE_EVERY * 1e3:g} ms). Pool",
        "attempts = calls of a pool's `_connect` (psycopg_pool's `connections_num`) from the",
        "call of `failover()` to reachable, recorded with their instants by a subclass, and",
        "how many of them the monitor granted (one waiting pool's attempt at a time as its",
        "look; target: none it did not grant); watch = the monitor's `connects` over the",
        "same span. First write = seconds from reachable",
        "to each pool's first acknowledged write. Reconnects = successful `_connect` calls",
        "that ended after reachable; share = the largest fraction of them in any 50 ms window,",
        "by the instant each started (what PgBouncer sees arriving) and ended (the",
        "connection made), the larger of the two counting.",
        "",
    ]
    rows = []
    for variant, s in out["variants"].items():
        monitored = s["monitor"]
        rows.append(
            [
                variant,
                str(len(s["runs"])),
                str(s["watches_max"]) if monitored else "-",
                f"{s['outage_s_total']:.2f}",
                (
                    f"{s['pool_attempts']} ({s.get('pool_attempts_granted', 0)} granted)"
                    if monitored
                    else str(s["pool_attempts"])
                ),
                str(s["watch_connects"]) if monitored else "-",
                f"{s['attempts_per_s']:.1f}",
                fmt(s["first_write_p50_s"]),
                fmt(s["first_write_max_s"]),
                f"{s['share_50ms_max']:.0%}",
                (
                    _verdict(
                        s["watches_met"],
                        s["pool_attempts_met"],
                        s["first_write_met"],
                        s["share_met"],
                    )
                    if monitored
                    else "(reference)"
                ),
            ]
        )
    lines.append(
        table(
            [
                "variant",
                "runs",
                "watches (target 1)",
                "outage s (sum)",
                "pool attempts in outage (target: all granted)",
                "watch connects in outage",
                "attempts/s",
                "first write p50 s",
                f"first write max s (target <= {TARGET_MAX})",
                f"largest 50 ms share (target <= {TARGET_SHARE:.0%})",
                "result",
            ],
            rows,
            [False, True, True, True, True, True, True, True, True, True, False],
        )
    )
    burst = out["connect_burst"]
    lines += [
        "",
        f"For context, after the runs: {burst['connections']} new connections opened at once",
        "through the same PgBouncer from one event loop (connect with the SCRAM exchange, then",
        f"`SELECT 1`, no spread) were all done in {burst['all_done_s']:.3f} s (each "
        f"{burst['each_p50_s']:.3f} s p50).",
        "",
    ]
    for variant, s in out["variants"].items():
        for i, r in enumerate(s["runs"], 1):
            starts = r["reconnect_starts_s"]
            span = f"{starts[0]:.3f}-{starts[-1]:.3f} s" if starts else "none"
            failed = sum(r["writes_failed"].values())
            lines.append(
                f"- {variant}, run {i}: outage {r['outage_s']:.3f} s, "
                + (
                    f"watch saw writable {fmt(r['watch_saw_writable_s'])} s after reachable, "
                    if r["watch_saw_writable_s"] is not None
                    else ""
                )
                + (
                    "the monitor acted on "
                    + ", ".join(_change(t, k, m) for t, k, m in r["monitor_changes"])
                    + " (from reachable), "
                    if r["monitor_changes"]
                    else ""
                )
                + f"generations purged {r['generations_purged']} (all pools), "
                + "pool attempts in it "
                f"{r['pool_attempts_during_outage']} "
                f"({r['pool_attempts_failed_during_outage']} failed, "
                f"{r.get('pool_attempts_granted_during_outage', 0)} granted), watch connects "
                f"{r['watch_connects_during_outage']}, looks {r['watch_checks_during_outage']};"
                f" first write p50 {fmt(r['first_write_p50_s'])} / max "
                f"{fmt(r['first_write_max_s'])} s; {r['reconnects']} reconnects (made after "
                "reachable) started "
                f"{span} after reachable (failed attempts after reachable "
                f"{r['reconnect_attempts_failed_after_reachable']}; failed attempts in the run by "
                f"error {dict(sorted(r['pool_attempt_errors'].items()))}), largest 50 ms share "
                f"{r['share_50ms_starts']:.0%} by start, {r['share_50ms_ends']:.0%} by end; "
                f"failed writes {failed} {dict(sorted(r['writes_failed'].items()))}"
            )
    return "\n".join(lines)
