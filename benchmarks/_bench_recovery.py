"""The recovery measure of ``bench_pool.py`` and ``bench_sqlalchemy.py``.

Writer threads insert rows through a cluster's PgBouncer (transaction mode) while the
cluster fails over; PgBouncer is repointed 0.3 s after each failover, and the measure is the
time from the repoint to the first successful write, next to the harness's
promote-until-writable time (the physical limit).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pgfailover.testing import LocalCluster


@dataclass
class Recovery:
    """What :func:`measure` saw: one delay and one promote time per failover (seconds) and
    the name of each failed write's error (SQLSTATE, else the exception's type)."""

    delays: list[float] = field(default_factory=list)
    promotes: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def measure(
    cluster: LocalCluster,
    write: Callable[[], None],
    *,
    errors: tuple[type[BaseException], ...],
    error_name: Callable[[BaseException], str],
    runs: int,
    writers: int = 4,
) -> Recovery:
    """Run ``writers`` threads calling ``write`` in a loop (one row each time) through
    ``runs`` failovers of ``cluster``, each followed 0.3 s later by a repoint of its
    PgBouncer. An exception of ``errors`` from ``write`` counts as a failed write, named by
    ``error_name``; any other ends its thread. A failover after which no write succeeds
    within 10 s of the repoint gets an infinite delay."""
    result = Recovery()
    ok: list[float] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            try:
                write()
                ok.append(time.monotonic())
            except errors as ex:
                result.failed.append(error_name(ex))

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for t in threads:
        t.start()
    try:
        for _ in range(runs):
            time.sleep(0.3)
            result.promotes.append(cluster.failover()["promote"])
            time.sleep(0.3)
            at = cluster.repoint_pgbouncer(cluster.primary).ended_at["reload"]
            deadline = time.monotonic() + 10
            while not any(t > at for t in ok[-50:]) and time.monotonic() < deadline:
                time.sleep(0.002)
            later = [t for t in ok if t > at]
            result.delays.append(min(later) - at if later else float("inf"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    return result


def report(result: Recovery, stats: Mapping[str, int]) -> None:
    """Print ``result`` as a Markdown table, the failed writes by error and the probing
    counts of ``stats`` (a pool's or an instrumentation's statistics)."""
    print(f"(b) recovery through PgBouncer (transaction mode), {len(result.delays)} failovers\n")
    print("| measure | p50 s | max s |")
    print("|---|---:|---:|")
    for what, values in (
        ("repoint -> first successful write", result.delays),
        ("harness promote-until-writable", result.promotes),
    ):
        print(f"| {what} | {statistics.median(values):.3f} | {max(values):.3f} |")
    failed = {name: result.failed.count(name) for name in sorted(set(result.failed))}
    print(f"\nfailed writes over all runs: {len(result.failed)} {failed}")
    print(
        f"probes run: {stats['probes_run']}, generations purged: {stats['generations_purged']}, "
        f"failovers detected: {stats['failovers_detected']}"
    )
