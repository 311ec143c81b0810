"""Run a drill: start a local cluster, write through every stack, fail over, verify.

The sequence (times are seconds since the workload started):

1. a :class:`~pgfailover.testing.LocalCluster` (primary, streaming standby and, unless the
   target is ``direct``, PgBouncer in front of the primary) and a table of writes;
2. ``workers`` threads per stack, each writing one unique key every ``1 / rate`` seconds
   and recording what the application saw (:class:`~pgfailover.drill.report.Op`);
3. after ``before`` seconds, a failover (``stop`` mode): the primary stops, the standby is
   promoted until it accepts writes, the old primary rejoins as a standby;
4. behind PgBouncer, ``repoint_delay`` seconds after the promotion (but not before the old
   primary has rejoined: the harness's failover returns then), PgBouncer is repointed
   to the new primary: that is when the primary becomes reachable for the stacks. With
   ``follower`` nobody repoints PgBouncer by hand: the real ``pgfailover pgbouncer follow``
   process does, and the primary is reachable from the instant ``SHOW DATABASES`` shows
   the new primary (polled every 10 ms). With a direct multi-host DSN it is reachable as
   soon as the promotion ends;
5. ``after`` seconds later the workers stop (an operation in progress, e.g. a runner
   still retrying, is waited for), and every key is looked up on the final primary.

Everything started is torn down at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import itertools
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from ..testing import LocalCluster
from ..testing.cluster import StopMode
from .options import (
    DEFAULT_AFTER,
    DEFAULT_BEFORE,
    DEFAULT_FOLLOWER_INTERVAL,
    DEFAULT_RATE,
    DEFAULT_REPOINT_DELAY,
    DEFAULT_WORKERS,
    FAULTS,
    HA_KINDS,
    MAX_RATE,
    MAX_SECONDS,
    MAX_WORKERS,
    OPTIONAL_STACK_NAMES,
    STACK_NAMES,
)
from .report import DrillReport, Mark, Op, build_report
from .stacks import (
    OPTIONAL_STACKS,
    POOL_TIMEOUT,
    RUNNER_TIMEOUT,
    STACKS,
    Endpoint,
    Stack,
    close_quietly,
    error_code,
)

Target = Literal["transaction", "session", "direct"]
Ha = Literal["local", "patroni"]
Fault = Literal["crash", "switchover", "freeze"]

#: The table every stack writes to. No unique constraint: a duplicate must be countable.
TABLE = "drill_writes"


@dataclass(frozen=True)
class DrillOptions:
    """What the drill does. Times are in seconds.

    ``ha``: what fails over: ``local`` (a :class:`~pgfailover.testing.LocalCluster` the
    harness promotes) or ``patroni`` (a 3-node :class:`~pgfailover.testing.PatroniCluster`,
    the harness's fast profile; Patroni elects the new leader). ``fault`` (``patroni`` only):
    ``crash`` (kill -9 of the leader's Patroni and postmaster), ``switchover`` (planned,
    through the REST API) or ``freeze`` (SIGSTOP of every process of the leader, thawed and
    healed once the new leader takes writes); None means ``crash``.

    ``target`` (``local`` only; None means ``session``): ``session`` or ``transaction``
    (PgBouncer pool mode in front of the primary) or ``direct`` (a multi-host DSN listing
    both servers). A Patroni drill always connects directly (its naive stacks use a
    multi-host ``target_session_attrs=read-write`` conninfo, its pgfailover pools
    :class:`~pgfailover.PatroniTopology`): None and ``direct`` are accepted, a PgBouncer mode
    is refused. ``stop`` (``local`` only; None means ``fast``): how the primary is stopped
    (``fast`` or ``immediate``). ``repoint_delay`` (``local`` only; None means
    :data:`~pgfailover.drill.options.DEFAULT_REPOINT_DELAY`): behind PgBouncer, how long
    after the promotion PgBouncer is repointed (the outage an operator or a Patroni callback
    would take); ignored for ``direct``. ``before`` / ``after``: writing time before the
    failover and after the primary is reachable again (both more than 0: without them
    nothing is measured). ``rate``: writes per second per worker; ``workers``: threads per
    stack. ``synchronous``: synchronous replication (Patroni's ``synchronous_mode``); None
    means off for ``local`` (PostgreSQL's default: an ``immediate`` stop may then lose
    acknowledged commits whatever the client does) and on for ``patroni``.

    ``follower``: PgBouncer is repointed by the real follower process (``pgfailover
    pgbouncer follow``, every :data:`~pgfailover.drill.options.DEFAULT_FOLLOWER_INTERVAL`
    seconds, ``--hosts`` for ``local``, ``--patroni`` for ``patroni``) and never by hand:
    ``repoint_delay`` does not apply (refused), ``target`` must be a PgBouncer mode (None
    means ``session`` for both kinds; ``direct`` is refused), and a Patroni drill then
    connects every stack through PgBouncer in front of the leader.

    After construction the ``None`` defaults that apply are filled in (a local drill's
    ``target``, ``stop``, ``repoint_delay``, ``synchronous``; a Patroni drill's ``target``
    ``direct``, ``fault``, ``synchronous``); ``stop`` and ``repoint_delay`` stay None for a
    Patroni drill. Raises ValueError for a value out of range or an option the chosen ``ha``
    does not use. Defaults and bounds come from :mod:`pgfailover.drill.options`.
    """

    target: Target | None = None
    stop: StopMode | None = None
    repoint_delay: float | None = None
    before: float = DEFAULT_BEFORE
    after: float = DEFAULT_AFTER
    rate: float = DEFAULT_RATE
    workers: int = DEFAULT_WORKERS
    stacks: tuple[type[Stack], ...] = STACKS
    synchronous: bool | None = None
    ha: Ha = "local"
    fault: Fault | None = None
    follower: bool = False

    def __post_init__(self) -> None:
        if self.ha not in HA_KINDS:
            raise ValueError(f"ha must be 'local' or 'patroni', got {self.ha!r}")
        if self.target not in (None, "transaction", "session", "direct"):
            raise ValueError(
                f"target must be 'transaction', 'session' or 'direct', got {self.target!r}"
            )
        if self.stop not in (None, "fast", "immediate"):
            raise ValueError(f"stop must be 'fast' or 'immediate', got {self.stop!r}")
        if self.fault not in (None, *FAULTS):
            raise ValueError(f"fault must be 'crash', 'switchover' or 'freeze', got {self.fault!r}")
        if self.repoint_delay is not None and not 0 <= self.repoint_delay <= MAX_SECONDS:
            raise ValueError(
                f"repoint_delay must be between 0 and {MAX_SECONDS:g} seconds, "
                f"got {self.repoint_delay!r}"
            )
        self._follower_defaults()
        if self.ha == "patroni":
            self._patroni_defaults()
        else:
            self._local_defaults()
        for name in ("before", "after"):
            value = getattr(self, name)
            if not 0 < value <= MAX_SECONDS:
                raise ValueError(
                    f"{name} must be more than 0 and at most {MAX_SECONDS:g} seconds, got {value!r}"
                )
        if not 0 < self.rate <= MAX_RATE:
            raise ValueError(
                f"rate must be more than 0 and at most {MAX_RATE:g} writes per second, "
                f"got {self.rate!r}"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, got {self.workers!r}")
        if not self.stacks:
            raise ValueError("choose at least one stack")

    def _follower_defaults(self) -> None:
        if not self.follower:
            return
        if self.target == "direct":
            raise ValueError(
                "follower (--follower) repoints PgBouncer: choose a PgBouncer target "
                "(--target session or transaction), not direct"
            )
        if self.repoint_delay is not None:
            raise ValueError(
                "repoint_delay (--repoint-delay) is the manual repoint's delay: with the "
                "follower (--follower) nobody repoints PgBouncer by hand; leave it out"
            )
        object.__setattr__(self, "target", self.target or "session")

    def _local_defaults(self) -> None:
        if self.fault is not None:
            raise ValueError(
                "fault (--fault) applies to the Patroni drill (--ha patroni) only: the local "
                "drill's failover is a stop of the primary (see --stop) and a promotion"
            )
        set_ = object.__setattr__
        set_(self, "target", self.target or "session")
        set_(self, "stop", self.stop or "fast")
        if self.repoint_delay is None and not self.follower:
            set_(self, "repoint_delay", DEFAULT_REPOINT_DELAY)
        set_(self, "synchronous", bool(self.synchronous))

    def _patroni_defaults(self) -> None:
        if self.target not in (None, "direct") and not self.follower:
            raise ValueError(
                f"target (--target) {self.target!r} does not apply to the Patroni drill "
                "(--ha patroni): its stacks connect to the members directly (naive ones "
                "through a multi-host target_session_attrs=read-write conninfo, pgfailover's "
                "through PatroniTopology); leave target out or use 'direct', or add the "
                "PgBouncer follower (--follower)"
            )
        if self.stop is not None:
            raise ValueError(
                "stop (--stop) applies to the local drill only: the Patroni drill's failover "
                "is its fault (--fault crash, switchover or freeze)"
            )
        if self.repoint_delay is not None:
            raise ValueError(
                "repoint_delay (--repoint-delay) applies to the local drill behind PgBouncer "
                "only: the Patroni drill has no PgBouncer to repoint"
            )
        set_ = object.__setattr__
        set_(self, "target", self.target or "direct")
        set_(self, "fault", self.fault or "crash")
        set_(self, "synchronous", True if self.synchronous is None else self.synchronous)


@dataclass
class Recorder:
    """The ops of every worker (list.append is atomic) and the drill's clock."""

    t0: float
    ops: list[Op] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def now(self) -> float:
        return time.monotonic() - self.t0


def _worker(stack: Stack, keys: Callable[[], int], rec: Recorder, interval: float) -> None:
    next_at = rec.now()
    while not rec.stop.is_set():
        key = keys()
        start = rec.now()
        try:
            stack.write(key)
        except Exception as ex:  # what the application sees: recorded, not raised
            code, unknown = error_code(ex)
            rec.ops.append(Op(stack.name, start, rec.now(), key, False, code, unknown))
        else:
            rec.ops.append(Op(stack.name, start, rec.now(), key, True))
        next_at = max(next_at + interval, rec.now())
        rec.stop.wait(max(0.0, next_at - rec.now()))


def _progress_line(rec: Recorder, phase: str) -> str:
    ops = list(rec.ops)
    ok = sum(op.ok for op in ops)
    return f"[{rec.now():6.1f}s] {phase:<36} writes ok {ok:6d}  failed {len(ops) - ok:6d}"


def _ticker(rec: Recorder, phase: list[str], progress: Callable[[str], None]) -> None:
    while not rec.stop.wait(1.0):
        progress(_progress_line(rec, phase[0]))


def sleep_until(rec: Recorder, at: float) -> None:
    """Sleep until ``at`` seconds on ``rec``'s clock (at once if that is past)."""
    delay = at - rec.now()
    if delay > 0:
        time.sleep(delay)


def run_drill(
    options: DrillOptions | None = None,
    *,
    progress: Callable[[str], None] = lambda line: None,
) -> DrillReport:
    """Run the drill described by ``options`` (defaults when None) and return its report.

    ``progress`` receives one line per step and one per second while writing. Raises
    :class:`~pgfailover.testing.HarnessError` if the cluster cannot be started or failed
    over, and ``KeyboardInterrupt`` after tearing everything down.
    """
    options = options or DrillOptions()
    if options.ha == "patroni":
        from .patroni import run_patroni_drill  # noqa: PLC0415 - it imports this module

        return run_patroni_drill(options, progress=progress)
    pool_mode = None if options.target == "direct" else options.target
    progress(
        "starting a local cluster: primary + streaming standby"
        + (f" + PgBouncer ({pool_mode} mode)" if pool_mode else " (direct multi-host DSN)")
    )
    # PgBouncer as the harness configures it (server_login_retry 0.1 s), recorded in the
    # report's config: it bounds how soon after a failed login PgBouncer tries again.
    if options.follower:
        progress("  PgBouncer follows the primary by itself: pgfailover pgbouncer follow --hosts")
    with LocalCluster(
        standbys=1,
        pgbouncer=pool_mode,
        synchronous=bool(options.synchronous),
        follower=options.follower,
        follower_interval=DEFAULT_FOLLOWER_INTERVAL,
    ) as cluster:
        login_retry = (
            cluster.pgbouncer.settings["server_login_retry"] if cluster.pgbouncer else None
        )
        with cluster.primary.connect(superuser=False) as conn:
            server_version = create_table(conn)
        if cluster.pgbouncer is not None:
            hosts = [(cluster.pgbouncer.host, cluster.pgbouncer.port)]
        else:
            hosts = [(node.host, node.port) for node in cluster.nodes]
        endpoint = Endpoint(
            hosts,
            cluster.dbname,
            cluster.user,
            cluster.password,
            prepare=pool_mode != "transaction",
        )
        progress(f"  up: {cluster!r}, files in {cluster.root}")
        ops, marks, reachable_at, window_end = run_workload(
            endpoint,
            options,
            lambda rec, phase: _fail_over(cluster, options, rec, phase, progress),
            progress,
        )
        progress(f"verifying {len(ops)} writes on the final primary ({cluster.primary.name})")
        with cluster.primary.connect(superuser=False) as conn:
            found = count_rows(conn)
    config: dict[str, object] = {
        "ha": "local",
        "target": options.target,
        "stop": options.stop,
        "repoint_delay": options.repoint_delay if pool_mode else None,
        **follower_config(options),
        "server_login_retry": None if login_retry is None else float(login_retry),
        "before": options.before,
        "after": options.after,
        "rate": options.rate,
        "workers": options.workers,
        "replication": "synchronous" if options.synchronous else "asynchronous",
        "postgresql": _version(server_version),
        "psycopg": psycopg.__version__,
        "python": platform.python_version(),
    }
    return build_report(
        config,
        marks,
        reachable_at,
        (0.0, window_end),
        [(kind.name, kind.protected) for kind in options.stacks],
        ops,
        found,
    )


def create_table(conn: psycopg.Connection[Any]) -> int:
    """Create the drill's table (:data:`TABLE`) through ``conn``; the server's version number."""
    conn.execute(
        f"CREATE TABLE {TABLE} (k bigint NOT NULL, stack text NOT NULL);CREATE INDEX ON {TABLE} (k)"
    )
    conn.commit()
    return conn.info.server_version


def count_rows(conn: psycopg.Connection[Any]) -> dict[int, int]:
    """How many rows of :data:`TABLE` each key has, read through ``conn`` (absent keys: 0)."""
    rows = conn.execute(f"SELECT k, count(*) FROM {TABLE} GROUP BY k").fetchall()
    return {int(k): int(n) for k, n in rows}


FailOver = Callable[[Recorder, list[str]], tuple[list[Mark], float]]
"""The failover step of a drill: given the recorder (its clock) and the one-item phase list
the progress ticker shows, performs the failover and returns the marks and the time (seconds
since the workload started) from which the primary is reachable for the stacks."""


def run_workload(
    endpoint: Endpoint,
    options: DrillOptions,
    fail_over: FailOver,
    progress: Callable[[str], None],
) -> tuple[list[Op], list[Mark], float, float]:
    """Write through every stack of ``options`` on ``endpoint`` while ``fail_over`` runs.

    The workers start, ``fail_over`` is called (it sleeps until ``before`` itself), writing
    goes on ``after`` seconds past the time it returns as reachable, then the workers stop
    (an operation in progress is waited for, up to the runner's and pool's deadlines) and
    every stack is closed, also on error and on Ctrl-C. Returns the ops, the marks, when the
    primary was reachable and when the workload window ended (seconds since it started).
    """
    stacks: list[Stack] = []
    rec = Recorder(t0=time.monotonic())
    threads: list[threading.Thread] = []
    try:
        for kind in options.stacks:
            stacks.append(kind(endpoint, TABLE, options.workers))
        progress(f"writing through {len(stacks)} stacks, {options.workers} workers each")
        counter = itertools.count(1)
        rec.t0 = time.monotonic()
        phase = ["steady state"]
        for stack in stacks:
            for i in range(options.workers):
                thread = threading.Thread(
                    target=_worker,
                    args=(stack, counter.__next__, rec, 1.0 / options.rate),
                    name=f"drill {stack.name} #{i}",
                    daemon=True,
                )
                thread.start()
                threads.append(thread)
        ticker = threading.Thread(target=_ticker, args=(rec, phase, progress), daemon=True)
        ticker.start()
        marks, reachable_at = fail_over(rec, phase)
        phase[0] = "primary reachable: writing"
        sleep_until(rec, reachable_at + options.after)
        window_end = rec.now()
        progress(f"[{window_end:6.1f}s] stopping the workers")
    finally:
        rec.stop.set()
        deadline = time.monotonic() + RUNNER_TIMEOUT + POOL_TIMEOUT + 5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for stack in stacks:
            close_quietly(stack)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        progress(f"  workers still blocked after the deadline: {', '.join(stuck)}")
    return list(rec.ops), marks, reachable_at, window_end


def _fail_over(
    cluster: LocalCluster,
    options: DrillOptions,
    rec: Recorder,
    phase: list[str],
    progress: Callable[[str], None],
) -> tuple[list[Mark], float]:
    """Fail over (and repoint PgBouncer); the marks and when the primary became reachable."""
    sleep_until(rec, options.before)
    old = cluster.primary
    progress(f"[{rec.now():6.1f}s] failover: {options.stop} stop of {old.name}, promote")
    phase[0] = "failing over"
    watch = None
    if cluster.follower is not None and cluster.pgbouncer is not None:
        watch = RepointWatch(cluster.pgbouncer.admin_dsn(), cluster.dbname, (old.host, old.port))
        watch.start()
    marks = [Mark("failover started", rec.now())]
    try:
        timings = cluster.failover(options.stop or "fast")
    except BaseException:
        if watch is not None:
            watch.cancel()
        raise
    stopped, promoted = (timings.ended_at[p] - rec.t0 for p in ("stop", "promote"))
    rejoined = timings.ended_at["rejoin"] - rec.t0
    marks += [
        Mark(f"{old.name} stopped", stopped),
        Mark(f"{cluster.primary.name} promoted", promoted),
        Mark(f"{old.name} rejoined as standby", rejoined),
    ]
    progress(f"[{rec.now():6.1f}s] new primary {cluster.primary.name}: {timings}")
    if cluster.pgbouncer is None:
        return marks, promoted
    if watch is not None:
        phase[0] = "waiting for the follower's repoint"
        at, _ = watch.wait(cluster.ready_timeout)
        reachable_at = max(at - rec.t0, promoted)
        marks.append(Mark("PgBouncer repointed by the follower", reachable_at))
        marks.sort(key=lambda mark: mark.at)
        progress(
            f"[{rec.now():6.1f}s] the follower repointed PgBouncer to {cluster.primary.name}, "
            f"{reachable_at - promoted:.3f} s after the promotion"
        )
        return marks, reachable_at
    phase[0] = "PgBouncer still on the old primary"
    sleep_until(rec, promoted + (options.repoint_delay or 0.0))
    repoint = cluster.repoint_pgbouncer(cluster.primary)
    reachable_at = repoint.ended_at["reload"] - rec.t0
    marks.append(Mark("PgBouncer repointed", reachable_at))
    progress(f"[{rec.now():6.1f}s] PgBouncer repointed to {cluster.primary.name}")
    return marks, reachable_at


def follower_config(options: DrillOptions) -> dict[str, object]:
    """The report's config entry saying who repoints PgBouncer (empty without PgBouncer)."""
    if options.follower:
        return {
            "pgbouncer repoint": "by the follower process (pgfailover pgbouncer follow, "
            f"--interval {DEFAULT_FOLLOWER_INTERVAL:g}), no manual repoint"
        }
    return {}


class RepointWatch:
    """Polls PgBouncer's ``SHOW DATABASES`` from a thread of its own (every 10 ms, one
    admin connection) until ``database`` points elsewhere than ``away_from`` (``(host,
    port)``); records that instant (``time.monotonic()``) and the new ``(host, port)``.
    This is how the drill sees the follower's repoint without taking part in it."""

    def __init__(self, admin_dsn: str, database: str, away_from: tuple[str, int]) -> None:
        self._dsn, self._database, self._away = admin_dsn, database, away_from
        self.at: float | None = None
        self.endpoint: tuple[str, int] | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill repoint watch", daemon=True)

    def start(self) -> RepointWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        from ..pgbouncer.admin import AdminConsole, AdminError  # noqa: PLC0415 - drill only

        admin: AdminConsole | None = None
        try:
            while not self._stop.is_set():
                try:
                    admin = admin or AdminConsole(self._dsn)
                    rows = [r for r in admin.databases() if r.name == self._database]
                except AdminError:
                    if admin is not None:
                        admin.close()
                    admin = None
                    rows = []
                if rows and rows[0].host and (rows[0].host, rows[0].port) != self._away:
                    self.at, self.endpoint = time.monotonic(), (rows[0].host, rows[0].port)
                    return
                self._stop.wait(0.01)
        except BaseException as ex:  # reported by wait()
            self.error = ex
        finally:
            if admin is not None:
                admin.close()
            self._done.set()

    def wait(self, timeout: float) -> tuple[float, tuple[str, int]]:
        """When PgBouncer pointed elsewhere, and where; HarnessError after ``timeout``
        seconds or when polling failed."""
        from ..testing import HarnessError  # noqa: PLC0415 - the package loads lazily

        finished = self._done.wait(timeout)
        self._stop.set()
        if self.error is not None:
            raise HarnessError(f"watching PgBouncer failed: {self.error}") from self.error
        if not finished or self.at is None or self.endpoint is None:
            raise HarnessError(f"the follower did not repoint PgBouncer within {timeout:g} s")
        return self.at, self.endpoint

    def cancel(self) -> None:
        """Stop polling (idempotent)."""
        self._stop.set()


def _version(number: int) -> str:
    return f"{number // 10000}.{number % 10000}"


def stacks_named(names: Sequence[str]) -> tuple[type[Stack], ...]:
    """The stack classes called ``names`` (as the report shows them, e.g. from
    :func:`pgfailover.drill.options.select_stacks`), in display order; ValueError naming
    the unknown ones and the valid ones. The optional (Django) stacks are accepted too."""
    known = (*STACK_NAMES, *OPTIONAL_STACK_NAMES)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown stack {', '.join(map(repr, unknown))}: choose from "
            f"{', '.join(map(repr, known))}"
        )
    order = {name: i for i, name in enumerate(names)}
    chosen = [kind for kind in (*STACKS, *OPTIONAL_STACKS) if kind.name in order]
    return tuple(sorted(chosen, key=lambda kind: order[kind.name]))
