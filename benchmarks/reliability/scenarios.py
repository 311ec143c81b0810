"""The scenarios: crashes during commits, hangs, switchover churn, and the bad-input and
secrets test files run as they are.

Each fault scenario takes a running :class:`~pgfailover.testing.LocalCluster` (reset to
its known topology first), runs the checker workload (:mod:`.workload`) through every
requested stack while it injects the fault ``times`` times, then checks every key on the
final primary and returns a :class:`ScenarioResult`. Sizes are parameters: the full run
and the CI-sized tests call the same functions.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgfailover.drill.stacks import Endpoint
from pgfailover.testing import LocalCluster
from pgfailover.testing.proxy import FaultProxy

from .workload import (
    FLAVOURS,
    STACK_KINDS,
    Settings,
    StackResult,
    Workload,
    app_backends,
    create_table,
    direct_endpoint,
    final_counts,
    leaked_backends,
    rss_kib,
    settled_threads,
    threads,
    verify,
)

#: Seconds a stack may take to acknowledge the next calls after a fault before the
#: scenario notes it as making no progress (and goes on).
PROGRESS_TIMEOUT = 60.0
#: Seconds a test file run by :func:`run_test_file` may take.
TEST_FILE_TIMEOUT = 900.0


@dataclass
class ScenarioResult:
    """One scenario's figures.

    ``times``: how many faults were injected. ``leaked``: application backends left on the
    servers after the stacks closed, above the count before they opened, once Python's
    cyclic garbage collector has run; ``leaked_until_gc``: the same before it ran (sessions
    held by client objects nothing closed, freed only when the collector finds them).
    ``threads_*`` and ``rss_*``: this process before the stacks opened and after they
    closed (``*_warm``: with the stacks open after the first fault, ``*_end``: with them
    open after the last; the churn scenario compares those two). ``bound_s``: for hangs,
    the stated bound of a statement in flight. ``notes``: anything the run noticed (a
    stack without progress, a close error, a session left).
    """

    scenario: str
    done: str
    replication: str
    times: int
    stacks: list[StackResult]
    leaked: int = 0
    leaked_until_gc: int = 0
    threads_before: int = 0
    threads_after: int = 0
    threads_warm: int = 0
    threads_end: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    seconds: float = 0.0
    bound_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def total(self, name: str) -> int:
        """The sum of the integer field ``name`` over the stacks."""
        return sum(int(getattr(s, name)) for s in self.stacks)

    def stack(self, name: str) -> StackResult:
        """The result of the stack called ``name``."""
        return next(s for s in self.stacks if s.stack == name)

    def as_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready."""
        return asdict(self)


def replication_of(cluster: LocalCluster) -> str:
    """``"synchronous"`` or ``"asynchronous"``, as the primary is configured."""
    with cluster.primary.connect() as conn:
        row = conn.execute("SHOW synchronous_standby_names").fetchone()
    return "synchronous" if row and row[0] else "asynchronous"


class _Run:
    """The frame shared by the scenarios: table, baselines, workload, verification."""

    def __init__(
        self,
        cluster: LocalCluster,
        settings: Settings,
        kinds: Sequence[str],
        flavours: Sequence[str],
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.kinds = kinds
        self.flavours = flavours
        cluster.reset()
        self.table = f"rel_{uuid.uuid4().hex[:10]}"
        create_table(cluster, self.table)
        self.started = time.monotonic()
        self.baseline = app_backends(cluster)
        self.threads_before = threads()
        self.rss_before = rss_kib()
        self.notes: list[str] = []

    def workload(self, endpoint_for: Any) -> Workload:
        return Workload(
            endpoint_for, self.table, self.settings, kinds=self.kinds, flavours=self.flavours
        )

    def progress(self, workload: Workload, more: int, when: str) -> None:
        behind = workload.wait_progress(more, PROGRESS_TIMEOUT)
        if behind:
            self.notes.append(f"no progress within {PROGRESS_TIMEOUT:g} s {when}: {behind}")

    def result(
        self, workload: Workload, scenario: str, done: str, times: int, **extra: Any
    ) -> ScenarioResult:
        self.cluster.wait_replicated()
        stacks = verify(workload, final_counts(self.cluster, self.table))
        notes = self.notes + [f"close: {e}" for e in workload.close_errors]
        if workload.left_running:
            notes.append(f"{workload.left_running} worker(s) still in a call at the end")
        waited = leaked_backends(self.cluster, self.baseline)
        notes += [
            f"session left (node pid | app | port | state | wait | query | age s): {s}"
            for s in waited
        ]
        leaked: list[str] = []
        if waited:  # held by objects only the cyclic garbage collector frees?
            gc.collect()
            leaked = leaked_backends(self.cluster, self.baseline, timeout=5.0)
        return ScenarioResult(
            scenario=scenario,
            done=done,
            replication=replication_of(self.cluster),
            times=times,
            stacks=stacks,
            leaked=max(0, len(leaked) - self.baseline) if leaked else 0,
            leaked_until_gc=max(0, len(waited) - self.baseline) if waited else 0,
            threads_before=self.threads_before,
            threads_after=settled_threads(self.threads_before),
            rss_before_kib=self.rss_before,
            rss_after_kib=rss_kib(),
            seconds=round(time.monotonic() - self.started, 1),
            notes=notes,
            **extra,
        )


# ------------------------------------------------------------------ crashes


def crash(
    cluster: LocalCluster,
    times: int,
    settings: Settings,
    *,
    kinds: Sequence[str] = STACK_KINDS,
    flavours: Sequence[str] = FLAVOURS,
    more: int = 3,
) -> ScenarioResult:
    """Crash the primary ``times`` times while every stack commits: alternately SIGKILL
    of the postmaster and an immediate stop, then promote the standby and rejoin the old
    primary as its standby. Between crashes every stack acknowledges ``more`` new calls.
    Needs a cluster with one standby or more and no PgBouncer in the way (the stacks use a
    direct multi-host DSN)."""
    run = _Run(cluster, settings, kinds, flavours)
    endpoint = direct_endpoint(cluster)
    extra: dict[str, Any] = {}
    with run.workload(lambda _: endpoint) as workload:
        run.progress(workload, more, "before the first crash")
        for n in range(times):
            old, new = cluster.primary, cluster.standbys[0]
            start = time.monotonic()
            workload.fault(start)
            if n % 2 == 0:
                cluster.kill(old)
            else:
                cluster.stop(old, "immediate")
            cluster.promote(new)
            cluster.rejoin(old, new)
            workload.fault(start, time.monotonic())
            run.progress(workload, more, f"after crash {n + 1}")
            if n == 0:
                extra.update(threads_warm=threads(), rss_warm_kib=rss_kib())
        extra.update(threads_end=threads(), rss_end_kib=rss_kib())
    done = (
        f"{times} crashes of the primary while commits stream (SIGKILL of the postmaster and "
        "immediate stop, alternately), each followed by promote + rejoin"
    )
    return run.result(workload, "crash during commits", done, times, **extra)


# ------------------------------------------------------------------ hangs


def hang(
    cluster: LocalCluster,
    times: int,
    settings: Settings,
    *,
    fault: str = "blackhole",
    kinds: Sequence[str] = STACK_KINDS,
    flavours: Sequence[str] = FLAVOURS,
    more: int = 3,
) -> ScenarioResult:
    """Make the primary silent ``times`` times while every stack writes, each time for the
    stated bound (``settings.hang_bound``) plus 2 s, then let it answer again.

    ``fault``: ``"blackhole"`` (each stack connects through its own
    :class:`~pgfailover.testing.proxy.FaultProxy`, which stops forwarding and holds every
    socket open) or ``"freeze"`` (SIGSTOP of the primary's processes by the harness's
    ``freeze``/``thaw``; the stacks connect directly). A bare stack's call in flight must
    end (with an error) within the bound, before the silence ends: its ``fault_to_end_s``
    says when it did. A runner stack retries until the server answers: its calls must end
    within their own bound (:meth:`Settings.call_bound`).
    """
    if fault not in ("blackhole", "freeze"):
        raise ValueError(f"fault must be 'blackhole' or 'freeze', got {fault!r}")
    run = _Run(cluster, settings, kinds, flavours)
    hold = settings.hang_bound + 2.0
    proxies: dict[str, FaultProxy] = {}
    primary = cluster.primary
    app = (cluster.dbname, cluster.user, cluster.password)
    direct = Endpoint([(primary.host, primary.port)], *app)

    def endpoint_for(name: str) -> Endpoint:
        if fault == "freeze":
            return direct
        proxy = proxies[name] = FaultProxy(primary).start()
        return Endpoint([(proxy.host, proxy.port)], *app)

    def silence(on: bool) -> None:
        if fault == "freeze":
            (cluster.freeze if on else cluster.thaw)(primary)
        for proxy in proxies.values():
            if on:
                proxy.blackhole()
            else:
                proxy.restore()

    extra: dict[str, Any] = {"bound_s": settings.hang_bound}
    try:
        with run.workload(endpoint_for) as workload:
            run.progress(workload, more, "before the first silence")
            for n in range(times):
                start = time.monotonic()
                workload.fault(start)
                silence(True)
                # The outage lasts `hold` by design: a call in flight that ends before it
                # is over was ended by the client, not by the server coming back.
                time.sleep(max(0.0, start + hold - time.monotonic()))
                silence(False)
                workload.fault(start, time.monotonic())
                run.progress(workload, more, f"after silence {n + 1}")
                if n == 0:
                    extra.update(threads_warm=threads(), rss_warm_kib=rss_kib())
            extra.update(threads_end=threads(), rss_end_kib=rss_kib())
    finally:
        if fault == "freeze":
            cluster.thaw(primary)
        for proxy in proxies.values():
            proxy.close()
    how = (
        "FaultProxy.blackhole() of each stack's proxy (sockets held open, nothing forwarded)"
        if fault == "blackhole"
        else "freeze of the primary (SIGSTOP of its processes)"
    )
    done = f"{times} x {how} for {hold:g} s (stated bound {settings.hang_bound:g} s + 2 s)"
    return run.result(workload, f"hang: {fault}", done, times, **extra)


# ------------------------------------------------------------------ churn


def churn(
    cluster: LocalCluster,
    times: int,
    settings: Settings,
    *,
    kinds: Sequence[str] = STACK_KINDS,
    flavours: Sequence[str] = FLAVOURS,
    more: int = 3,
) -> ScenarioResult:
    """``times`` switchovers back and forth (fast stop, promote, rejoin) while every stack
    writes; between two, every stack acknowledges ``more`` new calls. Threads and RSS with
    the stacks open are sampled after the first and after the last switchover."""
    run = _Run(cluster, settings, kinds, flavours)
    endpoint = direct_endpoint(cluster)
    extra: dict[str, Any] = {}
    with run.workload(lambda _: endpoint) as workload:
        run.progress(workload, more, "before the first switchover")
        for n in range(times):
            start = time.monotonic()
            workload.fault(start)
            cluster.switchover()
            workload.fault(start, time.monotonic())
            run.progress(workload, more, f"after switchover {n + 1}")
            if n == 0:
                extra.update(threads_warm=threads(), rss_warm_kib=rss_kib())
        extra.update(threads_end=threads(), rss_end_kib=rss_kib())
    done = f"{times} switchovers back and forth (fast stop, promote, rejoin) under load"
    return run.result(workload, "churn: switchovers", done, times, **extra)


# ------------------------------------------------------------------ test files run as they are


@dataclass
class TestFileResult:
    """The outcome of one pytest file: ``present`` False when the file does not exist."""

    scenario: str
    path: str
    present: bool
    tests: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready."""
        return asdict(self)


def run_test_file(
    scenario: str, path: Path, root: Path, timeout: float = TEST_FILE_TIMEOUT
) -> TestFileResult:
    """Run the pytest file ``path`` (relative to the repository ``root``) in a subprocess
    and count its tests from a JUnit XML report; a missing file is reported, not run. A
    run longer than ``timeout`` seconds is killed and reported as timed out (one failure)."""
    rel = str(path)
    if not (root / path).is_file():
        return TestFileResult(scenario, rel, present=False)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgfailover-reliability-") as tmp:
        report = Path(tmp) / "junit.xml"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        argv += [f"--junitxml={report}", rel]
        try:
            proc = subprocess.run(
                argv,
                cwd=root,
                capture_output=True,
                text=True,
                check=False,
                env=dict(os.environ),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            result = TestFileResult(scenario, rel, present=True, timed_out=True, failed=1)
            result.seconds = round(time.monotonic() - started, 1)
            return result
        result = TestFileResult(scenario, rel, present=True, returncode=proc.returncode)
        if report.is_file():
            root_el = ET.parse(report).getroot()  # noqa: S314 - pytest's own report, just written
            found = root_el.find("testsuite")
            suite = found if found is not None else root_el
            tests = int(suite.get("tests", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            result.tests, result.failed, result.skipped = tests, failed, skipped
            result.passed = tests - failed - skipped
        elif proc.returncode != 0:
            result.failed = 1  # pytest could not even start: count it as a failure
    result.seconds = round(time.monotonic() - started, 1)
    return result
