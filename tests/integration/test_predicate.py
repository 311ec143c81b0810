"""The documented retry predicate around application code, through a real failover."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import tenacity

import pgfailover
from pgfailover.classify import VERDICT_ATTRIBUTE
from pgfailover.policy import tenacity_wait
from pgfailover.pool import ConnectionPool
from pgfailover.testing.plugin import ClusterFactory

from .support import bouncer_cluster


def test_tenacity_with_the_documented_predicate_gets_through_a_session_mode_failover(
    pgfailover_cluster_factory: ClusterFactory,
) -> None:
    """PgBouncer in session mode, a failover and a repoint: a hand-written write function
    under tenacity with ``retry_if_exception(pgfailover.is_retryable)`` gets through (the
    dead server's error reaches it with the connection's verdict: the transaction was
    lost before its COMMIT), and the row is written exactly once. The pool is made with
    ``monitor=False``: the test is about the predicate seeing the failure, and the process
    monitor would purge the idle pool before its next write meets the failover."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "session")
    assert cluster.pgbouncer is not None
    table = f"k_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {table} (k text PRIMARY KEY)")
    retried: list[BaseException] = []

    def remember(state: tenacity.RetryCallState) -> None:
        assert state.outcome is not None
        error = state.outcome.exception()
        assert error is not None
        retried.append(error)

    kwargs: dict[str, Any] = {"prepare_threshold": None}
    with ConnectionPool[Any](
        cluster.pgbouncer.dsn(), min_size=2, max_size=2, kwargs=kwargs, timeout=20, monitor=False
    ) as pool:

        @tenacity.retry(
            retry=tenacity.retry_if_exception(pgfailover.is_retryable),
            wait=tenacity_wait(),
            stop=tenacity.stop_after_delay(20),
            before_sleep=remember,
            reraise=True,
        )
        def write(key: str) -> None:
            with pool.connection() as conn:
                conn.execute(f"INSERT INTO {table} (k) VALUES (%s)", [key])

        pool.wait()
        write("before")
        cluster.failover()
        cluster.repoint_pgbouncer(cluster.primary)
        write("after")

    assert retried, "the failover never reached the application: nothing was tested"
    assert all(isinstance(error, psycopg.Error) for error in retried), retried
    assert all(hasattr(error, VERDICT_ATTRIBUTE) for error in retried), retried
    # The case a bare classification got wrong: PgBouncer hands the dead server's FATAL to
    # the next BEGIN, and psycopg raises "received 2 results" with no SQLSTATE.
    assert any(pgfailover.sqlstate_of(error) is None for error in retried), retried
    with cluster.primary.connect(superuser=False) as conn:
        rows = conn.execute(f"SELECT k, count(*) FROM {table} GROUP BY k ORDER BY k").fetchall()
    assert rows == [("after", 1), ("before", 1)]
