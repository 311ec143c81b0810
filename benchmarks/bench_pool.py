"""pgfailover.ConnectionPool against psycopg_pool.ConnectionPool, and recovery after failover.

    python benchmarks/bench_pool.py [--rounds 10] [--checkouts 1000] [--recoveries 10]

(a) Happy path: on one local primary, alternating round by round, each pool serves
``--checkouts`` sequential checkouts running ``SELECT 1``; prints throughput and p50/p99
checkout+query latency of each, and the throughput ratio pgfailover/psycopg_pool.
(b) Recovery: primary + standby + PgBouncer (transaction mode), 4 writer threads on a
pgfailover pool; ``--recoveries`` times: failover, repoint PgBouncer 0.3 s later, and the
time from the repoint to the first successful write, next to the harness's
promote-until-writable time (the physical limit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _bench_recovery
import psycopg
import psycopg_pool

from pgfailover.pool import ConnectionPool
from pgfailover.testing import LocalCluster


def _round(pool: Any, checkouts: int) -> list[float]:
    latencies = []
    for _ in range(checkouts):
        t0 = time.perf_counter()
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        latencies.append(time.perf_counter() - t0)
    return latencies


def happy_path(rounds: int, checkouts: int) -> None:
    with LocalCluster(standbys=0, pgbouncer=None) as cluster:
        dsn = cluster.primary.dsn()
        kwargs: dict[str, Any] = {"min_size": 2, "max_size": 2}
        results: dict[str, list[float]] = {"psycopg_pool": [], "pgfailover": []}
        times: dict[str, float] = {"psycopg_pool": 0.0, "pgfailover": 0.0}
        with (
            psycopg_pool.ConnectionPool(dsn, **kwargs) as plain,
            ConnectionPool[Any](dsn, **kwargs) as ours,
        ):
            plain.wait()
            ours.wait()
            pools = {"psycopg_pool": plain, "pgfailover": ours}
            for pool in pools.values():
                _round(pool, checkouts // 10)
            for _ in range(rounds):
                for name, pool in pools.items():
                    lat = _round(pool, checkouts)
                    results[name] += lat
                    times[name] += sum(lat)
    print(f"(a) happy path: {rounds} alternating rounds x {checkouts} checkouts of SELECT 1\n")
    print("| pool | checkouts/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for name, lat in results.items():
        q = statistics.quantiles(lat, n=100)
        print(f"| {name} | {len(lat) / times[name]:.0f} | {q[49] * 1e3:.3f} | {q[98] * 1e3:.3f} |")
    ratio = times["psycopg_pool"] / times["pgfailover"]
    print(f"\nthroughput ratio pgfailover/psycopg_pool: {ratio:.3f}\n")


def recovery(runs: int, server_login_retry: float) -> None:
    with LocalCluster(
        standbys=1, pgbouncer="transaction", server_login_retry=server_login_retry
    ) as cluster:
        assert cluster.pgbouncer is not None
        with cluster.primary.connect(superuser=False) as conn:
            conn.execute("CREATE TABLE bench (id serial PRIMARY KEY)")
        with ConnectionPool[Any](
            cluster.pgbouncer.dsn(),
            kwargs={"prepare_threshold": None, "autocommit": True},
            min_size=4,
            max_size=8,
            timeout=30,
        ) as pool:
            pool.wait()

            def write() -> None:
                with pool.connection() as conn:
                    conn.execute("INSERT INTO bench DEFAULT VALUES")

            result = _bench_recovery.measure(
                cluster,
                write,
                errors=(psycopg.Error, psycopg_pool.PoolTimeout),
                error_name=lambda ex: getattr(ex, "sqlstate", None) or type(ex).__name__,
                runs=runs,
            )
            stats = pool.get_stats()
    _bench_recovery.report(result, stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--checkouts", type=int, default=1000)
    parser.add_argument("--recoveries", type=int, default=10)
    parser.add_argument(
        "--server-login-retry",
        type=float,
        default=0.1,
        help="PgBouncer's wait after a failed server login (it adds to recovery 1:1)",
    )
    args = parser.parse_args()
    print(f"command: python {' '.join(sys.argv)}\n")
    happy_path(args.rounds, args.checkouts)
    recovery(args.recoveries, args.server_login_retry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
