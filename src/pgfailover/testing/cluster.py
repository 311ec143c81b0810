"""A real local PostgreSQL cluster (primary, streaming standbys, optional PgBouncer) for tests.

:class:`LocalCluster` builds everything in a temporary directory on free loopback ports and
produces real failovers on demand. Every operation waits until it is done, polling with a
deadline, and returns the time each phase took as :class:`Timings`. Everything it started
is ended by PID and its directory removed on :meth:`LocalCluster.close`, on exit from the
``with`` block (exception and KeyboardInterrupt included) and, as a last resort, at
interpreter exit.

When run as root, servers run as an unprivileged OS user (see ``_osuser``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ._binaries import PostgresBinaries, find_pgbouncer, find_postgres
from ._follower import DEFAULT_INTERVAL, FollowerProcess, wait_points_at
from ._osuser import OsUser, server_user
from ._ports import release_port, reserve_port
from ._process import ServerProcess
from .errors import HarnessError

logger = logging.getLogger("pgfailover.testing")

StopMode = Literal["smart", "fast", "immediate"]
PoolMode = Literal["session", "transaction", "statement"]
Role = Literal["primary", "standby", "down"]

_STOP_SIGNALS: dict[str, int] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
HOST = "127.0.0.1"
SUPERUSER = "postgres"
_POLL = 0.02
T = TypeVar("T")
#: The SQLAlchemy URL scheme of each driver ``url()`` knows (SQLAlchemy picks psycopg's
#: async flavour itself for ``create_async_engine``).
URL_SCHEMES: dict[str, str] = {
    "psycopg": "postgresql+psycopg",
    "psycopg_async": "postgresql+psycopg",
    "psycopg2": "postgresql+psycopg2",
    "asyncpg": "postgresql+asyncpg",
}
#: The harness's own connections: plain tuples as rows.
Conn: TypeAlias = psycopg.Connection[tuple[Any, ...]]

#: Settings every node gets. ``fsync=off`` trades durability against an OS crash (never
#: simulated here) for speed; crash recovery after ``immediate`` stops or SIGKILL still
#: replays WAL as usual because the data stays in the OS page cache.
BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": HOST,
    "max_connections": "200",
    "shared_buffers": "32MB",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "wal_keep_size": "512MB",
    "max_wal_size": "256MB",
    "hot_standby": "on",
    "wal_log_hints": "on",
    "fsync": "off",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "100ms",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track_utility": "on",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "log_min_messages": "warning",
}


@dataclass(frozen=True)
class Timings:
    """How long each phase of an operation took, in seconds, in the order they ran.

    ``total`` is measured end to end (it includes the time between phases). ``notes`` holds
    facts about how the operation went (e.g. ``rejoin: "pg_rewind"`` or ``"pg_basebackup"``).
    ``ended_at`` holds the ``time.monotonic()`` instant each phase ended, to compare with a
    client's own clock (e.g. when did the promoted node start accepting writes).
    """

    phases: Mapping[str, float]
    total: float
    notes: Mapping[str, str] = field(default_factory=dict)
    ended_at: Mapping[str, float] = field(default_factory=dict)

    def __getitem__(self, phase: str) -> float:
        return self.phases[phase]

    def __str__(self) -> str:
        parts = [f"{name} {secs:.3f}s" for name, secs in self.phases.items()]
        notes = "".join(f", {k}: {v}" for k, v in self.notes.items())
        return f"{', '.join(parts)} (total {self.total:.3f}s{notes})"


class _Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self.ended_at: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
            self.ended_at[name] = time.monotonic()

    def result(self) -> Timings:
        return Timings(
            dict(self.phases),
            time.perf_counter() - self.start,
            dict(self.notes),
            dict(self.ended_at),
        )


def _poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = _POLL) -> T:
    """Call ``check`` until it returns something other than None; HarnessError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
        except (psycopg.Error, OSError) as ex:
            last_error, result = ex, None
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


class Node:
    """One PostgreSQL server of a :class:`LocalCluster`."""

    def __init__(self, cluster: LocalCluster, name: str, port: int, root: Path) -> None:
        self._cluster = cluster
        self.name = name
        self.host = HOST
        self.port = port
        self.root = root
        self.datadir = root / "data"
        self.socket_dir = root / "socket"
        self.log_path = root / "postgres.log"
        self.process: ServerProcess | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the node."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the postmaster runs."""
        return self.process is not None and self.process.running

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, None when stopped."""
        return self.process.pid if self.running and self.process else None

    def dsn(self, *, dbname: str | None = None, user: str | None = None, **params: Any) -> str:
        """A libpq conninfo string for this node (application user and database by default).

        It contains the password: pass it to a driver, never log it.
        """
        return self._cluster._dsn(self.host, self.port, dbname=dbname, user=user, **params)

    def url(
        self, driver: str = "psycopg", *, dbname: str | None = None, user: str | None = None
    ) -> str:
        """A SQLAlchemy URL string for this node (application user and database by default):
        ``postgresql+psycopg://user:password@host:port/dbname``, every part URL-quoted.

        ``driver``: ``psycopg`` or ``psycopg_async`` (both ``postgresql+psycopg``),
        ``psycopg2`` or ``asyncpg``; ValueError for another. Only the user, password, host,
        port and database are carried: pass driver options (``prepare_threshold``, ...) as
        the engine's ``connect_args``. The string contains the password, as a URL must:
        give it to ``create_engine``, never log it (SQLAlchemy's ``URL`` objects mask it in
        their repr; the string does not).
        """
        return self._cluster._url(self.host, self.port, driver, dbname=dbname, user=user)

    def connect(self, *, superuser: bool = True, **kwargs: Any) -> Conn:
        """An autocommit psycopg connection to this node (superuser ``postgres`` by default)."""
        conninfo = self.dsn(dbname="postgres", user=SUPERUSER) if superuser else self.dsn()
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(conninfo, **kwargs)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<Node {self.name} {self.address} {state}>"


class _BouncerOwner(Protocol):
    """What :class:`PgBouncer` needs of its cluster (LocalCluster or PatroniCluster)."""

    dbname: str
    ready_timeout: float

    def _dsn(
        self, host: str, port: int | str, *, dbname: str | None, user: str | None, **params: Any
    ) -> str: ...

    def _url(
        self, host: str, port: int, driver: str, *, dbname: str | None, user: str | None
    ) -> str: ...


class _Server(Protocol):
    """A PostgreSQL server PgBouncer can point at (a :class:`Node` or a Patroni node)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def connect(self, *, superuser: bool = True, **kwargs: Any) -> Conn: ...


def _userlist_entries(
    conn: Conn, passwords: Mapping[str, str], plaintext: Collection[str] = ()
) -> dict[str, str]:
    """The secret PgBouncer's ``auth_file`` holds for each user of ``passwords``.

    A user's SCRAM secret as the server keeps it (``pg_authid.rolpassword``, read on
    ``conn``, a superuser connection): PgBouncer then checks a client's proof without deriving
    the key from a password (PBKDF2, 4096 iterations, at every login otherwise), and logs in
    to the server with the keys the client's own SCRAM exchange gave it (SCRAM pass-through:
    that needs the server to hold the very same secret, same salt and iterations, which
    reading it from the server and its replicas guarantees). The plaintext password instead
    for a user named in ``plaintext`` (PgBouncer's ``auth_user``, which logs in to the server
    with no client behind it) and for a user the server keeps no SCRAM secret for (e.g.
    ``password_encryption = md5``).
    """
    rows = conn.execute(
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)", [list(passwords)]
    ).fetchall()
    stored = {str(name): secret for name, secret in rows}
    entries: dict[str, str] = {}
    for user, password in passwords.items():
        secret = stored.get(user)
        if isinstance(secret, str) and secret.startswith("SCRAM-SHA-256$"):
            entries[user] = password if user in plaintext else secret
        else:
            entries[user] = password
    return entries


class PgBouncer:
    """The PgBouncer of a :class:`LocalCluster` (admin console enabled for ``postgres``).

    Its ``auth_file`` (``userlist.txt``) holds each user's SCRAM secret, not its password,
    except for an ``auth_user`` given in the cluster's ``pgbouncer_settings``.
    """

    def __init__(
        self,
        cluster: _BouncerOwner,
        port: int,
        root: Path,
        pool_mode: PoolMode,
        settings: Mapping[str, str],
    ) -> None:
        self._cluster = cluster
        self.host = HOST
        self.port = port
        self.root = root
        self.pool_mode: PoolMode = pool_mode
        self.settings = dict(settings)
        self.config_path = root / "pgbouncer.ini"
        self.log_path = root / "pgbouncer.log"
        self.target: Node | None = None
        self.process: ServerProcess | None = None

    @property
    def address(self) -> str:
        """``host:port`` of PgBouncer."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the pgbouncer process runs."""
        return self.process is not None and self.process.running

    def dsn(self, *, dbname: str | None = None, user: str | None = None, **params: Any) -> str:
        """Conninfo of a client connection through PgBouncer (contains the password).

        In transaction mode psycopg's automatic prepared statements fail: pass
        ``prepare_threshold=None`` to ``psycopg.connect`` (it is not a conninfo parameter).
        """
        return self._cluster._dsn(self.host, self.port, dbname=dbname, user=user, **params)

    def url(
        self, driver: str = "psycopg", *, dbname: str | None = None, user: str | None = None
    ) -> str:
        """A SQLAlchemy URL string for a client of PgBouncer (see :meth:`Node.url`; it
        contains the password: never log it).

        In transaction mode pass ``connect_args={"prepare_threshold": None}`` (psycopg) or
        ``{"statement_cache_size": 0}`` (asyncpg): prepared statements need PgBouncer 1.21.
        """
        return self._cluster._url(self.host, self.port, driver, dbname=dbname, user=user)

    def admin_dsn(self) -> str:
        """Conninfo of the admin console (database ``pgbouncer``, user ``postgres``)."""
        return self.dsn(dbname="pgbouncer", user=SUPERUSER)

    def admin(self, command: str) -> list[dict[str, object]]:
        """Run an admin console command (``SHOW SERVERS``, ``RELOAD``, ...); rows as dicts."""
        with psycopg.connect(
            self.admin_dsn(), autocommit=True, prepare_threshold=None, connect_timeout=5
        ) as conn:
            cur = conn.execute(command)  # no parameters: sent with the simple protocol
            if cur.description is None:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def __repr__(self) -> str:
        target = self.target.name if self.target else None
        return f"<PgBouncer {self.address} {self.pool_mode} -> {target}>"

    # The set-up both clusters share; the cluster supplies its programs, user and files.
    def _configure(self, target: _Server, passwords: Mapping[str, str], osuser: OsUser) -> None:
        """Create PgBouncer's directory, its ``auth_file`` (mode 0600; each user of
        ``passwords`` with its secret on ``target``, see :func:`_userlist_entries`) and its
        configuration pointing at ``target``."""
        self.root.mkdir(mode=0o700)
        osuser.own(self.root)
        with target.connect() as conn:
            entries = _userlist_entries(conn, passwords, [self.settings.get("auth_user", "")])
        path = self.root / "userlist.txt"
        path.write_text("".join(f'"{_quoted(u)}" "{_quoted(s)}"\n' for u, s in entries.items()))
        path.chmod(0o600)
        osuser.own(path)
        self._write_config(target, osuser)

    def _write_config(self, target: _Server, osuser: OsUser) -> None:
        """(Re)write ``pgbouncer.ini`` with the cluster's databases at ``target``, atomically."""
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": str(self.root),
            "auth_type": "scram-sha-256",
            "auth_file": str(self.root / "userlist.txt"),
            "admin_users": SUPERUSER,
            "stats_users": SUPERUSER,
            "pool_mode": self.pool_mode,
            "max_client_conn": "500",
            "default_pool_size": "20",
            "server_connect_timeout": "5",
            "ignore_startup_parameters": "extra_float_digits,options",
            **self.settings,
        }
        databases = "".join(
            f"{db} = host={target.host} port={target.port} dbname={db}\n"
            for db in (self._cluster.dbname, "postgres")
        )
        text = (
            "[databases]\n"
            + databases
            + "\n[pgbouncer]\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        osuser.own(tmp)
        tmp.replace(self.config_path)

    def _spawn(
        self, program: Path | None, osuser: OsUser, *, cwd: Path, env: Mapping[str, str]
    ) -> None:
        """Start ``program`` (None: the cluster was opened without PgBouncer, HarnessError) as
        ``osuser`` and wait, up to the cluster's ``ready_timeout``, until its admin console
        answers; HarnessError with its log tail if it exits meanwhile."""
        if program is None:
            raise HarnessError("this cluster was opened without PgBouncer")
        process = ServerProcess(
            osuser.wrap([str(program), str(self.config_path)]),
            log_path=self.log_path,
            cwd=cwd,
            env=dict(env),
            description="pgbouncer",
        )
        self.process = process

        def check() -> bool | None:
            if not process.running:
                raise HarnessError(
                    "pgbouncer exited during start-up; log tail:\n" + process.log_tail()
                )
            self.admin("SHOW VERSION")
            return True

        _poll("pgbouncer to accept connections", check, self._cluster.ready_timeout)

    def _follower(
        self,
        root: Path,
        source: Sequence[str],
        superuser_password: str,
        interval: float,
        extra: Sequence[str],
    ) -> FollowerProcess:
        """A (not yet started) ``pgbouncer follow`` process for this PgBouncer in ``root``,
        topology from ``source`` (``["--hosts", ...]`` or ``["--patroni", ...]``); the
        superuser's password goes to its passfile, never to its command line."""
        return FollowerProcess(
            root,
            admin_dsn=self.dsn(dbname="pgbouncer", user=SUPERUSER, password=None),
            source=source,
            check_dsn=make_conninfo(dbname="postgres", user=SUPERUSER),
            passwords={SUPERUSER: superuser_password},
            interval=interval,
            extra=extra,
        )

    def _wait_points_at(
        self, node: _Server, timeout: float | None, follower: FollowerProcess | None
    ) -> None:
        """Wait until ``SHOW DATABASES`` has every database of the cluster at ``node``
        (``timeout`` seconds; None: the cluster's ``ready_timeout``); HarnessError past it
        or as soon as ``follower`` has exited."""
        wait_points_at(
            self.admin_dsn(),
            node.host,
            node.port,
            (self._cluster.dbname, "postgres"),
            timeout=timeout or self._cluster.ready_timeout,
            follower=follower,
        )


def _quoted(text: str) -> str:
    """``text`` for a double-quoted ``auth_file`` field (a ``"`` is doubled)."""
    return text.replace('"', '""')


@dataclass(frozen=True)
class _Runtime:
    """What an open cluster found and made: binaries, the server OS user, its directory."""

    bin: PostgresBinaries
    osuser: OsUser
    root: Path
    pgbouncer_bin: Path | None


class _Credentials:
    """The users and database of a harness cluster (LocalCluster, PatroniCluster) and the
    conninfo strings and SQLAlchemy URLs its nodes and PgBouncer hand out (they contain the
    password: never log them)."""

    dbname: str
    user: str
    password: str
    superuser_password: str

    def _dsn(
        self, host: str, port: int | str, *, dbname: str | None, user: str | None, **params: Any
    ) -> str:
        """Conninfo for ``host``/``port``: ``dbname`` and ``user`` None mean the application
        database and user; the password is that user's unless ``params`` has one (None: no
        password in the string, for a passfile); other ``params`` are added as they are."""
        user = user or self.user
        default = self.superuser_password if user == SUPERUSER else self.password
        password = params.pop("password", default)
        return make_conninfo(
            host=host,
            port=str(port),
            dbname=dbname or self.dbname,
            user=user,
            password=password,
            **params,
        )

    def _url(
        self, host: str, port: int, driver: str, *, dbname: str | None, user: str | None
    ) -> str:
        """A SQLAlchemy URL for ``host``/``port`` (see :meth:`Node.url`); ValueError for a
        driver not in :data:`URL_SCHEMES`."""
        scheme = URL_SCHEMES.get(driver)
        if scheme is None:
            raise ValueError(f"driver must be one of {', '.join(URL_SCHEMES)}, got {driver!r}")
        user = user or self.user
        password = self.superuser_password if user == SUPERUSER else self.password

        def quote(part: str) -> str:
            return urllib.parse.quote(part, safe="")

        where = f"[{host}]" if ":" in host else host  # an IPv6 address
        return (
            f"{scheme}://{quote(user)}:{quote(password)}@{where}:{port}/"
            f"{quote(dbname or self.dbname)}"
        )


_open_clusters: set[LocalCluster] = set()
_open_lock = threading.Lock()


class LocalCluster(_Credentials):
    """A primary, ``standbys`` streaming standbys and optionally a PgBouncer, all local.

    Use it as a context manager (or call :meth:`open` and :meth:`close`)::

        with LocalCluster(standbys=1, pgbouncer="transaction") as cluster:
            conn = psycopg.connect(cluster.pgbouncer.dsn(), prepare_threshold=None)
            cluster.failover()

    ``pgbouncer`` is the pool mode, or None for no PgBouncer. ``server_login_retry`` is
    PgBouncer's wait, in seconds (fractions allowed), after a failed server login: until it
    has passed, new clients of that database get an error at once. 0.1 s here, as a
    PgBouncer tuned for fast failover would have: its own default (15 s), or even 1 s,
    dominates every failover timing, since a server login often fails during a failover
    (the old primary shutting down, the new one not yet promoted). ``pgbouncer_settings``
    and ``pg_settings`` add or override settings. ``synchronous`` makes replication
    synchronous (a commit returns once one standby has flushed it): without it, like
    PostgreSQL's default, an ``immediate`` stop or a kill can lose the last acknowledged
    commits. ``follower`` runs the real ``pgfailover pgbouncer follow --hosts`` process
    (:attr:`follower`, log in ``follower/follower.log``) with PgBouncer: :meth:`failover`
    leaves PgBouncer to it, :meth:`wait_pgbouncer_points_at` waits for its repoint, and
    :meth:`reset` waits for it instead of repointing; ``follower_interval`` is its pause
    between rounds, in seconds, ``follower_args`` more ``follow`` arguments (e.g.
    ``["--pause"]``). ``ready_timeout`` bounds every wait, in seconds.
    ``base_dir`` is where the temporary directory goes (system default when None);
    ``keep_dir`` keeps it after close. Addresses: :meth:`Node.dsn` /
    :meth:`PgBouncer.dsn` (libpq conninfo) and :meth:`Node.url` / :meth:`PgBouncer.url`
    (SQLAlchemy URLs); both contain the password, which no repr shows.
    """

    def __init__(
        self,
        *,
        standbys: int = 1,
        synchronous: bool = False,
        pgbouncer: PoolMode | None = "transaction",
        server_login_retry: float = 0.1,
        pgbouncer_settings: Mapping[str, object] | None = None,
        pg_settings: Mapping[str, object] | None = None,
        pg_bindir: str | os.PathLike[str] | None = None,
        pgbouncer_bin: str | os.PathLike[str] | None = None,
        os_user: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        keep_dir: bool = False,
        ready_timeout: float = 60.0,
        dbname: str = "app",
        user: str = "app",
        follower: bool = False,
        follower_interval: float = DEFAULT_INTERVAL,
        follower_args: Sequence[str] = (),
    ) -> None:
        if follower and pgbouncer is None:
            raise ValueError("follower=True needs a PgBouncer to follow (pass pgbouncer=...)")
        if standbys < 0:
            raise ValueError(f"standbys must be >= 0, got {standbys}")
        if pgbouncer not in (None, "session", "transaction", "statement"):
            raise ValueError(
                "pgbouncer must be 'session', 'transaction', 'statement' or None, "
                f"got {pgbouncer!r}"
            )
        if ready_timeout <= 0:
            raise ValueError(f"ready_timeout must be > 0 seconds, got {ready_timeout}")
        self._n_standbys = standbys
        self._pool_mode = pgbouncer
        self._pgb_settings = {
            "server_login_retry": str(server_login_retry),
            **{k: str(v) for k, v in (pgbouncer_settings or {}).items()},
        }
        if synchronous and standbys == 0:
            raise ValueError("synchronous replication needs at least one standby")
        self._pg_settings = {
            **BASE_SETTINGS,
            **({"synchronous_standby_names": "ANY 1 (*)"} if synchronous else {}),
            **{k: str(v) for k, v in (pg_settings or {}).items()},
        }
        self._pg_bindir = pg_bindir
        self._pgbouncer_bin = pgbouncer_bin
        self._os_user_name = os_user
        self._base_dir = base_dir
        self._keep_dir = keep_dir
        self.ready_timeout = ready_timeout
        self.dbname = dbname
        self.user = user
        #: Password of the application user (random per cluster). Never log it.
        self.password = secrets.token_urlsafe(12)
        #: Password of the ``postgres`` superuser (random per cluster). Never log it.
        self.superuser_password = secrets.token_urlsafe(12)
        self.nodes: list[Node] = []
        self.pgbouncer: PgBouncer | None = None
        self._runtime: _Runtime | None = None
        self._primary: Node | None = None
        self._ports: list[int] = []
        self._closed = False
        #: Frozen nodes (by name) and the PIDs :meth:`freeze` stopped, postmaster first.
        self._frozen: dict[str, list[int]] = {}
        self._want_follower = follower
        self._follower_interval = follower_interval
        self._follower_args = tuple(follower_args)
        #: The PgBouncer follower process (``follower=True``), None otherwise.
        self.follower: FollowerProcess | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> Timings:
        """Build and start every server; on any failure everything started so far is ended.

        Raises :class:`HarnessError` if the cluster is already open (``with LocalCluster()``
        opens it).
        """
        if self._runtime is not None:
            raise HarnessError("this cluster is already open (a `with` block opens it)")
        watch = _Stopwatch()
        with _open_lock:
            _open_clusters.add(self)
        try:
            self._open(watch)
        except BaseException:
            self.close()
            raise
        return watch.result()

    def _open(self, watch: _Stopwatch) -> None:
        binaries = find_postgres(self._pg_bindir)
        pgbouncer_bin = find_pgbouncer(self._pgbouncer_bin) if self._pool_mode else None
        osuser = server_user(self._os_user_name)
        root = Path(tempfile.mkdtemp(prefix="pgfailover-", dir=self._base_dir))
        root.chmod(0o700)
        osuser.own(root)
        self._runtime = _Runtime(binaries, osuser, root, pgbouncer_bin)
        self._write_private(
            "pgpass",
            f"*:*:*:{SUPERUSER}:{self.superuser_password}\n*:*:*:{self.user}:{self.password}\n",
        )
        for i in range(self._n_standbys + 1):
            self.nodes.append(self._new_node(f"node{i}"))
        primary = self.nodes[0]
        with watch.phase("initdb"):
            self._initdb(primary)
        with watch.phase("start_primary"):
            self.start(primary)
            self._primary = primary
            self._create_app_database(primary)
        with watch.phase("standbys"):
            for node in self.nodes[1:]:
                self._base_backup(node, primary)
                self._write_standby_config(node, primary)
                self.start(node)
            for node in self.nodes[1:]:
                self._wait_streaming(node, primary)
        if self._pool_mode:
            with watch.phase("pgbouncer"):
                self._start_pgbouncer(self._pool_mode, primary)
            if self._want_follower:
                with watch.phase("follower"):
                    self._start_follower()
        logger.info("local cluster up in %s: %s", root, watch.result())

    def close(self) -> None:
        """End every process this cluster started (by PID) and remove its directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._thaw_all()  # a stopped process would never act on the signals below
        if self.follower is not None:
            self.follower.stop(10)
        procs: list[ServerProcess] = []
        if self.pgbouncer and self.pgbouncer.process:
            self.pgbouncer.process.signal(signal.SIGTERM)
            procs.append(self.pgbouncer.process)
        for node in self.nodes:
            if node.process:
                node.process.signal(signal.SIGQUIT)
                procs.append(node.process)
        for proc in procs:
            if not proc.wait(10) or not proc.wait_group_gone(10):
                proc.kill_group()
        if self._runtime and not self._keep_dir:
            shutil.rmtree(self._runtime.root, ignore_errors=True)
        for port in self._ports:
            release_port(port)
        with _open_lock:
            _open_clusters.discard(self)

    # ------------------------------------------------------------------ addressing
    @property
    def root(self) -> Path | None:
        """The cluster's temporary directory (None before :meth:`open`)."""
        return self._runtime.root if self._runtime else None

    @property
    def bin(self) -> PostgresBinaries | None:
        """The PostgreSQL binaries in use (None before :meth:`open`)."""
        return self._runtime.bin if self._runtime else None

    @property
    def _rt(self) -> _Runtime:
        if self._runtime is None or self._closed:
            raise HarnessError("the cluster is not open: use it in a with-block or call open()")
        return self._runtime

    @property
    def primary(self) -> Node:
        """The node the cluster made primary last (see :meth:`role` for the live truth)."""
        if self._primary is None:
            raise HarnessError("the cluster is not open")
        return self._primary

    @property
    def standbys(self) -> list[Node]:
        """Every node but the primary."""
        return [n for n in self.nodes if n is not self._primary]

    def node(self, name: str) -> Node:
        """The node called ``name`` (``node0``, ``node1``, ...)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}; nodes are {[n.name for n in self.nodes]}")

    def multihost_dsn(self, *, dbname: str | None = None, **params: Any) -> str:
        """Conninfo listing every node (``host=a,b port=x,y``); add e.g. target_session_attrs."""
        hosts = ",".join(n.host for n in self.nodes)
        ports = ",".join(str(n.port) for n in self.nodes)
        return self._dsn(hosts, ports, dbname=dbname, user=None, **params)

    # ------------------------------------------------------------------ node operations
    def role(self, node: Node) -> Role:
        """The node's live role: ``primary``, ``standby``, or ``down`` (stopped or unreachable)."""
        if not node.running:
            return "down"
        try:
            with node.connect(connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.OperationalError:
            return "down"
        return "standby" if row and row[0] else "primary"

    def start(self, node: Node) -> Timings:
        """Start ``node`` (a no-op if it runs) and wait until it accepts connections."""
        watch = _Stopwatch()
        if node.running:
            return watch.result()
        node.socket_dir.mkdir(exist_ok=True)
        self._rt.osuser.own(node.socket_dir)
        argv = [
            self._rt.bin.path("postgres"),
            "-D",
            str(node.datadir),
            "-p",
            str(node.port),
            "-k",
            str(node.socket_dir),
            "-c",
            f"cluster_name={node.name}",
        ]
        with watch.phase("start"):
            node.process = ServerProcess(
                self._rt.osuser.wrap(argv),
                log_path=node.log_path,
                cwd=self._rt.root,
                env=self._env(),
                description=f"postgres {node.name}",
            )
            self._wait_accepting(node)
        return watch.result()

    def stop(self, node: Node, mode: StopMode = "fast") -> Timings:
        """Stop ``node`` with a ``smart``, ``fast`` or ``immediate`` shutdown; wait for the exit."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"stop mode must be smart, fast or immediate, got {mode!r}")
        watch = _Stopwatch()
        with watch.phase("stop"):
            self._thaw_quietly(node)  # a frozen server would never act on the signal
            if node.process and node.running:
                node.process.stop(_STOP_SIGNALS[mode], timeout=self.ready_timeout)
        return watch.result()

    def kill(self, node: Node) -> Timings:
        """SIGKILL the postmaster of ``node`` (a crash) and wait until its children are gone."""
        watch = _Stopwatch()
        with watch.phase("kill"):
            if node.process and node.running:
                node.process.signal(signal.SIGKILL)
                self._thaw_quietly(node)  # frozen children would never see their parent die
                node.process.wait(self.ready_timeout)
                if not node.process.wait_group_gone(self.ready_timeout):
                    node.process.kill_group()
        return watch.result()

    def freeze(self, node: Node) -> Timings:
        """Freeze ``node`` as a hung machine would: SIGSTOP its postmaster, then every process
        under it (backends, WAL sender or receiver, background workers).

        The server keeps its sockets, so the kernel still accepts new TCP connections and
        acknowledges every byte sent, but nothing answers: a statement in flight waits, a
        new connection gets no start-up reply. :meth:`thaw` resumes it; :meth:`reset`,
        :meth:`stop`, :meth:`kill` and :meth:`close` thaw it first, so no teardown waits on
        a stopped process. Freezing a frozen node is a no-op; HarnessError if ``node`` is
        not running. Phase: ``freeze``.
        """
        watch = _Stopwatch()
        with watch.phase("freeze"):
            if node.name in self._frozen:
                return watch.result()
            pid = node.pid
            if pid is None:
                raise HarnessError(f"{node.name} is not running: there is nothing to freeze")
            stopped = [pid]
            self._frozen[node.name] = stopped
            os.kill(pid, signal.SIGSTOP)  # first: a stopped postmaster forks no new child
            # A child forked just before the stop appears in a later scan: scan until none is
            # new (a stopped process cannot fork, so this ends).
            while fresh := [p for p in _descendants(pid) if p not in stopped]:
                for child in fresh:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGSTOP)
                    stopped.append(child)
        return watch.result()

    def thaw(self, node: Node) -> Timings:
        """Resume a node :meth:`freeze` stopped (SIGCONT to every process it stopped and any
        process now under the postmaster); it answers again at once. A no-op if the node is
        not frozen. Phase: ``thaw``."""
        watch = _Stopwatch()
        with watch.phase("thaw"):
            self._thaw_quietly(node)
        return watch.result()

    def frozen(self, node: Node) -> bool:
        """Whether ``node`` is frozen (by :meth:`freeze`, not thawed since)."""
        return node.name in self._frozen

    def promote(self, node: Node) -> Timings:
        """Promote the standby ``node`` and wait until it accepts writes; it becomes ``primary``."""
        watch = _Stopwatch()
        with watch.phase("promote"):
            with node.connect() as conn:
                # pg_promote(wait => true) polls every 100 ms; polling ourselves measures
                # tighter.
                conn.execute("SELECT pg_promote(false)")
            polling: list[Conn] = []

            def writable() -> bool | None:
                # The server ends every session when promotion fails (its startup process
                # PANICs and the postmaster shuts down): say so with the log, at once.
                if not node.running:
                    raise HarnessError(
                        f"postgres {node.name} exited while it was promoted; log tail:\n"
                        + (node.process.log_tail() if node.process else "")
                    )
                if not polling or polling[0].closed:
                    if polling:
                        polling.pop().close()
                    polling.append(node.connect())
                return self._writable(polling[0])

            try:
                _poll(f"{node.name} to accept writes", writable, self.ready_timeout, interval=0.005)
            finally:
                for conn in polling:
                    conn.close()
        self._primary = node
        return watch.result()

    def rejoin(self, node: Node, primary: Node | None = None) -> Timings:
        """Make ``node`` a streaming standby of ``primary`` (default: the current primary).

        Stops it if it runs, rewinds it with ``pg_rewind`` after a CHECKPOINT on the primary,
        falls back to a fresh base backup when rewinding fails, writes ``standby.signal`` and
        ``primary_conninfo``, starts it and waits until it streams.
        """
        primary = primary or self.primary
        if node is primary:
            raise HarnessError(f"{node.name} cannot rejoin itself as a standby")
        watch = _Stopwatch()
        if node.running:
            with watch.phase("stop"):
                self.stop(node, "fast")
        with watch.phase("rewind"):
            with primary.connect() as conn:
                conn.execute("CHECKPOINT")
            watch.notes["rejoin"] = self._rewind_or_clone(node, primary)
        with watch.phase("start"):
            self._write_standby_config(node, primary)
            self.start(node)
        with watch.phase("streaming"):
            self._wait_streaming(node, primary)
        return watch.result()

    def failover(self, stop_mode: StopMode = "fast", *, target: Node | None = None) -> Timings:
        """The realistic failover: stop the primary, promote a standby until it accepts writes,
        point the other standbys at it, and bring the old primary back as its standby.

        PgBouncer is left untouched (it still points at the old primary, now a standby,
        until the follower, with ``follower=True``, repoints it). Phases: ``stop``,
        ``promote`` (until writable), ``rejoin``.
        """
        old = self.primary
        target = target or self._first_standby()
        if target is old:
            raise HarnessError(f"{target.name} is already the primary")
        watch = _Stopwatch()
        with watch.phase("stop"):
            self.stop(old, stop_mode)
        with watch.phase("promote"):
            self.promote(target)
        with watch.phase("rejoin"):
            for other in self.nodes:
                if other not in (old, target):
                    self._follow(other, target)
            rejoined = self.rejoin(old, target)
        watch.notes.update(rejoined.notes)
        return watch.result()

    def switchover(self, target: Node | None = None, *, repoint_pgbouncer: bool = False) -> Timings:
        """Planned role swap: like :meth:`failover` with a fast stop, then optionally repoint
        PgBouncer at the new primary. Two switchovers restore the original topology."""
        watch = _Stopwatch()
        with watch.phase("failover"):
            timings = self.failover("fast", target=target)
        if repoint_pgbouncer and self.pgbouncer:
            with watch.phase("repoint"):
                if self.follower is not None:
                    self.wait_pgbouncer_points_at(self.primary)
                else:
                    self.repoint_pgbouncer(self.primary)
        watch.notes.update(timings.notes)
        return watch.result()

    def wait_pgbouncer_points_at(self, node: Node, timeout: float | None = None) -> Timings:
        """Wait until PgBouncer's ``SHOW DATABASES`` has every database at ``node`` (the
        follower's repoint, with ``follower=True``); then PgBouncer's ``target`` is ``node``.

        Polls with a deadline of ``timeout`` seconds (None: ``ready_timeout``);
        :class:`HarnessError` past it, or as soon as the follower process has exited (with
        its log tail). Phase: ``follow``.
        """
        if self.pgbouncer is None:
            raise HarnessError("this cluster has no PgBouncer (pass pgbouncer='transaction')")
        watch = _Stopwatch()
        with watch.phase("follow"):
            self.pgbouncer._wait_points_at(node, timeout, self.follower)
            self.pgbouncer.target = node
        return watch.result()

    def repoint_pgbouncer(self, node: Node) -> Timings:
        """Point PgBouncer's databases at ``node`` and RELOAD it through the admin console."""
        if self.pgbouncer is None:
            raise HarnessError("this cluster has no PgBouncer (pass pgbouncer='transaction')")
        watch = _Stopwatch()
        with watch.phase("reload"):
            self.pgbouncer.target = node
            self._write_pgbouncer_config(self.pgbouncer, node)
            self.pgbouncer.admin("RELOAD")
        return watch.result()

    def wait_replicated(self, timeout: float | None = None) -> Timings:
        """Wait until every running standby has replayed all WAL the primary has written so far."""
        watch = _Stopwatch()
        timeout = timeout or self.ready_timeout
        with watch.phase("replicate"), self.primary.connect() as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            lsn = row[0]
            for node in self.standbys:
                if node.running:
                    _poll(
                        f"{node.name} to replay {lsn}",
                        functools.partial(self._replayed, node, lsn),
                        timeout,
                    )
        return watch.result()

    def reset(self) -> Timings:
        """Restore the known topology cheaply: every node running, ``node0`` primary, the others
        its streaming standbys, PgBouncer running and pointing at ``node0``.

        Frozen nodes are thawed first. On return every standby streams from ``node0`` on its
        timeline and has written the WAL ``node0`` had written (so it can be promoted at
        once); each wait is bounded by ``ready_timeout`` and a HarnessError names the node
        that did not get there. Costs a few queries per node when the topology is already
        right.
        """
        watch = _Stopwatch()
        if self._frozen:
            with watch.phase("thaw"):
                self._thaw_all()
        home = self.nodes[0]
        roles = {n.name: self.role(n) for n in self.nodes}
        primaries = [n for n in self.nodes if roles[n.name] == "primary"]
        keep = home if home in primaries else (primaries[0] if primaries else None)
        if keep is None:
            with watch.phase("promote"):
                self.start(home)
                self._wait_accepting(home)  # it may have been running, still starting up
                if self.role(home) == "standby":
                    self.promote(home)
                keep = home
        self._primary = keep
        for node in self.nodes:
            if node is keep:
                continue
            if (
                not node.running
                or roles[node.name] != "standby"
                or not self._streams_from(node, keep)
            ):
                with watch.phase("rejoin"):
                    self.rejoin(node, keep)
        if keep is not home:
            with watch.phase("switchover"):
                self.failover("fast", target=home)
        with watch.phase("streaming"):
            # the followers a failover re-pointed, and standbys that were fine but behind
            for node in self.standbys:
                self._wait_streaming(node, home)
        if self.pgbouncer:
            with watch.phase("pgbouncer"):
                if not self.pgbouncer.running:
                    self.pgbouncer.target = home
                    self._write_pgbouncer_config(self.pgbouncer, home)
                    self._spawn_pgbouncer(self.pgbouncer)
                elif self.follower is not None:
                    self._start_follower()  # a no-op while it runs
                    self.wait_pgbouncer_points_at(home)
                elif self.pgbouncer.target is not home:
                    self.repoint_pgbouncer(home)
        return watch.result()

    # ------------------------------------------------------------------ internals
    def _thaw_quietly(self, node: Node) -> None:
        stopped = self._frozen.pop(node.name, None)
        if stopped is None:
            return
        # Whatever the postmaster forked meanwhile is resumed too (none should exist).
        pids = stopped + [p for p in _descendants(stopped[0]) if p not in stopped]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _thaw_all(self) -> None:
        for node in self.nodes:
            self._thaw_quietly(node)

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(self._rt.root),
            "PGPASSFILE": str(self._rt.root / "pgpass"),
        }

    def _run(self, argv: list[str], what: str) -> None:

        result = subprocess.run(
            self._rt.osuser.wrap(argv),
            cwd=self._rt.root,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=max(self.ready_timeout, 120),
            check=False,
        )
        if result.returncode != 0:
            raise HarnessError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()}")

    def _write_private(self, name: str, text: str) -> Path:
        path = self._rt.root / name
        path.write_text(text)
        path.chmod(0o600)
        self._rt.osuser.own(path)
        return path

    def _new_node(self, name: str) -> Node:
        port = reserve_port()
        self._ports.append(port)
        root = self._rt.root / name
        root.mkdir(mode=0o700)
        self._rt.osuser.own(root)
        return Node(self, name, port, root)

    def _initdb(self, node: Node) -> None:
        pwfile = self._write_private("pwfile", self.superuser_password + "\n")
        self._run(
            [
                self._rt.bin.path("initdb"),
                "-D",
                str(node.datadir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            "initdb",
        )
        pwfile.unlink()
        conf = "".join(f"{k} = '{v}'\n" for k, v in self._pg_settings.items())
        with open(node.datadir / "postgresql.conf", "a") as f:
            f.write("\n# pgfailover test harness\n" + conf)

    def _create_app_database(self, node: Node) -> None:
        # No standby exists yet: with synchronous replication a commit would wait forever.
        local = "-c synchronous_commit=local"
        with node.connect(options=local) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(self.user), sql.Literal(self.password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.dbname), sql.Identifier(self.user)
                )
            )
        with psycopg.connect(
            node.dsn(user=SUPERUSER), autocommit=True, connect_timeout=5, options=local
        ) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def _base_backup(self, node: Node, source: Node) -> None:
        if node.datadir.exists():
            shutil.rmtree(node.datadir)
        self._run(
            [
                self._rt.bin.path("pg_basebackup"),
                "-D",
                str(node.datadir),
                "-h",
                source.host,
                "-p",
                str(source.port),
                "-U",
                SUPERUSER,
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            f"pg_basebackup of {node.name} from {source.name}",
        )

    def _rewind_or_clone(self, node: Node, source: Node) -> str:
        try:
            self._run(
                [
                    self._rt.bin.path("pg_rewind"),
                    f"--target-pgdata={node.datadir}",
                    f"--source-server=host={source.host} port={source.port} user={SUPERUSER} "
                    "dbname=postgres",
                    "--no-sync",
                ],
                f"pg_rewind of {node.name} from {source.name}",
            )
        except HarnessError as ex:
            logger.info("%s; falling back to a fresh base backup", ex)
            self._base_backup(node, source)
            return "pg_basebackup"
        return "pg_rewind"

    def _write_standby_config(self, node: Node, primary: Node) -> None:
        (node.datadir / "standby.signal").touch()
        self._rt.osuser.own(node.datadir / "standby.signal")
        auto = node.datadir / "postgresql.auto.conf"
        lines = [
            line
            for line in (auto.read_text().splitlines() if auto.exists() else [])
            if not line.startswith(("primary_conninfo", "primary_slot_name"))
        ]
        lines.append(f"primary_conninfo = '{self._primary_conninfo(node, primary)}'")
        auto.write_text("\n".join(lines) + "\n")
        self._rt.osuser.own(auto)

    def _primary_conninfo(self, node: Node, primary: Node) -> str:
        return (
            f"host={primary.host} port={primary.port} user={SUPERUSER} "
            f"passfile={self._rt.root / 'pgpass'} application_name={node.name}"
        )

    def _follow(self, node: Node, primary: Node) -> None:
        """Point a running standby at a new primary without restarting it (PG13+)."""
        if not node.running:
            return
        with node.connect() as conn:
            conn.execute(
                f"ALTER SYSTEM SET primary_conninfo = '{self._primary_conninfo(node, primary)}'"
            )
            conn.execute("SELECT pg_reload_conf()")

    def _first_standby(self) -> Node:
        for node in self.standbys:
            if node.running:
                return node
        raise HarnessError("no running standby to promote")

    def _wait_accepting(self, node: Node) -> None:
        def check() -> bool | None:
            assert node.process
            if not node.process.running:
                raise HarnessError(
                    f"postgres {node.name} exited during start-up; log tail:\n"
                    + node.process.log_tail()
                )
            with node.connect(connect_timeout=2):
                return True

        _poll(f"{node.name} to accept connections", check, self.ready_timeout)

    @staticmethod
    def _writable(conn: Conn) -> bool | None:
        try:
            conn.execute("SELECT pg_current_xact_id()")  # needs an xid: fails on a standby
        except psycopg.errors.ReadOnlySqlTransaction:
            return None
        return True

    def _wait_streaming(self, node: Node, primary: Node) -> None:
        """Wait until ``node`` streams from ``primary``, on its timeline, and has written the
        WAL ``primary`` had written when the wait began; HarnessError naming ``node`` and what
        it last showed after ``ready_timeout``.

        A status of ``streaming`` alone is not enough: a standby that moves to a new timeline
        streams the current segment again from its start, and promoted before it is done,
        PostgreSQL (15 at least) PANICs re-reading its last record from that partly written
        segment file ("invalid magic number 0000") and shuts down. The measure is the greater
        of ``written_lsn`` and ``flushed_lsn``: a restarted WAL receiver that streams again
        what it had already replayed leaves ``flushed_lsn`` at the segment's start until new
        WAL comes, which an idle primary never sends, and one that starts at the primary's
        position exactly (a segment boundary) writes nothing: ``written_lsn`` stays NULL.
        """
        with primary.connect(connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT pg_walfile_name(lsn), lsn::text FROM pg_current_wal_lsn() AS lsn"
            ).fetchone()
        assert row is not None
        timeline, lsn = int(row[0][:8], 16), row[1]
        seen: list[str] = []

        def check() -> bool | None:
            if not node.running:
                raise HarnessError(
                    f"postgres {node.name} exited while it was to stream from {primary.name}; "
                    "log tail:\n" + (node.process.log_tail() if node.process else "")
                )
            with node.connect(connect_timeout=2) as conn:
                got = conn.execute(
                    "SELECT status, sender_port, received_tli, "
                    "GREATEST(written_lsn, flushed_lsn)::text, "
                    "GREATEST(written_lsn, flushed_lsn) >= %s::pg_lsn FROM pg_stat_wal_receiver",
                    [lsn],
                ).fetchone()
            if got is None:
                seen[:] = ["no WAL receiver"]
                return None
            status, port, tli, written, caught_up = got
            seen[:] = [f"{status} from port {port}, timeline {tli}, written {written}"]
            ok = status == "streaming" and port == primary.port and tli == timeline
            return True if ok and caught_up else None

        try:
            _poll(f"{node.name} to stream WAL", check, self.ready_timeout)
        except HarnessError as ex:
            if not seen or not node.running:  # no answer at all, or the server exited
                raise
            raise HarnessError(
                f"{node.name} did not catch up with {primary.name} within "
                f"{self.ready_timeout:.1f}s: wanted streaming from port {primary.port}, "
                f"timeline {timeline}, written {lsn}; last seen: {seen[0]} ({ex})"
            ) from None

    def _streams_from(self, node: Node, primary: Node) -> bool:
        try:
            with node.connect(connect_timeout=2) as conn:
                row = conn.execute(
                    "SELECT status, sender_port FROM pg_stat_wal_receiver"
                ).fetchone()
        except psycopg.OperationalError:
            return False
        return bool(row and row[0] == "streaming" and row[1] == primary.port)

    def _replayed(self, node: Node, lsn: str) -> bool | None:
        with node.connect(connect_timeout=2) as conn:
            row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [lsn]).fetchone()
            return True if row and row[0] else None

    # ------------------------------------------------------------------ PgBouncer
    def _start_pgbouncer(self, pool_mode: PoolMode, target: Node) -> None:
        port = reserve_port()
        self._ports.append(port)
        root = self._rt.root / "pgbouncer"
        bouncer = PgBouncer(self, port, root, pool_mode, self._pgb_settings)
        bouncer.target = target
        self.pgbouncer = bouncer
        passwords = {SUPERUSER: self.superuser_password, self.user: self.password}
        bouncer._configure(target, passwords, self._rt.osuser)
        self._spawn_pgbouncer(bouncer)

    def _spawn_pgbouncer(self, bouncer: PgBouncer) -> None:
        bouncer._spawn(self._rt.pgbouncer_bin, self._rt.osuser, cwd=self._rt.root, env=self._env())

    def _start_follower(self) -> None:
        """Start the follower process of ``follower=True`` (a no-op while it runs)."""
        assert self.pgbouncer is not None
        if self.follower is None:
            self.follower = self.pgbouncer._follower(
                self._rt.root / "follower",
                ["--hosts", ",".join(n.address for n in self.nodes)],
                self.superuser_password,
                self._follower_interval,
                self._follower_args,
            )
        self.follower.start(self.ready_timeout)

    def _write_pgbouncer_config(self, bouncer: PgBouncer, target: Node) -> None:
        bouncer._write_config(target, self._rt.osuser)

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name}@{n.port}" for n in self.nodes)
        return f"<LocalCluster [{nodes}] primary={self._primary and self._primary.name}>"


def _descendants(pid: int) -> list[int]:
    """PIDs of every live process under ``pid`` (children, their children...), parents
    first, found by scanning ``/proc`` for parent PIDs. Only the harness's own servers are
    ever looked up, so only processes it started are found."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def _close_open_clusters() -> None:
    with _open_lock:
        clusters = list(_open_clusters)
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.close()


atexit.register(_close_open_clusters)
