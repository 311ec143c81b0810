"""``ENGINE: "pgfailover.django"`` and ``pgfailover.django.atomic`` in a real Django project.

Django's settings are process-global, so each scenario runs the project of
``tests/integration/django_project`` in its own subprocess (``serve.py``), configured by the
``PGF_DJANGO`` environment variable and driven over stdin/stdout, while this process drives
the cluster (failover, repoint). Requests go through Django's test client, with
``close_old_connections()`` around each as a WSGI server's request signals do.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

import django  # type: ignore[import-untyped]  # in the dev extras: missing must fail, not skip
import pytest

from pgfailover.testing import LocalCluster
from pgfailover.testing.cluster import SUPERUSER
from pgfailover.testing.plugin import ClusterFactory
from pgfailover.testing.proxy import FaultProxy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PGF = "pgfailover.django"
STOCK = "django.db.backends.postgresql"
HAS_POOL = django.VERSION >= (5, 1)
#: Bound of one answer from the subprocess (a migrate, a request, a loop stop...).
ANSWER_TIMEOUT = 90.0


class Project:
    """The test project in a subprocess (see ``django_project/serve.py``)."""

    def __init__(self, databases: dict[str, Any], installed_apps: list[str] | None = None):
        env = {
            **os.environ,
            "PGF_DJANGO": json.dumps(
                {"databases": databases, "installed_apps": installed_apps or []}
            ),
            "DJANGO_SETTINGS_MODULE": "tests.integration.django_project.settings",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.django_project.serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one message, return its answer; fail on an exception in the subprocess."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        if not self._selector.select(ANSWER_TIMEOUT):
            raise AssertionError(f"no answer to {op} within {ANSWER_TIMEOUT} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the Django process ended (exit code {self.proc.wait(5)})")
        answer: dict[str, Any] = json.loads(line)
        if "exception" in answer:
            raise AssertionError(f"{op} failed in the Django process:\n{answer['tb']}")
        return answer

    def request(self, path: str, db: str, key: str = "") -> dict[str, Any]:
        return self.ask("request", path=path, db=db, key=key)

    def wait_done(self, db: str, at_least: int, timeout: float = 60.0) -> int:
        """Poll a request loop until it has done ``at_least`` requests."""
        deadline = time.monotonic() + timeout
        while True:
            done = int(self.ask("loop_progress", db=db)["done"])
            if done >= at_least:
                return done
            if time.monotonic() > deadline:
                raise AssertionError(f"the loop on {db} did {done} < {at_least} requests")
            time.sleep(0.05)

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self._selector.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def project() -> Iterator[list[Project]]:
    """Projects opened by the test (append them); all closed at its end."""
    opened: list[Project] = []
    yield opened
    for p in opened:
        p.close()


def database(
    engine: str,
    *,
    host: str,
    port: int | str,
    cluster: LocalCluster,
    conn_max_age: int | None = 600,
    health_checks: bool = True,
    options: dict[str, Any] | None = None,
    superuser: bool = False,
) -> dict[str, Any]:
    """One entry of DATABASES for ``cluster``'s application database."""
    return {
        "ENGINE": engine,
        "NAME": cluster.dbname,
        "USER": SUPERUSER if superuser else cluster.user,
        "PASSWORD": cluster.superuser_password if superuser else cluster.password,
        "HOST": host,
        "PORT": str(port),
        "CONN_MAX_AGE": conn_max_age,
        "CONN_HEALTH_CHECKS": health_checks,
        "OPTIONS": {"connect_timeout": 3, **(options or {})},
    }


def multihost(cluster: LocalCluster) -> tuple[str, str]:
    """HOST and PORT settings listing every node."""
    return (
        ",".join(n.host for n in cluster.nodes),
        ",".join(str(n.port) for n in cluster.nodes),
    )


Results: TypeAlias = dict[str, list[dict[str, Any]]]


#: What PgBouncer answers a client while its last server login failed and no server
#: connection is left (``server_login_retry``): a failover refusal, not ours.
PGBOUNCER_FAST_FAIL = "server login has been failing"


def _write_across_failover(
    cluster: LocalCluster,
    p: Project,
    aliases: list[str],
    *,
    before: int,
    until: tuple[str, str] | None = None,
) -> tuple[Results, Results]:
    """Fail ``cluster`` over, send ``before`` write requests per alias (then, with ``until``
    = (alias, text), more on that alias until an answer's message holds the text, for up to
    10 s), repoint PgBouncer at the new primary and send 8 more per alias; the answers
    before and after the repoint, printed in short (status, or SQLSTATE / error of each)
    for the test's output."""
    cluster.failover()
    early = {alias: [p.request("/write/", alias) for _ in range(before)] for alias in aliases}
    if until is not None:
        alias, text = until
        deadline = time.monotonic() + 10.0
        while text not in early[alias][-1].get("message", "") and time.monotonic() < deadline:
            early[alias].append(p.request("/write/", alias))
    cluster.repoint_pgbouncer(cluster.primary)
    late = {alias: [p.request("/write/", alias) for _ in range(8)] for alias in aliases}

    def summary(results: list[dict[str, Any]]) -> list[str]:
        return [
            str(r["status"]) if r["status"] == 200 else f"{r['sqlstate'] or r['error']}"
            for r in results
        ]

    print({alias: (summary(early[alias]), summary(late[alias])) for alias in aliases})
    return early, late


@pytest.fixture(scope="module")
def session_mode_cluster(pgfailover_cluster_factory: ClusterFactory) -> LocalCluster:
    """Primary + standby + PgBouncer in session mode, for this module."""
    return pgfailover_cluster_factory(standbys=1, pgbouncer="session")


def test_session_mode_stock_backend_stays_broken_pgfailover_recovers(
    session_mode_cluster: LocalCluster, project: list[Project]
) -> None:
    """Through PgBouncer in session mode with CONN_MAX_AGE and CONN_HEALTH_CHECKS, after a
    failover and a repoint: the stock backend fails every write request with 25006 (its
    health check's SELECT 1 passes on the standby, so it keeps the connection bound to it);
    pgfailover.django serves the first or second write request and every one after (before
    the repoint it refuses new connections that lead to the standby, once PgBouncer itself
    lets them through)."""
    cluster = session_mode_cluster
    pgb = cluster.pgbouncer
    assert pgb is not None
    dbs = {
        alias: database(engine, host=pgb.host, port=pgb.port, cluster=cluster)
        for alias, engine in (("default", PGF), ("stock", STOCK))
    }
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    for alias in dbs:
        assert p.request("/write/", alias)["status"] == 200

    standby = "leads to a standby"
    before, after = _write_across_failover(
        cluster, p, list(dbs), before=3, until=("default", standby)
    )
    stock = after["stock"]
    assert all(r["status"] == 500 and r["sqlstate"] == "25006" for r in stock), stock
    ours = after["default"]
    first_ok = next(i for i, r in enumerate(ours) if r["status"] == 200)
    assert first_ok <= 1, ours
    assert all(r["status"] == 200 for r in ours[first_ok:]), ours
    # before the repoint both fail: PgBouncer still leads to the old primary, a standby now;
    # pgfailover.django refuses a new connection to it up front (NotWritable). PgBouncer
    # may refuse first: the monitor's looks through it during the outage met the stopped
    # server, and until a login of its own succeeds it fast-fails every new client.
    assert all(r["status"] == 500 for r in before["stock"] + before["default"]), before
    assert standby in before["default"][-1]["message"], before
    assert all(
        standby in r["message"] or PGBOUNCER_FAST_FAIL in r["message"] for r in before["default"]
    ), before


def test_session_mode_with_django_pool(
    session_mode_cluster: LocalCluster, project: list[Project]
) -> None:
    """The same through PgBouncer in session mode with Django's pool (OPTIONS "pool",
    Django 5.1+) and CONN_HEALTH_CHECKS: after the failover and the repoint the stock
    backend's psycopg_pool keeps serving connections bound to the demoted node (its check
    runs an empty query, which a standby passes), so write requests keep failing with
    25006; pgfailover.django's pool (a pgfailover.ConnectionPool) serves the first or
    second write request and every one after."""
    if not HAS_POOL:
        pytest.skip(f"Django {django.get_version()} has no connection pool (5.1+)")
    cluster = session_mode_cluster
    pgb = cluster.pgbouncer
    assert pgb is not None
    pool = {"pool": {"min_size": 2, "max_size": 2, "timeout": 3}}
    dbs = {
        alias: database(
            engine, host=pgb.host, port=pgb.port, cluster=cluster, conn_max_age=0, options=pool
        )
        for alias, engine in (("default", PGF), ("stock", STOCK))
    }
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    for alias in dbs:
        for _ in range(3):  # every pooled connection used once
            assert p.request("/write/", alias)["status"] == 200

    _, after = _write_across_failover(cluster, p, list(dbs), before=2)
    ours = after["default"]
    first_ok = next(i for i, r in enumerate(ours) if r["status"] == 200)
    assert first_ok <= 1, ours
    assert all(r["status"] == 200 for r in ours[first_ok:]), ours
    stock = after["stock"]
    assert all(r["status"] == 500 and r["sqlstate"] == "25006" for r in stock), stock


@pytest.mark.parametrize("pool", [False, True], ids=["persistent", "pool"])
def test_atomic_turns_a_failover_into_zero_failed_requests(
    pgfailover_cluster: LocalCluster, project: list[Project], pool: bool
) -> None:
    """Through PgBouncer in transaction mode and on a direct multi-host connection (with
    persistent connections, or Django's pool), requests whose write runs in
    pgfailover.django's AtomicRunner all succeed across a failover and repoint, each
    writing its row exactly once; the failover was felt (the runner retried)."""
    if pool and not HAS_POOL:
        pytest.skip(f"Django {django.get_version()} has no connection pool (5.1+)")
    cluster = pgfailover_cluster
    pgb = cluster.pgbouncer
    assert pgb is not None
    host, port = multihost(cluster)
    extra: dict[str, Any] = {"conn_max_age": 0, "options": {"pool": True}} if pool else {}
    dbs = {
        "default": database(PGF, host=pgb.host, port=pgb.port, cluster=cluster, **extra),
        "direct": database(PGF, host=host, port=port, cluster=cluster, **extra),
    }
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="direct")
    rows_before = int(p.ask("count", db="direct")["count"])
    for alias in dbs:
        p.ask("loop_start", path="/atomic-write/", db=alias)
    for alias in dbs:
        p.wait_done(alias, 5)
    cluster.failover()
    cluster.repoint_pgbouncer(cluster.primary)
    marks = {alias: int(p.ask("loop_progress", db=alias)["done"]) for alias in dbs}
    for alias in dbs:
        p.wait_done(alias, marks[alias] + 5)
    stopped = {alias: p.ask("loop_stop", db=alias) for alias in dbs}

    results = {alias: stopped[alias]["results"] for alias in dbs}
    for alias, done in results.items():
        failed = [r for r in done if r["status"] != 200]
        assert not failed, (alias, failed)
    retries = max(s["retries"] for s in stopped.values())
    print({alias: len(done) for alias, done in results.items()}, f"retries: {retries}")
    assert retries > 0, "no request felt the failover"
    succeeded = sum(len(done) for done in results.values())
    rows_after = int(p.ask("count", db="direct")["count"])
    assert rows_after - rows_before == succeeded


def test_django_migrations_and_testcase_run_unchanged(
    pgfailover_cluster: LocalCluster, project: list[Project]
) -> None:
    """Django's own test runner on the backend: it creates the test database, runs the
    migrations of contenttypes, auth and the app, runs a TestCase (pgfailover.django's
    run_atomic inside it runs once, in the test's transaction) and drops the database."""
    node = pgfailover_cluster.primary
    dbs = {
        "default": database(
            PGF, host=node.host, port=node.port, cluster=pgfailover_cluster, superuser=True
        )
    }
    p = Project(dbs, installed_apps=["django.contrib.contenttypes", "django.contrib.auth"])
    project.append(p)
    assert p.ask("testcase") == {"failures": 0}


def test_happy_path_costs_no_extra_round_trip(
    pgfailover_cluster: LocalCluster, project: list[Project]
) -> None:
    """Per request on a persistent connection, pgfailover.django makes no more round trips
    than the stock backend: one fewer with CONN_HEALTH_CHECKS (its check needs no SELECT 1
    without a reason), as many without; and AtomicRunner's transaction (the record rides in
    BEGIN's round trip) as many as Django's own transaction.atomic. With Django's pool and
    CONN_HEALTH_CHECKS (Django 5.1+): one fewer per request than psycopg_pool's checkout
    check, none beyond the INSERT."""
    node = pgfailover_cluster.primary
    c = pgfailover_cluster
    dbs = {
        "default": database(PGF, host=node.host, port=node.port, cluster=c),
        "stock": database(STOCK, host=node.host, port=node.port, cluster=c),
        "pgf_plain": database(PGF, host=node.host, port=node.port, cluster=c, health_checks=False),
        "stock_plain": database(
            STOCK, host=node.host, port=node.port, cluster=c, health_checks=False
        ),
    }
    if HAS_POOL:  # Django's pool of one connection, with CONN_HEALTH_CHECKS
        one = {"pool": {"min_size": 1, "max_size": 1}}
        for alias, engine in (("pgf_pool", PGF), ("stock_pool", STOCK)):
            dbs[alias] = database(
                engine, host=node.host, port=node.port, cluster=c, conn_max_age=0, options=one
            )
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    n = 20

    def trips(path: str, db: str) -> int:
        return int(p.ask("trace", path=path, db=db, n=n)["round_trips"])

    checked = {db: trips("/write/", db) for db in ("default", "stock")}
    plain = {db: trips("/write/", db) for db in ("pgf_plain", "stock_plain")}
    atomic = trips("/atomic-write/", "pgf_plain")
    django_atomic = trips("/tx-write/", "stock_plain")
    assert checked["stock"] == 2 * n, checked  # SELECT 1, then the INSERT
    assert checked["default"] == n, checked  # the INSERT alone
    assert plain["pgf_plain"] == plain["stock_plain"] == n, plain
    assert atomic == django_atomic == 4 * n, (atomic, django_atomic)  # BEGIN, 2 stmts, COMMIT
    if HAS_POOL:
        pooled = {db: trips("/write/", db) for db in ("pgf_pool", "stock_pool")}
        assert pooled["stock_pool"] == 2 * n, pooled  # psycopg_pool's check, then the INSERT
        assert pooled["pgf_pool"] == n, pooled  # the checkout check needs no round trip


def test_caught_failover_error_still_ends_the_connection_with_the_request(
    pgfailover_cluster: LocalCluster, project: list[Project]
) -> None:
    """A failover error the view catches still poisons its persistent connection, and
    Django's end-of-request check closes it (no health checks needed): the next request
    runs on a new server process, and writes."""
    node = pgfailover_cluster.primary
    dbs = {
        "default": database(
            PGF, host=node.host, port=node.port, cluster=pgfailover_cluster, health_checks=False
        )
    }
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    first = p.request("/pid/", "default")
    assert p.request("/pid/", "default") == first  # a persistent connection
    assert p.request("/caught-failover/", "default")["status"] == 200
    after = p.request("/pid/", "default")
    assert after["status"] == 200
    assert after != first
    assert p.request("/write/", "default")["status"] == 200


def test_bad_settings_and_nested_atomic_fail_typed(
    pgfailover_cluster: LocalCluster, project: list[Project]
) -> None:
    """Bad pgfailover OPTIONS (recheck_interval, pooler, monitor) raise
    ImproperlyConfigured naming the alias and the option (never the password); AtomicRunner
    inside an outer atomic block raises NestedAtomicError before running anything; unknown
    policy options raise TypeError at construction."""
    node = pgfailover_cluster.primary
    c = pgfailover_cluster
    dbs = {
        "default": database(PGF, host=node.host, port=node.port, cluster=c),
        "bad": database(
            PGF, host=node.host, port=node.port, cluster=c, options={"recheck_interval": -1}
        ),
        "bad_pooler": database(
            PGF, host=node.host, port=node.port, cluster=c, options={"pooler": "yes"}
        ),
        "bad_monitor": database(
            PGF, host=node.host, port=node.port, cluster=c, options={"monitor": "yes"}
        ),
    }
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    bad = (("bad", "recheck_interval"), ("bad_pooler", "pooler"), ("bad_monitor", "monitor"))
    for alias, word in bad:
        answer = p.ask("wrapper", db=alias)
        assert answer["error"] == "ImproperlyConfigured", answer
        assert alias in answer["message"]
        assert word in answer["message"]
        assert c.password not in answer["message"]
    rows = p.ask("count", db="default")["count"]
    nested = p.request("/nested/", "default")
    assert nested["status"] == 500
    assert nested["error"] == "NestedAtomicError", nested
    assert p.ask("count", db="default")["count"] == rows

    from pgfailover.django import AtomicRunner  # noqa: PLC0415 - needs the django extra

    with pytest.raises(TypeError, match="bogus"):
        AtomicRunner(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="using"):
        AtomicRunner(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("when", ["after_reply", "before"])
def test_atomic_looks_a_lost_commit_up_and_writes_once(
    pgfailover_cluster: LocalCluster, proxy: FaultProxy, project: list[Project], when: str
) -> None:
    """The connection dies around the COMMIT of an AtomicRunner transaction: when the
    COMMIT reached the server, the request succeeds without running the work again (the
    outcome was looked up through the record: "committed"); when it did not, the work is
    retried. Either way the row exists exactly once."""
    c = pgfailover_cluster
    dbs = {"default": database(PGF, host=proxy.host, port=proxy.port, cluster=c)}
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    p.ask("retry_actions")
    key = uuid.uuid4().hex
    proxy.drop_on(when)  # type: ignore[arg-type]
    answer = p.request("/atomic-write/", "default", key)
    assert answer["status"] == 200, answer
    assert proxy.faults, "the fault never fired"
    assert p.ask("count", db="default", key=key)["count"] == 1
    actions = p.ask("retry_actions")["actions"]
    assert actions == (["committed"] if when == "after_reply" else ["retry"]), actions


def test_topology_through_options_follows_the_leader(
    pgfailover_cluster: LocalCluster, project: list[Project]
) -> None:
    """OPTIONS {"topology": {"kind": "hosts"}} (a HostListTopology over the alias's HOST
    list, listing the standby first): new connections go to the leader it names, a request
    costs no more round trips than without a topology, and across a failover the requests
    fail only with failover errors until one is served (within 10 s; the failover verdict
    invalidated the topology, or the monitor refreshed it), and every one after is served,
    on the new primary; with
    Django's pool too (Django 5.1+). The process monitor watches the alias through its
    topology: pgfailover.health() of it is the monitor's answer. A bad spec raises
    ImproperlyConfigured naming the alias."""
    c = pgfailover_cluster
    standby = next(n for n in c.nodes if n is not c.primary)
    nodes = [standby, c.primary]  # the leader last: libpq's order would pick the standby
    host, port = ",".join(n.host for n in nodes), ",".join(str(n.port) for n in nodes)
    topology = {"topology": {"kind": "hosts", "timeout": 2, "max_age": 60}}
    dbs = {
        "default": database(PGF, host=host, port=port, cluster=c, options=topology),
        "bad": database(PGF, host=host, port=port, cluster=c, options={"topology": {"kind": 1}}),
    }
    if HAS_POOL:
        dbs["pooled"] = database(
            PGF,
            host=host,
            port=port,
            cluster=c,
            conn_max_age=0,
            options={**topology, "pool": {"min_size": 1, "max_size": 2, "timeout": 10}},
        )
    p = Project(dbs)
    project.append(p)
    answer = p.ask("wrapper", db="bad")
    assert answer["error"] == "ImproperlyConfigured", answer
    assert "'bad'" in answer["message"], answer
    assert "kind" in answer["message"], answer
    assert c.password not in answer["message"]
    p.ask("migrate", db="default")
    aliases = [alias for alias in dbs if alias != "bad"]
    for alias in aliases:
        served = p.request("/server/", alias)
        assert served["status"] == 200, served
        assert served["body"]["port"] == c.primary.port, (alias, served)
    n = 20
    assert p.ask("trace", path="/write/", db="default", n=n)["round_trips"] == n

    old = c.primary.port
    c.failover()
    assert c.primary.port != old
    for alias in aliases:
        failed = _until_served(p, alias, timeout=10.0)
        # before the first success only failover errors (the old leader down, or no leader
        # named yet: a topology the monitor refreshed during the failover names none, and
        # is refreshed again within NO_LEADER_RETRY, 0.25 s)
        assert all(r["error"] in _FAILOVER_ERRORS for r in failed), (alias, failed)
        results = [p.request("/server/", alias) for _ in range(4)]
        assert all(r["status"] == 200 for r in results), (alias, results)
        assert {r["body"]["port"] for r in results} == {c.primary.port}, results
    # the process monitor follows the alias's topology (one watch per source object)
    _poll(lambda: _health(p, "default")["health"]["writable"], "the new leader watched")
    watched = _health(p, "default")
    assert watched["member"] is True, watched
    assert watched["health"]["monitored"] is True, watched


def test_topology_naming_another_leader_ends_connections_to_the_former_one(
    pgfailover_cluster: LocalCluster, project: list[Project]
) -> None:
    """A split brain: the standby is promoted while the old primary still accepts writes. A
    persistent connection to the old primary keeps writing there until the alias's topology
    is refreshed (by anyone sharing it); from then on the next request's connection check
    closes it (no round trip, whatever the server would answer) and the write lands on the
    leader the topology names."""
    c = pgfailover_cluster
    old, new = c.primary, c.standbys[0]
    host, port = multihost(c)
    spec = {"topology": {"kind": "hosts", "timeout": 2, "max_age": 600}}
    dbs = {"default": database(PGF, host=host, port=port, cluster=c, options=spec)}
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    assert p.request("/server/", "default")["body"]["port"] == old.port
    c.promote(new)  # the old primary keeps running: two primaries
    assert p.request("/server/", "default")["body"]["port"] == old.port  # nothing told it
    assert p.ask("topology_refresh", db="default")["leader"] == new.address
    served = p.request("/server/", "default")
    assert served["status"] == 200, served
    assert served["body"]["port"] == new.port


def _health(p: Project, alias: str, by: str = "name") -> dict[str, Any]:
    """``pgfailover.health()`` of ``alias`` in the project, its counters, its membership."""
    return p.ask("health", db=alias, by=by)


#: What a request may fail with while a failover settles, by exception class name.
_FAILOVER_ERRORS = frozenset({"OperationalError", "NoLeader", "NotWritable", "LeaderMoved"})


def _until_served(p: Project, alias: str, timeout: float) -> list[dict[str, Any]]:
    """Send ``/server/`` requests on ``alias`` until one is served (200); the failed ones
    before it. Fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    failed: list[dict[str, Any]] = []
    while (answer := p.request("/server/", alias))["status"] != 200:
        failed.append(answer)
        assert time.monotonic() < deadline, (alias, failed[-5:])
        time.sleep(0.02)
    return failed


def _poll(check: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_monitor_purges_idle_persistent_connections_before_the_next_request(
    session_mode_cluster: LocalCluster, project: list[Project]
) -> None:
    """Through PgBouncer in session mode with CONN_MAX_AGE, no request in flight during a
    failover and the repoint: the process monitor (on by default) purges the alias's
    generation, so once it has seen the primary back the first write request succeeds on
    its first attempt, on a new connection, with no failover error met and no probe, with
    CONN_HEALTH_CHECKS and without; pgfailover.health() of the alias (by name or
    connection), and the readiness app's with no target, is the monitor's answer: not
    writable during the outage, writable after.
    With OPTIONS {"monitor": False} today's behaviour stays: the alias is not watched
    (health() says writable through the outage: nothing of its own failed) and, without
    health checks, its first request after the repoint fails on the dead connection and
    the next one succeeds. health() refuses an alias of another ENGINE and a string that
    is no alias (without showing it) with a TypeError."""
    cluster = session_mode_cluster
    pgb = cluster.pgbouncer
    assert pgb is not None
    at: dict[str, Any] = {"host": pgb.host, "port": pgb.port, "cluster": cluster}
    dbs = {
        "default": database(PGF, **at),
        "plain": database(PGF, health_checks=False, **at),
        "alone": database(PGF, health_checks=False, options={"monitor": False}, **at),
        "stock": database(STOCK, **at),
    }
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    ours = ("default", "plain", "alone")
    pids = {alias: p.request("/pid/", alias)["body"]["pid"] for alias in ours}
    watched = ("default", "plain")
    for alias in watched:
        _poll(lambda a=alias: _health(p, a)["health"]["writable"], f"{alias} watched")
    assert _health(p, "default", by="connection")["health"]["monitored"] is True
    alone = _health(p, "alone")
    assert alone["member"] is False
    assert alone["health"]["monitored"] is False
    refused = {target: _health(p, target) for target in ("stock", "host=x password=hunter2")}
    assert refused["stock"]["error"] == "TypeError", refused
    assert "'stock'" in refused["stock"]["message"], refused
    assert refused["host=x password=hunter2"]["error"] == "TypeError", refused
    assert "hunter2" not in refused["host=x password=hunter2"]["message"], refused

    cluster.failover()
    for alias in watched:
        _poll(lambda a=alias: not _health(p, a)["health"]["writable"], f"{alias} outage seen")
    during = {alias: _health(p, alias) for alias in ours}
    probe_during = p.ask("ready")
    cluster.repoint_pgbouncer(cluster.primary)
    for alias in watched:  # the monitor ends the alias's outage just after its own answer

        def back(alias: str = alias) -> bool:
            seen = _health(p, alias)
            return bool(seen["health"]["writable"]) and not seen["outage"]

        _poll(back, f"{alias} primary back")
    probe_after = p.ask("ready")
    after = {alias: [p.request("/write/", alias) for _ in range(2)] for alias in ours}
    print({alias: [r["status"] for r in results] for alias, results in after.items()})
    for alias in watched:
        seen = during[alias]
        assert seen["member"] is True
        assert seen["health"]["monitored"] is True
        assert seen["health"]["role"] in ("read-only", "down"), seen
        assert seen["stats"]["generations_purged"] == 1, seen  # by the monitor, once
        assert [r["status"] for r in after[alias]] == [200, 200], (alias, after[alias])
        stats = _health(p, alias)["stats"]
        assert stats["connections_poisoned"] == 0, (alias, stats)  # no request met it
        assert stats["connections_rejected"] == 0, (alias, stats)  # nor the standby
        assert stats["probes_run"] == 0, (alias, stats)  # closed without a round trip
        assert p.request("/pid/", alias)["body"]["pid"] != pids[alias]
    # the readiness app with no target checks the aliases the monitor watches
    assert probe_during["status"] == 503, probe_during
    assert len(probe_during["body"]["targets"]) == len(watched), probe_during
    assert probe_after["status"] == 200, probe_after
    assert during["alone"]["health"]["writable"] is True, during["alone"]
    assert during["alone"]["stats"]["generations_purged"] == 0, during["alone"]
    first, second = after["alone"]
    assert first["status"] == 500, first
    assert first["error"] == "OperationalError", first
    assert second["status"] == 200, second
