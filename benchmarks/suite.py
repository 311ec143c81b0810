"""The benchmark suite of the issue's targets: one command, fresh local clusters, markdown out.

    .venv/bin/python benchmarks/suite.py --json benchmarks/results/suite.json
    .venv/bin/python benchmarks/suite.py --quick                  # smaller, < 2 minutes
    .venv/bin/python benchmarks/suite.py --only happy,resources   # some sections only
    .venv/bin/python benchmarks/suite.py --only happy --latency-ms 0   # loopback only
    .venv/bin/python benchmarks/suite.py --only recovery,fleet,happy  # the monitor's targets

Starts its own ``LocalCluster``s (loopback only) and tears them down on exit, on error, on
Ctrl-C and on SIGTERM. Prints to stdout a header (machine, versions, the exact command) and
one markdown section per part, ready to paste into benchmarks/RESULTS.md; progress goes to
stderr. ``--json`` writes every raw figure too. On a quiet 2-core machine the happy part
should take about 3 minutes and a full run about 4 (estimated from the per-transaction
times of the 2026-11-24 run; at a load average of 5-6 the happy part took 9.5 minutes),
``--quick`` about a minute.

(a) happy path (``happy``): on one primary, one thread, four components, each as naive,
    pgfailover and naive twin (the A/A control); rounds of the pair (naive, pgfailover)
    and of the pair (naive, twin) alternate two by two, each pair swapping which goes
    first every round (see ``_suite_happy``):
    - pool: ``psycopg_pool.ConnectionPool`` vs ``pgfailover.ConnectionPool``, one insert
      transaction per checkout;
    - SQLAlchemy: plain vs ``pgfailover.sqlalchemy.instrument``-ed engine (psycopg
      dialect), one insert per ``engine.begin()``;
    - runner, recorded: a bare ``with pool.connection()`` transaction vs
      ``runner(work)`` with ``runner = TransactionRunner(pool)``, both on the same
      ``pgfailover.ConnectionPool``;
    - runner, idempotent: the same with ``TransactionRunner(pool, idempotent=True)``.
    Twice: on loopback (``--rounds`` x ``--transactions``), then with every variant
    connecting through a ``FaultProxy`` adding ``--latency-ms`` of round trip (default 0.5,
    a same-zone network; ``--latency-rounds`` x ``--latency-transactions``; 0 skips it);
    the round trip the proxy really adds is measured and printed.
    Figures: tx/s (transactions per second of summed latency), p50 and p99 latency (ms) of
    one transaction, the throughput ratio pgfailover/naive (A/A: twin/naive) with a 95 %
    bootstrap interval over rounds; per transaction (loopback), the server-side statements
    (pg_stat_statements calls / transactions, naming the statements) and the client-side
    round trips (libpq trace). Targets: ratio >= 0.98 (the recorded runner on loopback:
    >= 0.85), 0 extra round trips.
    The pgfailover pools and instrumented engines register with the process monitor
    (``monitor=True``; the monitor is opt-in, the suite turns it on for this section):
    the suite samples the process monitor while the section runs and prints
    what it watched (endpoints, pools registered, role checks), so the figures are those
    of the pools with the monitor on.
(b) recovery (``recovery``): PgBouncer transaction mode, PgBouncer session mode, direct
    multi-host conninfo; per run and variant a fresh ``pgfailover.ConnectionPool``
    (max_size 4), one writer every ~2 ms, ``failover('fast')`` (+ PgBouncer repoint);
    variants: registered with a private ``Monitor()`` and ``monitor=False``, one after
    the other in each run; seconds from "primary reachable" (end of repoint / end of
    promote-until-writable) to the first acknowledged commit, p50 and max, next to the
    harness's promote-until-writable p50 (the physical limit); connection attempts during
    the outage (the pool's and the monitor's watch's) per second of outage, and where the
    time goes after reachable. Targets: with the monitor p50 <= 0.05 s, max <= 0.2 s and
    no more attempts per second than without it; without it p50 <= 0.1 s, max <= 0.5 s
    (see ``_suite_recovery``).
(c) resources (``resources``): per open pool (min = max = 4, warmed up), psycopg_pool vs
    pgfailover, sync and async: threads (or asyncio tasks) added, Python heap KiB
    (tracemalloc) and RSS KiB added (see ``_suite_resources``).
(d) fleet (``fleet``): ``--fleet-pools`` (100) ``pgfailover.AsyncConnectionPool`` pools
    (min_size 1, max_size 2) in one event loop behind PgBouncer in transaction mode, a
    light writer each, ``--fleet-runs`` failovers with one shared private ``Monitor()``
    and as many with ``monitor=False``: watches (target 1), the pools' connection
    attempts during the outage (target 0) and the watch's, each pool's first write after
    reachable (target: all within 0.5 s), the largest share of the reconnects in a 50 ms
    window (target <= 25 %) (see ``_suite_fleet``).

Sections run in the order ``--only`` names them (by default a, b, c, d).
Each table says "met" or "MISSED" against the issue's targets from the figures as measured;
nothing is tuned towards a target. Timing figures depend on the machine's load: the header
gives the load average at the start and the footer at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from unittest import mock

import _suite_fleet
import _suite_happy
import _suite_recovery
import _suite_resources
import psycopg
from _suite_common import load_average, log, machine

import pgfailover.sqlalchemy
from pgfailover.monitor import EndpointWatch, Monitor, process_monitor
from pgfailover.pool import ConnectionPool
from pgfailover.sqlalchemy import instrument as _instrument
from pgfailover.testing import LocalCluster

SECTIONS = ("happy", "recovery", "resources", "fleet")
#: Settings of a full run and of --quick.
FULL = {
    "rounds": 100,
    "transactions": 120,
    "latency_rounds": 20,
    "latency_transactions": 50,
    "count": 500,
    "runs": 10,
    "fleet_runs": 3,
}
QUICK = {
    "rounds": 10,
    "transactions": 60,
    "latency_rounds": 4,
    "latency_transactions": 20,
    "count": 200,
    "runs": 3,
    "fleet_runs": 1,
}


def _command() -> str:
    python = os.path.relpath(sys.executable)
    if python.startswith(".."):
        python = sys.executable
    return shlex.join([python, *sys.argv])


def _header(info: dict[str, Any], command: str, started: str, load: list[float]) -> str:
    return "\n".join(
        [
            "## Benchmark suite",
            "",
            f"Machine: {info['cores']} cores, {info['ram_gib']} GiB RAM, {info['os']}, kernel "
            f"{info['kernel']} ({info['arch']}); Python {info['python']}; "
            f"{info['postgresql']}; {info['pgbouncer']}; psycopg {info['psycopg']}, "
            f"psycopg_pool {info['psycopg_pool']}, SQLAlchemy {info['sqlalchemy']}.",
            f"Started {started}, load average (1/5/15 min) {load}. Command, from the "
            "repository root:",
            "",
            "```",
            command,
            "```",
        ]
    )


def _finite(value: Any) -> Any:
    """JSON without NaN/Infinity: non-finite floats become null (inf: "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value == math.inf else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class MonitorSampler:
    """A thread that looks at ``monitor`` every ``every`` seconds while a section runs: how
    many endpoints it watches, how many pools are registered, how many role checks its
    watches made (each watch's last count seen, summed: a watch ends with its last pool)."""

    def __init__(self, monitor: Monitor, every: float = 0.1) -> None:
        self.monitor = monitor
        self.every = every
        self.samples = 0
        self.samples_watching = 0
        self.endpoints_max = 0
        self.members_max = 0
        self.checks: dict[int, tuple[EndpointWatch, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            endpoints = self.monitor.endpoints()
            members = sum(len(self.monitor.members(e)) for e in endpoints)
            self.samples += 1
            self.samples_watching += bool(endpoints)
            self.endpoints_max = max(self.endpoints_max, len(endpoints))
            self.members_max = max(self.members_max, members)
            for endpoint in endpoints:
                watch = self.monitor.watch_of(endpoint)
                if watch is not None:  # keyed by the object, kept alive here
                    self.checks[id(watch)] = (watch, watch.checks)

    def __enter__(self) -> MonitorSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        return {
            "sample_every_s": self.every,
            "samples": self.samples,
            "samples_watching": self.samples_watching,
            "endpoints_max": self.endpoints_max,
            "pools_registered_max": self.members_max,
            "watches_seen": len(self.checks),
            "role_checks": sum(checks for _, checks in self.checks.values()),
        }


def render_monitor(s: dict[str, Any]) -> str:
    """The process monitor's activity during the happy section, one paragraph."""
    share = s["samples_watching"] / s["samples"] if s["samples"] else 0.0
    text = (
        "Process monitor during the happy section: the pgfailover pools and instrumented "
        "engines registered with it (`monitor=True`, set by the suite: the monitor is "
        "opt-in). Sampled every "
        f"{s['sample_every_s']:g} s, it watched an endpoint in {share:.0%} of {s['samples']} "
        f"samples, at most {s['endpoints_max']} endpoint(s) and {s['pools_registered_max']} "
        f"member(s) (pools, engines) registered at once; {s['watches_seen']} watch(es) "
        f"made {s['role_checks']} "
        "role checks on their own connections. Those queries run as the application user, "
        "so a statement count (pg_stat_statements) may include one; the round trips are "
        "traced on the pools' own connections only."
    )
    return textwrap.fill(text, width=90)


_interrupted = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C or SIGTERM: unwind every with-block (pools closed, clusters torn down)."""
    global _interrupted  # noqa: PLW0603 - one flag, set from the signal handler
    _interrupted = True
    raise KeyboardInterrupt


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=f"smaller run: {QUICK}")
    parser.add_argument("--json", type=Path, help="write every raw figure to this file")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {SECTIONS}, run in the order given",
    )
    parser.add_argument("--rounds", type=int, help=f"happy path rounds (full {FULL['rounds']})")
    parser.add_argument(
        "--transactions",
        type=int,
        help=f"transactions per variant and round (full {FULL['transactions']})",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.5,
        help="round trip added by the proxy for the happy path's second network, in ms "
        "(default 0.5; 0: loopback only)",
    )
    parser.add_argument(
        "--latency-rounds",
        type=int,
        help=f"happy path rounds through the proxy (full {FULL['latency_rounds']})",
    )
    parser.add_argument(
        "--latency-transactions",
        type=int,
        help="transactions per variant and round through the proxy "
        f"(full {FULL['latency_transactions']})",
    )
    parser.add_argument(
        "--count", type=int, help=f"transactions for statement counts (full {FULL['count']})"
    )
    parser.add_argument(
        "--runs",
        type=int,
        help=f"failovers per recovery scenario and variant (full {FULL['runs']})",
    )
    parser.add_argument(
        "--fleet-runs",
        type=int,
        help=f"fleet failovers per variant (full {FULL['fleet_runs']})",
    )
    parser.add_argument(
        "--fleet-pools", type=int, default=100, help="pools in the fleet (default 100)"
    )
    parser.add_argument(
        "--repoint-delay",
        type=float,
        default=0.3,
        help="seconds between the failover and the PgBouncer repoint (default 0.3)",
    )
    args = parser.parse_args()
    only = list(dict.fromkeys(s.strip() for s in args.only.split(",") if s.strip()))
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown or not only:
        parser.error(f"--only: unknown sections {unknown}; choose from {SECTIONS}")
    args.only = only
    defaults = QUICK if args.quick else FULL
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("rounds", "latency_rounds"):
        if getattr(args, name) < 2 or getattr(args, name) % 2:
            parser.error(
                f"--{name.replace('_', '-')} must be even "
                "(the order swaps every round, in blocks of two)"
            )
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    if args.fleet_pools < 1:
        parser.error("--fleet-pools must be >= 1")
    return args


CT = TypeVar("CT", bound="psycopg.Connection[Any]")


class _MonitoredPool(ConnectionPool[CT]):
    """pgfailover's pool registered with the process monitor (``monitor=True``): the
    monitor is opt-in, and the happy path measures the pools with it on."""

    def __init__(self, *args: Any, monitor: Monitor | bool = True, **kwargs: Any) -> None:
        super().__init__(*args, monitor=monitor, **kwargs)


def _instrument_monitored(engine: Any, **kwargs: Any) -> Any:
    """``pgfailover.sqlalchemy.instrument`` with ``monitor=True`` unless told otherwise."""
    kwargs.setdefault("monitor", True)
    return _instrument(engine, **kwargs)


def _happy(args: argparse.Namespace, result: dict[str, Any]) -> str:
    # the section's pgfailover pools and instrumented engines register with the process
    # monitor (opt-in): its ConnectionPool and pgfailover.sqlalchemy.instrument, for the
    # duration of the section
    with (
        mock.patch.object(_suite_happy, "ConnectionPool", _MonitoredPool),
        mock.patch.object(pgfailover.sqlalchemy, "instrument", _instrument_monitored),
        LocalCluster(standbys=0, pgbouncer=None) as cluster,
        MonitorSampler(process_monitor()) as sampled,
    ):
        happy = _suite_happy.run(
            cluster,
            args.rounds,
            args.transactions,
            args.count,
            latency_ms=args.latency_ms,
            latency_rounds=args.latency_rounds,
            latency_tx=args.latency_transactions,
        )
    happy["process_monitor"] = sampled.summary()
    result["happy"] = happy
    return (
        _suite_happy.render(happy, args.rounds, args.transactions)
        + "\n\n"
        + render_monitor(happy["process_monitor"])
    )


def _recovery(args: argparse.Namespace, result: dict[str, Any]) -> str:
    recovery = _suite_recovery.run(args.runs, args.repoint_delay)
    result["recovery"] = recovery
    return _suite_recovery.render(recovery, args.runs, args.repoint_delay)


def _fleet(args: argparse.Namespace, result: dict[str, Any]) -> str:
    fleet = _suite_fleet.run(args.fleet_runs, args.fleet_pools, args.repoint_delay)
    result["fleet"] = fleet
    return _suite_fleet.render(fleet, args.fleet_runs, args.repoint_delay)


def _resources(args: argparse.Namespace, result: dict[str, Any]) -> str:
    with LocalCluster(standbys=0, pgbouncer=None) as cluster:
        resources = _suite_resources.run(cluster)
    result["resources"] = resources
    return _suite_resources.render(resources)


RUN = {"happy": _happy, "recovery": _recovery, "resources": _resources, "fleet": _fleet}


def _sections(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Run and print the sections asked for, in the order ``--only`` names them; raw
    figures into ``result``."""
    for section in args.only:
        t = time.monotonic()
        text = RUN[section](args, result)
        result["seconds"][section] = time.monotonic() - t
        print("\n" + text, flush=True)


def main() -> int:
    args = _parse()
    # Ctrl-C and SIGTERM raise KeyboardInterrupt, even when started with SIGINT ignored
    # (a background job of a non-interactive shell): teardown then runs.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    # Failovers are logged at WARNING by pgfailover and psycopg_pool; the tables count them.
    for name in ("pgfailover", "psycopg"):
        logging.getLogger(name).addHandler(logging.NullHandler())
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    command = _command()
    load_start = load_average()
    print(_header(info, command, started, load_start), flush=True)
    result: dict[str, Any] = {
        "command": command,
        "started": started,
        "machine": info,
        "settings": {
            k: getattr(args, k)
            for k in (*FULL, "latency_ms", "quick", "repoint_delay", "only", "fleet_pools")
        },
        "load_average": {"start": load_start},
        "seconds": {},
    }
    try:
        _sections(args, result)
    except Exception:
        if not _interrupted:
            raise
        # A driver may turn the interrupt into its own error (e.g. a cancelled query).
        log("interrupted: every cluster started has been torn down")
        return 130
    except KeyboardInterrupt:
        log("interrupted: every cluster started has been torn down")
        return 130
    total = time.monotonic() - t0
    result["seconds"]["total"] = total
    result["load_average"]["end"] = load_average()
    sections = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items() if k != "total")
    print(
        f"\nRun took {total:.0f} s ({sections}); load average at the end "
        f"{result['load_average']['end']}."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(result), indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
