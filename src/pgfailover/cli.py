"""Command-line entry point: ``pgfailover COMMAND``.

- ``drill``: the failover drill on a local or Patroni cluster (naive vs protected stacks),
  with a report, a timeline PNG and JSON;
- ``probe DSN``: what each host of a DSN is (role, lag, PgBouncer);
- ``pgbouncer doctor|repoint|follow``: PgBouncer's failover settings checked; its
  databases pointed at a new primary, once or at every failover;
- ``demo``: the bare problem in a few seconds (stuck writes behind PgBouncer).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


def _bounded(
    kind: type[float] | type[int], low: float, high: float, *, low_open: bool, unit: str
) -> Callable[[str], float]:
    """An argparse ``type`` reading a number of ``kind`` from ``low`` (excluded when
    ``low_open``) to ``high``: anything else is refused with exit status 2, the usage line
    and what the option accepts."""
    noun = "a whole number" if kind is int else "a number"
    accepted = (
        f"{noun} more than {low:g}, at most {high:g} {unit}"
        if low_open
        else f"{noun} from {low:g} to {high:g} {unit}"
    )

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan  # refused below, with the same message
        if not ((low < value) if low_open else (low <= value)) or not value <= high:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    return parse


def _stacks(text: str) -> tuple[str, ...]:
    from .drill.options import select_stacks

    try:
        return select_stacks(text)
    except ValueError as ex:
        raise argparse.ArgumentTypeError(str(ex)) from None


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, without breaking lines at hyphens: keys such as
    ``sqlalchemy-pre-ping`` stay whole, ready to copy."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _add_drill(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .drill.options import (
        DEFAULT_AFTER,
        DEFAULT_BEFORE,
        DEFAULT_RATE,
        DEFAULT_REPOINT_DELAY,
        DEFAULT_WORKERS,
        FAULTS,
        HA_KINDS,
        MAX_RATE,
        MAX_SECONDS,
        MAX_WORKERS,
        OPTIONAL_STACK_NAMES,
        STACK_NAMES,
        stack_key,
    )

    drill = commands.add_parser(
        "drill",
        help="fail over a local or Patroni cluster under load: naive stacks vs pgfailover's",
        formatter_class=_HelpFormatter,
        description=(
            "Start a local primary + standby (+ PgBouncer), or with --ha patroni etcd + 3 "
            "Patroni members, write through naive and protected stacks, fail over, verify "
            "every acknowledged write, report. Exit status 0 when "
            "every protected stack kept every write and the retry-runner stacks saw no failure, "
            "1 otherwise, 2 for bad options."
        ),
    )
    seconds = _bounded(float, 0, MAX_SECONDS, low_open=False, unit="seconds")
    positive_seconds = _bounded(float, 0, MAX_SECONDS, low_open=True, unit="seconds")
    drill.add_argument(
        "--ha",
        choices=HA_KINDS,
        default=HA_KINDS[0],
        help="what fails over: local (the harness stops the primary and promotes the standby) "
        "or patroni (etcd + 3 Patroni members, fast profile: Patroni elects the new leader) "
        "(default: %(default)s)",
    )
    drill.add_argument(
        "--fault",
        choices=FAULTS,
        default=None,
        help="--ha patroni only: what happens to the leader: crash (kill -9 of its Patroni "
        "and postgres), switchover (planned, through the REST API) or freeze (SIGSTOP of the "
        "node, thawed once the new leader takes writes) (default: crash)",
    )
    drill.add_argument(
        "--target",
        choices=("session", "transaction", "direct"),
        default=None,
        help="PgBouncer's pool mode in front of the primary (session, transaction), or direct: "
        "a multi-host DSN naming both servers, no pooler (default: session; --ha patroni "
        "always connects directly)",
    )
    drill.add_argument(
        "--stop",
        choices=("fast", "immediate"),
        default=None,
        help="--ha local only: how the primary is stopped: fast (a clean shutdown that "
        "disconnects clients) or immediate (no shutdown checkpoint, like a crash) "
        "(default: fast)",
    )
    drill.add_argument(
        "--repoint-delay",
        type=seconds,
        default=None,
        metavar="S",
        help="--ha local only: seconds from the promotion to PgBouncer's repoint, the outage "
        "an operator or a Patroni callback takes; the repoint comes no earlier than the old "
        "primary's rejoin, so 0 repoints as soon as the failover ends; ignored with --target "
        f"direct (default: {DEFAULT_REPOINT_DELAY:g}; none with --follower)",
    )
    drill.add_argument(
        "--follower",
        action="store_true",
        help="PgBouncer follows the primary by itself: the real `pgfailover pgbouncer follow` "
        "process repoints it (--hosts for --ha local, --patroni for --ha patroni), nobody by "
        "hand; needs a PgBouncer --target (session by default), with --ha patroni too "
        "(default: off, PgBouncer repointed by the drill --repoint-delay after the promotion)",
    )
    drill.add_argument(
        "--before",
        type=positive_seconds,
        default=DEFAULT_BEFORE,
        metavar="S",
        help="seconds of writing before the failover starts (default: %(default)s)",
    )
    drill.add_argument(
        "--after",
        type=positive_seconds,
        default=DEFAULT_AFTER,
        metavar="S",
        help="seconds of writing after the primary is reachable again (default: %(default)s)",
    )
    drill.add_argument(
        "--rate",
        type=_bounded(float, 0, MAX_RATE, low_open=True, unit="writes per second"),
        default=DEFAULT_RATE,
        metavar="N",
        help="writes per second per worker (default: %(default)s)",
    )
    drill.add_argument(
        "--workers",
        type=_bounded(int, 1, MAX_WORKERS, low_open=False, unit="threads"),
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"writer threads per stack, each stack's pool holding as many connections "
        f"(1 to {MAX_WORKERS}; default: %(default)s)",
    )
    drill.add_argument(
        "--stacks",
        type=_stacks,
        default=STACK_NAMES,
        metavar="KEY,...",
        help="comma-separated stacks to run, by the names the report shows or these keys: "
        f"{', '.join(stack_key(name) for name in STACK_NAMES)} (default: all six); also, "
        f"when named: {', '.join(stack_key(name) for name in OPTIONAL_STACK_NAMES)} (they "
        "need Django)",
    )
    drill.add_argument(
        "--synchronous",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="synchronous replication, Patroni's synchronous_mode with --ha patroni (default: "
        "on with --ha patroni; asynchronous with --ha local, PostgreSQL's default, with which "
        "an immediate stop may lose acknowledged commits)",
    )
    drill.add_argument(
        "--plot",
        type=Path,
        default=Path("pgfailover-drill.png"),
        metavar="PNG",
        help="timeline PNG to write (default: %(default)s)",
    )
    drill.add_argument(
        "--no-plot", action="store_true", help="do not draw the timeline (default: draw it)"
    )
    drill.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the report, every operation included, as JSON to PATH (default: no JSON)",
    )
    drill.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress lines on standard error (default: one per step and one per second)",
    )


def _run_drill(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .drill.run import DrillOptions, run_drill, stacks_named

    try:
        options = DrillOptions(
            ha=args.ha,
            fault=args.fault,
            target=args.target,
            stop=args.stop,
            repoint_delay=args.repoint_delay,
            follower=args.follower,
            before=args.before,
            after=args.after,
            rate=args.rate,
            workers=args.workers,
            synchronous=args.synchronous,
            stacks=stacks_named(args.stacks),
        )
    except ValueError as ex:  # options that do not go together (e.g. --ha patroni --stop)
        parser.error(str(ex))
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


def _version() -> str:
    """The installed distribution's version."""
    try:
        return importlib.metadata.version("pgfailover")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``pgfailover`` argument parser and its sub-commands (imports no optional
    dependency: each command imports what it needs when it runs)."""
    parser = argparse.ArgumentParser(
        prog="pgfailover", description="Keep psycopg applications writing through a failover."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log harness steps and pgfailover's events (default: warnings only)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_drill(commands)
    from .survey import add_command as add_probe

    add_probe(commands)
    from .pgbouncer.cli import add_command as add_pgbouncer

    add_pgbouncer(commands)
    commands.add_parser(
        "demo",
        help="start a local cluster, fail over behind PgBouncer, show the write failure",
        description=(
            "The bare problem in a few seconds: start a local primary + standby + PgBouncer "
            "(transaction mode), connect one plain psycopg client through PgBouncer, fail "
            "over, and show that the client's connection stays open while its writes fail "
            "(25006, and 0A000 for BEGIN READ WRITE) until PgBouncer is repointed at the new "
            "primary; then tear everything down. Exit status 0 when it went as described. "
            "For naive and protected stacks under load, run `pgfailover drill`."
        ),
    )
    return parser


def _masked(arg: str) -> str:
    """A stray command-line argument as an error may show it: a URL's password and
    everything after a ``password=`` (one argument, spaces included) masked."""
    from ._secrets import scrub, secret_candidates

    arg = scrub(arg, secret_candidates(arg))
    return re.sub(r"(password\s*=\s*).*", r"\1***", arg, flags=re.IGNORECASE | re.DOTALL)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name`` (its ``error()`` prints that command's usage)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices[name]
            assert isinstance(found, argparse.ArgumentParser)
            return found
    raise KeyError(name)  # pragma: no cover - every command is registered by build_parser


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost sub-command parser ``args`` went through (``pgbouncer doctor``'s for
    ``pgfailover pgbouncer doctor ...``)."""
    while True:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(args, action.dest, None) or "")
                if isinstance(chosen, argparse.ArgumentParser):
                    parser = chosen
                    break
        else:
            return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (argparse exits with status 2 itself on
    bad options, and 0 after ``--help`` or ``--version``)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would blame the program: the sub-command's usage says more
        _chosen(parser, args).error(
            "unrecognized arguments: " + " ".join(_masked(arg) for arg in extras)
        )
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
                return _run_drill(args, _subparser(parser, "drill"))
        if args.command == "probe":
            from .errors import InvalidConninfo
            from .survey import run_command as run_probe
            from .survey import split_hosts

            try:
                split_hosts(args.dsn)
            except InvalidConninfo as ex:  # its message never holds the password
                _subparser(parser, "probe").error(f"argument dsn: {ex}")
            return run_probe(args)
        if args.command == "pgbouncer":
            from .pgbouncer.cli import check_args, run_command

            pgbouncer = _subparser(parser, "pgbouncer")
            check_args(args, _subparser(pgbouncer, args.pgbouncer_command))
            return run_command(args)
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
