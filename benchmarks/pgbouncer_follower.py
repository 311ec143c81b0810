"""Failovers behind PgBouncer with the follower repointing it: how soon applications write
again, with nobody repointing PgBouncer by hand.

For each configuration in ``--configs`` one :class:`~pgfailover.testing.LocalCluster`
(primary, streaming standby, PgBouncer 1.18 with ``server_login_retry`` 0.1 s, and the real
``pgfailover pgbouncer follow --hosts`` process at ``--interval`` seconds, the command's
default unless told) goes through ``--runs`` failovers (a fast stop of the primary,
promotion of the standby, the old primary rejoining as its standby; the next failover goes
back). The configurations:

- ``transaction``: PgBouncer in transaction mode, the follower's plain repoint (rewrite,
  RELOAD, RECONNECT);
- ``transaction-pause``: the same with ``follow --pause`` (PAUSE before the rewrite, RESUME
  after the RELOAD);
- ``session``: PgBouncer in session mode, plain repoint;
- ``session-fast-close``: session mode with ``server_fast_close = 1`` (what ``pgfailover
  pgbouncer doctor`` advises for session mode);
- ``session-pause``: session mode with ``follow --pause``.

Two stacks write through PgBouncer all along (``--writers`` threads each, one insert of a
unique key every ``--pace`` seconds per thread), built as the drill builds them: a plain
``psycopg_pool.ConnectionPool`` (no pgfailover in it) and ``pgfailover.ConnectionPool``
under ``pgfailover.TransactionRunner``.

Per failover: *writable* is when the promoted node accepted a write (the harness polls it
every 5 ms on one session); *repointed* is when PgBouncer's ``SHOW DATABASES`` first showed
the new primary (polled every 10 ms from here, ``time.monotonic()`` on both); per stack,
*first write after writable* is the end of the first acknowledged write that ended after
*writable*, minus that instant ("none" when none came within ``--window`` seconds). At the
end, failed writes are counted per stack, and every key the runner stack saw acknowledged is
looked up on the final primary: lost (absent) and duplicated.

    python benchmarks/pgbouncer_follower.py --json benchmarks/results/pgbouncer_follower.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgfailover.drill.run import TABLE, RepointWatch, count_rows, create_table
from pgfailover.drill.stacks import Endpoint, NaivePool, ProtectedPoolRunner, Stack, error_code
from pgfailover.pgbouncer.follow import DEFAULT_INTERVAL
from pgfailover.testing import LocalCluster

#: name -> (pool mode, extra PgBouncer settings, extra follow arguments)
CONFIGS: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "transaction": ("transaction", {}, []),
    "transaction-pause": ("transaction", {}, ["--pause"]),
    "session": ("session", {}, []),
    "session-fast-close": ("session", {"server_fast_close": "1"}, []),
    "session-pause": ("session", {}, ["--pause"]),
}
NAIVE, RUNNER = NaivePool.name, ProtectedPoolRunner.name
#: The issue's targets for the plain app in transaction mode (seconds after writable).
TARGET_P50, TARGET_MAX = 0.5, 1.0


@dataclass(frozen=True)
class Write:
    """One write as the application saw it (``time.monotonic()`` instants)."""

    stack: str
    end: float
    key: int
    ok: bool
    error: str | None = None


@dataclass
class Load:
    """``writers`` threads per stack, each writing a new key every ``pace`` seconds."""

    stacks: list[Stack]
    writers: int
    pace: float
    writes: list[Write] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _keys: Any = field(default_factory=lambda: itertools.count(1))

    def __enter__(self) -> Load:
        for stack in self.stacks:
            for _ in range(self.writers):
                thread = threading.Thread(target=self._run, args=(stack,), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, stack: Stack) -> None:
        while not self._stop.is_set():
            key = next(self._keys)
            try:
                stack.write(key)
            except Exception as ex:  # what the application sees, recorded
                code, _ = error_code(ex)
                self.writes.append(Write(stack.name, time.monotonic(), key, False, code))
            else:
                self.writes.append(Write(stack.name, time.monotonic(), key, True))
            self._stop.wait(self.pace)

    def first_ok_after(self, stack: str, at: float) -> float | None:
        ends = [w.end for w in list(self.writes) if w.stack == stack and w.ok and w.end > at]
        return min(ends) - at if ends else None


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``args.runs`` failovers in configuration ``name``; every run's numbers and totals."""
    mode, settings, follow_args = CONFIGS[name]
    print(f"== {name}: PgBouncer {mode} mode {settings or ''} follow {follow_args}", flush=True)
    runs: list[dict[str, Any]] = []
    with LocalCluster(
        standbys=1,
        pgbouncer=mode,  # type: ignore[arg-type]
        pgbouncer_settings=settings,
        follower=True,
        follower_interval=args.interval,
        follower_args=follow_args,
    ) as cluster:
        bouncer = cluster.pgbouncer
        assert bouncer is not None
        with cluster.primary.connect(superuser=False) as conn:
            create_table(conn)
        endpoint = Endpoint(
            [(bouncer.host, bouncer.port)],
            cluster.dbname,
            cluster.user,
            cluster.password,
            prepare=mode != "transaction",
        )
        stacks: list[Stack] = [
            NaivePool(endpoint, TABLE, 2),
            ProtectedPoolRunner(endpoint, TABLE, 2),
        ]
        try:
            with Load(stacks, args.writers, args.pace) as load:
                time.sleep(1.0)  # steady state before the first failover
                for i in range(args.runs):
                    old, new = cluster.primary, cluster.standbys[0]
                    watch = RepointWatch(bouncer.admin_dsn(), cluster.dbname, (old.host, old.port))
                    watch.start()
                    timings = cluster.failover("fast", target=new)
                    writable = timings.ended_at["promote"]
                    repointed, _ = watch.wait(60)
                    deadline = writable + args.window
                    while time.monotonic() < deadline and (
                        load.first_ok_after(NAIVE, writable) is None
                        or load.first_ok_after(RUNNER, writable) is None
                    ):
                        time.sleep(0.02)
                    run: dict[str, Any] = {
                        "run": i + 1,
                        "to": new.name,
                        "promote_s": timings.phases["promote"],
                        "repointed_after_writable_s": repointed - writable,
                        NAIVE: load.first_ok_after(NAIVE, writable),
                        RUNNER: load.first_ok_after(RUNNER, writable),
                    }
                    runs.append(run)
                    print(
                        f"  run {i + 1}: repointed +{run['repointed_after_writable_s']:.3f} s, "
                        + ", ".join(f"{s} {_s(run[s])}" for s in (NAIVE, RUNNER)),
                        flush=True,
                    )
                    time.sleep(0.5)  # the rejoined node settles before the next failover
        finally:
            for stack in stacks:
                stack.close()
        with cluster.primary.connect(superuser=False) as conn:
            found = count_rows(conn)
    writes = list(load.writes)
    acked = [w.key for w in writes if w.stack == RUNNER and w.ok]
    totals = {
        stack: {
            "writes": sum(1 for w in writes if w.stack == stack),
            "failed": sum(1 for w in writes if w.stack == stack and not w.ok),
            "errors": _errors([w for w in writes if w.stack == stack]),
        }
        for stack in (NAIVE, RUNNER)
    }
    totals[RUNNER]["lost"] = sum(1 for k in acked if found.get(k, 0) == 0)
    totals[RUNNER]["duplicated"] = sum(1 for k in acked if found.get(k, 0) > 1)
    return {
        "config": name,
        "mode": mode,
        "settings": settings,
        "follow_args": follow_args,
        "runs": runs,
        "totals": totals,
    }


def _errors(writes: list[Write]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for w in writes:
        if not w.ok and w.error:
            counts[w.error] = counts.get(w.error, 0) + 1
    return counts


def _s(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _stat(values: list[float | None], window: float) -> str:
    """``p50 / max`` over the runs; runs without a write in the window count as above it."""
    got = sorted(v for v in values if v is not None)
    missing = len(values) - len(got)
    if not got:
        return f"none within {window:g} s ({missing} runs)"
    ranked = sorted([*got, *([float("inf")] * missing)])
    p50 = statistics.median(ranked)
    text = f"{_s(p50) if p50 != float('inf') else 'none'} / {_s(max(got))}"
    return text + (
        f" ({missing} of {len(values)} runs: none within {window:g} s)" if missing else ""
    )


def table(results: list[dict[str, Any]], window: float) -> str:
    lines = [
        "| configuration | repointed after writable | psycopg_pool: first write after writable "
        "| runner: first write after writable | psycopg_pool failed | runner failed | runner lost "
        "| runner duplicated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        runs = r["runs"]
        lines.append(
            f"| {r['config']} | {_stat([x['repointed_after_writable_s'] for x in runs], window)} "
            f"| {_stat([x[NAIVE] for x in runs], window)} "
            f"| {_stat([x[RUNNER] for x in runs], window)} "
            f"| {r['totals'][NAIVE]['failed']} | {r['totals'][RUNNER]['failed']} "
            f"| {r['totals'][RUNNER]['lost']} | {r['totals'][RUNNER]['duplicated']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="failovers per configuration")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated configurations (default: all: {', '.join(CONFIGS)})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL,
        help="the follower's --interval (default: the command's, %(default)s)",
    )
    parser.add_argument("--writers", type=int, default=2, help="writer threads per stack")
    parser.add_argument("--pace", type=float, default=0.01, help="seconds between two writes")
    parser.add_argument(
        "--window", type=float, default=5.0, help="seconds after writable to wait for a write"
    )
    parser.add_argument("--json", type=Path, help="write every run's results here")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}: choose from {', '.join(CONFIGS)}")
    # every failover event is logged at WARNING (hundreds here): keep the output readable
    logging.getLogger("pgfailover").setLevel(logging.ERROR)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = [run_config(name, args) for name in names]
    machine = {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print()
    print(table(results, args.window))
    print(f"\nload average at the end: {machine['load_average']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
