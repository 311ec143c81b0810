"""Bad input fails fast and typed: a configuration error reaches the caller at once through
every stack, as the driver's error (or pgfailover's typed one naming the cause), without
the password, and the pools never reconnect faster than psycopg_pool does on it.

The bound on how fast an error arrives (:data:`BOUND`, against a 20 s request timeout) is
a fault bound: it separates "at once" from "after waiting for a primary that cannot
appear", not a speed benchmark.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.ext.asyncio import create_async_engine

import pgfailover
import pgfailover.sqlalchemy as pgsa
from pgfailover.cli import main
from pgfailover.pool import ConnectionPool
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.testing import LocalCluster
from pgfailover.testing._ports import release_port, reserve_port

pytestmark = pytest.mark.integration

#: A password with the characters that break naive quoting (at least 8 characters, so
#: that it cannot appear in an ordinary message by chance).
PASSWORD = "B@d 'input' %20=\\ pässwörd"
#: The request timeout every stack is given: a configuration error must not wait for it.
TIMEOUT = 20.0
#: Seconds within which a configuration error must reach the caller (a fault bound).
BOUND = 5.0
#: The window, in seconds, whose reconnection attempts are counted.
WINDOW = 3.5


# ------------------------------------------------------------------ a non-PostgreSQL server


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP server's handler that, like Apache's request timeout, answers a request it
    could not read within :attr:`timeout` seconds with ``408 Request Timeout``."""

    timeout = 0.3

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except TimeoutError:
            self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
            self.send_error(408)
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if self.parse_request():
            self.send_error(404)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads nothing from the server's log."""


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    """The loopback port of a real HTTP server running in a thread for the module."""
    port = reserve_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _HttpHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http-server", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        release_port(port)


# ------------------------------------------------------------------ the bad inputs


@dataclass(frozen=True)
class BadInput:
    """One configuration mistake, as each stack is given it.

    ``conninfo`` and ``kwargs`` go to the connections and pools; engines get ``url`` with
    ``connect_args`` (``kwargs`` plus the conninfo's parameters when ``url`` is the bare
    scheme). ``says`` is a regex the error's message matches: it names the cause
    (``engine_says`` instead for engines, when SQLAlchemy reads the URL itself;
    ``probe_says`` for ``pgfailover probe``, when it reads the DSN itself).
    ``secret`` is the password the input holds. ``parsed_up_front``: the pools' constructors
    refuse the conninfo, so no connection is ever attempted.
    """

    conninfo: str
    says: str
    secret: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    url: str = "postgresql+psycopg://"
    engine_says: str | None = None
    probe_says: str | None = None
    parsed_up_front: bool = False

    def connect_args(self) -> dict[str, Any]:
        """The engine's ``connect_args``."""
        if self.url != "postgresql+psycopg://":
            return dict(self.kwargs)
        return {**conninfo_to_dict(self.conninfo), **self.kwargs}


def _bad_inputs(cluster: LocalCluster, http_port: int) -> dict[str, BadInput]:
    """Every bad input by name, against ``cluster`` and the HTTP server on ``http_port``."""
    node = cluster.primary
    assert cluster.pgbouncer is not None
    real = cluster.password
    base = {"host": node.host, "port": str(node.port), "dbname": cluster.dbname}
    base |= {"user": cluster.user, "password": PASSWORD}
    quoted = urllib.parse.quote(PASSWORD, safe="")
    return {
        "wrong-password": BadInput(
            make_conninfo(**base), r"password authentication failed for user", PASSWORD
        ),
        "tls-required-without-tls": BadInput(
            node.dsn(sslmode="require"), r"server does not support SSL, but SSL was required", real
        ),
        "port-not-a-number": BadInput(
            make_conninfo(**{**base, "port": "abc"}),
            r'invalid integer value "abc" for connection option "port"',
            PASSWORD,
            probe_says=r"invalid port 'abc': expected a number in 1-65535",
        ),
        "unresolvable-host": BadInput(
            make_conninfo(**{**base, "host": "no-such-host.invalid"}),
            r"no-such-host\.invalid",
            PASSWORD,
        ),
        "http-server": BadInput(
            make_conninfo(**{**base, "port": str(http_port)}),
            r"received invalid response to SSL negotiation",
            PASSWORD,
        ),
        "malformed-url": BadInput(
            f"postgresql://{cluster.user}:{quoted}@[{node.host}/{cluster.dbname}",
            r'cannot parse the connection string: .*"\]" in IPv6 host address in URI',
            PASSWORD,
            url=f"postgresql+psycopg://{cluster.user}:{quoted}@[{node.host}/{cluster.dbname}",
            engine_says=f"failed to resolve host '{re.escape('[' + node.host)}'",  # SQLAlchemy's
            parsed_up_front=True,
        ),
        "unknown-option": BadInput(
            node.dsn() + " bogus_option=1",
            r'invalid connection option "bogus_option"',
            real,
            url=sa.URL.create(
                "postgresql+psycopg",
                username=cluster.user,
                password=real,
                host=node.host,
                port=node.port,
                database=cluster.dbname,
                query={"bogus_option": "1"},
            ).render_as_string(hide_password=False),
            parsed_up_front=True,
        ),
        "unknown-option-keyword": BadInput(
            node.dsn(), r'invalid connection option "bogus_option"', real, {"bogus_option": "1"}
        ),
        "unknown-database": BadInput(
            node.dsn(dbname="no_such_db"), r'database "no_such_db" does not exist', real
        ),
        "pgbouncer-admin-console-refuses-the-user": BadInput(
            cluster.pgbouncer.dsn(dbname="pgbouncer"), r"FATAL:\s+not allowed", real
        ),
    }


ROWS = [
    "wrong-password",
    "tls-required-without-tls",
    "port-not-a-number",
    "unresolvable-host",
    "http-server",
    "malformed-url",
    "unknown-option",
    "unknown-option-keyword",
    "unknown-database",
    "pgbouncer-admin-console-refuses-the-user",
]


@pytest.fixture
def bad_inputs(pgfailover_cluster: LocalCluster, http_port: int) -> dict[str, BadInput]:
    """Every bad input, against the session cluster and the module's HTTP server."""
    rows = _bad_inputs(pgfailover_cluster, http_port)
    assert sorted(rows) == sorted(ROWS)
    return rows


# ------------------------------------------------------------------ the stacks


def _work(conn: Any) -> None:
    conn.execute("SELECT 1")


def _connect(row: BadInput) -> None:
    pgfailover.Connection.connect(row.conninfo, **row.kwargs).close()


async def _aconnect(row: BadInput) -> None:
    conn = await pgfailover.AsyncConnection.connect(row.conninfo, **row.kwargs)
    await conn.close()


def _pool(row: BadInput) -> None:
    with ConnectionPool[Any](
        row.conninfo, kwargs=row.kwargs, min_size=1, timeout=TIMEOUT, open=False
    ) as pool:
        pool.getconn()


async def _apool(row: BadInput) -> None:
    async with AsyncConnectionPool[Any](
        row.conninfo, kwargs=row.kwargs, min_size=1, timeout=TIMEOUT, open=False
    ) as pool:
        await pool.getconn()


def _runner(row: BadInput) -> None:
    with ConnectionPool[Any](
        row.conninfo, kwargs=row.kwargs, min_size=1, timeout=TIMEOUT, open=False
    ) as pool:
        pgfailover.TransactionRunner(pool, timeout=TIMEOUT)(_work)


async def _arunner(row: BadInput) -> None:
    async with AsyncConnectionPool[Any](
        row.conninfo, kwargs=row.kwargs, min_size=1, timeout=TIMEOUT, open=False
    ) as pool:

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute("SELECT 1")

        await pgfailover.AsyncTransactionRunner(pool, timeout=TIMEOUT)(work)


def _engine(row: BadInput) -> None:
    engine = sa.create_engine(row.url, connect_args=row.connect_args(), pool_timeout=TIMEOUT)
    pgsa.instrument(engine, timeout=TIMEOUT)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


async def _aengine(row: BadInput) -> None:
    engine = create_async_engine(row.url, connect_args=row.connect_args(), pool_timeout=TIMEOUT)
    pgsa.instrument(engine, timeout=TIMEOUT)
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
    finally:
        await engine.dispose()


STACKS: dict[str, Callable[[BadInput], Any]] = {
    "connection": _connect,
    "async-connection": _aconnect,
    "pool": _pool,
    "async-pool": _apool,
    "runner": _runner,
    "async-runner": _arunner,
    "engine": _engine,
    "async-engine": _aengine,
}


async def _run(call: Callable[[BadInput], Any], bad: BadInput) -> None:
    """``call(bad)``, awaited if it is a coroutine."""
    result = call(bad)
    if asyncio.iscoroutine(result):
        await result


def _texts(error: BaseException) -> list[str]:
    """What a caller can read of ``error``: str, repr and notes along its chain as a
    traceback shows it (a context suppressed by ``raise ... from None`` is not shown)."""
    texts: list[str] = []
    seen: set[int] = set()
    node: BaseException | None = error
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        texts += [str(node), repr(node), *getattr(node, "__notes__", ())]
        orig = getattr(node, "orig", None)
        if isinstance(orig, BaseException):
            texts += [str(orig), repr(orig)]
        node = node.__cause__ or (None if node.__suppress_context__ else node.__context__)
    return texts


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("row", ROWS)
async def test_a_configuration_error_reaches_the_caller_at_once(
    bad_inputs: dict[str, BadInput], row: str, stack: str
) -> None:
    """Each bad input, through each stack given a 20 s timeout: the caller gets, within the
    fault bound, a psycopg error (SQLAlchemy's wrapping one for engines) that pgfailover
    classifies as a configuration error and whose message names the cause, and the
    password is nowhere in what the caller can read of it."""
    bad = bad_inputs[row]
    call = STACKS[stack]
    started = time.monotonic()
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is checked below
        await _run(call, bad)
    waited = time.monotonic() - started
    error = info.value
    assert waited < BOUND, f"{row} through {stack}: {waited:.1f} s"
    driver_error = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    assert isinstance(driver_error, psycopg.Error), repr(error)
    if bad.parsed_up_front and stack not in ("engine", "async-engine"):
        assert isinstance(error, pgfailover.InvalidConninfo), repr(error)
    if isinstance(error, pgfailover.InvalidConninfo) and "connection" in stack:
        assert error.__context__ is None  # psycopg's error quoting the URL is not kept
    assert pgfailover.classify(error).kind is pgfailover.Kind.CONFIGURATION, repr(error)
    says = bad.engine_says if bad.engine_says and "engine" in stack else bad.says
    assert re.search(says, str(error)), str(error)
    quoted = urllib.parse.quote(bad.secret, safe="")
    for text in _texts(error):
        assert bad.secret not in text
        assert quoted not in text


@pytest.mark.parametrize("as_json", [False, True])
def test_pgbouncer_doctor_refused_by_the_admin_console_says_so(
    pgfailover_cluster: LocalCluster, as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pgfailover pgbouncer doctor --admin`` as a user the admin console refuses: status
    2 at once, one line saying PgBouncer refused the login with its "not allowed", no
    password."""
    assert pgfailover_cluster.pgbouncer is not None
    dsn = pgfailover_cluster.pgbouncer.dsn(dbname="pgbouncer")
    started = time.monotonic()
    code = main(["pgbouncer", "doctor", "--admin", dsn, *(["--json"] if as_json else [])])
    assert time.monotonic() - started < BOUND
    out, err = capsys.readouterr()
    assert code == 2
    assert "refused the login" in err
    assert "not allowed" in err
    assert pgfailover_cluster.password not in out + err


@pytest.mark.parametrize("row", [name for name in ROWS if name != "unknown-option-keyword"])
def test_probe_reports_each_bad_input_at_once(
    bad_inputs: dict[str, BadInput], row: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pgfailover probe --json`` of each bad input (but keyword options, which a command
    line cannot give) ends within the fault bound: status 2 with the usage line for a DSN
    it cannot split, else status 1 with the host unreachable and the error naming the
    cause; the password appears nowhere."""
    bad = bad_inputs[row]
    started = time.monotonic()
    code: object
    try:
        code = main(["probe", bad.conninfo, "--timeout", "2", "--json"])
    except SystemExit as ex:  # argparse refused the DSN
        code = ex.code
    waited = time.monotonic() - started
    out, err = capsys.readouterr()
    assert waited < BOUND, f"{row}: {waited:.1f} s"
    says = bad.probe_says or bad.says
    if code == 2:
        assert err.startswith("usage: pgfailover probe"), err
        assert re.search(says, err), err
    else:
        assert code == 1, (code, out, err)
        (host,) = json.loads(out)["hosts"]
        assert host["role"] == "unreachable"
        assert re.search(says, host["error"]["message"]), host["error"]
    assert bad.secret not in out + err
    assert urllib.parse.quote(bad.secret, safe="") not in out + err


async def _engine_connect(url: str, driver: str) -> None:
    """Connect once through an instrumented engine for ``url`` (async for asyncpg)."""
    if driver == "asyncpg":
        aengine = create_async_engine(url, pool_timeout=TIMEOUT)
        pgsa.instrument(aengine, timeout=TIMEOUT)
        try:
            async with aengine.connect():
                pass
        finally:
            await aengine.dispose()
        return
    engine = sa.create_engine(url, pool_timeout=TIMEOUT)
    pgsa.instrument(engine, timeout=TIMEOUT)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg"])
@pytest.mark.parametrize(
    ("dbname", "says"), [("pgbouncer", "not allowed"), ("no_such_db", "no such database")]
)
async def test_pgbouncer_refusing_the_login_reaches_other_drivers_engines_at_once(
    pgfailover_cluster: LocalCluster, driver: str, dbname: str, says: str
) -> None:
    """PgBouncer refusing a login (its admin console for a user it does not admit, a
    database it does not know) through an instrumented psycopg2 or asyncpg engine: the
    driver's error (SQLSTATE 08P01 with asyncpg, none with libpq) is a configuration error
    that reaches the caller at once, not a lost connection waited on for 20 s."""
    assert pgfailover_cluster.pgbouncer is not None
    url = pgfailover_cluster.pgbouncer.url(driver, dbname=dbname)
    started = time.monotonic()
    with pytest.raises(sa.exc.DBAPIError) as info:
        await _engine_connect(url, driver)
    assert time.monotonic() - started < BOUND
    assert pgfailover.classify(info.value).kind is pgfailover.Kind.CONFIGURATION
    assert says in str(info.value)
    assert pgfailover_cluster.password not in str(info.value)


# ------------------------------------------------------------------ reconnection schedule


class _Counting(pgfailover.Connection[Any]):
    attempts = 0

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> Any:
        cls.attempts += 1
        return super().connect(*args, **kwargs)


class _PlainCounting(psycopg.Connection[Any]):
    attempts = 0

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> Any:
        cls.attempts += 1
        return super().connect(*args, **kwargs)


class _ACounting(pgfailover.AsyncConnection[Any]):
    attempts = 0

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> Any:
        cls.attempts += 1
        return await super().connect(*args, **kwargs)


class _APlainCounting(psycopg.AsyncConnection[Any]):
    attempts = 0

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> Any:
        cls.attempts += 1
        return await super().connect(*args, **kwargs)


COUNTED = [name for name in ROWS if name not in ("malformed-url", "unknown-option")]


def _check_schedule(attempts: dict[str, tuple[int, int]]) -> None:
    """Each row's (pgfailover, psycopg_pool) attempts by two pools of two connections in
    :data:`WINDOW` seconds: pgfailover's are psycopg_pool's own schedule (1 s, doubling: at
    most 3 per connection), at most one more per connection than psycopg_pool's (jitter)."""
    for row, (ours, theirs) in attempts.items():
        assert 2 <= ours <= 3 * 2, (row, attempts)
        assert ours <= theirs + 2, (row, attempts)


def test_the_pool_reconnects_no_faster_than_psycopg_pool_on_bad_input(
    bad_inputs: dict[str, BadInput],
) -> None:
    """On every bad input that reaches a connection attempt, a pgfailover pool of two
    connections makes no more attempts in 3.5 s than psycopg_pool's pool does on the same
    input (its schedule: 1 s, doubling), never the failover schedule's dozens; on the
    inputs its constructor refuses it makes none."""
    pools: list[tuple[str, psycopg_pool.ConnectionPool[Any], type[Any], type[Any]]] = []
    for name in COUNTED:
        row = bad_inputs[name]
        ours = type(f"Ours_{name}", (_Counting,), {"attempts": 0})
        theirs = type(f"Theirs_{name}", (_PlainCounting,), {"attempts": 0})
        options: dict[str, Any] = {"kwargs": row.kwargs, "min_size": 2, "open": False}
        pool: psycopg_pool.ConnectionPool[Any] = ConnectionPool[Any](
            row.conninfo, connection_class=ours, **options
        )
        plain = psycopg_pool.ConnectionPool[Any](row.conninfo, connection_class=theirs, **options)
        pools += [(name, pool, ours, theirs), (name, plain, ours, theirs)]
    try:
        for _, opened, _, _ in pools:
            opened.open()
        time.sleep(WINDOW)  # the window whose attempts are counted
        counts = {name: (ours.attempts, theirs.attempts) for name, _, ours, theirs in pools}
    finally:
        for _, opened, _, _ in pools:
            opened.close()
    _check_schedule(counts)
    for name in ("malformed-url", "unknown-option"):
        with pytest.raises(pgfailover.InvalidConninfo):
            ConnectionPool[Any](bad_inputs[name].conninfo, open=False)


async def test_the_async_pool_reconnects_no_faster_than_psycopg_pool_on_bad_input(
    bad_inputs: dict[str, BadInput],
) -> None:
    """Async twin: an AsyncConnectionPool makes no more attempts on bad input than
    psycopg_pool's AsyncConnectionPool on the same input."""
    pools: list[tuple[str, psycopg_pool.AsyncConnectionPool[Any], type[Any], type[Any]]] = []
    for name in COUNTED:
        row = bad_inputs[name]
        ours = type(f"AOurs_{name}", (_ACounting,), {"attempts": 0})
        theirs = type(f"ATheirs_{name}", (_APlainCounting,), {"attempts": 0})
        options: dict[str, Any] = {"kwargs": row.kwargs, "min_size": 2, "open": False}
        pool: psycopg_pool.AsyncConnectionPool[Any] = AsyncConnectionPool[Any](
            row.conninfo, connection_class=ours, **options
        )
        plain = psycopg_pool.AsyncConnectionPool[Any](
            row.conninfo, connection_class=theirs, **options
        )
        pools += [(name, pool, ours, theirs), (name, plain, ours, theirs)]
    try:
        for _, opened, _, _ in pools:
            await opened.open()
        await asyncio.sleep(WINDOW)  # the window whose attempts are counted
        counts = {name: (ours.attempts, theirs.attempts) for name, _, ours, theirs in pools}
    finally:
        for _, opened, _, _ in pools:
            await opened.close()
    _check_schedule(counts)


# ------------------------------------------------------------------ the command line

_MALFORMED_URL = f"postgresql://app:{urllib.parse.quote(PASSWORD, safe='')}@[db/app"


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        ([], "usage: pgfailover "),
        (["frobnicate"], "usage: pgfailover "),
        (["--bogus", "probe", "host=a"], "usage: pgfailover "),
        (["drill", "--bogus"], "usage: pgfailover drill"),
        (["drill", "--target", "nowhere"], "usage: pgfailover drill"),
        (["drill", "--stop", "gently"], "usage: pgfailover drill"),
        (["drill", "--workers", "many"], "usage: pgfailover drill"),
        (["drill", "--plot"], "usage: pgfailover drill"),
        (["drill", "surplus"], "usage: pgfailover drill"),
        (["probe"], "usage: pgfailover probe"),
        (["probe", "host=a", "--timeout", "0"], "usage: pgfailover probe"),
        (["probe", "host=a", "--timeout", "soon"], "usage: pgfailover probe"),
        (["probe", "host=a", "--bogus"], "usage: pgfailover probe"),
        (["probe", _MALFORMED_URL], "usage: pgfailover probe"),
        (["probe", f"host=a port=abc password='{PASSWORD}'"], "usage: pgfailover probe"),
        (["probe", "host=a,b hostaddr=127.0.0.1"], "usage: pgfailover probe"),
        (["pgbouncer"], "usage: pgfailover pgbouncer"),
        (["pgbouncer", "nope"], "usage: pgfailover pgbouncer"),
        (["pgbouncer", "doctor", "--bogus"], "usage: pgfailover pgbouncer doctor"),
        (["pgbouncer", "doctor", "surplus"], "usage: pgfailover pgbouncer doctor"),
        (["pgbouncer", "doctor", "--admin", _MALFORMED_URL], "usage: pgfailover pgbouncer doctor"),
        (["pgbouncer", "repoint"], "usage: pgfailover pgbouncer repoint"),
        (
            ["pgbouncer", "repoint", "--admin", "host=a", "--to", "db"],
            "usage: pgfailover pgbouncer",
        ),
        (["pgbouncer", "follow", "--bogus"], "usage: pgfailover pgbouncer follow"),
        (["demo", "--bogus"], "usage: pgfailover demo"),
        (["demo", "surplus"], "usage: pgfailover demo"),
        (["probe", "host=a", f"password={PASSWORD}"], "usage: pgfailover probe"),
    ],
)
def test_every_subcommand_refuses_bad_arguments_with_status_2_and_its_usage(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments to the program or to any sub-command (unknown option, bad value,
    missing or surplus argument, a DSN that cannot be parsed) exit with status 2, print the
    usage line and say what is wrong, never the password; nothing is started."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert "error: " in err
    for piece in (PASSWORD, PASSWORD.replace("'", "\\'"), *PASSWORD.split()[1:]):
        assert piece not in err


def test_the_console_script_refuses_a_malformed_url_without_the_password() -> None:
    """The installed ``pgfailover`` program, given a malformed URL with a password: exit
    status 2, the usage line and the reason, and no trace of the password (quoted or not)."""
    script = "import sys; from pgfailover.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", script, "probe", _MALFORMED_URL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: pgfailover probe")
    assert "IPv6 host address in URI" in done.stderr
    quoted = urllib.parse.quote(PASSWORD, safe="")
    for text in (done.stdout, done.stderr):
        assert PASSWORD not in text
        assert quoted not in text


@pytest.mark.parametrize("as_json", [False, True])
def test_probe_of_a_pgbouncer_admin_console_refusing_the_user_says_so(
    pgfailover_cluster: LocalCluster, as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pgfailover probe`` of PgBouncer's admin console as a user it refuses: status 1 (no
    primary), the host reported unreachable with an ``auth`` error quoting PgBouncer's
    "not allowed", at once, without the password."""
    assert pgfailover_cluster.pgbouncer is not None
    dsn = pgfailover_cluster.pgbouncer.dsn(dbname="pgbouncer")
    started = time.monotonic()
    code = main(["probe", dsn, "--timeout", "2", *(["--json"] if as_json else [])])
    assert time.monotonic() - started < BOUND
    out = capsys.readouterr().out
    assert code == 1
    assert pgfailover_cluster.password not in out
    if as_json:
        (host,) = json.loads(out)["hosts"]
        assert host["role"] == "unreachable"
        assert host["error"]["kind"] == "auth"
        assert "not allowed" in host["error"]["message"]
    else:
        assert "unreachable" in out
        assert "not allowed" in out
