"""The drill on a real Patroni cluster: ``pgfailover drill --ha patroni``.

The sequence (times are seconds since the workload started):

1. a :class:`~pgfailover.testing.PatroniCluster`: etcd and 3 Patroni members in the harness's
   fast profile (``ttl`` 10, ``loop_wait`` 1, ``retry_timeout`` 3), ``synchronous_mode`` on
   unless turned off, and the drill's table on the leader;
2. the same workers and stacks as the local drill, except where they connect: the naive
   stacks through a multi-host ``target_session_attrs=read-write`` conninfo listing every
   member (how Patroni's documentation tells applications to connect), pgfailover's pools
   through :class:`~pgfailover.PatroniTopology` over the members' REST URLs, the
   instrumented SQLAlchemy engines through the naive stacks' multi-host URL;
3. after ``before`` seconds, the fault, at the instant marked *leader lost*:

   - ``crash``: SIGKILL of the leader's Patroni and postmaster; Patroni elects another
     member once the leader key expires (about ``ttl``);
   - ``switchover``: ``POST /switchover`` to the leader's REST API, naming the synchronous
     standby (or the first replica); the old leader rejoins as a replica;
   - ``freeze``: SIGSTOP of every process of the leader (a hung machine); once the new
     leader takes writes, the old one is thawed and healed (it rejoins as a replica). With
     Patroni 3.0.2's etcd3 store the thawed leader may take its leader key back instead
     (:meth:`~pgfailover.testing.PatroniCluster.thaw`): the timeline then says so, what the
     new leader accepted meanwhile is rewound away by Patroni (counted as lost), and the
     members are healed (:meth:`~pgfailover.testing.PatroniCluster.reset`) before counting;

   *new leader* is when Patroni's leader key (what ``GET /cluster`` reports) names another
   member, *writable* when that member accepts a write: from then on the primary is
   **reachable** for the stacks;
4. ``after`` seconds after that the workers stop, and every key is counted on the leader.

With ``follower`` a PgBouncer (the ``target`` pool mode) stands in front of the leader and
every stack connects through it; the real ``pgfailover pgbouncer follow --patroni`` process
repoints it, nobody else: the primary is **reachable** from the instant PgBouncer's ``SHOW
DATABASES`` shows the new leader (polled every 10 ms), and no earlier than *writable*.

Everything started is torn down at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable

import psycopg

from ..testing import PatroniCluster
from ..testing.patroni import PatroniError, PatroniNode, PatroniTimeout
from .options import DEFAULT_FOLLOWER_INTERVAL
from .report import DrillReport, Mark, build_report
from .run import (
    DrillOptions,
    Recorder,
    RepointWatch,
    count_rows,
    create_table,
    follower_config,
    run_workload,
    sleep_until,
)
from .stacks import Endpoint

__all__ = ["NODES", "run_patroni_drill"]

#: Members of the drill's Patroni cluster.
NODES = 3
#: Seconds to wait for each of Patroni's steps (a new leader, a writable one, a rejoin).
STEP_TIMEOUT = 60.0
_POLL = 0.02


def run_patroni_drill(
    options: DrillOptions, *, progress: Callable[[str], None] = lambda line: None
) -> DrillReport:
    """Run the drill of ``options`` (``ha`` must be ``patroni``) and return its report.

    ``progress`` receives one line per step and one per second while writing. Raises
    :class:`~pgfailover.testing.HarnessError` (a
    :class:`~pgfailover.testing.PatroniTimeout` naming the step) if the cluster cannot be
    started or Patroni does not fail over within 60 s a step, ValueError for options of
    another ``ha``, and ``KeyboardInterrupt`` after tearing everything down.
    """
    if options.ha != "patroni":
        raise ValueError(f"run_patroni_drill runs ha 'patroni' drills, got ha {options.ha!r}")
    synchronous = bool(options.synchronous)
    progress(
        f"starting a Patroni cluster: etcd + {NODES} members"
        + (" (synchronous_mode)" if synchronous else " (asynchronous replication)")
    )
    pool_mode = options.target if options.target in ("session", "transaction") else None
    if options.follower:
        progress(
            f"  behind PgBouncer ({pool_mode} mode), which follows the leader by itself: "
            "pgfailover pgbouncer follow --patroni"
        )
    with PatroniCluster(
        nodes=NODES,
        synchronous_mode=synchronous,
        pgbouncer=pool_mode if options.follower else None,
        follower=options.follower,
        follower_interval=DEFAULT_FOLLOWER_INTERVAL,
    ) as cluster:
        leader = cluster.wait_leader()
        with leader.connect(superuser=False) as conn:
            server_version = create_table(conn)
        patroni_version = _patroni_version(leader)
        if cluster.pgbouncer is not None:
            endpoint = Endpoint(
                [(cluster.pgbouncer.host, cluster.pgbouncer.port)],
                cluster.dbname,
                cluster.user,
                cluster.password,
                prepare=pool_mode != "transaction",
            )
        else:
            endpoint = Endpoint(
                [(node.host, node.port) for node in cluster.nodes],
                cluster.dbname,
                cluster.user,
                cluster.password,
                session_attrs="read-write",
                patroni_urls=tuple(node.rest_url for node in cluster.nodes),
            )
        progress(f"  up: {cluster!r}, leader {leader.name}, files in {cluster.root}")
        if synchronous:
            _wait_sync_standby(cluster)
        ops, marks, reachable_at, window_end = run_workload(
            endpoint,
            options,
            lambda rec, phase: _fail_over(cluster, options, rec, phase, progress),
            progress,
        )
        final = cluster.wait_leader()
        progress(f"verifying {len(ops)} writes on the final leader ({final.name})")
        with final.connect(superuser=False) as conn:
            found = count_rows(conn)
    if options.follower:
        where: dict[str, object] = {
            "target": options.target,
            "naive conninfo": "PgBouncer",
            "pgfailover pools": "PgBouncer",
            **follower_config(options),
        }
    else:
        where = {
            "target": "direct",
            "naive conninfo": "multi-host, target_session_attrs=read-write",
            "pgfailover pools": "PatroniTopology (REST API of every member)",
        }
    config: dict[str, object] = {
        "ha": "patroni",
        "fault": options.fault,
        **where,
        "nodes": NODES,
        "ttl": cluster.ttl,
        "loop_wait": cluster.loop_wait,
        "retry_timeout": cluster.retry_timeout,
        "before": options.before,
        "after": options.after,
        "rate": options.rate,
        "workers": options.workers,
        "replication": "synchronous_mode" if synchronous else "asynchronous",
        "patroni": patroni_version,
        "postgresql": f"{server_version // 10000}.{server_version % 10000}",
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


def _patroni_version(node: PatroniNode) -> str:
    """Patroni's version as ``GET /patroni`` reports it ("unknown" if it does not)."""
    try:
        status, body = node.api("/patroni")
    except OSError:
        return "unknown"
    if status == 200 and isinstance(body, dict):
        info = body.get("patroni")
        if isinstance(info, dict) and isinstance(info.get("version"), str):
            return str(info["version"])
    return "unknown"


def _wait_sync_standby(cluster: PatroniCluster) -> None:
    """Wait until ``/cluster`` lists a synchronous standby (commits then wait for it)."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while not any(member.role == "sync_standby" for member in cluster.members()):
        if time.monotonic() > deadline:
            raise PatroniTimeout(f"no synchronous standby appeared in {STEP_TIMEOUT:g} s")
        time.sleep(_POLL * 5)


class _LeaderWatch:
    """Polls, from its own thread, until Patroni names a leader other than ``old`` and that
    leader accepts a write; records both instants (``time.monotonic()``)."""

    def __init__(self, cluster: PatroniCluster, old: PatroniNode) -> None:
        self.cluster, self.old = cluster, old
        self.new: PatroniNode | None = None
        self.elected_at: float | None = None
        self.writable_at: float | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill leader watch", daemon=True)

    def start(self) -> _LeaderWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.new is None:
                    try:
                        leader = self.cluster.leader()
                    except PatroniError:
                        leader = None
                    if leader is not None and leader is not self.old:
                        self.new, self.elected_at = leader, time.monotonic()
                if self.new is not None and self.cluster.writable(self.new):
                    self.writable_at = time.monotonic()
                    return
                self._stop.wait(_POLL)
        except BaseException as ex:  # reported by wait()
            self.error = ex
        finally:
            self._done.set()

    def wait(self, timeout: float = STEP_TIMEOUT) -> tuple[PatroniNode, float, float]:
        """The new leader, when it was named and when it took a write; PatroniTimeout after
        ``timeout`` seconds."""
        finished = self._done.wait(timeout)
        self._stop.set()
        if self.error is not None:
            raise PatroniError(f"watching for a new leader failed: {self.error}") from self.error
        if not finished or self.new is None or self.elected_at is None:
            raise PatroniTimeout(f"no leader other than {self.old.name} within {timeout:g} s")
        if self.writable_at is None:
            raise PatroniTimeout(f"new leader {self.new.name} took no write within {timeout:g} s")
        return self.new, self.elected_at, self.writable_at


def _fail_over(
    cluster: PatroniCluster,
    options: DrillOptions,
    rec: Recorder,
    phase: list[str],
    progress: Callable[[str], None],
) -> tuple[list[Mark], float]:
    """Inflict ``options.fault`` on the leader; the marks and when the new leader took writes
    (seconds on ``rec``'s clock)."""
    sleep_until(rec, options.before)
    old = cluster.wait_leader()
    fault = options.fault
    phase[0] = f"{fault}: waiting for a new leader"

    def at(instant: float) -> float:
        return max(0.0, instant - rec.t0)

    repoint = None
    if cluster.follower is not None and cluster.pgbouncer is not None:
        repoint = RepointWatch(cluster.pgbouncer.admin_dsn(), cluster.dbname, (old.host, old.port))
        repoint.start()
    try:
        marks, new, lost, elected, writable = _inflict(
            cluster, fault, old, rec=rec, phase=phase, progress=progress
        )
    except BaseException:
        if repoint is not None:
            repoint.cancel()
        raise
    progress(
        f"[{rec.now():6.1f}s] new leader {new.name}: named {elected - lost:.3f} s and "
        f"writable {writable - lost:.3f} s after the {fault}"
    )
    if repoint is None:
        return marks, writable
    phase[0] = "waiting for the follower's repoint"
    repointed_at, endpoint = repoint.wait(STEP_TIMEOUT)
    reachable = max(at(repointed_at), writable)
    marks.append(
        Mark(f"PgBouncer repointed by the follower to {endpoint[0]}:{endpoint[1]}", reachable)
    )
    marks.sort(key=lambda mark: mark.at)
    progress(
        f"[{rec.now():6.1f}s] the follower repointed PgBouncer, "
        f"{reachable - writable:.3f} s after the new leader took writes"
    )
    return marks, reachable


def _inflict(
    cluster: PatroniCluster,
    fault: str | None,
    old: PatroniNode,
    *,
    rec: Recorder,
    phase: list[str],
    progress: Callable[[str], None],
) -> tuple[list[Mark], PatroniNode, float, float, float]:
    """The fault proper: the marks, the new leader, and when (seconds on ``rec``'s clock)
    the leader was lost, the new one named and writable."""

    def at(instant: float) -> float:
        return max(0.0, instant - rec.t0)

    if fault == "crash":
        progress(f"[{rec.now():6.1f}s] crash: kill -9 of leader {old.name} (Patroni + postgres)")
        timings = cluster.kill_leader(timeout=STEP_TIMEOUT)
        lost = at(timings.ended_at["killed"] - timings.phases["killed"])
        new = cluster.node(timings.notes["new_leader"])
        elected, writable = at(timings.ended_at["elected"]), at(timings.ended_at["writable"])
        marks = [Mark(f"leader {old.name} killed (leader lost)", lost)]
        rest: list[Mark] = []
    elif fault == "switchover":
        progress(f"[{rec.now():6.1f}s] switchover: POST /switchover to leader {old.name}")
        watch = _LeaderWatch(cluster, old)
        watch.start()
        timings = cluster.switchover(timeout=STEP_TIMEOUT)
        lost = at(timings.ended_at["writable"] - timings.phases["writable"])
        new, elected_mono, writable_mono = watch.wait()
        elected, writable = at(elected_mono), at(writable_mono)
        marks = [Mark(f"switchover from {old.name} requested", lost)]
        rest = [Mark(f"{old.name} rejoined as replica", at(timings.ended_at["rejoin"]))]
    else:
        progress(f"[{rec.now():6.1f}s] freeze: SIGSTOP of every process of leader {old.name}")
        watch = _LeaderWatch(cluster, old)
        lost = rec.now()
        cluster.freeze(old)
        watch.start()
        new, elected_mono, writable_mono = watch.wait()
        elected, writable = at(elected_mono), at(writable_mono)
        marks = [Mark(f"leader {old.name} frozen (leader lost)", lost)]
        phase[0] = f"{new.name} leads: healing {old.name}"
        progress(f"[{rec.now():6.1f}s] {new.name} takes writes; thawing and healing {old.name}")
        thawed = cluster.thaw(old)
        healed = cluster.heal(old, timeout=STEP_TIMEOUT)
        rest = [Mark(f"{old.name} thawed", at(thawed.ended_at["thawed"]))]
        if cluster.leader() is old:
            # Patroni 3.0.2 with etcd3 may let a thawed leader put its key back (see
            # PatroniCluster.thaw): what the new leader accepted meanwhile is rewound away
            progress(
                f"[{rec.now():6.1f}s] {old.name} took Patroni's leader key back once thawed: "
                f"what {new.name} accepted meanwhile is rewound away; healing the cluster"
            )
            rest.append(Mark(f"{old.name} leads again", at(healed.ended_at["rejoin"])))
            converged = cluster.reset(timeout=STEP_TIMEOUT)
            rest.append(Mark("members converged", at(converged.ended_at["converge"])))
        else:
            rest.append(Mark(f"{old.name} rejoined as replica", at(healed.ended_at["rejoin"])))
    marks += [
        Mark(f"{new.name} named leader", elected),
        Mark(f"{new.name} takes writes (new leader)", writable),
        *rest,
    ]
    marks.sort(key=lambda mark: mark.at)
    return marks, new, lost, elected, writable
