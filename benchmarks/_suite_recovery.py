"""Section (b) of ``benchmarks/suite.py``: recovery of a pgfailover pool after a failover.

One cluster per scenario (primary + 1 standby; PgBouncer in transaction or session mode
with ``server_login_retry`` 0.1 s, or none for the direct multi-host conninfo). Each run,
on a topology reset to node0 = primary: a fresh ``pgfailover.ConnectionPool`` (max_size 4)
and one writer thread inserting a row per transaction every ~2 ms (errors counted, never
raised); after a warm-up, ``cluster.failover("fast")``; behind PgBouncer, after
``repoint_delay`` seconds, ``cluster.repoint_pgbouncer(new primary)``. "Primary reachable"
is the end of the repoint (PgBouncer) or the end of the harness's promote-until-writable
phase (direct). The figure is the time from that instant to the first commit acknowledged
after the old primary had stopped.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from _suite_common import fmt, log, table

import pgfailover
from pgfailover.pool import ConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing.cluster import PoolMode

#: Scenario name -> PgBouncer pool mode (None: direct, multi-host conninfo).
SCENARIOS: dict[str, PoolMode | None] = {
    "PgBouncer transaction mode": "transaction",
    "PgBouncer session mode": "session",
    "direct multi-host": None,
}
TARGET_P50 = 0.1
TARGET_MAX = 0.5
#: PgBouncer's wait after a failed server login (its 1 s harness default dominated before).
SERVER_LOGIN_RETRY = 0.1
WRITE_EVERY = 0.002
WARMUP = 0.3
#: A run that has not written within this long after the primary was reachable is recorded
#: as "none in time" (infinite), which misses the target.
GIVE_UP = 10.0
TABLE = "recovery_bench"


@dataclass
class Writer:
    """One thread: a transaction inserting one row every ~2 ms; successes' instants kept."""

    pool: ConnectionPool[Any]
    ok: list[float] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="recovery-writer", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.pool.connection() as conn:
                    conn.execute(f"INSERT INTO {TABLE} DEFAULT VALUES")
                self.ok.append(time.monotonic())  # the COMMIT (on leaving the block) returned
            except Exception as ex:  # counted, never raised: the run goes on
                self.failed[pgfailover.sqlstate_of(ex) or type(ex).__name__] += 1
            time.sleep(WRITE_EVERY)

    def first_ok_after(self, instant: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            later = [t for t in self.ok[-200:] if t > instant]
            if later:
                return min(t for t in self.ok if t > instant)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)


def _one_run(cluster: LocalCluster, mode: PoolMode | None, repoint_delay: float) -> dict[str, Any]:
    if mode is None:
        dsn, kwargs = cluster.multihost_dsn(), {}
    else:
        assert cluster.pgbouncer is not None
        dsn, kwargs = cluster.pgbouncer.dsn(), {"prepare_threshold": None}
    with ConnectionPool[Any](dsn, kwargs=kwargs, max_size=4, timeout=5, open=True) as pool:
        pool.wait()
        writer = Writer(pool)
        writer.thread.start()
        try:
            time.sleep(WARMUP)
            before = len(writer.ok)
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
        stats = pool.get_stats()
    return {
        "reachable_to_first_write_s": float("inf") if first is None else first - reachable,
        "promote_until_writable_s": timings["promote"],
        "stop_s": timings["stop"],
        "rejoin_s": timings["rejoin"],
        "repoint_s": repoint,
        "writes_before_failover": before,
        "writes_ok": len(writer.ok),
        "writes_failed": dict(writer.failed),
        "pool_stats": {
            k: stats.get(k, 0) for k in ("probes_run", "generations_purged", "failovers_detected")
        },
    }


def run(runs: int, repoint_delay: float) -> dict[str, Any]:
    """Every scenario, ``runs`` times each; the raw results (see :func:`render`)."""
    out: dict[str, Any] = {}
    for name, mode in SCENARIOS.items():
        log(f"recovery: {name}, starting a cluster")
        with LocalCluster(
            standbys=1, pgbouncer=mode, server_login_retry=SERVER_LOGIN_RETRY
        ) as cluster:
            with cluster.primary.connect(superuser=False) as conn:
                conn.execute(f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY)")
            cluster.wait_replicated()
            results = []
            for i in range(runs):
                cluster.reset()  # node0 primary, node1 streaming from it, PgBouncer -> node0
                results.append(_one_run(cluster, mode, repoint_delay))
                log(
                    f"recovery: {name}, run {i + 1}/{runs}: "
                    f"{fmt(results[-1]['reachable_to_first_write_s'])} s "
                    f"({results[-1]['writes_before_failover']} writes before the failover)"
                )
        delays = [r["reachable_to_first_write_s"] for r in results]
        promotes = [r["promote_until_writable_s"] for r in results]
        p50, worst = statistics.median(delays), max(delays)
        failed: Counter[str] = Counter()
        for r in results:
            failed.update(r["writes_failed"])
        out[name] = {
            "pool_mode": mode,
            "runs": results,
            "p50_s": p50,
            "max_s": worst,
            "promote_p50_s": statistics.median(promotes),
            "promote_max_s": max(promotes),
            "p50_met": p50 <= TARGET_P50,
            "max_met": worst <= TARGET_MAX,
            "writes_failed": dict(failed),
        }
    return out


def render(out: dict[str, Any], runs: int, repoint_delay: float) -> str:
    """Markdown: one row per scenario, then what failed."""
    lines = [
        f"### (b) Recovery after a failover: {runs} runs per scenario",
        "",
        "pgfailover.ConnectionPool (max_size 4), one writer thread (an insert transaction every",
        "~2 ms), `cluster.failover('fast')`; behind PgBouncer (`server_login_retry` "
        f"{SERVER_LOGIN_RETRY} s) a",
        f"repoint {repoint_delay} s after the failover returned. Reachable = end of the repoint",
        "(PgBouncer) or end of promote-until-writable (direct multi-host). Figure = seconds",
        "from reachable to the first acknowledged commit after the old primary stopped",
        "(slightly negative when a commit landed before the harness's 5 ms poll saw the",
        "promotion). Physical limit = the harness's promote-until-writable in the same runs.",
        "",
    ]
    rows = []
    for name, s in out.items():
        missed = [w for w, ok in (("p50", s["p50_met"]), ("max", s["max_met"])) if not ok]
        reachable = "end of promote" if s["pool_mode"] is None else "end of repoint"
        rows.append(
            [
                name,
                reachable,
                str(len(s["runs"])),
                fmt(s["p50_s"]),
                fmt(s["max_s"]),
                fmt(s["promote_p50_s"]),
                f"p50 <= {TARGET_P50}, max <= {TARGET_MAX}",
                "met" if not missed else "MISSED (" + ", ".join(missed) + ")",
            ]
        )
    lines.append(
        table(
            [
                "scenario",
                "reachable at",
                "runs",
                "reachable -> first write p50 s",
                "max s",
                "promote-until-writable p50 s",
                "target",
                "result",
            ],
            rows,
            [False, False, True, True, True, True, False, False],
        )
    )
    lines.append("")
    for name, s in out.items():
        per_run = ", ".join(fmt(r["reachable_to_first_write_s"]) for r in s["runs"])
        purged = sum(r["pool_stats"]["generations_purged"] for r in s["runs"])
        detected = sum(r["pool_stats"]["failovers_detected"] for r in s["runs"])
        failed = sum(s["writes_failed"].values())
        before = min(r["writes_before_failover"] for r in s["runs"])
        lines.append(
            f"- {name}: runs [{per_run}] s; failed writes {failed} "
            f"{dict(sorted(s['writes_failed'].items()))}; generations purged {purged}, "
            f"failovers detected {detected}; writes in the {WARMUP} s before each failover "
            f">= {before}"
        )
    return "\n".join(lines)
