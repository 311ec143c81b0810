"""Happy-path cost of pgfailover.Connection against psycopg.Connection, same server, same run.

    python benchmarks/bench_connection.py --dsn DSN [--rounds 20] [--queries 2000]

Alternates the two classes round by round (so drift in the machine hits both), each round
running ``--queries`` ``SELECT 1`` on one open connection, and prints the median per-query
latency of each and the throughput ratio pgfailover/psycopg (1.0 means no cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from time import perf_counter_ns

import psycopg

import pgfailover


def _round(conn: psycopg.Connection[tuple[int]], queries: int) -> float:
    t0 = perf_counter_ns()
    for _ in range(queries):
        conn.execute("SELECT 1").fetchone()
    return (perf_counter_ns() - t0) / queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"psycopg": [], "pgfailover": []}
    with (
        psycopg.connect(args.dsn, autocommit=True) as plain,
        pgfailover.Connection.connect(args.dsn, autocommit=True) as ours,
    ):
        for conn in (plain, ours):  # warm up both
            _round(conn, args.queries // 10)
        for _ in range(args.rounds):
            results["psycopg"].append(_round(plain, args.queries))
            results["pgfailover"].append(_round(ours, args.queries))
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.rounds} alternating rounds x {args.queries} SELECT 1, autocommit\n")
    print("| connection class | median µs per query |")
    print("|---|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value / 1000:.1f} |")
    ratio = medians["psycopg"] / medians["pgfailover"]
    print(f"\nthroughput ratio pgfailover/psycopg: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
