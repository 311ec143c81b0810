"""Command-line entry point: ``pgfailover COMMAND``.

- ``drill``: the failover drill on a local cluster (naive vs protected stacks), with a
  report, a timeline PNG and JSON;
- ``probe DSN``: what each host of a DSN is (role, lag, PgBouncer);
- ``demo``: the bare problem in a few seconds (stuck writes behind PgBouncer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 600:
        raise argparse.ArgumentTypeError(f"expected 0 to 600 seconds, got {text!r}")
    return value


def _add_drill(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drill = commands.add_parser(
        "drill",
        help="fail over a local cluster under load: naive stacks vs pgfailover's",
        description=(
            "Start a local primary + standby (+ PgBouncer), write through naive and protected "
            "stacks, fail over, verify every acknowledged write, report. Exit status 0 when "
            "every protected stack kept every write and the retry-runner stacks saw no failure."
        ),
    )
    drill.add_argument(
        "--target",
        choices=("session", "transaction", "direct"),
        default="session",
        help="PgBouncer pool mode in front of the primary, or a direct multi-host DSN "
        "(default: session)",
    )
    drill.add_argument("--stop", choices=("fast", "immediate"), default="fast")
    drill.add_argument(
        "--repoint-delay",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="seconds between promotion and PgBouncer's repoint (default 2)",
    )
    drill.add_argument("--before", type=_seconds, default=3.0, metavar="S")
    drill.add_argument(
        "--after",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="seconds of writing after the primary is reachable (default 5)",
    )
    drill.add_argument("--rate", type=float, default=20.0, help="writes/s per worker")
    drill.add_argument("--workers", type=int, default=2, help="threads per stack")
    drill.add_argument(
        "--stacks",
        default=None,
        help="comma-separated subset: pool, sqlalchemy, pgfailover-pool, "
        "pgfailover-sqlalchemy, pgfailover-pool-runner, pgfailover-sqlalchemy-runner",
    )
    drill.add_argument(
        "--synchronous", action="store_true", help="synchronous replication (default async)"
    )
    drill.add_argument(
        "--plot",
        type=Path,
        default=Path("pgfailover-drill.png"),
        help="timeline PNG to write (default ./pgfailover-drill.png)",
    )
    drill.add_argument("--no-plot", action="store_true", help="do not draw the timeline")
    drill.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    drill.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _run_drill(args: argparse.Namespace) -> int:
    from .drill.run import DrillOptions, run_drill, stacks_by_name

    try:
        options = DrillOptions(
            target=args.target,
            stop=args.stop,
            repoint_delay=args.repoint_delay,
            before=args.before,
            after=args.after,
            rate=args.rate,
            workers=args.workers,
            synchronous=args.synchronous,
            **({"stacks": stacks_by_name(args.stacks.split(","))} if args.stacks else {}),
        )
    except ValueError as ex:
        print(f"pgfailover drill: {ex}", file=sys.stderr)
        return 2
    if not args.no_plot:  # fail before the drill, not after, if the plot cannot be drawn
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            print(
                "pgfailover drill: the timeline plot needs matplotlib: "
                "pip install 'pgfailover[cli]' (or pass --no-plot)",
                file=sys.stderr,
            )
            return 2

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    report = run_drill(options, progress=progress)
    print(report.format_text())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
        print(f"JSON report: {args.json}")
    if not args.no_plot:
        from .drill.plot import render

        print(f"timeline: {render(report, args.plot)}")
    return 0 if drill_passed(report) else 1


def drill_passed(report: object) -> bool:
    """Whether a drill went as pgfailover promises: no protected stack lost, duplicated or
    invented a write, and the stacks under the retry runner saw no failure."""
    from .drill.report import DrillReport

    assert isinstance(report, DrillReport)
    for stack in report.stacks:
        if not stack.protected:
            continue
        if stack.lost or stack.duplicated or stack.phantom:
            return False
        if "runner" in stack.name and stack.failed:
            return False
    return True


@contextlib.contextmanager
def _log_level(names: Sequence[str], level: int) -> Iterator[None]:
    """Set these loggers' level for the duration, then restore it (``main`` may run
    inside another program, e.g. a test)."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="pgfailover", description="Keep psycopg applications writing through a failover."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log harness steps")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_drill(commands)
    from .survey import add_command as add_probe

    add_probe(commands)
    commands.add_parser(
        "demo", help="start a local cluster, fail over behind PgBouncer, show the write failure"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        if args.command == "drill":
            # Every failover event is logged at WARNING: hundreds during a drill. The
            # report tells the story; -v shows the log too.
            quiet = () if args.verbose else ("pgfailover", "psycopg", "sqlalchemy")
            with _log_level(quiet, logging.ERROR):
                return _run_drill(args)
        if args.command == "probe":
            from .survey import run_command as run_probe

            return run_probe(args)
        if args.command == "demo":
            from .testing.demo import run

            return run()
    except KeyboardInterrupt:
        print("interrupted; everything started was torn down", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
