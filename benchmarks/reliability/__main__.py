"""Run the reliability suite on fresh local clusters and write its report.

    PYTHONPATH=benchmarks .venv/bin/python -m reliability \\
        --markdown docs/reliability.md --json benchmarks/results/reliability.json
    PYTHONPATH=benchmarks .venv/bin/python -m reliability --size ci     # about 2 minutes
    PYTHONPATH=benchmarks .venv/bin/python -m reliability --only crash --crashes 10

Each fault scenario gets its own fresh ``LocalCluster`` (primary + one standby, no
PgBouncer; synchronous replication except for the asynchronous crash scenario), torn down
at the end, on error and on Ctrl-C. Then the bad-input and secrets test files run under
pytest as they are. Progress goes to stderr, library log records (WARNING and up) to a
temporary file named on stderr; the markdown goes to ``--markdown`` (stdout when not
given), the figures to ``--json``. The exit status is 0 even when a check is MISSED: the
document says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from _suite_common import load_average, machine

from pgfailover.testing import LocalCluster

from .report import Run, markdown
from .scenarios import ScenarioResult, churn, crash, hang, run_test_file
from .workload import Settings

ROOT = Path(__file__).resolve().parents[2]

#: The sizes: faults per scenario and the stacks' settings.
SIZES: dict[str, dict[str, int]] = {
    "full": {"crashes": 50, "async_crashes": 50, "switchovers": 50, "blackholes": 2, "freezes": 2},
    "ci": {"crashes": 3, "async_crashes": 3, "switchovers": 5, "blackholes": 1, "freezes": 1},
}
SETTINGS: dict[str, Settings] = {
    # The library's defaults for the watchdog (5 s silence, 3 s probe): the stated bound.
    "full": Settings(workers=2, rate=50.0, runner_timeout=30.0, pool_timeout=5.0),
    # Smaller bounds, as the CI-sized tests configure them.
    "ci": Settings(
        workers=1,
        rate=25.0,
        runner_timeout=15.0,
        pool_timeout=3.0,
        silence_limit=0.5,
        probe_timeout=2.0,
    ),
}
#: The test files other parts of the suite own, run as they are: (scenario, path).
TEST_FILES = (
    ("bad input", Path("tests/integration/test_bad_input.py")),
    ("secrets", Path("tests/integration/test_secrets.py")),
)
SCENARIOS = ("crash", "async-crash", "hang", "churn", "files")


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"# {message}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reliability", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--crashes", type=int, help="crashes with synchronous replication")
    p.add_argument("--async-crashes", type=int, help="crashes with asynchronous replication")
    p.add_argument("--switchovers", type=int, help="switchovers of the churn scenario")
    p.add_argument("--blackholes", type=int, help="blackholes of the hang scenario")
    p.add_argument("--freezes", type=int, help="freezes of the hang scenario")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"some of {','.join(SCENARIOS)}")
    p.add_argument("--markdown", type=Path, help="write the report here (default: stdout)")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= set(SCENARIOS):
        p.error(f"--only takes some of {','.join(SCENARIOS)}, got {args.only!r}")
    args.only = only
    for name, default in SIZES[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def revision() -> str:
    """The commit the library was run from, and the files of ``src/`` changed since (the
    run used them as they were in the working tree)."""

    def git(*argv: str) -> str:  # porcelain lines start with a status column: no strip()
        proc = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--", "src").splitlines()
    if not changed:
        return f"commit {head}, src/ unchanged"
    paths = ", ".join(line[3:] for line in changed)
    return f"commit {head} plus uncommitted changes to src/ used as they were: {paths}"


def _fresh(synchronous: bool, what: Callable[[LocalCluster], ScenarioResult]) -> ScenarioResult:
    with LocalCluster(standbys=1, pgbouncer=None, synchronous=synchronous) as cluster:
        return what(cluster)


def main(argv: list[str] | None = None) -> int:
    """Run what ``argv`` asks; 0 once the report is written."""
    args = _parse(argv)
    settings = SETTINGS[args.size]
    logfile = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the whole run
        prefix="pgfailover-reliability-", suffix=".log", delete=False
    )
    logging.basicConfig(filename=logfile.name, level=logging.WARNING)
    log(f"library log records go to {logfile.name}")
    sized = {k: getattr(args, k) for k in SIZES[args.size]}
    size = args.size if sized == SIZES[args.size] else f"{args.size}, changed to"
    run = Run(
        command="PYTHONPATH=benchmarks python -m reliability "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        revision=revision(),
        size=f"{size} {sized}; scenarios {sorted(args.only)}",
        settings=asdict(settings),
        load_before=load_average(),
    )
    started = time.monotonic()
    plan: list[tuple[str, bool, Callable[[LocalCluster], ScenarioResult]]] = []
    if "crash" in args.only and args.crashes:
        plan.append(("crash, synchronous", True, lambda c: crash(c, args.crashes, settings)))
    if "async-crash" in args.only and args.async_crashes:
        plan.append(
            ("crash, asynchronous", False, lambda c: crash(c, args.async_crashes, settings))
        )
    if "hang" in args.only:
        if args.blackholes:
            plan.append(("hang: blackhole", True, lambda c: hang(c, args.blackholes, settings)))
        if args.freezes:
            plan.append(
                ("hang: freeze", True, lambda c: hang(c, args.freezes, settings, fault="freeze"))
            )
    if "churn" in args.only and args.switchovers:
        plan.append(("churn", True, lambda c: churn(c, args.switchovers, settings)))
    for title, synchronous, what in plan:
        log(f"{title}: starting")
        result = _fresh(synchronous, what)
        run.scenarios.append(result)
        log(
            f"{title}: {result.seconds:g} s, acknowledged {result.total('acked')},"
            f" lost {result.total('lost')}, duplicated {result.total('duplicated')},"
            f" unknown {result.total('unknown')}, stuck {result.total('stuck')},"
            f" leaked {result.leaked}"
        )
    if "files" in args.only:
        for scenario, path in TEST_FILES:
            log(f"{scenario}: pytest {path}")
            run.files.append(run_test_file(scenario, path, ROOT))
    run.seconds = time.monotonic() - started
    run.load_after = load_average()
    text = markdown(run)
    if args.markdown:
        args.markdown.write_text(text)
        log(f"wrote {args.markdown}")
    else:
        sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(run.as_dict(), indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
