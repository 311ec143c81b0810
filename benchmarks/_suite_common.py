"""Helpers shared by the sections of ``benchmarks/suite.py``: statistics, the machine, markdown,
server-side statement counts and client-side round trips."""

from __future__ import annotations

import os
import platform
import random
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import psycopg
import psycopg_pool
import sqlalchemy

from pgfailover.testing import LocalCluster


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout is only the markdown to paste."""
    print(f"# {message}", file=sys.stderr, flush=True)


def quantile(values: Sequence[float], q: int) -> float:
    """The q-th percentile (1..99) of ``values`` (exclusive method, as the other scripts)."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100)[q - 1]


def fmt(value: float, digits: int = 3) -> str:
    """A number for a table cell; infinity (nothing happened in time) spelled out."""
    if value == float("inf"):
        return "none in time"
    return f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A markdown table; ``right[i]`` right-aligns column i (numbers)."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ the machine


def _meminfo_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as ex:
        return f"unknown ({ex})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def machine() -> dict[str, Any]:
    """What the figures were taken on: hardware, OS, server and library versions."""
    from pgfailover.testing._binaries import (  # noqa: PLC0415 - only for the header
        find_pgbouncer,
        find_postgres,
    )

    binaries = find_postgres(None)
    try:
        pgbouncer = _first_line([str(find_pgbouncer(None)), "--version"])
    except Exception as ex:  # no PgBouncer: the recovery section will say so too
        pgbouncer = f"not found ({ex})"
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(_meminfo_gib(), 1),
        "os": _os_name(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "postgresql": _first_line([binaries.path("postgres"), "--version"]),
        "pgbouncer": pgbouncer,
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
        "psycopg_pool": psycopg_pool.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (the machine may be shared)."""
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------ statements and round trips


def _superuser(cluster: LocalCluster) -> psycopg.Connection[tuple[Any, ...]]:
    # In the application database: that is where the harness created pg_stat_statements.
    return psycopg.connect(cluster.primary.dsn(user="postgres"), autocommit=True)


def reset_statements(cluster: LocalCluster) -> None:
    """Zero the primary's pg_stat_statements counters."""
    with _superuser(cluster) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def statement_calls(cluster: LocalCluster) -> list[tuple[str, int]]:
    """(query, calls) of every statement the application user ran in the application
    database since the last reset, most frequent first. The superuser's own queries (this
    one, the reset) are not counted."""
    with _superuser(cluster) as conn:
        rows = conn.execute(
            "SELECT s.query, s.calls FROM pg_stat_statements s"
            " JOIN pg_roles r ON r.oid = s.userid"
            " JOIN pg_database d ON d.oid = s.dbid"
            " WHERE r.rolname = %s AND d.datname = %s ORDER BY s.calls DESC, s.query",
            [cluster.user, cluster.dbname],
        ).fetchall()
    return [(str(q), int(c)) for q, c in rows]


def statement_label(query: str) -> str:
    """A short name for a normalized statement: its command; for a SELECT, the runner's
    commit record (it asks for the xid) or else the first function it calls."""
    text = " ".join(query.split())
    head = text.split(" ", 1)[0].upper().rstrip(";")
    if head != "SELECT":
        return head
    if "pg_current_xact_id" in text:
        return "SELECT commit record"
    call = re.search(r"([A-Za-z_][A-Za-z_0-9]*)\(", text.replace("pg_catalog.", ""))
    return f"SELECT {call.group(1)}(...)" if call else "SELECT"


@dataclass
class Timed:
    """Latencies (seconds) of one variant, and its per-round sums."""

    latencies: list[float]
    rounds: list[float]

    @classmethod
    def empty(cls) -> Timed:
        return cls([], [])

    def add(self, latencies: list[float]) -> None:
        self.latencies += latencies
        self.rounds.append(sum(latencies))

    @property
    def tx_per_s(self) -> float:
        return len(self.latencies) / sum(self.latencies)

    def summary(self) -> dict[str, float]:
        return {
            "transactions": len(self.latencies),
            "tx_per_s": self.tx_per_s,
            "p50_ms": quantile(self.latencies, 50) * 1e3,
            "p99_ms": quantile(self.latencies, 99) * 1e3,
            "mean_ms": statistics.fmean(self.latencies) * 1e3,
        }


def bootstrap_ci(
    base: Sequence[float], compared: Sequence[float], resamples: int = 2000
) -> tuple[float, float]:
    """95 % interval of the throughput ratio compared/base (``sum(base)/sum(compared)`` of
    per-round summed latencies), resampling whole rounds with replacement: the rounds are
    paired (both variants ran in each), so the interval reflects round-to-round noise."""
    rng = random.Random(20240601)  # fixed seed: the same data gives the same interval
    n = len(base)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(base[i] for i in idx) / sum(compared[i] for i in idx))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def timed(one: Callable[[], None], n: int) -> list[float]:
    """Latency of each of ``n`` sequential calls of ``one``."""
    perf = perf_counter
    latencies = []
    for _ in range(n):
        t0 = perf()
        one()
        latencies.append(perf() - t0)
    return latencies


def vmrss_kib() -> int:
    """Resident set size of this process (kB as /proc/self/status says)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")
