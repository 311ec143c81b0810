"""A real Patroni cluster (etcd + Patroni-managed PostgreSQL nodes) for tests.

:class:`PatroniCluster` starts a single-member etcd 3.4 and ``nodes`` Patroni members (each one
PostgreSQL server) on free loopback ports in a temporary directory, optionally with a PgBouncer
in front of the leader, and produces Patroni's own failovers on demand::

    with PatroniCluster(nodes=3, synchronous_mode=True) as cluster:
        leader = cluster.leader()
        timings = cluster.kill_leader()      # SIGKILL of Patroni + postmaster; back once the
        print(timings)                       # new leader takes writes: killed/elected/writable
        cluster.heal(leader)                 # restart its Patroni: it rejoins (pg_rewind)
        cluster.switchover(candidate=leader) # POST /switchover through the REST API

Operations wait until they are done, polling with a deadline (``ready_timeout`` unless told
otherwise); a wait that runs out raises :class:`PatroniTimeout` naming what was awaited. Each
returns the time its phases took as :class:`~pgfailover.testing.Timings`.

Fault model: :meth:`PatroniCluster.kill_leader` is a crash of the leader's Patroni and
postmaster (a new leader appears once its leader lease expires, about ``ttl`` seconds);
:meth:`~PatroniCluster.freeze` / :meth:`~PatroniCluster.thaw` stop and continue every process
of a node (a hung machine: a frozen leader loses leadership after about ``ttl``, and once thawed
Patroni demotes it); :meth:`~PatroniCluster.heal` brings a killed or frozen node back as a
replica; :meth:`~PatroniCluster.reset` heals every node.

Profile: ``ttl=10, loop_wait=1, retry_timeout=3`` by default (Patroni's own defaults are
30/10/10). Patroni 3.0.2 enforces no minimum; keep ``loop_wait + 2 * retry_timeout <= ttl``
(checked here) and, for Patroni 4, ``ttl >= 20``. ``use_pg_rewind`` is on.

Users and addresses follow :class:`~pgfailover.testing.LocalCluster`: the superuser ``postgres``
and the application user (``app``, owner of database ``app``) have random passwords;
:meth:`PatroniNode.dsn`, :meth:`PatroniCluster.multihost_dsn` and PgBouncer's ``dsn()`` give
conninfo strings for them (they contain the password: never log them). Replication uses a
``replicator`` user of Patroni's.

Teardown: every process this cluster started (etcd, Patroni, every postgres process, PgBouncer)
is ended on :meth:`PatroniCluster.close`, on exit from the ``with`` block, when :meth:`open`
fails part way, and at interpreter exit. Patroni starts the postmaster in a session of its
own, so teardown finds processes by their working directory and command line under the
cluster's directory rather than by process group (:meth:`PatroniCluster.pids`).

Needs Linux (``/proc``), the PostgreSQL server programs, ``patroni`` (3.x, with the etcd3
DCS) and ``etcd`` (3.4+); ``scripts/ensure-system-deps`` installs them on Debian. As root,
every server runs as the harness's unprivileged OS user.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import psycopg
from psycopg import sql

from ._binaries import PostgresBinaries, find_pgbouncer, find_postgres
from ._etcd import Etcd, find_etcd
from ._follower import DEFAULT_INTERVAL, FollowerProcess
from ._osuser import OsUser, server_user
from ._ports import release_port, reserve_port
from ._process import ServerProcess
from .cluster import (
    BASE_SETTINGS,
    HOST,
    SUPERUSER,
    Conn,
    PgBouncer,
    PoolMode,
    Timings,
    _Credentials,
    _Stopwatch,
)
from .errors import BinariesNotFound, HarnessError

logger = logging.getLogger("pgfailover.testing")

REPLICATION_USER = "replicator"
_POLL = 0.05
_REST_TIMEOUT = 2.0
T = TypeVar("T")


class PatroniError(HarnessError):
    """Patroni did not do as asked (a refused switchover, no leader to act on, ...)."""


class PatroniTimeout(PatroniError):
    """A state the harness waited for was not reached in time; the message names it."""


# ---------------------------------------------------------------------- processes (/proc)
def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``T``, ``Z``...), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _pids_under(root: Path) -> list[int]:
    """Live processes whose working directory or an argument lies in ``root``.

    That is every process a cluster started: postgres processes work in their data directory,
    Patroni, etcd and PgBouncer in the cluster's, and each names a file in it on its command
    line. Processes this one cannot inspect (another user's, when not root) are skipped.
    """
    base = str(root)
    prefix = base + os.sep
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        ours = cwd == base or cwd.startswith(prefix)
        if not ours:
            ours = any(arg == base or prefix in arg for arg in _cmdline(pid))
        if ours and _alive(pid):
            found.append(pid)
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def find_patroni(path: str | os.PathLike[str] | None = None) -> Path:
    """Find the ``patroni`` program: ``path``, ``$PGFAILOVER_PATRONI``, ``PATH``, /usr/bin."""
    explicit = path or os.environ.get("PGFAILOVER_PATRONI")
    if explicit:
        if not Path(explicit).is_file():
            raise BinariesNotFound(f"Patroni program {explicit} does not exist")
        return Path(explicit)
    found = shutil.which("patroni") or (
        "/usr/bin/patroni" if Path("/usr/bin/patroni").is_file() else None
    )
    if found is None:
        raise BinariesNotFound(
            "patroni not found: install it (Debian: apt-get install patroni, or run "
            "scripts/ensure-system-deps) or set PGFAILOVER_PATRONI"
        )
    return Path(found)


def _poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = _POLL) -> T:
    """Call ``check`` until it returns something other than None.

    Connection, HTTP and decoding errors count as "not yet"; :class:`PatroniTimeout` after
    ``timeout`` seconds names ``what`` and the last such error. Other exceptions propagate.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
        except (psycopg.Error, OSError, http.client.HTTPException, ValueError) as ex:
            last_error, result = ex, None
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise PatroniTimeout(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


def _http(
    url: str, method: str = "GET", body: Mapping[str, object] | None = None, timeout: float = 2.0
) -> tuple[int, Any]:
    """``(status, body)`` of a request to a Patroni REST API; the body is decoded JSON when it
    parses, else text. A 4xx/5xx answer is returned, not raised; no answer raises OSError."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - loopback http URLs we built
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as ex:
        status, raw = ex.code, ex.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


# ---------------------------------------------------------------------- members and nodes
@dataclass(frozen=True)
class Member:
    """One member as Patroni's ``GET /cluster`` lists it.

    ``role``: ``leader``, ``replica``, ``sync_standby`` (or ``standby_leader``); ``state``:
    ``running``, ``streaming`` (Patroni 4), ``starting``, ``stopped``, ``crashed``...;
    ``timeline`` None when not reported; ``lag`` in bytes, None for the leader and when
    Patroni reports it ``unknown``. ``raw`` is Patroni's entry as is.
    """

    name: str
    role: str
    state: str
    host: str
    port: int
    api_url: str
    timeline: int | None
    lag: int | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> Member:
        """A :class:`Member` from one entry of ``/cluster``'s ``members`` list."""
        lag = entry.get("lag")
        timeline = entry.get("timeline")
        return cls(
            name=str(entry["name"]),
            role=str(entry.get("role", "")),
            state=str(entry.get("state", "")),
            host=str(entry.get("host", "")),
            port=int(entry.get("port", 0)),
            api_url=str(entry.get("api_url", "")),
            timeline=timeline if isinstance(timeline, int) else None,
            lag=lag if isinstance(lag, int) else None,
            raw=dict(entry),
        )


class PatroniNode:
    """One Patroni member of a :class:`PatroniCluster` and the PostgreSQL server it manages."""

    def __init__(
        self, cluster: PatroniCluster, name: str, port: int, rest_port: int, root: Path
    ) -> None:
        self._cluster = cluster
        self.name = name
        self.host = HOST
        self.port = port
        self.rest_port = rest_port
        self.root = root
        self.datadir = root / "data"
        self.socket_dir = root / "socket"
        self.config_path = root / "patroni.yml"
        #: Patroni's log; the postmaster's own output goes there too.
        self.log_path = root / "patroni.log"
        self.process: ServerProcess | None = None
        #: True between :meth:`PatroniCluster.freeze` and :meth:`PatroniCluster.thaw`.
        self.frozen = False
        #: True between :meth:`PatroniCluster.kill_leader` and :meth:`PatroniCluster.heal`.
        self.killed = False

    @property
    def address(self) -> str:
        """``host:port`` of the node's PostgreSQL."""
        return f"{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        """Base URL of the node's Patroni REST API, ``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.rest_port}"

    @property
    def running(self) -> bool:
        """Whether the node's Patroni process runs (frozen counts as running)."""
        return self.process is not None and self.process.running

    @property
    def patroni_pid(self) -> int | None:
        """PID of the node's Patroni, None when it is not running."""
        return self.process.pid if self.process is not None and self.running else None

    @property
    def postmaster_pid(self) -> int | None:
        """PID of the node's postmaster, None when none runs (read from ``postmaster.pid``)."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        if not _alive(pid) or str(self.datadir) not in _cmdline(pid):
            return None
        return pid

    def pids(self) -> list[int]:
        """Live PIDs of the node: Patroni, its helpers and every postgres process."""
        return _pids_under(self.root)

    def dsn(self, *, dbname: str | None = None, user: str | None = None, **params: Any) -> str:
        """A libpq conninfo string for this node (application user and database by default).

        It contains the password: pass it to a driver, never log it.
        """
        return self._cluster._dsn(self.host, self.port, dbname=dbname, user=user, **params)

    def url(
        self, driver: str = "psycopg", *, dbname: str | None = None, user: str | None = None
    ) -> str:
        """A SQLAlchemy URL for this node, as :meth:`pgfailover.testing.Node.url` (it contains
        the password: never log it)."""
        return self._cluster._url(self.host, self.port, driver, dbname=dbname, user=user)

    def connect(self, *, superuser: bool = True, **kwargs: Any) -> Conn:
        """An autocommit psycopg connection to this node (superuser ``postgres`` by default)."""
        conninfo = self.dsn(dbname="postgres", user=SUPERUSER) if superuser else self.dsn()
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(conninfo, **kwargs)

    def api(
        self,
        path: str,
        method: str = "GET",
        body: Mapping[str, object] | None = None,
        *,
        timeout: float = _REST_TIMEOUT,
    ) -> tuple[int, Any]:
        """Call the node's REST API: ``(status, body)``, the body decoded from JSON when it is
        JSON. 4xx/5xx answers are returned; no answer within ``timeout`` seconds raises
        OSError (a frozen node accepts the connection and never answers)."""
        return _http(self.rest_url + path, method, body, timeout)

    def __repr__(self) -> str:
        if self.frozen:
            state = "frozen"
        elif self.killed:
            state = "killed"
        elif self.running:
            state = f"patroni pid {self.patroni_pid}"
        else:
            state = "stopped"
        return f"<PatroniNode {self.name} {self.address} api {self.rest_port} {state}>"


@dataclass(frozen=True)
class _Runtime:
    bin: PostgresBinaries
    osuser: OsUser
    root: Path
    patroni_bin: Path
    etcd_bin: Path
    pgbouncer_bin: Path | None


_open_clusters: set[PatroniCluster] = set()
_open_lock = threading.Lock()


class PatroniCluster(_Credentials):
    """etcd + ``nodes`` Patroni-managed PostgreSQL servers (+ optionally PgBouncer), all local.

    ``nodes`` members (at least 1; 2 with ``synchronous_mode``). ``ttl``, ``loop_wait`` and
    ``retry_timeout`` are Patroni's DCS settings in whole seconds (``loop_wait + 2 *
    retry_timeout <= ttl``); a leader crash costs about ``ttl``. ``synchronous_mode`` turns on
    Patroni's synchronous mode (a commit waits for the synchronous standby; failover goes to
    it only). ``pgbouncer`` is a pool mode to put a PgBouncer in front of the leader, or None;
    ``server_login_retry`` and ``pgbouncer_settings`` as in :class:`LocalCluster`.
    ``follower`` (with ``pgbouncer``) runs the real ``pgfailover pgbouncer follow --patroni``
    process (:attr:`follower`, log in ``follower/follower.log``), watching every member's
    REST API: nothing here repoints PgBouncer then (:meth:`reset` waits for the follower,
    as :meth:`wait_pgbouncer_points_at` does); ``follower_interval`` is its pause between
    rounds, in seconds, ``follower_args`` more ``follow`` arguments (e.g. ``["--pause"]``).
    ``pg_settings`` add or override PostgreSQL settings (in Patroni's DCS configuration).
    ``ready_timeout`` bounds each wait, in seconds. ``base_dir``: where the temporary directory
    goes (system default when None); ``keep_dir`` keeps it after close. ``scope`` is Patroni's
    cluster name. Programs are found automatically unless given (``pg_bindir``,
    ``patroni_bin``, ``etcd_bin``, ``pgbouncer_bin`` or ``$PGFAILOVER_PG_BINDIR``,
    ``$PGFAILOVER_PATRONI``, ``$PGFAILOVER_ETCD``, ``$PGFAILOVER_PGBOUNCER``).
    """

    def __init__(
        self,
        *,
        nodes: int = 3,
        synchronous_mode: bool = False,
        ttl: int = 10,
        loop_wait: int = 1,
        retry_timeout: int = 3,
        pgbouncer: PoolMode | None = None,
        server_login_retry: float = 0.1,
        pgbouncer_settings: Mapping[str, object] | None = None,
        pg_settings: Mapping[str, object] | None = None,
        pg_bindir: str | os.PathLike[str] | None = None,
        patroni_bin: str | os.PathLike[str] | None = None,
        etcd_bin: str | os.PathLike[str] | None = None,
        pgbouncer_bin: str | os.PathLike[str] | None = None,
        os_user: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        keep_dir: bool = False,
        ready_timeout: float = 60.0,
        dbname: str = "app",
        user: str = "app",
        scope: str = "pgfailover",
        follower: bool = False,
        follower_interval: float = DEFAULT_INTERVAL,
        follower_args: Sequence[str] = (),
    ) -> None:
        if follower and pgbouncer is None:
            raise ValueError("follower=True needs a PgBouncer to follow (pass pgbouncer=...)")
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        if synchronous_mode and nodes < 2:
            raise ValueError("synchronous_mode needs at least 2 nodes")
        for name, value in (("ttl", ttl), ("loop_wait", loop_wait)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}")
        if not isinstance(retry_timeout, int) or retry_timeout < 1:
            raise ValueError(
                f"retry_timeout must be a whole number of seconds >= 1, got {retry_timeout!r}"
            )
        if loop_wait + 2 * retry_timeout > ttl:
            raise ValueError(
                f"loop_wait + 2 * retry_timeout must be <= ttl (Patroni's rule), got "
                f"{loop_wait} + 2 * {retry_timeout} > {ttl}: raise ttl or lower the others"
            )
        if pgbouncer not in (None, "session", "transaction", "statement"):
            raise ValueError(
                "pgbouncer must be 'session', 'transaction', 'statement' or None, "
                f"got {pgbouncer!r}"
            )
        if ready_timeout <= 0:
            raise ValueError(f"ready_timeout must be > 0 seconds, got {ready_timeout}")
        self.n_nodes = nodes
        self.synchronous_mode = synchronous_mode
        self.ttl = ttl
        self.loop_wait = loop_wait
        self.retry_timeout = retry_timeout
        self._pool_mode = pgbouncer
        self._pgb_settings = {
            "server_login_retry": str(server_login_retry),
            **{k: str(v) for k, v in (pgbouncer_settings or {}).items()},
        }
        self._pg_settings = {
            **{k: v for k, v in BASE_SETTINGS.items() if k != "listen_addresses"},
            **{k: str(v) for k, v in (pg_settings or {}).items()},
        }
        self._pg_bindir = pg_bindir
        self._patroni_bin = patroni_bin
        self._etcd_bin = etcd_bin
        self._pgbouncer_bin = pgbouncer_bin
        self._os_user_name = os_user
        self._base_dir = base_dir
        self._keep_dir = keep_dir
        self.ready_timeout = ready_timeout
        self.dbname = dbname
        self.user = user
        self.scope = scope
        #: Password of the application user (random per cluster). Never log it.
        self.password = secrets.token_urlsafe(12)
        #: Password of the ``postgres`` superuser (random per cluster). Never log it.
        self.superuser_password = secrets.token_urlsafe(12)
        self._replication_password = secrets.token_urlsafe(12)
        self.nodes: list[PatroniNode] = []
        self.etcd: Etcd | None = None
        self.pgbouncer: PgBouncer | None = None
        self._pgbouncer_target: PatroniNode | None = None
        self._runtime: _Runtime | None = None
        self._root: Path | None = None
        self._ports: list[int] = []
        self._closed = False
        self._want_follower = follower
        self._follower_interval = follower_interval
        self._follower_args = tuple(follower_args)
        #: The PgBouncer follower process (``follower=True``), None otherwise.
        self.follower: FollowerProcess | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> PatroniCluster:
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
        """Start etcd, every Patroni member and PgBouncer; return once there is one writable
        leader, the application user and database exist and every other member streams.

        On any failure (including KeyboardInterrupt) everything started so far is ended and the
        exception propagates. Raises :class:`HarnessError` if already opened once.
        """
        if self._runtime is not None or self._closed:
            raise HarnessError("this cluster was already opened (a `with` block opens it)")
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
        patroni_bin = find_patroni(self._patroni_bin)
        etcd_bin = find_etcd(self._etcd_bin)
        pgbouncer_bin = find_pgbouncer(self._pgbouncer_bin) if self._pool_mode else None
        osuser = server_user(self._os_user_name)
        root = Path(tempfile.mkdtemp(prefix="pgfailover-patroni-", dir=self._base_dir))
        self._root = root
        root.chmod(0o700)
        osuser.own(root)
        self._runtime = _Runtime(binaries, osuser, root, patroni_bin, etcd_bin, pgbouncer_bin)

        etcd = Etcd(root / "etcd", self._reserve(), self._reserve())
        self.etcd = etcd
        with watch.phase("etcd"):
            etcd.start(etcd_bin, osuser, self._env(root))
            _poll("etcd to serve its v3 API", etcd.ready, self.ready_timeout)
        for i in range(self.n_nodes):
            node_root = root / f"node{i}"
            node_root.mkdir(mode=0o700)
            osuser.own(node_root)
            node = PatroniNode(self, f"node{i}", self._reserve(), self._reserve(), node_root)
            node.socket_dir.mkdir(mode=0o700)
            osuser.own(node.socket_dir)
            self._write_patroni_config(node)
            self.nodes.append(node)
        with watch.phase("bootstrap"):
            for node in self.nodes:
                self._spawn_patroni(node)
            leader = self._wait_writable_leader(exclude=(), timeout=self.ready_timeout)
        with watch.phase("app_database"):
            self._create_app_database(leader)
        with watch.phase("replicas"):
            for node in self.nodes:
                if node is not leader:
                    self._wait_replica(node, self.ready_timeout)
        if self._pool_mode:
            with watch.phase("pgbouncer"):
                self._start_pgbouncer(self._pool_mode, leader)
            if self._want_follower:
                with watch.phase("follower"):
                    self._start_follower()
        logger.info("Patroni cluster up in %s: %s", root, watch.result())

    def close(self) -> None:
        """End every process this cluster started and remove its directory. Idempotent.

        Patroni is killed first (so it restarts nothing), then each remaining process under
        the cluster's directory is continued (if frozen) and asked to stop (postmasters get an
        immediate shutdown, which frees their shared memory); what is left after 5 s is killed.
        """
        if self._closed:
            return
        self._closed = True
        if self.follower is not None:
            self.follower.stop(10)
        for node in self.nodes:
            self._kill_patroni(node)
        for node in self.nodes:
            if node.process is not None:
                node.process.wait(10)
            node.frozen = False
        if self._root is not None:
            self._end_processes_under(self._root)
        for proc in self._server_processes():
            if not proc.wait(1):
                proc.kill_group()
        if self._root is not None and not self._keep_dir:
            shutil.rmtree(self._root, ignore_errors=True)
        for port in self._ports:
            release_port(port)
        with _open_lock:
            _open_clusters.discard(self)

    def _end_processes_under(self, root: Path, grace: float = 5.0, timeout: float = 15.0) -> None:
        postgres = str(self._runtime.bin.path("postgres")) if self._runtime else None
        asked: set[int] = set()
        start = time.monotonic()
        while True:
            pids = _pids_under(root)
            if not pids:
                return
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                logger.warning("processes %s of %s outlived teardown", pids, root)
                return
            for pid in pids:
                if elapsed > grace:
                    _signal_all([pid], signal.SIGKILL)
                elif pid not in asked:
                    asked.add(pid)
                    argv = _cmdline(pid)
                    _signal_all([pid], signal.SIGCONT)
                    if argv and argv[0] == postgres:
                        _signal_all([pid], signal.SIGQUIT)  # immediate shutdown
                    elif argv and not argv[0].startswith("postgres:"):
                        _signal_all([pid], signal.SIGTERM)  # etcd, pgbouncer, helpers
                    # a postmaster's children follow their postmaster
            time.sleep(0.02)

    def _server_processes(self) -> list[ServerProcess]:
        procs = [n.process for n in self.nodes if n.process is not None]
        if self.etcd is not None and self.etcd.process is not None:
            procs.append(self.etcd.process)
        if self.pgbouncer is not None and self.pgbouncer.process is not None:
            procs.append(self.pgbouncer.process)
        return procs

    # ------------------------------------------------------------------ addressing
    @property
    def root(self) -> Path | None:
        """The cluster's temporary directory (None before :meth:`open`)."""
        return self._root

    @property
    def etcd_url(self) -> str:
        """The etcd client endpoint, ``http://127.0.0.1:<port>``."""
        if self.etcd is None:
            raise HarnessError("the cluster is not open")
        return self.etcd.url

    @property
    def _rt(self) -> _Runtime:
        if self._runtime is None or self._closed:
            raise HarnessError("the cluster is not open: use it in a with-block or call open()")
        return self._runtime

    def node(self, name: str) -> PatroniNode:
        """The node called ``name`` (``node0``, ``node1``, ...)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}; nodes are {[n.name for n in self.nodes]}")

    def multihost_dsn(self, *, dbname: str | None = None, **params: Any) -> str:
        """Conninfo listing every node (``host=a,b,c port=x,y,z``); add e.g.
        ``target_session_attrs="read-write"``. It contains the password: never log it."""
        hosts = ",".join(n.host for n in self.nodes)
        ports = ",".join(str(n.port) for n in self.nodes)
        return self._dsn(hosts, ports, dbname=dbname, user=None, **params)

    def pids(self) -> list[int]:
        """Every live process of this cluster: etcd, Patroni, postgres, PgBouncer (sorted)."""
        if self._root is None:
            return []
        return sorted(_pids_under(self._root))

    # ------------------------------------------------------------------ observing
    def members(self) -> list[Member]:
        """The members Patroni lists in ``GET /cluster``, sorted by name.

        Asked of each running, unfrozen node in turn until one answers; raises
        :class:`PatroniError` when none does. A killed member stays listed until its member
        key expires (about ``ttl``).
        """
        errors: list[str] = []
        for node in self.nodes:
            if node.frozen or not node.running:
                continue
            try:
                status, body = node.api("/cluster")
            except (OSError, http.client.HTTPException) as ex:
                errors.append(f"{node.name}: {ex}")
                continue
            if status == 200 and isinstance(body, dict):
                entries = body.get("members", [])
                return sorted((Member.from_json(m) for m in entries), key=lambda m: m.name)
            errors.append(f"{node.name}: HTTP {status}")
        raise PatroniError(
            "no Patroni REST API answered GET /cluster"
            + (f" ({'; '.join(errors)})" if errors else " (no node runs unfrozen)")
        )

    def leader(self) -> PatroniNode | None:
        """The node holding Patroni's leader key in etcd right now, None when none does.

        Read from etcd itself, not from a member's view (a member that was frozen may still
        believe it leads). Raises :class:`PatroniError` when etcd does not answer.
        """
        try:
            return self._dcs_leader()
        except (OSError, ValueError) as ex:
            raise PatroniError(f"etcd did not answer for the leader key: {ex}") from ex

    def _dcs_leader(self) -> PatroniNode | None:
        if self.etcd is None:
            raise HarnessError("the cluster is not open")
        name = self.etcd.get(f"/pgfailover/{self.scope}/leader")
        if name is None:
            return None
        return self.node(name)

    def wait_leader(self, timeout: float | None = None) -> PatroniNode:
        """Wait until ``/cluster`` names a leader that accepts writes, and return it.

        ``timeout`` in seconds, None for ``ready_timeout``; :class:`PatroniTimeout` past it.
        """
        return self._wait_writable_leader(exclude=(), timeout=timeout or self.ready_timeout)

    def writable(self, node: PatroniNode) -> bool:
        """Whether ``node`` accepts a write right now (a transaction that needs an xid)."""
        try:
            with node.connect(connect_timeout=2) as conn:
                return self._writable(conn)
        except psycopg.Error:
            return False

    # ------------------------------------------------------------------ faults
    def kill_leader(self, timeout: float | None = None) -> Timings:
        """Crash the leader: SIGKILL its Patroni and its postmaster; return once another
        member is leader and accepts writes.

        Phases: ``killed`` (until every process of the old leader is gone), ``elected`` (until
        ``/cluster`` names another leader: about ``ttl``), ``writable`` (until the new leader
        takes a write). ``notes`` name the ``old_leader`` and ``new_leader``; ``ended_at``
        holds ``time.monotonic()`` at the end of each phase. ``timeout`` bounds each wait
        (None: ``ready_timeout``). The old leader stays down until :meth:`heal`.
        """
        timeout = timeout or self.ready_timeout
        old = self.leader()
        if old is None:
            raise PatroniError("there is no leader to kill (see members())")
        watch = _Stopwatch()
        with watch.phase("killed"):
            self._kill_node(old, timeout)
        with watch.phase("elected"):
            new = _poll(
                f"a leader other than {old.name} in /cluster",
                lambda: self._leader_other_than(old),
                timeout,
            )
        with watch.phase("writable"):
            _poll(
                f"new leader {new.name} to accept writes", lambda: self._writable_now(new), timeout
            )
        watch.notes.update(old_leader=old.name, new_leader=new.name)
        logger.info("killed leader %s; %s took over: %s", old.name, new.name, watch.result())
        return watch.result()

    def freeze(self, node: PatroniNode) -> Timings:
        """SIGSTOP the node's Patroni and every postgres process of it: a hung machine.

        Its connections stay open and unanswered; a frozen leader loses its leader key about
        ``ttl`` later and another member takes over. Phase ``frozen``.
        """
        if node.frozen:
            raise PatroniError(f"{node.name} is already frozen")
        if not node.running:
            raise PatroniError(f"{node.name} does not run: heal() it first")
        watch = _Stopwatch()
        with watch.phase("frozen"):
            node.frozen = True

            def all_stopped() -> bool | None:
                pending = [p for p in node.pids() if _proc_state(p) not in ("T", "t", None)]
                _signal_all(pending, signal.SIGSTOP)
                return None if pending else True

            _poll(f"every process of {node.name} to stop", all_stopped, self.ready_timeout, 0.005)
        return watch.result()

    def thaw(self, node: PatroniNode) -> Timings:
        """SIGCONT every process of a frozen node (postgres first, then Patroni). Phase
        ``thawed``. What Patroni then does is :meth:`heal`'s to wait for.

        A leader thawed after another member took over normally demotes itself and rejoins
        with pg_rewind. With Patroni 3.0.2's etcd3 DCS it may instead write the leader key
        back (its lease expired, it takes a new one and puts the key without a revision
        check): the member that took over demotes, what it accepted meanwhile is rewound
        away, and replicas that followed it need rebuilding (:meth:`reset` does that).
        """
        if not node.frozen:
            raise PatroniError(f"{node.name} is not frozen")
        watch = _Stopwatch()
        with watch.phase("thawed"):
            patroni = node.patroni_pid

            def all_running() -> bool | None:
                pending = [p for p in node.pids() if _proc_state(p) in ("T", "t")]
                _signal_all([p for p in pending if p != patroni], signal.SIGCONT)
                _signal_all([p for p in pending if p == patroni], signal.SIGCONT)
                return None if pending else True

            _poll(f"every process of {node.name} to run again", all_running, self.ready_timeout)
            node.frozen = False
        return watch.result()

    def heal(self, node: PatroniNode, timeout: float | None = None) -> Timings:
        """Bring ``node`` back as a healthy member: thaw it if frozen, restart its Patroni if it
        was killed (it rejoins as a replica, with pg_rewind when its timeline diverged), then
        wait until it is a replica streaming from the leader, or the writable leader itself.

        Phases (only those that ran): ``thaw``, ``restart``, ``rejoin``. ``notes["rejoin"]``
        says ``pg_rewind`` when Patroni rewound it meanwhile. A no-op wait on a healthy node.
        """
        timeout = timeout or self.ready_timeout
        watch = _Stopwatch()
        log_mark = node.log_path.stat().st_size if node.log_path.exists() else 0
        if node.frozen:
            with watch.phase("thaw"):
                self.thaw(node)
        if not node.running:
            with watch.phase("restart"):
                self._clear_stale_locks(node)
                self._spawn_patroni(node)
        reinit: set[str] = set()
        with watch.phase("rejoin"):
            _poll(
                f"{node.name} to stream from the leader (or lead)",
                lambda: self._healthy(node, reinit),
                timeout,
            )
        with contextlib.suppress(OSError), open(node.log_path, "rb") as log:
            log.seek(log_mark)
            if b"running pg_rewind" in log.read():
                watch.notes["rejoin"] = "pg_rewind"
        if reinit:
            watch.notes["rejoin"] = "reinitialize"
        return watch.result()

    def reset(self, timeout: float | None = None) -> Timings:
        """Heal every node: afterwards every member runs, exactly one is the writable leader,
        the others stream from it, and PgBouncer (if any) runs and points at the leader.

        The leader is whichever node holds the key (it is not moved back to ``node0``). A
        member that followed a timeline the leader never had (after a thawed leader took its
        key back, see :meth:`thaw`) is rebuilt through ``POST /reinitialize``
        (``notes["reinitialized"]``). Cheap when nothing changed: one etcd read, one
        ``/cluster`` call and one query per node.
        """
        timeout = timeout or self.ready_timeout
        watch = _Stopwatch()
        frozen = [n for n in self.nodes if n.frozen]
        if frozen:
            with watch.phase("thaw"):
                for node in frozen:
                    self.thaw(node)
        stopped = [n for n in self.nodes if not n.running]
        if stopped:
            with watch.phase("restart"):
                for node in stopped:
                    self._clear_stale_locks(node)
                    self._spawn_patroni(node)
        reinit: set[str] = set()
        with watch.phase("converge"):
            leader = _poll(
                "one writable leader with every other member streaming from it",
                lambda: self._converged(reinit),
                timeout,
            )
        if reinit:
            watch.notes["reinitialized"] = ",".join(sorted(reinit))
        if self.pgbouncer is not None:
            with watch.phase("pgbouncer"):
                if not self.pgbouncer.running:
                    self._write_pgbouncer_config(self.pgbouncer, leader)
                    self._spawn_pgbouncer(self.pgbouncer)
                elif self.follower is not None:
                    self._start_follower()  # a no-op while it runs
                    self.wait_pgbouncer_points_at(leader, timeout)
                elif self._pgbouncer_target is not leader:
                    self.repoint_pgbouncer(leader)
        return watch.result()

    def switchover(
        self, candidate: PatroniNode | None = None, *, timeout: float | None = None
    ) -> Timings:
        """Planned switchover through the leader's REST API (``POST /switchover`` with leader
        and candidate); return once the candidate accepts writes and the old leader streams
        from it.

        ``candidate`` None: the synchronous standby in ``synchronous_mode``, else the first
        running replica. Phases: ``writable`` (from the request until the candidate takes a
        write, measured by polling alongside Patroni's own one-second polling), ``confirmed``
        (until the REST call returned), ``rejoin``. :class:`PatroniError` if Patroni refuses
        (its answer is in the message). PgBouncer is left as is (see
        :meth:`repoint_pgbouncer`).
        """
        timeout = timeout or self.ready_timeout
        leader = self._wait_writable_leader(exclude=(), timeout=timeout)
        candidate = candidate or self._default_candidate(leader, timeout)
        if candidate is leader:
            raise PatroniError(f"{candidate.name} is already the leader")
        watch = _Stopwatch()
        answer: list[tuple[int, Any] | BaseException] = []

        def post() -> None:
            try:
                answer.append(
                    leader.api(
                        "/switchover",
                        "POST",
                        {"leader": leader.name, "candidate": candidate.name},
                        timeout=timeout,
                    )
                )
            except BaseException as ex:
                answer.append(ex)

        thread = threading.Thread(target=post, name="patroni-switchover", daemon=True)
        with watch.phase("writable"):
            thread.start()

            def done() -> bool | None:
                if answer and (isinstance(answer[0], BaseException) or answer[0][0] != 200):
                    return True  # refused: reported below
                if self._leader_other_than(leader) is candidate and self._writable_now(candidate):
                    return True
                return None

            _poll(f"{candidate.name} to become a writable leader", done, timeout)
        with watch.phase("confirmed"):
            thread.join(timeout)
        if not answer:
            raise PatroniTimeout(f"POST /switchover to {leader.name} did not answer in {timeout}s")
        result = answer[0]
        if isinstance(result, BaseException):
            raise PatroniError(f"POST /switchover to {leader.name} failed: {result}") from result
        if result[0] != 200:
            raise PatroniError(
                f"Patroni refused the switchover from {leader.name} to {candidate.name}: "
                f"HTTP {result[0]} {result[1]!r}"
            )
        with watch.phase("rejoin"):
            _poll(
                f"{leader.name} to stream from {candidate.name}",
                lambda: self._streams_from(leader, candidate),
                timeout,
            )
        watch.notes.update(old_leader=leader.name, new_leader=candidate.name)
        return watch.result()

    def wait_pgbouncer_points_at(self, node: PatroniNode, timeout: float | None = None) -> Timings:
        """Wait until PgBouncer's ``SHOW DATABASES`` has every database at ``node`` (the
        follower's repoint, with ``follower=True``).

        Polls with a deadline of ``timeout`` seconds (None: ``ready_timeout``);
        :class:`HarnessError` past it, or as soon as the follower process has exited (with
        its log tail). Phase: ``follow``.
        """
        if self.pgbouncer is None:
            raise HarnessError("this cluster has no PgBouncer (pass pgbouncer='transaction')")
        watch = _Stopwatch()
        with watch.phase("follow"):
            self.pgbouncer._wait_points_at(node, timeout, self.follower)
            self.pgbouncer.target = cast("Any", node)
            self._pgbouncer_target = node
        return watch.result()

    def repoint_pgbouncer(self, node: PatroniNode) -> Timings:
        """Point PgBouncer's databases at ``node`` and RELOAD it through the admin console."""
        if self.pgbouncer is None:
            raise HarnessError("this cluster has no PgBouncer (pass pgbouncer='transaction')")
        watch = _Stopwatch()
        with watch.phase("reload"):
            self._write_pgbouncer_config(self.pgbouncer, node)
            self.pgbouncer.admin("RELOAD")
        return watch.result()

    # ------------------------------------------------------------------ internals
    def _reserve(self) -> int:
        port = reserve_port()
        self._ports.append(port)
        return port

    @staticmethod
    def _env(root: Path) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(root),
        }

    def _write_private(self, path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o600)
        self._rt.osuser.own(path)

    def _write_patroni_config(self, node: PatroniNode) -> None:
        assert self.etcd is not None
        config = {
            "scope": self.scope,
            "namespace": "/pgfailover/",
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"{HOST}:{node.rest_port}",
                "connect_address": f"{HOST}:{node.rest_port}",
            },
            "etcd3": {"hosts": [f"{HOST}:{self.etcd.client_port}"], "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl,
                    "loop_wait": self.loop_wait,
                    "retry_timeout": self.retry_timeout,
                    "maximum_lag_on_failover": 1024 * 1024,
                    "synchronous_mode": self.synchronous_mode,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": self._pg_settings,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"{HOST}:{node.port}",
                "connect_address": f"{HOST}:{node.port}",
                "data_dir": str(node.datadir),
                "bin_dir": str(self._rt.bin.bindir),
                "pgpass": str(node.root / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": self.superuser_password},
                    "replication": {
                        "username": REPLICATION_USER,
                        "password": self._replication_password,
                    },
                },
                "parameters": {"unix_socket_directories": str(node.socket_dir)},
                "pg_hba": [
                    "local all all trust",
                    f"host all all {HOST}/32 scram-sha-256",
                    f"host replication all {HOST}/32 scram-sha-256",
                ],
                "basebackup": [{"checkpoint": "fast"}],
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "watchdog": {"mode": "off"},
        }
        # JSON is YAML: no YAML library needed.
        self._write_private(node.config_path, json.dumps(config, indent=2) + "\n")

    def _spawn_patroni(self, node: PatroniNode) -> None:
        node.process = ServerProcess(
            self._rt.osuser.wrap([str(self._rt.patroni_bin), str(node.config_path)]),
            log_path=node.log_path,
            cwd=node.root,
            env=self._env(node.root),
            description=f"patroni {node.name}",
        )
        node.frozen = False
        node.killed = False

    def _check_patroni_alive(self, nodes: Iterable[PatroniNode]) -> None:
        """Raise :class:`PatroniError` with its log's tail if a Patroni we did not kill exited."""
        for node in nodes:
            if node.process is not None and not node.killed and not node.process.running:
                raise PatroniError(
                    f"patroni {node.name} exited; log tail:\n{node.process.log_tail(30)}"
                )

    def _kill_node(self, node: PatroniNode, timeout: float) -> None:
        postmaster = node.postmaster_pid
        node.killed = True
        self._kill_patroni(node)
        if postmaster is not None:
            _signal_all([postmaster], signal.SIGKILL)
        if node.frozen:  # stopped children would wait for a SIGCONT to notice their death
            _signal_all(node.pids(), signal.SIGCONT)
            node.frozen = False
        if node.process is not None:
            node.process.wait(timeout)

        def gone() -> bool | None:
            return None if node.pids() else True

        try:
            _poll(f"every process of {node.name} to exit", gone, min(timeout, 10.0))
        except PatroniTimeout:
            _signal_all(node.pids(), signal.SIGKILL)
            _poll(f"every process of {node.name} to exit after SIGKILL", gone, timeout)

    @staticmethod
    def _kill_patroni(node: PatroniNode) -> None:
        """SIGKILL the node's Patroni and its process group (pg_rewind, pg_basebackup...).

        Only while it runs: once reaped, its PID (and group ID) may belong to a stranger.
        """
        if node.process is not None and node.process.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.process.pid, signal.SIGKILL)

    def _clear_stale_locks(self, node: PatroniNode) -> None:
        """Remove lock files a killed postmaster left: its PID may linger as an unreaped
        zombie, which PostgreSQL would take for a running server."""
        if node.postmaster_pid is not None:
            return
        (node.datadir / "postmaster.pid").unlink(missing_ok=True)
        (node.socket_dir / f".s.PGSQL.{node.port}.lock").unlink(missing_ok=True)

    @staticmethod
    def _writable(conn: Conn) -> bool:
        try:
            conn.execute("SELECT pg_current_xact_id()")  # needs an xid: fails on a standby
        except psycopg.errors.ReadOnlySqlTransaction:
            return False
        return True

    def _writable_now(self, node: PatroniNode) -> bool | None:
        return True if self.writable(node) else None

    def _leader_other_than(self, old: PatroniNode | None) -> PatroniNode | None:
        self._check_patroni_alive(n for n in self.nodes if n is not old and not n.frozen)
        leader = self._dcs_leader()
        return leader if leader is not None and leader is not old else None

    def _wait_writable_leader(self, exclude: Iterable[PatroniNode], timeout: float) -> PatroniNode:
        excluded = list(exclude)

        def check() -> PatroniNode | None:
            self._check_patroni_alive(n for n in self.nodes if n.process is not None)
            leader = self._dcs_leader()
            if leader is None or leader in excluded or leader.frozen:
                return None
            status, _ = leader.api("/primary")
            if status != 200 or not self.writable(leader):
                return None
            return leader

        return _poll("a writable leader", check, timeout)

    def _streams_from(self, node: PatroniNode, leader: PatroniNode) -> bool | None:
        """True when ``node``'s WAL receiver streams from ``leader``; None otherwise.

        Asked of the replica: the leader's ``pg_stat_replication`` would also list a
        ``pg_basebackup`` Patroni runs under the member's name while rebuilding it.
        """
        if node.frozen or not node.running:
            return None
        try:
            with node.connect(connect_timeout=2) as conn:
                row = conn.execute(
                    "SELECT status, sender_port FROM pg_stat_wal_receiver"
                ).fetchone()
        except psycopg.Error:
            return None
        return True if row and row[0] == "streaming" and row[1] == leader.port else None

    def _wait_replica(self, node: PatroniNode, timeout: float) -> None:
        def check() -> bool | None:
            self._check_patroni_alive([node])
            leader = self._dcs_leader()
            if leader is None or leader is node:
                return None
            return self._streams_from(node, leader)

        _poll(f"{node.name} to stream as a replica", check, timeout)

    def _healthy(self, node: PatroniNode, reinit: set[str]) -> bool | None:
        """True when ``node`` is the writable leader or streams from it; None while not."""
        self._check_patroni_alive([node])
        leader = self._dcs_leader()
        if leader is None or leader.frozen:
            return None
        if leader is node:
            status, _ = node.api("/primary")
            return True if status == 200 and self.writable(node) else None
        if self._streams_from(node, leader):
            return True
        self._reinit_if_diverged(node, leader, reinit)
        return None

    def _converged(self, reinit: set[str]) -> PatroniNode | None:
        """The leader once it takes writes and every other member streams from it."""
        self._check_patroni_alive(self.nodes)
        leader = self._dcs_leader()
        if leader is None or leader.frozen or not self.writable(leader):
            return None
        lagging = [n for n in self.nodes if n is not leader and not self._streams_from(n, leader)]
        for node in lagging:
            self._reinit_if_diverged(node, leader, reinit)
        if lagging:
            return None
        members = self.members()
        ready = [m for m in members if m.state in ("running", "streaming")]
        return leader if len(ready) == len(self.nodes) == len(members) else None

    def _reinit_if_diverged(self, node: PatroniNode, leader: PatroniNode, done: set[str]) -> None:
        """Ask Patroni to rebuild ``node`` from the leader when it has followed a timeline the
        leader never had (a replica that briefly followed a leader which was then demoted:
        PostgreSQL then refuses to stream, "highest timeline N of the primary is behind
        recovery timeline M", and Patroni 3.0.2 does not rewind a replica for that)."""
        if node.name in done or node.frozen or not node.running:
            return
        with leader.connect(connect_timeout=2) as conn:
            row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
        leader_tli = int(str(row[0])[:8], 16) if row else 0
        try:
            names = os.listdir(node.datadir / "pg_wal")
        except OSError:
            return
        known = [int(n[:8], 16) for n in names if len(n) == 16 and n.endswith(".history")]
        if not known or max(known) <= leader_tli:
            return
        status, body = node.api("/reinitialize", "POST", {"force": True})
        logger.info(
            "%s followed timeline %d the leader %s (timeline %d) never had: reinitialize -> %s %s",
            node.name,
            max(known),
            leader.name,
            leader_tli,
            status,
            body,
        )
        if status == 200:
            done.add(node.name)

    def _default_candidate(self, leader: PatroniNode, timeout: float) -> PatroniNode:
        """The first running replica, or in synchronous mode the synchronous standby (which
        Patroni names a loop or so after a topology change), waited for up to ``timeout``."""
        wanted = ("sync_standby",) if self.synchronous_mode else ("replica", "sync_standby")

        def check() -> PatroniNode | None:
            for member in self.members():
                if member.role in wanted and member.state in ("running", "streaming"):
                    node = self.node(member.name)
                    return None if node is leader or node.frozen else node
            return None

        return _poll(f"a {' or '.join(wanted)} to switch over to", check, timeout)

    def _create_app_database(self, leader: PatroniNode) -> None:
        local = "-c synchronous_commit=local"  # no synchronous standby may stream yet
        with leader.connect(options=local) as conn:
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

    # ------------------------------------------------------------------ PgBouncer
    def _start_pgbouncer(self, pool_mode: PoolMode, target: PatroniNode) -> None:
        root = self._rt.root / "pgbouncer"
        bouncer = PgBouncer(self, self._reserve(), root, pool_mode, self._pgb_settings)
        self.pgbouncer = bouncer
        passwords = {SUPERUSER: self.superuser_password, self.user: self.password}
        bouncer._configure(target, passwords, self._rt.osuser)
        self._point_at(bouncer, target)
        self._spawn_pgbouncer(bouncer)

    def _spawn_pgbouncer(self, bouncer: PgBouncer) -> None:
        env = self._env(self._rt.root)
        bouncer._spawn(self._rt.pgbouncer_bin, self._rt.osuser, cwd=bouncer.root, env=env)

    def _start_follower(self) -> None:
        """Start the follower process of ``follower=True`` (a no-op while it runs)."""
        assert self.pgbouncer is not None
        if self.follower is None:
            self.follower = self.pgbouncer._follower(
                self._rt.root / "follower",
                ["--patroni", ",".join(n.rest_url for n in self.nodes)],
                self.superuser_password,
                self._follower_interval,
                self._follower_args,
            )
        self.follower.start(self.ready_timeout)

    def _write_pgbouncer_config(self, bouncer: PgBouncer, target: PatroniNode) -> None:
        bouncer._write_config(target, self._rt.osuser)
        self._point_at(bouncer, target)

    def _point_at(self, bouncer: PgBouncer, target: PatroniNode) -> None:
        # PgBouncer.target is typed for LocalCluster's nodes; PgBouncer reads only its name.
        bouncer.target = cast("Any", target)
        self._pgbouncer_target = target

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name}@{n.port}" for n in self.nodes)
        return f"<PatroniCluster {self.scope} [{nodes}]>"


def _close_open_clusters() -> None:
    with _open_lock:
        clusters = list(_open_clusters)
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.close()


atexit.register(_close_open_clusters)
