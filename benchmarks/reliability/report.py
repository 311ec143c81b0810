"""The report of a reliability run: docs/reliability.md (markdown) and the JSON figures.

Every sentence of judgement in the markdown ("met" / "MISSED") is computed here from the
figures as measured (:func:`checks`); nothing in the document is written by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .scenarios import ScenarioResult, TestFileResult
from .workload import StackResult

#: One line of the document's checks: what must hold, and whether it did.
Check = tuple[str, bool]


@dataclass
class Run:
    """A whole run: the command, the machine, the sizes, and every result."""

    command: str
    date: str
    machine: dict[str, Any]
    revision: str
    size: str
    settings: dict[str, Any]
    scenarios: list[ScenarioResult] = field(default_factory=list)
    files: list[TestFileResult] = field(default_factory=list)
    seconds: float = 0.0
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready, with the checks."""
        return {
            "command": self.command,
            "date": self.date,
            "machine": self.machine,
            "revision": self.revision,
            "size": self.size,
            "settings": self.settings,
            "seconds": self.seconds,
            "load_before": self.load_before,
            "load_after": self.load_after,
            "scenarios": [s.as_dict() for s in self.scenarios],
            "files": [f.as_dict() for f in self.files],
            "checks": [{"check": text, "met": ok} for text, ok in checks(self)],
        }


#: Seconds before a crash within which an acknowledged write may be lost with asynchronous
#: replication (the standby's replay lag on loopback is milliseconds; this leaves room for
#: a loaded machine). A loss acknowledged earlier would not be the replication window.
LOSS_WINDOW = 2.0


def lost_window(result: ScenarioResult) -> float | None:
    """The longest time from a lost write's acknowledgement to the crash that lost it,
    over the stacks (None: nothing lost; negative: a loss after every crash was over)."""
    values = [s.lost_before_fault_s for s in result.stacks if s.lost_before_fault_s is not None]
    if not values:
        return None
    return -1.0 if min(values) < 0 else max(values)


def _runner(stack: StackResult) -> bool:
    return "runner" in stack.stack


def _bare(stack: StackResult) -> bool:
    return "runner" not in stack.stack


def scenario_checks(result: ScenarioResult) -> list[Check]:
    """What must hold for one scenario, and whether it did."""
    out: list[Check] = []
    name = f"{result.scenario} ({result.replication})"
    lost, dup = result.total("lost"), result.total("duplicated")
    stuck, unexplained = result.total("stuck"), result.total("phantom_unexplained")
    if result.replication == "synchronous":
        out.append((f"{name}: 0 acknowledged writes lost (found {lost})", lost == 0))
    else:
        out.append(
            (
                f"{name}: every loss reached its caller as a failure or CommitOutcomeUnknown"
                f" (acknowledged writes lost, i.e. silent: {lost})",
                lost == 0,
            )
        )
        window = lost_window(result)
        out.append(
            (
                f"{name}: every acknowledged write lost was acknowledged at most"
                f" {LOSS_WINDOW:g} s before the crash that lost it, i.e. within the"
                " standby's replication window (longest: "
                + ("nothing lost" if window is None else f"{window:.3f} s")
                + ")",
                window is None or 0.0 <= window <= LOSS_WINDOW,
            )
        )
    out.append((f"{name}: 0 writes duplicated (found {dup})", dup == 0))
    out.append(
        (f"{name}: 0 rows written without a call for them (found {unexplained})", unexplained == 0)
    )
    out.append((f"{name}: 0 calls stuck past their bound (found {stuck})", stuck == 0))
    out.append(
        (
            f"{name}: 0 server connections leaked after the stacks closed (found {result.leaked})",
            result.leaked == 0,
        )
    )
    out.append(
        (
            f"{name}: no session left for the garbage collector to close"
            f" (found {result.leaked_until_gc}, gone after gc.collect():"
            f" {result.leaked_until_gc - result.leaked})",
            result.leaked_until_gc == 0,
        )
    )
    out.append(
        (
            f"{name}: threads back to the count before the stacks opened"
            f" ({result.threads_before} -> {result.threads_after})",
            result.threads_after <= result.threads_before,
        )
    )
    if result.scenario.startswith("hang") and result.bound_s is not None:
        bound = result.bound_s + 1.0  # one watchdog tick and scheduling
        for stack in filter(_bare, result.stacks):
            out.append(
                (
                    f"{name}, {stack.stack}: a call during the silence ended within the stated"
                    f" bound {result.bound_s:g} s + 1 s (longest {stack.fault_to_end_s:.2f} s)",
                    stack.fault_to_end_s <= bound,
                )
            )
    if result.scenario.startswith("churn"):
        out.append(
            (
                f"{name}: no thread growth over the run with the stacks open"
                f" ({result.threads_warm} after the first switchover, {result.threads_end}"
                " after the last)",
                result.threads_end <= result.threads_warm,
            )
        )
    if result.scenario.startswith("crash") and result.replication == "synchronous":
        unknown = sum(s.unknown for s in filter(_runner, result.stacks))
        out.append(
            (
                f"{name}: CommitOutcomeUnknown raised by the runner after synchronous crashes:"
                f" {unknown}",
                unknown == 0,
            )
        )
    return out


def checks(run: Run) -> list[Check]:
    """Every check of the run, scenario by scenario, then the test files."""
    out = [c for s in run.scenarios for c in scenario_checks(s)]
    for f in run.files:
        if not f.present:
            out.append((f"{f.scenario}: {f.path} is not present (not run)", False))
        elif f.timed_out:
            out.append((f"{f.scenario}: {f.path} timed out after {f.seconds:g} s", False))
        else:
            out.append(
                (
                    f"{f.scenario}: {f.path}: {f.passed} passed, {f.failed} failed,"
                    f" {f.skipped} skipped of {f.tests}",
                    f.failed == 0 and f.tests > 0,
                )
            )
    return out


# ------------------------------------------------------------------ markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _phantoms(items: Sequence[StackResult]) -> str:
    f = sum(s.phantom_failed for s in items)
    u = sum(s.phantom_unknown for s in items)
    x = sum(s.phantom_unexplained for s in items)
    return f"{f} / {u} / {x}"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def summary_table(run: Run) -> str:
    """One row per scenario (and per test file)."""
    header = [
        "scenario",
        "replication",
        "what was done",
        "times",
        "calls",
        "in flight at a fault",
        "acknowledged",
        "failed",
        "CommitOutcomeUnknown",
        "lost",
        "duplicated",
        "phantom (failed / unknown / unexplained)",
        "stuck",
        "leaked (before gc.collect())",
        "threads before -> after",
        "RSS MiB before -> after",
    ]
    rows: list[list[object]] = []
    for s in run.scenarios:
        rows.append(
            [
                s.scenario,
                s.replication,
                s.done,
                s.times,
                s.total("calls"),
                s.total("caught"),
                s.total("acked"),
                s.total("failed"),
                s.total("unknown"),
                s.total("lost"),
                s.total("duplicated"),
                _phantoms(s.stacks),
                s.total("stuck"),
                f"{s.leaked} ({s.leaked_until_gc})",
                f"{s.threads_before} -> {s.threads_after}",
                f"{_mib(s.rss_before_kib)} -> {_mib(s.rss_after_kib)}",
            ]
        )
    for f in run.files:
        what = (
            f"pytest {f.path}: {f.tests} tests, {f.passed} passed, {f.failed} failed,"
            f" {f.skipped} skipped ({f.seconds:g} s)"
            if f.present
            else f"{f.path} not present: not run"
        )
        rows.append([f.scenario, "", what, f.tests, *[""] * 12])
    return _table(header, rows, [False] * 3 + [True] * 13)


def stack_table(result: ScenarioResult) -> str:
    """One row per stack of a scenario."""
    header = [
        "stack",
        "calls",
        "in flight at a fault",
        "acknowledged",
        "failed",
        "CommitOutcomeUnknown",
        "lost",
        "duplicated",
        "phantom f / u / x",
        "stuck",
        "slowest call (s)",
        "longest wait in a fault (s)",
        "lost: longest ack-to-crash (s)",
        "errors seen (top 3)",
    ]
    rows = [
        [
            s.stack,
            s.calls,
            s.caught,
            s.acked,
            s.failed,
            s.unknown,
            s.lost,
            s.duplicated,
            _phantoms([s]),
            s.stuck,
            f"{s.slowest_s:.2f}",
            f"{s.fault_to_end_s:.2f}",
            "" if s.lost_before_fault_s is None else f"{s.lost_before_fault_s:.3f}",
            ", ".join(f"{k} x{n}" for k, n in list(s.errors.items())[:3]) or "none",
        ]
        for s in result.stacks
    ]
    return _table(header, rows, [False] + [True] * 12 + [False])


def _machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, {m.get('os')} ({m.get('arch')},"
        f" kernel {m.get('kernel')}); Python {m.get('python')}; {m.get('postgresql')};"
        f" psycopg {m.get('psycopg')}, psycopg_pool {m.get('psycopg_pool')},"
        f" SQLAlchemy {m.get('sqlalchemy')}"
    )


def markdown(run: Run) -> str:
    """The whole document."""
    lines = [
        "# Reliability",
        "",
        "Written by `make reliability` from the run described here; do not edit by hand.",
        "",
        f"- command: `{run.command}`",
        f"- date: {run.date}; the run took {run.seconds:.0f} s",
        f"- code: {run.revision}",
        f"- machine: {_machine_line(run.machine)}",
        f"- load average (1, 5, 15 min) at start {run.load_before}, at end {run.load_after}",
        f"- size: {run.size}",
        "- settings: " + ", ".join(f"`{k}={v}`" for k, v in run.settings.items() if k != "command"),
        "",
        "## What each scenario does",
        "",
        "Every fault scenario starts from the cluster's known topology, creates a table"
        " without a unique key, and runs the checker workload through eight stacks at once:"
        " a pgfailover pool, the same under the transaction runner, an instrumented"
        " SQLAlchemy engine, the same under the runner, each sync (threads) and async (tasks)."
        " Every call inserts one unique key. *In flight at a fault*: calls that had begun"
        " and not ended when a fault began (what the faults really hit). A call is"
        " *acknowledged* when it returned success. At the end every key is looked up on the"
        " final primary: *lost* are acknowledged keys missing there, *duplicated* keys"
        " present twice, *phantom* keys"
        " present although their call failed (f) or raised CommitOutcomeUnknown (u), both"
        " allowed since the caller was not told success, or without a call that ended (x,"
        " never allowed). *Stuck* are calls that took longer than their bound (runner"
        " stacks: the runner's deadline + the stated hang bound + 1 s; bare stacks: the pool"
        " wait + the hang bound + 1 s) or never ended. *Leaked* are application sessions"
        " left on the servers after the stacks closed, above the count before they opened,"
        " once Python's cyclic garbage collector has run; in brackets, the count before it"
        " ran (sessions whose client socket nothing closed: only the collector frees it)."
        " Threads exclude the process's one watchdog thread (started with the first"
        " pgfailover connection, kept for the process's life) and its short-lived probes."
        " Bare stacks (no runner) are expected to fail the calls in flight during a fault:"
        " their failures are what the application sees without a retry.",
        "",
        "## Summary",
        "",
        summary_table(run),
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in checks(run)]
    for s in run.scenarios:
        lines += [
            "",
            f"## {s.scenario} ({s.replication})",
            "",
            f"{s.done}; {s.seconds:g} s. Threads with the stacks open: {s.threads_warm} after"
            f" the first fault, {s.threads_end} after the last; RSS {_mib(s.rss_warm_kib)} ->"
            f" {_mib(s.rss_end_kib)} MiB."
            + (f" Stated hang bound: {s.bound_s:g} s." if s.bound_s is not None else ""),
            "",
            stack_table(s),
        ]
        lost = [k for st in s.stacks for k in st.lost_keys]
        if lost:
            lines += ["", "Acknowledged keys lost (first 20 per stack): " + ", ".join(lost)]
        if lost and s.replication == "asynchronous":
            lines += [
                "",
                "With asynchronous replication the primary acknowledges a COMMIT once it is"
                " flushed locally, before the standby has it. A crash in that window followed"
                " by the standby's promotion loses the transaction although its caller was"
                " told success: the old primary's answer was true when given, and nothing a"
                " client library does afterwards can learn of the loss (the new primary never"
                " saw the transaction; the rewound old primary forgets it). Every loss above"
                " is such a write (see the check on the replication window). Synchronous"
                " replication (or `synchronous_commit = remote_apply` with a synchronous"
                " standby) closes the window: the synchronous scenarios lost nothing.",
            ]
        if s.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in s.notes]
    return "\n".join(lines) + "\n"
