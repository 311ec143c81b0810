"""Happy path of ``ENGINE: "pgfailover.django"`` against Django's stock PostgreSQL backend.

    python benchmarks/bench_django.py [--rounds 10] [--requests 400] [--json PATH]

One local primary, one process, three database aliases on it: ``naive`` (the stock
backend), ``pgfailover`` (pgfailover.django) and ``twin`` (the stock backend again, for an
A/A control). A "request" is what a Django request does with the database, without the
HTTP layer that would only dilute the difference: ``close_old_connections()`` (Django's
``request_started``), one INSERT through Django's cursor (health check and
connection handling included), ``close_old_connections()`` (``request_finished``).

Scenarios (Django settings per alias): persistent connections (``CONN_MAX_AGE`` 600)
without health checks, the same with ``CONN_HEALTH_CHECKS`` (the stock backend's ``SELECT 1``
per request against pgfailover's check without a reason, no round trip), a new connection
per request (``CONN_MAX_AGE`` 0), and Django's pool (``OPTIONS {"pool": True}``, Django 5.1+:
psycopg_pool against pgfailover's pool). Rounds alternate in blocks of two as in
``_suite_happy.py`` (naive-pgfailover, pgfailover-naive, naive-twin, twin-naive), so both
ratios come from the same scheme and the same stretch of time; the ratio is throughput
pgfailover/naive (above 1: pgfailover is faster), with a bootstrap 95 % interval over blocks.
Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from typing import Any

import django  # type: ignore[import-untyped]
import psycopg
from _suite_common import Timed, bootstrap_ci, fmt, load_average, log, table, timed
from django.conf import settings  # type: ignore[import-untyped]

from pgfailover.testing import LocalCluster

TABLE = "bench_django"
INSERT = f"INSERT INTO {TABLE} (v) VALUES (1)"
WARMUP = 50
#: Throughput ratio pgfailover/naive the issue asks for.
TARGET_RATIO = 0.98
PGF = "pgfailover.django"
STOCK = "django.db.backends.postgresql"
HAS_POOL = django.VERSION >= (5, 1)

#: Scenario name -> (DATABASES settings shared by the three aliases, requests divisor).
SCENARIOS: dict[str, tuple[dict[str, Any], int]] = {
    "persistent": ({"CONN_MAX_AGE": 600, "CONN_HEALTH_CHECKS": False}, 1),
    "persistent + health checks": ({"CONN_MAX_AGE": 600, "CONN_HEALTH_CHECKS": True}, 1),
    "new connection per request": ({"CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False}, 10),
    "pool": ({"CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": True, "OPTIONS": {"pool": True}}, 1),
}


def _alias(scenario: str, variant: str) -> str:
    return f"{variant}:{scenario}"


def _databases(cluster: LocalCluster) -> dict[str, Any]:
    node = cluster.primary
    base = {
        "NAME": cluster.dbname,
        "USER": cluster.user,
        "PASSWORD": cluster.password,
        "HOST": node.host,
        "PORT": str(node.port),
    }
    databases: dict[str, Any] = {"default": {"ENGINE": STOCK, **base}}
    for scenario, (extra, _) in SCENARIOS.items():
        if "pool" in extra.get("OPTIONS", {}) and not HAS_POOL:
            continue
        for variant, engine in (("naive", STOCK), ("pgfailover", PGF), ("twin", STOCK)):
            # each alias its own options dict: Django's pool is per alias
            options = {"pool": {"min_size": 1, "max_size": 1}} if scenario == "pool" else {}
            databases[_alias(scenario, variant)] = {
                "ENGINE": engine,
                **base,
                **{k: v for k, v in extra.items() if k != "OPTIONS"},
                "OPTIONS": options,
            }
    return databases


def _request(alias: str) -> Callable[[], None]:
    from django.db import (  # type: ignore[import-untyped]  # noqa: PLC0415 - after setup
        close_old_connections,
        connections,
    )

    wrapper = connections[alias]

    def one() -> None:
        close_old_connections()
        with wrapper.cursor() as cur:
            cur.execute(INSERT)
        close_old_connections()

    return one


def _compare(scenario: str, rounds: int, n: int) -> dict[str, Timed]:
    naive, ours, twin = (_request(_alias(scenario, v)) for v in ("naive", "pgfailover", "twin"))
    for one in (naive, ours, twin):
        timed(one, WARMUP)
    results = {k: Timed.empty() for k in ("naive", "pgfailover", "control_naive", "control_twin")}
    main = [("naive", naive), ("pgfailover", ours)]
    control = [("control_naive", naive), ("control_twin", twin)]
    for _ in range(rounds // 2):
        for pair in (main, control):
            for key, one in (*pair, *pair[::-1]):
                results[key].add(timed(one, n))
    return results


def _ratio(compared: Timed, base: Timed) -> dict[str, Any]:
    blocks = [
        (base.rounds[i] + base.rounds[i + 1], compared.rounds[i] + compared.rounds[i + 1])
        for i in range(0, len(base.rounds) - 1, 2)
    ]
    low, high = bootstrap_ci([b for b, _ in blocks], [c for _, c in blocks])
    return {"ratio": sum(base.rounds) / sum(compared.rounds), "ci95": [low, high]}


def run(rounds: int, requests: int) -> dict[str, Any]:
    """Every scenario on a fresh local primary; the figures as a dict."""
    out: dict[str, Any] = {"scenarios": {}}
    with LocalCluster(standbys=0, pgbouncer=None) as cluster:
        with cluster.primary.connect(superuser=False) as conn:
            conn.execute(f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, v int)")
        settings.configure(DATABASES=_databases(cluster), USE_TZ=True)
        django.setup()
        from django.db import connections  # noqa: PLC0415 - after setup

        for scenario, (extra, divisor) in SCENARIOS.items():
            if "pool" in extra.get("OPTIONS", {}) and not HAS_POOL:
                log(f"{scenario}: skipped (Django {django.get_version()} has no pool)")
                continue
            n = max(requests // divisor, 10)
            log(f"{scenario}: {rounds} rounds x {n} requests per variant")
            results = _compare(scenario, rounds, n)
            out["scenarios"][scenario] = {
                "requests_per_round": n,
                "naive_per_s": results["naive"].tx_per_s,
                "pgfailover_per_s": results["pgfailover"].tx_per_s,
                "main": _ratio(results["pgfailover"], results["naive"]),
                "control": _ratio(results["control_twin"], results["control_naive"]),
            }
        connections.close_all()
        for alias in connections:
            close_pool = getattr(connections[alias], "close_pool", None)
            if close_pool is not None:
                close_pool()
    out["machine"] = {
        "python": platform.python_version(),
        "django": django.get_version(),
        "psycopg": psycopg.__version__,
        "load_average": load_average(),
    }
    out["rounds"] = rounds
    return out


def render(out: dict[str, Any]) -> str:
    rows = []
    for scenario, s in out["scenarios"].items():
        low, high = s["main"]["ci95"]
        clow, chigh = s["control"]["ci95"]
        rows.append(
            [
                scenario,
                fmt(s["naive_per_s"], 0),
                fmt(s["pgfailover_per_s"], 0),
                f"{fmt(s['main']['ratio'])} [{fmt(low)}, {fmt(high)}]",
                f"{fmt(s['control']['ratio'])} [{fmt(clow)}, {fmt(chigh)}]",
            ]
        )
    machine = out["machine"]
    return "\n".join(
        [
            f"Django {machine['django']}, psycopg {machine['psycopg']}, Python "
            f"{machine['python']}, {out['rounds']} rounds, load {machine['load_average']}; "
            f"target ratio >= {TARGET_RATIO}",
            "",
            table(
                [
                    "scenario",
                    "stock req/s",
                    "pgfailover req/s",
                    "ratio pgfailover/stock [95 % CI]",
                    "A/A stock/stock [95 % CI]",
                ],
                rows,
                [False, True, True, True, True],
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per pair (even)")
    parser.add_argument("--requests", type=int, default=400, help="requests per round")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    out = run(max(2, args.rounds - args.rounds % 2), args.requests)
    print(render(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
