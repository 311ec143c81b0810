"""Patroni failovers next to the application's recovery: leader crashes, switchovers and
frozen leaders.

One :class:`~pgfailover.testing.PatroniCluster` (etcd + 3 members, the harness's fast profile:
ttl 10, loop_wait 1, retry_timeout 3, ``synchronous_mode`` on). ``--runs`` runs of each fault
in ``--faults`` (default all three), the cluster healed (:meth:`reset`) before each:

- ``crash``: SIGKILL of the leader's Patroni and postmaster;
- ``switchover``: ``POST /switchover`` to the synchronous standby;
- ``freeze``: SIGSTOP of every process of the leader (a hung machine: its sockets stay open
  and its kernel keeps acknowledging). Patroni names another leader once the frozen one's
  lease runs out (about ``ttl``). The writers are stopped and every key counted on the new
  leader *before* the old one is thawed (with Patroni 3.0.2's etcd3 store a thawed leader
  may take its key back and rewind what the new one accepted); writes still blocked on the
  frozen node then (a plain pool has no bound) end after the thaw and are reported as
  ``late``, outside the lost/duplicated count.

During each run, three stacks write under load (``--writers`` threads each, one insert of a
unique key every ``--interval`` seconds per thread), built as the drill builds them:

- ``psycopg_pool``: a plain ``psycopg_pool.ConnectionPool`` on a multi-host
  ``target_session_attrs=read-write`` conninfo over every member (Patroni's documented way);
- ``pgfailover pool``: ``pgfailover.ConnectionPool`` with ``PatroniTopology`` over the
  members' REST URLs;
- ``pgfailover pool + runner``: the same under ``pgfailover.TransactionRunner``.

Alongside, one probe thread per member keeps an autocommit session open and runs ``SELECT
pg_current_xact_id()`` (it needs an xid: only a writable primary answers) every 10 ms,
reconnecting when the session breaks. From the probes:

- *new leader writable*: the first probe success on the new leader after the fault;
- *Patroni's promotion gap*: from the old leader's last probe success to that instant.

Per stack: *first write after writable* (the end of the first acknowledged write that ended
at or after "new leader writable", minus that instant), the *longest call* (the longest
write from start to end, success or failure, among those that ended before the count), the
*write gap* (the longest stretch
without an acknowledged write from 1 s before the fault to the end of the run), failed and
unknown-outcome writes, and, counting every key on the final leader, lost (acknowledged,
absent) and duplicated keys. Patroni's own phases come from the harness's
:class:`~pgfailover.testing.Timings`.

    python benchmarks/patroni_failover.py --runs 5 --json benchmarks/results/patroni_failover.json
    python benchmarks/patroni_failover.py --faults freeze --runs 5 --log /tmp/freeze.log

``--log FILE`` writes pgfailover's own log (DEBUG, with ``time.monotonic()`` stamps, the
same clock as the results) to FILE: where the time goes between the fault and the first
acknowledged write.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgfailover.drill.run import TABLE, count_rows, create_table
from pgfailover.drill.stacks import (
    Endpoint,
    NaivePool,
    ProtectedPool,
    ProtectedPoolRunner,
    Stack,
    close_quietly,
    error_code,
)
from pgfailover.testing import PatroniCluster
from pgfailover.testing.patroni import PatroniNode

STACKS: tuple[type[Stack], ...] = (NaivePool, ProtectedPool, ProtectedPoolRunner)
FAULTS = ("crash", "switchover", "freeze")
#: Seconds of writing before the fault, and after the new leader is writable.
BEFORE, AFTER = 1.5, 3.0
#: Seconds between two probe writes on each member.
PROBE_INTERVAL = 0.01
#: The write gap is measured from this many seconds before the fault.
GAP_LEAD = 1.0
#: The issue's targets (seconds).
CRASH_P50, CRASH_MAX, SWITCHOVER_EXTRA, FREEZE_MAX = 0.2, 0.5, 0.2, 0.5
#: Seconds the writers of a freeze run get to finish once stopped, before the count.
FREEZE_JOIN = 30.0


@dataclass(frozen=True)
class Write:
    """One write as the application saw it (``time.monotonic()`` instants)."""

    stack: str
    start: float
    end: float
    key: int
    ok: bool
    error: str | None = None
    unknown: bool = False


class Probe:
    """A session on one member writing an xid every :data:`PROBE_INTERVAL` seconds; the
    instants (``time.monotonic()``, at the answer) of every success."""

    def __init__(self, node: PatroniNode) -> None:
        self.node = node
        self.successes: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe {node.name}", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        dsn = self.node.dsn(connect_timeout=1)
        while not self._stop.wait(PROBE_INTERVAL):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(dsn, autocommit=True)
                conn.execute("SELECT pg_current_xact_id()")
            except psycopg.errors.ReadOnlySqlTransaction:
                continue  # a replica: not writable, the session stays
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                continue
            self.successes.append(time.monotonic())
        if conn is not None:
            conn.close()

    def wait_first_after(self, at: float, timeout: float = 30.0) -> float:
        """The first success at or after ``at``, waiting up to ``timeout`` seconds for it
        (the harness may see the leader writable a moment before this probe does)."""
        deadline = time.monotonic() + timeout
        while (found := next((t for t in self.successes if t >= at), None)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the probe never wrote on {self.node.name}")
            time.sleep(PROBE_INTERVAL)
        return found

    def last_before(self, at: float) -> float | None:
        before = [t for t in self.successes if t < at]
        return before[-1] if before else None


@dataclass
class Load:
    """``writers`` threads per stack writing a key from ``keys`` (unique across every run:
    the table is shared) every ``interval`` seconds."""

    stacks: list[Stack]
    writers: int
    interval: float
    keys: Callable[[], int]
    writes: list[Write] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for stack in self.stacks:
            for _ in range(self.writers):
                thread = threading.Thread(target=self._run, args=(stack, self.keys))
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.join(60)

    def stop(self) -> None:
        """Ask every writer to stop after its current write."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds in all for the writers to end."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, stack: Stack, next_key: Callable[[], int]) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            key, start = next_key(), time.monotonic()
            try:
                stack.write(key)
            except Exception as ex:  # what the application sees: recorded
                code, unknown = error_code(ex)
                self.writes.append(
                    Write(stack.name, start, time.monotonic(), key, False, code, unknown)
                )
            else:
                self.writes.append(Write(stack.name, start, time.monotonic(), key, True))
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))


@dataclass(frozen=True)
class DefaultBoundEndpoint(Endpoint):
    """The drill's endpoint, but pgfailover's pools get no ``connect_timeout`` of their
    own: each connection attempt is bounded by pgfailover's default
    (:data:`~pgfailover.policy.CONNECT_ATTEMPT_BOUND`), as in an application that sets
    none. The naive stacks keep the drill's ``connect_timeout=2``."""

    def topology_conninfo(self) -> str:
        return psycopg.conninfo.make_conninfo(
            dbname=self.dbname, user=self.user, password=self.password
        )


def _sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.monotonic()))


def _wait_sync_standby(cluster: PatroniCluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(m.role == "sync_standby" for m in cluster.members()):
        if time.monotonic() > deadline:
            raise TimeoutError("no synchronous standby appeared")
        time.sleep(0.1)


def _stack_result(
    writes: list[Write],
    found: dict[int, int],
    fault_at: float,
    writable: float,
    end: float,
    *,
    counted_at: float,
) -> dict[str, Any]:
    late = [w for w in writes if w.end > counted_at]  # ended after the count (freeze only)
    writes = [w for w in writes if w.end <= counted_at]
    ok_ends = sorted(w.end for w in writes if w.ok and w.end >= fault_at - GAP_LEAD)
    after = [t for t in ok_ends if t >= writable]
    points = [fault_at - GAP_LEAD, *(t for t in ok_ends if t <= end), end]
    acked = {w.key for w in writes if w.ok}
    return {
        "late": len(late),
        "longest_call": max((w.end - w.start for w in writes), default=0.0),
        "writes": len(writes),
        "ok": sum(w.ok for w in writes),
        "failed": sum(not w.ok for w in writes),
        "unknown": sum(w.unknown for w in writes),
        "failed_after_writable": sum(not w.ok and w.start >= writable for w in writes),
        "errors": sorted({w.error for w in writes if w.error}),
        "first_write_after_writable": (after[0] - writable) if after else None,
        "write_gap": max(b - a for a, b in itertools.pairwise(points)),
        "lost": sum(1 for k in acked if found.get(k, 0) == 0),
        "duplicated": sum(1 for w in writes if w.ok and found.get(w.key, 0) > 1),
    }


#: Keys for every write of every run (the runs share one table).
_KEYS = itertools.count(1)


def _inflict(
    cluster: PatroniCluster, fault: str, old: PatroniNode
) -> tuple[PatroniNode, float, dict[str, float], float | None]:
    """Inflict ``fault`` on leader ``old``; return the new leader, the fault's instant,
    Patroni's phases (seconds from the fault) and when the harness saw the new leader
    writable (None for a freeze: the probes say it)."""
    if fault == "crash":
        timings = cluster.kill_leader()
        fault_at = timings.ended_at["killed"] - timings.phases["killed"]
        patroni = {
            "killed": timings.phases["killed"],
            "elected": timings.ended_at["elected"] - fault_at,
            "writable": timings.ended_at["writable"] - fault_at,
        }
    elif fault == "switchover":
        timings = cluster.switchover()
        fault_at = timings.ended_at["writable"] - timings.phases["writable"]
        patroni = {"writable": timings.phases["writable"]}
    else:
        fault_at = time.monotonic()
        cluster.freeze(old)
        new, elected_at = _wait_other_leader(cluster, old)
        return new, fault_at, {"elected": elected_at - fault_at}, None
    new = cluster.node(timings.notes["new_leader"])
    return new, fault_at, patroni, timings.ended_at["writable"]


def one_run(
    cluster: PatroniCluster, endpoint: Endpoint, fault: str, writers: int, interval: float
) -> dict[str, Any]:
    """Heal the cluster, write through every stack, inflict ``fault``, measure."""
    cluster.reset()
    _wait_sync_standby(cluster)
    old = cluster.wait_leader()
    stacks: list[Stack] = []
    found: dict[int, int] | None = None
    try:
        stacks = [kind(endpoint, TABLE, writers) for kind in STACKS]
        with (
            Probe(cluster.nodes[0]) as p0,
            Probe(cluster.nodes[1]) as p1,
            Probe(cluster.nodes[2]) as p2,
            Load(stacks, writers, interval, _KEYS.__next__) as load,
        ):
            probes = {p.node.name: p for p in (p0, p1, p2)}
            _sleep_until(time.monotonic() + BEFORE)
            new, fault_at, patroni, harness_writable = _inflict(cluster, fault, old)
            writable = probes[new.name].wait_first_after(fault_at)
            old_last = probes[old.name].last_before(writable)
            if harness_writable is None:
                patroni["writable"] = writable - fault_at
            _sleep_until(max(writable, harness_writable or writable) + AFTER)
            end = time.monotonic()
            if fault == "freeze":  # count before the thaw (see the module docstring)
                load.stop()
                load.join(FREEZE_JOIN)
                counted_at = time.monotonic()
                with new.connect(superuser=False) as conn:
                    found = count_rows(conn)
                cluster.thaw(old)
    finally:
        for stack in stacks:
            close_quietly(stack)
    if found is None:
        counted_at = time.monotonic()
        with new.connect(superuser=False) as conn:
            found = count_rows(conn)
    writes = load.writes
    return {
        "fault": fault,
        "old_leader": old.name,
        "new_leader": new.name,
        "patroni": patroni,
        "probe": {
            "writable": writable - fault_at,
            "harness_writable_minus_probe": (
                None if harness_writable is None else harness_writable - writable
            ),
            "promotion_gap": None if old_last is None else writable - old_last,
        },
        "stacks": {
            kind.name: _stack_result(
                [w for w in writes if w.stack == kind.name],
                found,
                fault_at,
                writable,
                end,
                counted_at=counted_at,
            )
            for kind in STACKS
        },
    }


def _wait_other_leader(
    cluster: PatroniCluster, old: PatroniNode, timeout: float = 60.0
) -> tuple[PatroniNode, float]:
    """The member etcd names leader once it is not ``old``, and when that was seen."""
    deadline = time.monotonic() + timeout
    while True:
        leader = cluster.leader()
        if leader is not None and leader is not old:
            return leader, time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no leader other than {old.name} within {timeout} s")
        time.sleep(0.01)


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.3f} / {max(values):.3f}"


def _report(runs: list[dict[str, Any]]) -> list[str]:
    faults = [f for f in FAULTS if any(r["fault"] == f for r in runs)]
    out = ["### Patroni's own timings (seconds from the fault; median / max)", ""]
    out += ["| fault | runs | elected | writable (harness) | writable (probe) | promotion gap |"]
    out += ["|---|---|---|---|---|---|"]
    for fault in faults:
        rs = [r for r in runs if r["fault"] == fault]
        elected = [r["patroni"]["elected"] for r in rs if "elected" in r["patroni"]]
        gaps = [r["probe"]["promotion_gap"] for r in rs if r["probe"]["promotion_gap"] is not None]
        out.append(
            f"| {fault} | {len(rs)} | {_stats(elected)} | "
            f"{_stats([r['patroni']['writable'] for r in rs])} | "
            f"{_stats([r['probe']['writable'] for r in rs])} | {_stats(gaps)} |"
        )
    out += ["", "### The application (seconds; median / max over the runs)", ""]
    out += [
        "| fault | stack | first write after writable | longest call | write gap "
        "| gap - promotion gap | failed | failed after writable | unknown | lost | duplicated "
        "| late |"
    ]
    out += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fault in faults:
        rs = [r for r in runs if r["fault"] == fault]
        for kind in STACKS:
            ss = [r["stacks"][kind.name] for r in rs]
            firsts = [s["first_write_after_writable"] for s in ss]
            never = sum(f is None for f in firsts)
            first = _stats([f for f in firsts if f is not None]) + (
                f" ({never} run{'s' if never > 1 else ''} never)" if never else ""
            )
            extra = [
                s["write_gap"] - r["probe"]["promotion_gap"]
                for s, r in zip(ss, rs, strict=True)
                if r["probe"]["promotion_gap"] is not None
            ]
            totals = [sum(s[k] for s in ss) for k in ("failed", "failed_after_writable")]
            totals += [sum(s[k] for s in ss) for k in ("unknown", "lost", "duplicated", "late")]
            out.append(
                f"| {fault} | {kind.name} | {first} | "
                f"{_stats([s['longest_call'] for s in ss])} | "
                f"{_stats([s['write_gap'] for s in ss])} | "
                f"{_stats(extra)} | " + " | ".join(str(t) for t in totals) + " |"
            )
    out += ["", "### Targets", ""]
    crash = [r for r in runs if r["fault"] == "crash"]
    switch = [r for r in runs if r["fault"] == "switchover"]
    freeze = [r for r in runs if r["fault"] == "freeze"]
    for name in ("pgfailover pool", "pgfailover pool + runner"):
        if freeze:
            firsts = [r["stacks"][name]["first_write_after_writable"] for r in freeze]
            ok = None not in firsts and max(firsts) <= FREEZE_MAX
            out.append(
                f"- freeze, {name}: first write after writable <= {FREEZE_MAX} s (max): "
                f"{'met' if ok else 'MISSED'} ({_stats([f for f in firsts if f is not None])}"
                f"{', some run never wrote' if None in firsts else ''})"
            )
        if not crash:
            continue
        firsts = [r["stacks"][name]["first_write_after_writable"] for r in crash]
        ok = None not in firsts and (
            statistics.median(firsts) <= CRASH_P50 and max(firsts) <= CRASH_MAX
        )
        out.append(
            f"- crash, {name}: first write after writable p50 <= {CRASH_P50} s and max <= "
            f"{CRASH_MAX} s: {'met' if ok else 'MISSED'} "
            f"({_stats([f for f in firsts if f is not None])})"
        )
        if not switch:
            continue
        extra = [
            r["stacks"][name]["write_gap"] - r["probe"]["promotion_gap"]
            for r in switch
            if r["probe"]["promotion_gap"] is not None
        ]
        ok = bool(extra) and max(extra) <= SWITCHOVER_EXTRA
        out.append(
            f"- switchover, {name}: write gap <= Patroni's promotion gap + {SWITCHOVER_EXTRA} s: "
            f"{'met' if ok else 'MISSED'} (excess median / max {_stats(extra)})"
        )
    runner = [r["stacks"]["pgfailover pool + runner"] for r in runs]
    bad = {k: sum(s[k] for s in runner) for k in ("failed", "unknown", "lost", "duplicated")}
    out.append(
        f"- runner: 0 failed, 0 unknown, 0 lost, 0 duplicated: "
        f"{'met' if not any(bad.values()) else 'MISSED'} ({bad})"
    )
    return out


class _MonotonicFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{time.monotonic():.3f} {record.threadName} {super().format(record)}"


def _log_to(path: Path) -> None:
    """pgfailover's log at DEBUG into ``path``, each line stamped with ``time.monotonic()``."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(_MonotonicFormatter("%(name)s %(levelname)s %(message)s"))
    pgf = logging.getLogger("pgfailover")
    pgf.setLevel(logging.DEBUG)
    pgf.addHandler(handler)
    pgf.propagate = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each fault")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated faults to run, among {', '.join(FAULTS)} (default: all)",
    )
    parser.add_argument("--log", type=Path, help="write pgfailover's DEBUG log here")
    parser.add_argument(
        "--pool-connect-timeout",
        action="store_true",
        help="give pgfailover's pools the drill's connect_timeout=2 (default: none, so "
        "pgfailover's own bound applies)",
    )
    parser.add_argument("--writers", type=int, default=2, help="writer threads per stack")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between writes")
    parser.add_argument("--json", type=Path, help="write every run's results here")
    args = parser.parse_args()
    if args.runs < 1 or args.writers < 1 or args.interval <= 0:
        parser.error("--runs and --writers must be >= 1, --interval > 0")
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if not faults or not set(faults) <= set(FAULTS):
        parser.error(f"--faults takes a comma-separated list among {', '.join(FAULTS)}")
    for name in ("", "psycopg", "pgfailover"):  # every failed connection is a WARNING
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.log:
        _log_to(args.log)
    started = datetime.datetime.now(datetime.timezone.utc)
    runs: list[dict[str, Any]] = []
    with PatroniCluster(nodes=3, synchronous_mode=True) as cluster:
        leader = cluster.wait_leader()
        with leader.connect(superuser=False) as conn:
            server_version = create_table(conn)
        status, body = leader.api("/patroni")
        patroni_version = body.get("patroni", {}).get("version") if status == 200 else None
        endpoint = (Endpoint if args.pool_connect_timeout else DefaultBoundEndpoint)(
            [(n.host, n.port) for n in cluster.nodes],
            cluster.dbname,
            cluster.user,
            cluster.password,
            session_attrs="read-write",
            patroni_urls=tuple(n.rest_url for n in cluster.nodes),
        )
        for fault in faults:
            for i in range(args.runs):
                run = one_run(cluster, endpoint, fault, args.writers, args.interval)
                runs.append(run)
                pool = run["stacks"]["pgfailover pool"]
                print(
                    f"{fault} {i + 1}: {run['old_leader']} -> {run['new_leader']}, writable "
                    f"{run['probe']['writable']:.3f} s after the fault, pgfailover pool's first "
                    f"write {pool['first_write_after_writable']} s later",
                    file=sys.stderr,
                    flush=True,
                )
        profile = {"ttl": cluster.ttl, "loop_wait": cluster.loop_wait}
        profile["retry_timeout"] = cluster.retry_timeout
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}",
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "postgresql": f"{server_version // 10000}.{server_version % 10000}",
        "patroni": patroni_version,
        "profile": profile,
        "synchronous_mode": True,
        "writers_per_stack": args.writers,
        "interval": args.interval,
        "probe_interval": PROBE_INTERVAL,
        "pgfailover_pool_connect_timeout": 2 if args.pool_connect_timeout else None,
    }
    print("\n".join(f"{k}: {v}" for k, v in meta.items()) + "\n")
    print("\n".join(_report(runs)))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
