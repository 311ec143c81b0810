"""The transaction runner as a caller: targets chosen by type, arguments passed through,
misuse refused before anything is written, and the idempotent fast path."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import psycopg_pool
import pytest
import sqlalchemy as sa
from typing_extensions import assert_type

import pgfailover
from pgfailover.pool import ConnectionPool
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing.proxy import FaultProxy

from .support import count_key, reset_statements

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(pgfailover_cluster: LocalCluster) -> str:
    """A table of unique keys on the primary."""
    name = f"k_{uuid.uuid4().hex[:10]}"
    with pgfailover_cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (k text PRIMARY KEY, note text)")
    return name


def _url(dsn: str, driver: str = "psycopg") -> sa.URL:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return sa.URL.create(
        f"postgresql+{driver}",
        username=str(params["user"]),
        password=str(params["password"]),
        host=str(params["host"]),
        port=int(str(params["port"])),
        database=str(params["dbname"]),
    )


class MyPool(ConnectionPool[Any]):
    """A user's own subclass of pgfailover's pool."""


def test_work_arguments_named_like_policy_options_reach_the_work(
    pgfailover_cluster: LocalCluster, keys: str
) -> None:
    """``timeout=`` and ``attempts=`` after the work go to the work, untouched."""
    seen: dict[str, object] = {}

    def work(conn: psycopg.Connection[Any], key: str, *, timeout: float, attempts: int) -> str:
        seen.update(timeout=timeout, attempts=attempts)
        conn.execute(f"INSERT INTO {keys} (k) VALUES (%s)", [key])
        return key

    with ConnectionPool[Any](pgfailover_cluster.primary.dsn(), min_size=1, open=True) as pool:
        result = pgfailover.run_transaction(pool, work, "a", timeout=7.5, attempts=3)
        runner = pgfailover.TransactionRunner(pool, timeout=10)
        assert runner(work, "b", timeout=1.0, attempts=1) == "b"
    assert result == "a"
    assert seen == {"timeout": 1.0, "attempts": 1}
    assert count_key(pgfailover_cluster, keys, "a") == count_key(pgfailover_cluster, keys, "b") == 1


def test_decorated_function_keeps_its_signature_for_mypy(
    pgfailover_cluster: LocalCluster, keys: str
) -> None:
    """``@transaction`` drops the connection parameter and keeps the rest (mypy checks the
    ``assert_type`` below), and the call runs the work in a transaction."""
    with ConnectionPool[Any](pgfailover_cluster.primary.dsn(), min_size=1, open=True) as pool:

        @pgfailover.transaction(pool, timeout=10)
        def add(conn: psycopg.Connection[Any], key: str, note: str = "") -> int:
            conn.execute(f"INSERT INTO {keys} (k, note) VALUES (%s, %s)", [key, note])
            return len(key)

        assert_type(add("xyz", note="n"), int)
        assert add("abc", note="n") == 3
    assert (
        count_key(pgfailover_cluster, keys, "xyz")
        == count_key(pgfailover_cluster, keys, "abc")
        == 1
    )


def test_targets_are_chosen_by_type_subclasses_and_option_engines_included(
    pgfailover_cluster: LocalCluster, keys: str
) -> None:
    """A user's pool subclass, a plain psycopg_pool pool and an ``OptionEngine`` (from
    ``engine.execution_options``) are accepted and keep their settings."""

    def isolation(conn: Any, key: str) -> str:
        if isinstance(conn, sa.Connection):
            conn.exec_driver_sql(f"INSERT INTO {keys} (k) VALUES ('{key}')")
            return str(conn.exec_driver_sql("SHOW transaction_isolation").scalar_one())
        conn.execute(f"INSERT INTO {keys} (k) VALUES (%s)", [key])
        row = conn.execute("SHOW transaction_isolation").fetchone()
        return str(row[0])

    dsn = pgfailover_cluster.primary.dsn()
    with MyPool(dsn, min_size=1, open=True) as pool:
        assert pgfailover.run_transaction(pool, isolation, "sub") == "read committed"
    with psycopg_pool.ConnectionPool(dsn, min_size=1, open=True) as plain:
        assert pgfailover.run_transaction(plain, isolation, "plain") == "read committed"
    engine = sa.create_engine(_url(dsn))
    try:
        serializable = engine.execution_options(isolation_level="SERIALIZABLE")
        assert type(serializable) is not sa.Engine  # SQLAlchemy's OptionEngine
        assert pgfailover.run_transaction(serializable, isolation, "opt") == "serializable"
    finally:
        engine.dispose()
    for key in ("sub", "plain", "opt"):
        assert count_key(pgfailover_cluster, keys, key) == 1


def test_an_async_work_on_a_sync_runner_is_refused_and_writes_nothing(
    pgfailover_cluster: LocalCluster, keys: str
) -> None:
    """A coroutine function given to the sync runner raises TypeError before a transaction
    begins; an async callable it cannot tell up front raises TypeError and is rolled back."""

    async def work(conn: Any, key: str) -> None:  # pragma: no cover - never awaited
        await conn.execute(f"INSERT INTO {keys} (k) VALUES (%s)", [key])

    class Sneaky:
        def __call__(self, conn: psycopg.Connection[Any], key: str) -> Any:
            conn.execute(f"INSERT INTO {keys} (k) VALUES (%s)", [key])
            return asyncio.sleep(0)  # an awaitable a sync caller would never await

    with ConnectionPool[Any](pgfailover_cluster.primary.dsn(), min_size=1, open=True) as pool:
        with pytest.raises(TypeError, match="coroutine function"):
            pgfailover.run_transaction(pool, work, "c")  # type: ignore[unused-coroutine]
        with pytest.raises(TypeError, match="returned an awaitable"):
            pgfailover.run_transaction(pool, Sneaky(), "s")
        with pytest.raises(TypeError, match="needs a plain def"):
            pgfailover.transaction(pool)(work)
    assert count_key(pgfailover_cluster, keys, "c") == count_key(pgfailover_cluster, keys, "s") == 0


async def test_a_sync_work_on_an_async_runner_is_refused(
    pgfailover_cluster: LocalCluster,
) -> None:
    """A plain function given to the async runner raises TypeError (after it ran: the
    runner cannot tell before calling it) instead of being retried; a sync target given to
    the async runner is refused at construction."""
    ran: list[str] = []

    def work(conn: Any, key: str) -> str:
        ran.append(key)
        return key

    dsn = pgfailover_cluster.primary.dsn()
    async with AsyncConnectionPool[Any](dsn, min_size=1, open=False) as pool:
        with pytest.raises(TypeError, match="did not return an awaitable"):
            await pgfailover.arun_transaction(pool, work, "w")  # type: ignore[arg-type]
    with (
        ConnectionPool[Any](dsn, min_size=1, open=True) as sync_pool,
        pytest.raises(TypeError, match="is sync"),
    ):
        pgfailover.AsyncTransactionRunner(sync_pool)
    assert ran == ["w"]


def test_non_postgresql_engines_and_bad_options_are_refused_up_front(tmp_path: Any) -> None:
    """SQLite engines, unknown option names and a wrong policy type raise TypeError when
    the runner is made, naming what to fix."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with pytest.raises(TypeError, match=r"PostgreSQL engines only.*'sqlite'"):
            pgfailover.TransactionRunner(engine)
        with pytest.raises(TypeError, match="PostgreSQL engines only"):
            pgfailover.run_transaction(engine, lambda conn: None)
    finally:
        engine.dispose()
    with pytest.raises(TypeError, match="psycopg_pool pool"):
        pgfailover.TransactionRunner("postgresql://")
    with pytest.raises(TypeError, match=r"unknown runner options: \['tiemout'\]"):
        pgfailover.TransactionRunner(
            sa.create_engine("postgresql+psycopg://u@localhost/db"),
            tiemout=3,  # type: ignore[call-arg]
        )
    with pytest.raises(TypeError, match=r"policy must be a pgfailover\.RetryPolicy"):
        pgfailover.TransactionRunner(
            sa.create_engine("postgresql+psycopg://u@localhost/db"),
            policy=30,  # type: ignore[arg-type]
        )


def test_idempotent_work_records_nothing_and_a_lost_commit_is_simply_retried(
    pgfailover_cluster: LocalCluster, keys: str, proxy: FaultProxy
) -> None:
    """``idempotent=True``: no commit record is sent (the statements are the work's own),
    and a COMMIT lost after the server committed is retried: the upsert lands once."""

    def upsert(conn: psycopg.Connection[Any], key: str) -> str:
        conn.execute(
            f"INSERT INTO {keys} (k) VALUES (%s) ON CONFLICT (k) DO NOTHING", [key], prepare=False
        )
        return key

    reset_statements(pgfailover_cluster)
    dsn = proxy.dsn_for(pgfailover_cluster.primary)
    with ConnectionPool[Any](dsn, min_size=1, open=True) as pool:
        runner = pgfailover.TransactionRunner(pool, timeout=10, idempotent=True)
        assert runner(upsert, "first") == "first"
        with psycopg.connect(pgfailover_cluster.primary.dsn(user="postgres")) as admin:
            recorded = admin.execute(
                "SELECT count(*) FROM pg_stat_statements WHERE query LIKE %s",
                ["%pg_current_xact_id%"],
            ).fetchone()
        assert recorded is not None
        assert recorded[0] == 0
        proxy.drop_on("after_forward")  # the next COMMIT reaches the server, its reply is lost
        assert runner(upsert, "lost") == "lost"
        assert proxy.faults
    assert count_key(pgfailover_cluster, keys, "lost") == 1
