"""Section (b) of ``benchmarks/suite.py``: recovery of a pgfailover pool after a failover,
with the process monitor and without it.

One cluster per scenario (primary + 1 standby; PgBouncer in transaction or session mode
with ``server_login_retry`` 0.1 s, or none for the direct multi-host conninfo). Each run
fails the cluster over twice, once per variant (the order alternates from run to run), each
time on a topology reset to node0 = primary: a fresh ``pgfailover.ConnectionPool``
(max_size 4) and one writer thread inserting a row per transaction every ~2 ms (errors
counted, never raised); after a warm-up, ``cluster.failover("fast")``; behind PgBouncer,
after ``repoint_delay`` seconds, ``cluster.repoint_pgbouncer(new primary)``. "Primary
reachable" is the end of the repoint (PgBouncer) or the end of the harness's
promote-until-writable phase (direct). The figure is the time from that instant to the
first commit acknowledged after the old primary had stopped.

Variants: ``monitor`` registers the pool with a private :class:`~pgfailover.monitor.Monitor`
with the default timings (``monitor=Monitor()``, closed after the run, so that runs share
no state); ``no monitor`` is the pool on its own (``monitor=False``: its single-flight
prober reconnects on the failover schedule).

Connection attempts during the outage (from the call of ``failover()`` to "reachable"):

- the pool's own: every call of its ``_connect`` (each is one of psycopg_pool's
  ``connections_num``; the failed ones ``connections_errors``), recorded with its start and
  end instants by a subclass that only appends a timestamp (:class:`_TimedPool`);
- the monitor's watch: ``monitor.stats()["connects"]`` (connection attempts),
  ``["checks"]`` (looks: a role query, or a connection attempt that failed, or a pool's
  attempt the monitor granted) and ``["grants"]`` (those granted: each is one of the pool's
  attempts above, counted once in the attempts and once in the looks), sampled every
  :data:`SAMPLE_EVERY` seconds by a thread; a count at an instant is the last sample taken
  at or before it.

Where the time goes after "reachable" (to find out why a target is missed): the first
"writable primary again" the monitor logged after the failover (:class:`MonitorLog`, which
keeps every change the monitor acted on, LOST or BACK, with its instant), the start and the
end of the first connection the pool made after "reachable", the checkout and the commit of
the first write.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from _suite_common import fmt, log, table

import pgfailover
from pgfailover.monitor import Monitor
from pgfailover.pool import ConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing.cluster import PoolMode

#: Scenario name -> PgBouncer pool mode (None: direct, multi-host conninfo).
SCENARIOS: dict[str, PoolMode | None] = {
    "PgBouncer transaction mode": "transaction",
    "PgBouncer session mode": "session",
    "direct multi-host": None,
}
#: Variant name -> whether the pool registers with a private monitor.
VARIANTS: dict[str, bool] = {"monitor": True, "no monitor": False}
#: (p50, max) targets in seconds: the monitor's (issue: process monitor), and the pool's
#: own from the issue that introduced the suite.
TARGETS: dict[str, tuple[float, float]] = {"monitor": (0.05, 0.2), "no monitor": (0.1, 0.5)}
#: PgBouncer's wait after a failed server login (its 1 s harness default dominated before).
SERVER_LOGIN_RETRY = 0.1
WRITE_EVERY = 0.002
WARMUP = 0.3
#: Seconds between two samples of the monitor's counters.
SAMPLE_EVERY = 0.005
#: A run that has not written within this long after the primary was reachable is recorded
#: as "none in time" (infinite), which misses the target.
GIVE_UP = 10.0
TABLE = "recovery_bench"
#: New connections timed per scenario for the connection cost (see :func:`connect_cost`).
CONNECT_SAMPLES = 20


def error_name(ex: BaseException) -> str:
    """A failure's SQLSTATE, else its class name (no message: it could name a host)."""
    return pgfailover.sqlstate_of(ex) or type(ex).__name__


class _TimedPool(ConnectionPool[Any]):
    """pgfailover's pool, unchanged, plus the instants of its connection attempts:
    ``attempts`` holds ``(start, end, ok)`` per call of ``_connect`` (``time.monotonic()``
    values; ``ok`` False when it raised, the pool then counted a failed attempt), and
    ``errors`` the failed ones by SQLSTATE or class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.attempts: list[tuple[float, float, bool]] = []
        self.errors: Counter[str] = Counter()  # failed attempts by error (SQLSTATE or class)
        super().__init__(*args, **kwargs)

    def _connect(self, timeout: float | None = None) -> Any:
        start = time.monotonic()
        try:
            conn = super()._connect(timeout)
        except BaseException as ex:
            self.attempts.append((start, time.monotonic(), False))
            self.errors[error_name(ex)] += 1
            raise
        self.attempts.append((start, time.monotonic(), True))
        return conn


@dataclass
class Writer:
    """One thread: a transaction inserting one row every ~2 ms; successes' instants kept."""

    pool: ConnectionPool[Any]
    ok: list[float] = field(default_factory=list)
    #: per acknowledged write, the instant its checkout returned (same index as ``ok``)
    checked_out: list[float] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="recovery-writer", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.pool.connection() as conn:
                    got = time.monotonic()
                    conn.execute(f"INSERT INTO {TABLE} DEFAULT VALUES")
                self.ok.append(time.monotonic())  # the COMMIT (on leaving the block) returned
                self.checked_out.append(got)
            except Exception as ex:  # counted, never raised: the run goes on
                self.failed[pgfailover.sqlstate_of(ex) or type(ex).__name__] += 1
            time.sleep(WRITE_EVERY)

    def first_ok_after(self, instant: float, timeout: float) -> tuple[float, float] | None:
        """The first write acknowledged after ``instant``: (checked out, acknowledged)
        instants; None if there is none within ``timeout`` seconds (polled every ms)."""
        deadline = time.monotonic() + timeout
        while True:
            later = [t for t in self.ok[-200:] if t > instant]
            if later:
                i = next(i for i, t in enumerate(self.ok) if t > instant)
                return self.checked_out[i], self.ok[i]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)


class Sampler:
    """A thread sampling ``monitor.stats()`` every :data:`SAMPLE_EVERY` seconds (no monitor:
    nothing to sample, every count is 0)."""

    def __init__(self, monitor: Monitor | None) -> None:
        self.monitor = monitor
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="recovery-sampler", daemon=True)

    def _run(self) -> None:
        assert self.monitor is not None
        while True:
            self.samples.append((time.monotonic(), self.monitor.stats()))
            if self.stop.wait(SAMPLE_EVERY):
                return

    def __enter__(self) -> Sampler:
        if self.monitor is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def at(self, instant: float, key: str) -> int:
        """The counter ``key`` as last sampled at or before ``instant`` (0: none yet)."""
        value = 0
        for t, stats in self.samples:
            if t > instant:
                break
            value = stats.get(key, 0)
        return value

    def between(self, start: float, end: float, key: str) -> int:
        return self.at(end, key) - self.at(start, key)


class MonitorLog(logging.Handler):
    """What the monitor decided and when: it logs, at WARNING on ``pgfailover.monitor``,
    each endpoint it finds no longer writable (LOST: its pools are purged) and each one
    writable again (BACK: its pools are woken). Kept as ``(time.monotonic(), "lost" or
    "back", message)`` while in use as a context manager."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.changes: list[tuple[float, str, str]] = []
        self._logger = logging.getLogger("pgfailover.monitor")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        kind = "back" if message.endswith("writable primary again") else "lost"
        self.changes.append((time.monotonic(), kind, message))

    def __enter__(self) -> MonitorLog:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)

    def first(self, kind: str, after: float) -> float | None:
        """The first change of ``kind`` after the instant ``after``, None if none."""
        return next((t for t, k, _ in self.changes if k == kind and t > after), None)

    def relative(self, origin: float) -> list[tuple[float, str, str]]:
        """The changes as (seconds from ``origin``, kind, the monitor's message)."""
        return [(t - origin, k, m) for t, k, m in self.changes]


def _where(cluster: LocalCluster, mode: PoolMode | None) -> tuple[str, dict[str, Any]]:
    """The pool's conninfo and connection keyword arguments in a scenario."""
    if mode is None:
        return cluster.multihost_dsn(), {}
    assert cluster.pgbouncer is not None
    return cluster.pgbouncer.dsn(), {"prepare_threshold": None}


def _one_run(
    cluster: LocalCluster, mode: PoolMode | None, repoint_delay: float, monitored: bool
) -> dict[str, Any]:
    dsn, kwargs = _where(cluster, mode)
    monitor = Monitor() if monitored else None
    try:
        with (
            _TimedPool(
                dsn,
                kwargs=kwargs,
                max_size=4,
                timeout=5,
                open=True,
                monitor=monitor if monitor is not None else False,
            ) as pool,
            Sampler(monitor) as sampler,
            MonitorLog() as changes,
        ):
            pool.wait()
            writer = Writer(pool)
            writer.thread.start()
            try:
                time.sleep(WARMUP)
                before = len(writer.ok)
                stats_before = pool.get_stats()
                failover_at = time.monotonic()
                timings = cluster.failover("fast")
                repoint = None
                if mode is None:
                    reachable = timings.ended_at["promote"]
                else:
                    time.sleep(repoint_delay)
                    repointed = cluster.repoint_pgbouncer(cluster.primary)
                    reachable = repointed.ended_at["reload"]
                    repoint = repointed["reload"]
                first = writer.first_ok_after(timings.ended_at["stop"], GIVE_UP)
            finally:
                writer.stop.set()
                writer.thread.join()
            time.sleep(2 * SAMPLE_EVERY)  # one more sample after the last instant used
        stats = pool.get_stats()
    finally:
        if monitor is not None:
            monitor.close()
    during = [a for a in pool.attempts if failover_at <= a[0] <= reachable]
    # the first connection made after reachable (its attempt may have begun before)
    made = [a for a in pool.attempts if a[1] > reachable and a[2]]
    connect_start = made[0][0] if made else None
    connect_end = made[0][1] if made else None

    def since_reachable(instant: float | None) -> float | None:
        return None if instant is None else instant - reachable

    watch_back = changes.first("back", failover_at) if monitor is not None else None

    return {
        "reachable_to_first_write_s": float("inf") if first is None else first[1] - reachable,
        "promote_until_writable_s": timings["promote"],
        "stop_s": timings["stop"],
        "rejoin_s": timings["rejoin"],
        "repoint_s": repoint,
        "outage_s": reachable - failover_at,
        "writes_before_failover": before,
        "writes_ok": len(writer.ok),
        "writes_failed": dict(writer.failed),
        "pool_attempt_errors": dict(pool.errors),
        "pool_attempts_during_outage": len(during),
        "pool_attempts_failed_during_outage": sum(1 for a in during if not a[2]),
        "pool_connections_num_delta": stats["connections_num"] - stats_before["connections_num"],
        "pool_connections_errors_delta": (
            stats.get("connections_errors", 0) - stats_before.get("connections_errors", 0)
        ),
        "watch_connects_during_outage": sampler.between(failover_at, reachable, "connects"),
        "watch_checks_during_outage": sampler.between(failover_at, reachable, "checks"),
        "watch_grants_during_outage": sampler.between(failover_at, reachable, "grants"),
        "phases_s": {
            "watch_saw_writable": since_reachable(watch_back),
            "pool_connect_started": since_reachable(connect_start),
            "pool_connected": since_reachable(connect_end),
            "first_write_checked_out": None if first is None else first[0] - reachable,
            "first_write": None if first is None else first[1] - reachable,
        },
        "monitor_changes": changes.relative(reachable) if monitor is not None else [],
        "pool_stats": {
            k: stats.get(k, 0) for k in ("probes_run", "generations_purged", "failovers_detected")
        },
    }


def connect_cost(dsn: str, kwargs: dict[str, Any], n: int = CONNECT_SAMPLES) -> float:
    """Median seconds of ``n`` sequential new connections to ``dsn`` (connect, including
    the authentication exchange, then ``SELECT 1``), for context: every recovery needs
    at least one; with the monitor's own look, two in a row (the watch's, then the pool's)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True, **kwargs) as conn:
            conn.execute("SELECT 1")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _summary(variant: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    delays = [r["reachable_to_first_write_s"] for r in results]
    promotes = [r["promote_until_writable_s"] for r in results]
    p50, worst = statistics.median(delays), max(delays)
    target_p50, target_max = TARGETS[variant]
    failed: Counter[str] = Counter()
    for r in results:
        failed.update(r["writes_failed"])
    outage = sum(r["outage_s"] for r in results)
    pool_attempts = sum(r["pool_attempts_during_outage"] for r in results)
    watch_connects = sum(r["watch_connects_during_outage"] for r in results)
    watch_checks = sum(r["watch_checks_during_outage"] for r in results)
    watch_grants = sum(r.get("watch_grants_during_outage", 0) for r in results)
    return {
        "monitor": VARIANTS[variant],
        "runs": results,
        "p50_s": p50,
        "max_s": worst,
        "target_p50_s": target_p50,
        "target_max_s": target_max,
        "p50_met": p50 <= target_p50,
        "max_met": worst <= target_max,
        "promote_p50_s": statistics.median(promotes),
        "promote_max_s": max(promotes),
        "writes_failed": dict(failed),
        "outage_s_total": outage,
        "pool_attempts": pool_attempts,
        "watch_connects": watch_connects,
        "watch_checks": watch_checks,
        "watch_grants": watch_grants,
        "attempts_per_s": (pool_attempts + watch_connects) / outage,
        "looks_per_s": (pool_attempts + watch_checks - watch_grants) / outage,
        "phases_p50_s": {
            k: _median([r["phases_s"][k] for r in results]) for k in results[0]["phases_s"]
        },
        "phases_max_s": {
            k: max((v for r in results if (v := r["phases_s"][k]) is not None), default=None)
            for k in results[0]["phases_s"]
        },
    }


def run(runs: int, repoint_delay: float) -> dict[str, Any]:
    """Every scenario, ``runs`` times each with the monitor and without (alternating which
    goes first); the raw results (see :func:`render`)."""
    out: dict[str, Any] = {}
    for name, mode in SCENARIOS.items():
        log(f"recovery: {name}, starting a cluster")
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        with LocalCluster(
            standbys=1, pgbouncer=mode, server_login_retry=SERVER_LOGIN_RETRY
        ) as cluster:
            with cluster.primary.connect(superuser=False) as conn:
                conn.execute(f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY)")
            cluster.wait_replicated()
            for i in range(runs):
                order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    cluster.reset()  # node0 primary, node1 streaming from it, PgBouncer -> node0
                    r = _one_run(cluster, mode, repoint_delay, VARIANTS[variant])
                    results[variant].append(r)
                    log(
                        f"recovery: {name}, {variant}, run {i + 1}/{runs}: "
                        f"{fmt(r['reachable_to_first_write_s'])} s, outage {r['outage_s']:.3f} s, "
                        f"attempts during it: pool {r['pool_attempts_during_outage']}, watch "
                        f"{r['watch_connects_during_outage']} (looks "
                        f"{r['watch_checks_during_outage']}, granted "
                        f"{r['watch_grants_during_outage']}); "
                        f"{r['writes_before_failover']} writes before the failover"
                    )
            dsn, kwargs = _where(cluster, mode)
            cost = connect_cost(dsn, kwargs)
        out[name] = {
            "pool_mode": mode,
            "connect_p50_s": cost,
            "variants": {v: _summary(v, rs) for v, rs in results.items()},
        }
        monitored, alone = out[name]["variants"]["monitor"], out[name]["variants"]["no monitor"]
        out[name]["attempts_met"] = monitored["attempts_per_s"] <= alone["attempts_per_s"]
    return out


def _phase(value: float | None) -> str:
    return "-" if value is None else fmt(value)


def render(out: dict[str, Any], runs: int, repoint_delay: float) -> str:
    """Markdown: recovery per scenario and variant, connection attempts during the outage,
    where the time goes after "reachable", then the runs."""
    lines = [
        f"### (b) Recovery after a failover: {runs} runs per scenario and variant",
        "",
        "pgfailover.ConnectionPool (max_size 4), one writer thread (an insert transaction every",
        "~2 ms), `cluster.failover('fast')`; behind PgBouncer (`server_login_retry` "
        f"{SERVER_LOGIN_RETRY} s) a",
        f"repoint {repoint_delay} s after the failover returned. Reachable = end of the repoint",
        "(PgBouncer) or end of promote-until-writable (direct multi-host). Figure = seconds",
        "from reachable to the first acknowledged commit after the old primary stopped",
        "(slightly negative when a commit landed before the harness's 5 ms poll saw the",
        "promotion). Physical limit = the harness's promote-until-writable in the same runs.",
        "Variants, one after the other in each run (the order alternates): `monitor` = the pool",
        "registered with a private `Monitor()` (default timings, closed after the run);",
        "`no monitor` = `monitor=False`, the pool probing on its own (the pools before the",
        "monitor).",
        "",
    ]
    rows = []
    for name, scenario in out.items():
        for variant, s in scenario["variants"].items():
            missed = [w for w, ok in (("p50", s["p50_met"]), ("max", s["max_met"])) if not ok]
            rows.append(
                [
                    name,
                    variant,
                    "end of promote" if scenario["pool_mode"] is None else "end of repoint",
                    str(len(s["runs"])),
                    fmt(s["p50_s"]),
                    fmt(s["max_s"]),
                    fmt(s["promote_p50_s"]),
                    f"p50 <= {s['target_p50_s']:g}, max <= {s['target_max_s']:g}",
                    "met" if not missed else "MISSED (" + ", ".join(missed) + ")",
                ]
            )
    lines.append(
        table(
            [
                "scenario",
                "variant",
                "reachable at",
                "runs",
                "reachable -> first write p50 s",
                "max s",
                "promote-until-writable p50 s",
                "target",
                "result",
            ],
            rows,
            [False, False, False, True, True, True, True, False, False],
        )
    )
    lines += [
        "",
        "Connection attempts during the outage (from the call of `failover()` to reachable),",
        "summed over the runs: pool = calls of the pool's `_connect` (psycopg_pool's",
        "`connections_num`; failed ones in brackets), recorded with their instants by a",
        "subclass; watch = the monitor's `stats()['connects']`, looks = its `['checks']` (a",
        "role query, or a connection attempt, or a pool attempt it granted), granted = its",
        "`['grants']` (looks made by letting one of the pool's held attempts go: each is in",
        f"the pool's attempts too), sampled every {SAMPLE_EVERY * 1e3:g} ms.",
        "Attempts/s = (pool + watch connects) / outage seconds; looks/s = (pool attempts +",
        "watch looks - granted) / outage seconds. Target: the monitor's attempts/s no more",
        "than the pool's own without it.",
        "",
    ]
    rows = []
    for name, scenario in out.items():
        for variant, s in scenario["variants"].items():
            failed = sum(r["pool_attempts_failed_during_outage"] for r in s["runs"])
            is_monitor = s["monitor"]
            rows.append(
                [
                    name,
                    variant,
                    f"{s['outage_s_total']:.2f}",
                    f"{s['pool_attempts']} ({failed})",
                    str(s["watch_connects"]) if is_monitor else "-",
                    str(s["watch_checks"]) if is_monitor else "-",
                    str(s.get("watch_grants", 0)) if is_monitor else "-",
                    f"{s['attempts_per_s']:.1f}",
                    f"{s['looks_per_s']:.1f}",
                    (
                        ("met" if scenario["attempts_met"] else "MISSED")
                        if is_monitor
                        else "(reference)"
                    ),
                ]
            )
    lines.append(
        table(
            [
                "scenario",
                "variant",
                "outage s (sum)",
                "pool attempts (failed)",
                "watch connects",
                "watch looks",
                "granted",
                "attempts/s",
                "looks/s",
                "attempts/s <= no monitor",
            ],
            rows,
            [False, False, True, True, True, True, True, True, True, False],
        )
    )
    lines += [
        "",
        "Where the time goes after reachable (seconds from reachable, p50 / max over the",
        "runs): the monitor's watch saw a writable primary (its first BACK logged); the first",
        "connection the pool made after reachable: its attempt started (negative: before",
        "reachable) and ended (connected and probed); the first write acknowledged after the",
        "old primary stopped: its checkout returned, and its commit. New connection = median",
        f"of {CONNECT_SAMPLES} sequential new connections (connect with the SCRAM exchange, then",
        "`SELECT 1`) to the same address after the runs: a recovery needs one (the pool's",
        "granted attempt, or its own without the monitor), or two in a row when the",
        "monitor's own look saw the primary first (it reconnects through a pooler after",
        "finding a standby), then the pool's.",
        "",
    ]
    rows = []
    for name, scenario in out.items():
        for variant, s in scenario["variants"].items():
            p50, worst = s["phases_p50_s"], s["phases_max_s"]
            rows.append(
                [name, variant]
                + [f"{_phase(p50[k])} / {_phase(worst[k])}" for k in p50]
                + [fmt(scenario["connect_p50_s"])]
            )
    lines.append(
        table(
            [
                "scenario",
                "variant",
                "watch saw writable",
                "pool connect started",
                "pool connected",
                "first write checked out",
                "first write",
                "new connection p50 s",
            ],
            rows,
            [False, False, True, True, True, True, True, True],
        )
    )
    lines.append("")
    for name, scenario in out.items():
        for variant, s in scenario["variants"].items():
            per_run = ", ".join(fmt(r["reachable_to_first_write_s"]) for r in s["runs"])
            purged = sum(r["pool_stats"]["generations_purged"] for r in s["runs"])
            detected = sum(r["pool_stats"]["failovers_detected"] for r in s["runs"])
            failed = sum(s["writes_failed"].values())
            before = min(r["writes_before_failover"] for r in s["runs"])
            kinds = Counter(k for r in s["runs"] for _, k, _ in r["monitor_changes"])
            monitor = (
                f"; the monitor acted on {kinds['lost']} LOST and {kinds['back']} BACK"
                if s["monitor"]
                else ""
            )
            lines.append(
                f"- {name}, {variant}: runs [{per_run}] s; failed writes {failed} "
                f"{dict(sorted(s['writes_failed'].items()))}; generations purged {purged}, "
                f"failovers detected {detected}{monitor}; writes in the {WARMUP} s before "
                f"each failover >= {before}"
            )
    return "\n".join(lines)
