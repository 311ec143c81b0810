"""How much does classify() cost? Nanoseconds per call, printed as a markdown table.

    python benchmarks/bench_classify.py [--iterations N] [--repeats R] [--dsn DSN]

Each case calls ``classify()`` on the same exception object N times, R times over, and
reports the median per-call time with the cost of an empty loop subtracted. Repeated
messages hit classify's bounded verdict memo, as the same errors do in production; the
"fresh message" row builds every exception with its own message, so it always misses.

With ``--dsn``, also measures the median of 2000 ``SELECT 1`` round trips over a psycopg
connection to DSN, and prints each classify cost next to it, as a share of one round trip.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from types import SimpleNamespace
from typing import Any

import psycopg
import psycopg.errors

from pgfailover.classify import RECOVERY_MESSAGE, Phase, classify

ROUND_TRIPS = 2000


@dataclass(frozen=True)
class Case:
    """A benchmark case: a name and the exceptions it classifies, in turn."""

    name: str
    exceptions: Sequence[BaseException]
    conn: object | None = None
    phase: Phase = Phase.UNKNOWN


def _psycopg_cases() -> list[Case]:
    lookup = psycopg.errors.lookup
    return [
        Case(
            "psycopg 40001 serialization failure",
            [lookup("40001")("could not serialize access due to concurrent update")],
            phase=Phase.TRANSACTION,
        ),
        Case("psycopg 0A000 recovery (standby)", [lookup("0A000")(RECOVERY_MESSAGE)]),
        Case(
            "psycopg 25006 on a read-only session",
            [lookup("25006")("cannot execute INSERT in a read-only transaction")],
            conn=SimpleNamespace(read_only=True),
        ),
        Case(
            "psycopg OperationalError, no SQLSTATE",
            [psycopg.OperationalError("consuming input failed: server closed the connection")],
            phase=Phase.COMMIT,
        ),
        Case(
            "psycopg connect error: auth message",
            [
                psycopg.OperationalError(
                    'connection failed: connection to server at "10.0.0.1", port 5432 '
                    'failed: FATAL:  password authentication failed for user "app"'
                )
            ],
            phase=Phase.CONNECT,
        ),
        Case(
            "psycopg 40001, fresh message each call",
            [lookup("40001")(f"could not serialize access (tuple {i})") for i in range(10_000)],
        ),
        Case("ValueError (application)", [ValueError("invalid literal for int()")]),
    ]


def _optional_driver_cases() -> list[Case]:
    """psycopg2, asyncpg and SQLAlchemy cases, when those packages are installed."""
    cases: list[Case] = []
    try:
        import psycopg2.errors  # noqa: PLC0415 - optional dev dependency

        cases.append(
            Case(
                "psycopg2 57P01 (hand-built, no pgcode)",
                [psycopg2.errors.lookup("57P01")("terminating connection")],
            )
        )
    except ImportError:  # pragma: no cover - psycopg2 not installed
        pass
    try:
        import asyncpg.exceptions  # noqa: PLC0415 - optional dev dependency

        error = asyncpg.exceptions.SerializationError("could not serialize access")
        cases.append(Case("SQLAlchemy > adapted > asyncpg 40001", [_sqlalchemy_asyncpg(error)]))
    except ImportError:  # pragma: no cover - asyncpg or SQLAlchemy not installed
        pass
    return cases


def _sqlalchemy_asyncpg(error: Exception) -> BaseException:
    """``error`` as SQLAlchemy's asyncpg dialect raises it: DBAPIError > adapted > asyncpg."""
    import sqlalchemy.exc  # noqa: PLC0415 - optional dev dependency
    from sqlalchemy.dialects.postgresql import asyncpg as dialect  # noqa: PLC0415

    dialect_class: Any = dialect.PGDialect_asyncpg  # the dialect module is not annotated
    pg_dialect = dialect_class()
    dbapi = pg_dialect.import_dbapi()
    try:
        try:
            _raise(error)
        except Exception as exc:
            dialect.AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dbapi, exc)
    except Exception as adapted:
        return sqlalchemy.exc.DBAPIError.instance(
            "SELECT 1", {}, adapted, dbapi.Error, dialect=pg_dialect
        )
    raise AssertionError("the dialect did not raise")  # pragma: no cover


def _raise(error: Exception) -> None:
    raise error


def _empty_loop_ns(iterations: int) -> int:
    start = perf_counter_ns()
    for _ in range(iterations):
        pass
    return perf_counter_ns() - start


def per_call_ns(case: Case, iterations: int, repeats: int) -> float:
    """Median over ``repeats`` runs of the time per classify() call, loop cost removed."""
    excs = case.exceptions
    rounds = max(1, iterations // len(excs))
    calls = rounds * len(excs)
    conn, phase = case.conn, case.phase
    results: list[float] = []
    for _ in range(repeats):
        start = perf_counter_ns()
        for _ in range(rounds):
            for exc in excs:
                classify(exc, conn=conn, phase=phase)
        elapsed = perf_counter_ns() - start - _empty_loop_ns(calls)
        results.append(max(elapsed, 0) / calls)
    return statistics.median(results)


def select1_median_ns(dsn: str, round_trips: int = ROUND_TRIPS) -> float:
    """Median time of one ``SELECT 1`` round trip (execute + fetch) on a psycopg connection."""
    samples: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        for _ in range(20):  # warm up: connection, prepared statement
            cur.execute("SELECT 1")
            cur.fetchone()
        for _ in range(round_trips):
            start = perf_counter_ns()
            cur.execute("SELECT 1")
            cur.fetchone()
            samples.append(perf_counter_ns() - start)
    return statistics.median(samples)


def render(rows: list[tuple[Case, float]], select1_ns: float | None) -> str:
    """The results as a markdown table."""
    header = "| case | verdict | ns per classify() |"
    rule = "|---|---|---:|"
    if select1_ns is not None:
        header += " share of one SELECT 1 |"
        rule += "---:|"
    lines = [header, rule]
    for case, ns in rows:
        verdict = classify(case.exceptions[0], conn=case.conn, phase=case.phase)
        line = f"| {case.name} | {verdict.kind.value} / {verdict.retry.value} | {ns:,.0f} |"
        if select1_ns is not None:
            line += f" {ns / select1_ns:.2%} |"
        lines.append(line)
    if select1_ns is not None:
        lines.append("")
        lines.append(
            f"Median `SELECT 1` round trip over {ROUND_TRIPS} runs: "
            f"{select1_ns:,.0f} ns ({select1_ns / 1000:,.1f} µs)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, out: Callable[[str], object] = print) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=200_000, help="calls per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per case (median)")
    parser.add_argument("--dsn", help="also time SELECT 1 round trips on this server")
    args = parser.parse_args(argv)

    cases = _psycopg_cases() + _optional_driver_cases()
    rows = [(case, per_call_ns(case, args.iterations, args.repeats)) for case in cases]
    select1_ns = select1_median_ns(args.dsn) if args.dsn else None
    out(
        f"classify() cost, Python {sys.version.split()[0]}, psycopg {psycopg.__version__}, "
        f"{args.iterations:,} calls x {args.repeats} runs (median)\n"
    )
    out(render(rows, select1_ns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
