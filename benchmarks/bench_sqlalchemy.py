"""Instrumented SQLAlchemy engines against plain ones, and recovery after failover.

    python benchmarks/bench_sqlalchemy.py [--rounds 10] [--checkouts 1000] [--recoveries 10]

(a) Happy path: on one local primary, for each driver (psycopg, psycopg2, psycopg async,
asyncpg), a plain engine and an instrumented one (QueuePool of 2), alternating round by
round and swapping which goes first each round; each round runs ``--checkouts`` sequential
``engine.begin()`` + ``SELECT 1``. Prints throughput, p50/p99 latency and the throughput
ratio instrumented/plain.
(b) Recovery: primary + standby + PgBouncer (transaction mode), 4 writer threads on an
instrumented psycopg engine; ``--recoveries`` times: failover, repoint PgBouncer 0.3 s
later, and the time from the repoint to the first successful write, next to the harness's
promote-until-writable time (the physical limit).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time

import _bench_recovery
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import pgfailover
import pgfailover.sqlalchemy as pgsa
from pgfailover.testing import LocalCluster

DRIVERS = {"psycopg": False, "psycopg2": False, "psycopg-async": True, "asyncpg": True}
SELECT_1 = sa.text("SELECT 1")


def _url(cluster: LocalCluster, driver: str, host: str, port: int) -> sa.URL:
    return sa.URL.create(
        f"postgresql+{driver.removesuffix('-async')}",
        username=cluster.user,
        password=cluster.password,
        host=host,
        port=port,
        database=cluster.dbname,
    )


def _engine(url: sa.URL, is_async: bool) -> Engine | AsyncEngine:
    if is_async:
        return create_async_engine(url, pool_size=2, max_overflow=0)
    return sa.create_engine(url, pool_size=2, max_overflow=0)


async def _round(engine: Engine | AsyncEngine, checkouts: int) -> list[float]:
    latencies = []
    perf = time.perf_counter
    if isinstance(engine, AsyncEngine):
        for _ in range(checkouts):
            t0 = perf()
            async with engine.begin() as conn:
                await conn.execute(SELECT_1)
            latencies.append(perf() - t0)
    else:
        for _ in range(checkouts):
            t0 = perf()
            with engine.begin() as conn:
                conn.execute(SELECT_1)
            latencies.append(perf() - t0)
    return latencies


async def _happy_path_driver(
    cluster: LocalCluster, driver: str, rounds: int, checkouts: int
) -> None:
    url = _url(cluster, driver, cluster.primary.host, cluster.primary.port)
    engines = {"plain": _engine(url, DRIVERS[driver]), "pgfailover": _engine(url, DRIVERS[driver])}
    pgsa.instrument(engines["pgfailover"])
    results: dict[str, list[float]] = {"plain": [], "pgfailover": []}
    for engine in engines.values():
        await _round(engine, checkouts // 10)  # warm-up: connections, dialect initialize
    order = list(engines)
    for _ in range(rounds):
        for name in order:
            results[name] += await _round(engines[name], checkouts)
        order.reverse()
    for engine in engines.values():
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            engine.dispose()
    print(f"| {driver} | ", end="")
    cells = []
    for lat in results.values():
        q = statistics.quantiles(lat, n=100)
        cells.append(f"{len(lat) / sum(lat):.0f} | {q[49] * 1e3:.3f} | {q[98] * 1e3:.3f}")
    ratio = sum(results["plain"]) / sum(results["pgfailover"])
    print(" | ".join(cells) + f" | {ratio:.3f} |")


def happy_path(rounds: int, checkouts: int, drivers: list[str]) -> None:
    print(f"(a) happy path: {rounds} alternating rounds x {checkouts} checkouts of SELECT 1\n")
    print(
        "| driver | plain/s | plain p50 ms | plain p99 ms | instrumented/s | instr. p50 ms"
        " | instr. p99 ms | ratio instrumented/plain |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with LocalCluster(standbys=0, pgbouncer=None) as cluster:
        for driver in drivers:
            asyncio.run(_happy_path_driver(cluster, driver, rounds, checkouts))
    print()


def recovery(runs: int) -> None:
    with LocalCluster(standbys=1, pgbouncer="transaction", server_login_retry=0.1) as cluster:
        assert cluster.pgbouncer is not None
        with cluster.primary.connect(superuser=False) as conn:
            conn.execute("CREATE TABLE bench (id serial PRIMARY KEY)")
        url = _url(cluster, "psycopg", cluster.pgbouncer.host, cluster.pgbouncer.port)
        engine = sa.create_engine(
            url, pool_size=4, max_overflow=4, connect_args={"prepare_threshold": None}
        )
        instrumentation = pgsa.instrument(engine)

        def write() -> None:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO bench DEFAULT VALUES"))

        result = _bench_recovery.measure(
            cluster,
            write,
            errors=(Exception,),
            error_name=lambda ex: pgfailover.sqlstate_of(ex) or type(ex).__name__,
            runs=runs,
        )
        stats = instrumentation.stats()
        engine.dispose()
    _bench_recovery.report(result, stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--checkouts", type=int, default=1000)
    parser.add_argument("--recoveries", type=int, default=10)
    parser.add_argument("--drivers", default=",".join(DRIVERS), help="comma-separated")
    args = parser.parse_args()
    # Failover events are logged at WARNING; a benchmark reports them as counts instead.
    logging.getLogger("pgfailover").addHandler(logging.NullHandler())
    drivers = [d for d in args.drivers.split(",") if d]
    unknown = set(drivers) - set(DRIVERS)
    if unknown:
        parser.error(f"unknown drivers {sorted(unknown)}; choose from {sorted(DRIVERS)}")
    if args.rounds > 0:
        happy_path(args.rounds, args.checkouts, drivers)
    if args.recoveries > 0:
        recovery(args.recoveries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
