"""Failover phase timings of the LocalCluster harness: the physical limit of recovery.

Runs ``--runs`` failovers per stop mode on one cluster (primary + 1 standby) and prints a
markdown table of stop, promote-until-writable, rejoin and total (median, min, max), and
writes the raw runs as JSON.

    python benchmarks/failover_phases.py --runs 5 --json benchmarks/results/failover_phases.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import psycopg

from pgfailover.testing import LocalCluster
from pgfailover.testing.cluster import StopMode

PHASES = ("stop", "promote", "rejoin", "total")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="failovers per stop mode")
    parser.add_argument("--json", type=Path, help="write raw results here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    runs: dict[StopMode, list[dict[str, float | str]]] = {"fast": [], "immediate": []}
    with LocalCluster(standbys=1, pgbouncer=None) as cluster:
        assert cluster.bin is not None
        pg_version = cluster.bin.major
        for mode, results in runs.items():
            for _ in range(args.runs):
                t = cluster.failover(mode)
                results.append({**t.phases, "total": t.total, "rejoin_method": t.notes["rejoin"]})

    print(
        f"machine: {platform.machine()}, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}, PostgreSQL {pg_version}, "
        f"psycopg {psycopg.__version__}"
    )
    print(f"command: {' '.join(['python', *sys.argv])}\n")
    print("| stop mode | phase | median (s) | min (s) | max (s) |")
    print("|---|---|---|---|---|")
    for mode, results in runs.items():
        for phase in PHASES:
            values = [float(r[phase]) for r in results]
            print(
                f"| {mode} | {phase} | {statistics.median(values):.3f} | "
                f"{min(values):.3f} | {max(values):.3f} |"
            )
    methods = {
        mode: sorted({str(r["rejoin_method"]) for r in results}) for mode, results in runs.items()
    }
    print(f"\nrejoin methods used: {methods}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"postgresql": pg_version, "psycopg": psycopg.__version__, "runs": runs}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
