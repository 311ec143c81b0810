"""Command-line entry point: ``pgfailover COMMAND``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .testing.demo import run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="pgfailover", description="Keep psycopg applications writing through a failover."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log harness steps")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="start a local cluster, fail over behind PgBouncer, show the write failure"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "demo":
        try:
            return run()
        except KeyboardInterrupt:
            print("interrupted; the cluster was torn down", file=sys.stderr)
            return 130
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
