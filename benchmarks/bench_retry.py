"""The retry runner (with commit-outcome tracking) against a bare transaction.

    python benchmarks/bench_retry.py [--rounds 10] [--transactions 500] [--statements 1]

On one local primary, with one pgfailover.ConnectionPool, alternating round by round (and
swapping which goes first each round): a bare ``with pool.connection()`` transaction
inserting ``--statements`` rows (one INSERT each), and the same work through
``run_transaction`` (which records the xid, system identifier, timeline and WAL position
in BEGIN's round trip). Prints throughput, p50/p99 latency and the ratio runner/bare.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from typing import Any

import psycopg

from pgfailover.pool import ConnectionPool
from pgfailover.retry import run_transaction
from pgfailover.testing import LocalCluster

STATEMENTS = 1


def _work(conn: psycopg.Connection[Any]) -> None:
    for _ in range(STATEMENTS):
        conn.execute("INSERT INTO bench (v) VALUES (1)")


def _round(pool: ConnectionPool[Any], kind: str, n: int) -> list[float]:
    latencies = []
    perf = time.perf_counter
    for _ in range(n):
        t0 = perf()
        if kind == "bare":
            with pool.connection() as conn:
                _work(conn)
        else:
            run_transaction(pool, _work)
        latencies.append(perf() - t0)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--transactions", type=int, default=500)
    parser.add_argument("--statements", type=int, default=1, help="INSERTs per transaction")
    args = parser.parse_args()
    global STATEMENTS  # noqa: PLW0603 - a benchmark knob read by _work
    STATEMENTS = args.statements
    logging.getLogger("pgfailover").addHandler(logging.NullHandler())
    results: dict[str, list[float]] = {"bare": [], "runner": []}
    with LocalCluster(standbys=0, pgbouncer=None) as cluster:
        with cluster.primary.connect(superuser=False) as conn:
            conn.execute("CREATE TABLE bench (id bigserial PRIMARY KEY, v int)")
        with ConnectionPool[Any](cluster.primary.dsn(), min_size=1, max_size=1) as pool:
            for kind in results:
                _round(pool, kind, args.transactions // 10)
            order = list(results)
            for _ in range(args.rounds):
                for kind in order:
                    results[kind] += _round(pool, kind, args.transactions)
                order.reverse()
    print(
        f"{args.rounds} alternating rounds x {args.transactions} transactions of "
        f"{args.statements} INSERT(s)\n"
    )
    print("| unit of work | tx/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for kind, lat in results.items():
        q = statistics.quantiles(lat, n=100)
        print(f"| {kind} | {len(lat) / sum(lat):.0f} | {q[49] * 1e3:.3f} | {q[98] * 1e3:.3f} |")
    ratio = sum(results["bare"]) / sum(results["runner"])
    print(f"\nthroughput ratio runner/bare: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
