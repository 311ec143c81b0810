"""No password ever leaks: a property test over the failure paths a caller, a log reader or
an operator can see, with the password given every way libpq takes one.

Each example draws a password with awkward characters (spaces, quotes, ``@``, ``%``,
``=``, ``:``, ``\\``, non-ASCII letters), creates a login role with it on the session
cluster's primary (a member of the application role, so it can write the application's
tables; dropped afterwards), hands the password to libpq in one way (conninfo, URL,
``password=`` keyword, ``PGPASSWORD``, a ``PGPASSFILE`` passfile), drives every failure
path below, and checks that the password appears in no text captured along the way.

Assumption: a password of at least 8 characters, with at least 4 distinct ones, at least
one that is not an ASCII letter or digit, and no leading or trailing space, does not occur
in ordinary output by chance (table padding, separators, hex addresses, numbers); so "no
form of the password is a substring" means it did not leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgfailover
import pgfailover.sqlalchemy as pgsa
from pgfailover.cli import main
from pgfailover.drill.report import Op, build_report
from pgfailover.drill.stacks import error_code
from pgfailover.pool import ConnectionPool
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing._ports import release_port, reserve_port

pytestmark = pytest.mark.integration

WAYS = ("conninfo", "url", "keyword", "PGPASSWORD", "passfile")
#: Loggers whose records are captured, at DEBUG.
LOGGERS = ("pgfailover", "psycopg", "sqlalchemy")

_AWKWARD = " '\"@%=:\\/?#&;,"
_RARE = "'@%=\\?#&;"  # awkward characters that JSON, reprs and log lines do not use on their own
passwords = st.text(
    alphabet=st.one_of(
        st.sampled_from(_AWKWARD),
        st.characters(categories=("L", "N", "P", "S"), max_codepoint=0x24F),
    ),
    min_size=8,
    max_size=20,
).filter(
    lambda p: (
        p == p.strip()
        and len(set(p)) >= 4
        # one character of those no field name or report text of ours holds: "first_ok" is
        # a password, and also the drill report's own key first_ok_after_ms
        and any(c in _RARE for c in p)
    )
)


@dataclass
class Seen:
    """Every text captured during one example."""

    texts: list[str] = field(default_factory=list)

    def error(self, ex: BaseException) -> None:
        """str, repr and notes of ``ex`` and of its chain as a traceback shows it (a
        context suppressed with ``raise ... from None`` is not shown), and its traceback."""
        done: set[int] = set()
        node: BaseException | None = ex
        while node is not None and id(node) not in done:
            done.add(id(node))
            self.texts += [str(node), repr(node), *getattr(node, "__notes__", ())]
            orig = getattr(node, "orig", None)
            if isinstance(orig, BaseException):
                self.texts += [str(orig), repr(orig)]
            node = node.__cause__ or (None if node.__suppress_context__ else node.__context__)
        self.texts.append("".join(traceback.format_exception(ex)))

    def expect_error(self, call: Callable[[], object]) -> BaseException:
        """Run ``call``, which must raise; record the error."""
        try:
            call()
        except Exception as ex:
            self.error(ex)
            return ex
        raise AssertionError(f"{call!r} did not fail")

    def obj(self, *objects: object) -> None:
        """str and repr of each object."""
        for o in objects:
            self.texts += [str(o), repr(o)]


class _Capture(logging.Handler):
    """Formats every record (message, exception and stack) into ``seen``."""

    def __init__(self, seen: Seen) -> None:
        super().__init__(logging.DEBUG)
        self.seen = seen
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.texts.append(self.format(record))


@contextlib.contextmanager
def _capturing(seen: Seen) -> Iterator[None]:
    """Capture the log records of :data:`LOGGERS` at DEBUG and every pgfailover event."""
    handler = _Capture(seen)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)

    def hook(event: Any) -> None:
        seen.obj(event)
        seen.texts.append(event.summary())

    unsubscribe = pgfailover.subscribe(hook)
    try:
        yield
    finally:
        unsubscribe()
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


@dataclass(frozen=True)
class Given:
    """A role's connection parameters with its password given one way."""

    conninfo: Callable[[str], str]  # dbname -> conninfo (or URL) for psycopg and pools
    kwargs: dict[str, Any]  # extra keyword arguments to psycopg
    url: Callable[[str], sa.URL]  # dbname -> SQLAlchemy URL
    env: dict[str, str]  # environment variables libpq reads


def _given(way: str, cluster: LocalCluster, role: str, password: str, tmp: Path) -> Given:
    node = cluster.primary

    def conninfo(dbname: str, with_password: bool) -> str:
        params = {"host": node.host, "port": str(node.port), "dbname": dbname, "user": role}
        return make_conninfo(**params, **({"password": password} if with_password else {}))

    def url(dbname: str, with_password: bool) -> sa.URL:
        return sa.URL.create(
            "postgresql+psycopg",
            username=role,
            password=password if with_password else None,
            host=node.host,
            port=node.port,
            database=dbname,
        )

    if way == "conninfo":
        return Given(lambda db: conninfo(db, True), {}, lambda db: url(db, True), {})
    if way == "url":
        quoted = urllib.parse.quote(password, safe="")
        return Given(
            lambda db: f"postgresql://{role}:{quoted}@{node.host}:{node.port}/{db}",
            {},
            lambda db: url(db, True),
            {},
        )
    if way == "keyword":
        return Given(
            lambda db: conninfo(db, False),
            {"password": password},
            lambda db: url(db, False),
            {},
        )
    if way == "PGPASSWORD":
        return Given(
            lambda db: conninfo(db, False), {}, lambda db: url(db, False), {"PGPASSWORD": password}
        )
    assert way == "passfile"
    passfile = tmp / f"{role}.pgpass"
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    passfile.write_text(f"{node.host}:{node.port}:*:{role}:{escaped}\n", encoding="utf-8")
    passfile.chmod(0o600)
    return Given(
        lambda db: conninfo(db, False),
        {},
        lambda db: url(db, False),
        {"PGPASSFILE": str(passfile)},
    )


@pytest.fixture(scope="module")
def table(pgfailover_session_cluster: LocalCluster) -> str:
    """A table of the application role's, for the example roles to write to."""
    name = f"secrets_{uuid.uuid4().hex[:8]}"
    with pgfailover_session_cluster.primary.connect(superuser=False) as conn:
        conn.execute(f"CREATE TABLE {name} (k text)")
    return name


@contextlib.contextmanager
def _role(cluster: LocalCluster, password: str) -> Iterator[str]:
    """A login role with ``password``, a member of the application role; dropped after."""
    role = f"r_{uuid.uuid4().hex[:10]}"
    with cluster.primary.connect() as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(role), sql.Literal(password), sql.Identifier(cluster.user)
            )
        )
    try:
        yield role
    finally:
        with cluster.primary.connect() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
                [role],
            )
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _terminate(cluster: LocalCluster, pid: int) -> None:
    """End backend ``pid`` and wait until it is gone."""
    with cluster.primary.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])


def _cli(argv: list[str], seen: Seen) -> int:
    """``pgfailover ARGV``: its output and errors captured into ``seen``; the exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as ex:  # argparse refused the arguments
            code = ex.code if isinstance(ex.code, int) else 2
    seen.texts += [out.getvalue(), err.getvalue()]
    if "--json" in argv and code != 2:
        json.loads(out.getvalue())  # a whole document, not an error in its place
    return code


def _failure_paths(cluster: LocalCluster, given: Given, table: str, seen: Seen) -> None:
    """Drive every failure path with the role's password given as ``given`` says."""
    good, missing = cluster.dbname, "no_such_db"
    errors: list[BaseException] = []

    # connect: authentication passes, the database is missing; and a wrong user
    errors.append(
        seen.expect_error(
            lambda: pgfailover.Connection.connect(given.conninfo(missing), **given.kwargs)
        )
    )
    with ConnectionPool[Any](
        given.conninfo(missing), kwargs=given.kwargs, min_size=1, timeout=10, open=False
    ) as pool:
        seen.obj(pool)
        errors.append(seen.expect_error(pool.getconn))

    # a query fails, a connection is poisoned (note, FailoverEvent), the pool purges
    with ConnectionPool[Any](
        given.conninfo(good), kwargs=given.kwargs, min_size=1, max_size=1, timeout=10, open=False
    ) as pool:
        with pool.connection() as conn:
            errors.append(seen.expect_error(lambda: conn.execute("SELECT * FROM no_such_table")))
            conn.rollback()
            conn.simulate_recovery()
            errors.append(
                seen.expect_error(lambda: conn.execute(f"INSERT INTO {table} VALUES (1)"))
            )
            seen.obj(conn.poisoned)

        # a COMMIT lost in flight, under the runner (which retries, then gives up)
        def lose_the_commit(conn: psycopg.Connection[Any]) -> None:
            conn.execute(f"INSERT INTO {table} VALUES ('runner')")
            _terminate(cluster, conn.info.backend_pid)

        runner = pgfailover.TransactionRunner(pool, timeout=10, attempts=2)
        seen.obj(runner, pool)
        errors.append(seen.expect_error(lambda: runner(lose_the_commit)))
        seen.obj(pool.get_stats())

    # a COMMIT lost in flight on a bare connection
    with pgfailover.Connection.connect(given.conninfo(good), **given.kwargs) as bare:
        bare.execute(f"INSERT INTO {table} VALUES ('bare')")
        _terminate(cluster, bare.info.backend_pid)
        errors.append(seen.expect_error(bare.commit))
        seen.obj(bare)

    # an instrumented engine: a connect failure, then a read-only failure that purges
    for dbname in (missing, good):
        engine = sa.create_engine(given.url(dbname), connect_args=dict(given.kwargs))
        instrumentation = pgsa.instrument(engine, timeout=10)
        seen.obj(engine, instrumentation)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                conn.exec_driver_sql(f"INSERT INTO {table} VALUES ('engine')")
        except Exception as ex:
            seen.error(ex)
            errors.append(ex)
        else:
            raise AssertionError("the engine's write did not fail")
        finally:
            engine.dispose()

    # a connection string that cannot be parsed (a URL's error quotes the whole URL)
    node = cluster.primary
    broken = given.conninfo(good).replace(f"@{node.host}:", f"@[{node.host}:")
    if broken == given.conninfo(good):
        broken += " sslmode='unterminated"
    errors.append(seen.expect_error(lambda: pgfailover.Connection.connect(broken, **given.kwargs)))
    errors.append(seen.expect_error(lambda: ConnectionPool[Any](broken, open=False)))
    assert _cli(["probe", broken], seen) == 2

    # the async twins: a connect failure, a pool's, an unparseable connection string
    async def async_paths() -> None:
        for conninfo in (given.conninfo(missing), broken):
            try:
                await pgfailover.AsyncConnection.connect(conninfo, **given.kwargs)
            except Exception as ex:
                seen.error(ex)
                errors.append(ex)
            else:
                raise AssertionError("the async connect did not fail")
        async with AsyncConnectionPool[Any](
            given.conninfo(missing), kwargs=given.kwargs, min_size=1, timeout=10, open=False
        ) as apool:
            seen.obj(apool)
            try:
                await apool.getconn()
            except Exception as ex:
                seen.error(ex)
                errors.append(ex)
            else:
                raise AssertionError("the async pool gave a connection")

    asyncio.run(async_paths())

    # pgfailover probe: one host refusing, then a missing database, as a table and as JSON
    closed = reserve_port()
    try:
        two_hosts = given.conninfo(good)
        if two_hosts.startswith("postgresql://"):
            two_hosts = two_hosts.replace(
                f"@{node.host}:{node.port}/", f"@{node.host}:{node.port},127.0.0.1:{closed}/"
            )
        else:
            two_hosts = make_conninfo(
                two_hosts,
                host=f"{cluster.primary.host},127.0.0.1",
                port=f"{cluster.primary.port},{closed}",
            )
        for argv in ([two_hosts], [given.conninfo(missing)]):
            for extra in ([], ["--json"]):
                _cli(["probe", *argv, "--timeout", "2", *extra], seen)
    finally:
        release_port(closed)

    # the drill's report, built from these real failures as the drill records them
    ops = [
        Op("stack", float(i), float(i) + 0.5, i, False, *error_code(ex))
        for i, ex in enumerate(errors)
    ]
    report = build_report({}, (), None, (0.0, 1.0 + len(ops)), [("stack", True)], ops, {})
    seen.texts += [report.format_text(), json.dumps(report.to_json())]
    seen.obj(*errors)


@pytest.mark.parametrize("way", WAYS)
@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(password=passwords)
def test_no_password_appears_in_any_failure_text(
    pgfailover_session_cluster: LocalCluster,
    table: str,
    tmp_path: Path,
    way: str,
    password: str,
) -> None:
    """With the password given as a conninfo value, in a URL, as ``password=``, in
    PGPASSWORD or in a passfile: connect failures (sync and async connections and pools, and
    connection strings that cannot be parsed), query failures, a poisoned connection,
    lost COMMITs (bare and under the runner), an instrumented engine's failures, ``pgfailover
    probe`` (table and JSON), the drill's report, every event, every repr, every exception
    note and every log record at DEBUG hold no trace of it."""
    cluster = pgfailover_session_cluster
    seen = Seen()
    with _role(cluster, password) as role:
        given_ = _given(way, cluster, role, password, tmp_path)
        with pytest.MonkeyPatch.context() as mp, _capturing(seen):
            for name, value in given_.env.items():
                mp.setenv(name, value)
            if not given_.env:
                mp.delenv("PGPASSWORD", raising=False)
                mp.delenv("PGPASSFILE", raising=False)
            _failure_paths(cluster, given_, table, seen)
    assert len(seen.texts) > 40  # every path was captured
    leaks = [text for text in seen.texts for form in _forms(password) if form in text]
    assert not leaks, leaks[:3]


def _forms(password: str) -> set[str]:
    """The password as given, percent-encoded (URLs) and escaped (conninfo values)."""
    return {
        password,
        urllib.parse.quote(password, safe=""),
        urllib.parse.quote_plus(password),
        password.replace("\\", "\\\\").replace("'", "\\'"),
    }


def test_the_passfile_way_really_reads_the_passfile(
    pgfailover_session_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The passfile and PGPASSWORD ways carry the password (a connection succeeds with
    nothing else), so the property above tests them, not a login without a password."""
    cluster = pgfailover_session_cluster
    password = "pass:file\\ 'way' é"
    with _role(cluster, password) as role:
        for way in ("passfile", "PGPASSWORD"):
            given_ = _given(way, cluster, role, password, tmp_path)
            with pytest.MonkeyPatch.context() as mp:
                for name, value in given_.env.items():
                    mp.setenv(name, value)
                with pgfailover.Connection.connect(given_.conninfo(cluster.dbname)) as conn:
                    assert conn.execute("SELECT current_user").fetchone() == (role,)
            assert os.environ.get("PGPASSWORD") != password
