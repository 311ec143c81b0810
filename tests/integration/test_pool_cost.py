"""pgfailover's sync pool: what a checkout costs, and the constructor's checks."""

from __future__ import annotations

import functools
from typing import Any

import psycopg
import psycopg_pool
import pytest

from pgfailover.monitor import Monitor
from pgfailover.pool import ConnectionPool
from pgfailover.testing import LocalCluster

from .support import reset_statements, statement_calls


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
def test_happy_path_costs_no_extra_round_trip_per_checkout(
    pgfailover_cluster: LocalCluster, through: str
) -> None:
    """On a healthy cluster, server-side statement counts for 300 checkouts are those of
    psycopg_pool plus at most one probe query per connection the pool opened and one per
    look of the process monitor's watch (a rate in time, counted): nothing per checkout."""
    cluster = pgfailover_cluster
    assert cluster.pgbouncer is not None
    dsn = cluster.primary.dsn() if through == "direct" else cluster.pgbouncer.dsn()
    kwargs: dict[str, Any] = {"kwargs": {"prepare_threshold": None}, "min_size": 2, "max_size": 2}
    counts = {}
    opened = 0
    monitor = Monitor()
    for name, cls in (
        ("psycopg_pool", psycopg_pool.ConnectionPool),
        ("pgfailover", functools.partial(ConnectionPool, monitor=monitor)),
    ):
        reset_statements(cluster)
        with cls(dsn, **kwargs) as pool:
            pool.wait()
            for _ in range(300):
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            opened = pool.get_stats().get("connections_num", 0)
            looks = monitor.stats()["checks"]  # the watch ends with its last pool
        counts[name] = statement_calls(cluster)
    assert counts["psycopg_pool"] >= 600  # SELECT 1 and COMMIT per checkout
    monitor.close()
    assert looks >= 1  # the watch ran, and its queries are allowed for below
    # (+1: a look may run between the reading and the pool's close)
    assert counts["pgfailover"] - counts["psycopg_pool"] <= 3 * opened + looks + 1


def test_pool_rejects_what_is_not_a_psycopg_connection_class() -> None:
    """connection_class must be a psycopg connection class of the pool's kind (sync here):
    anything else is a clear TypeError, and so is a negative recheck_interval."""
    with pytest.raises(TypeError, match=r"psycopg\.Connection subclass"):
        ConnectionPool[Any]("", connection_class=psycopg.AsyncConnection, open=False)
    with pytest.raises(TypeError, match=r"psycopg\.Connection subclass"):
        ConnectionPool[Any]("", connection_class=dict, open=False)
    with pytest.raises(ValueError, match="recheck_interval"):
        ConnectionPool[Any]("", recheck_interval=-1, open=False)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("recheck_interval", "5", "recheck_interval must be a number of seconds or None"),
        ("pooler", "no", "pooler must be True, False or None"),
    ],
)
def test_pool_options_of_the_wrong_type_name_the_option(
    option: str, value: object, message: str
) -> None:
    """A string where a number or a bool belongs raises TypeError naming the option, not a
    comparison error from deep inside."""
    with pytest.raises(TypeError, match=message):
        ConnectionPool[Any]("", open=False, **{option: value})  # type: ignore[arg-type]
