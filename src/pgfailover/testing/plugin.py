"""pytest plugin (entry point ``pytest11``): real failover clusters as fixtures.

Fixtures:

- ``pgfailover_cluster_factory`` (session): ``factory(**LocalCluster kwargs)`` opens a
  cluster that is closed at the end of the session.
- ``pgfailover_session_cluster`` (session): primary + 1 standby + PgBouncer in transaction
  mode, shared by the whole session.
- ``pgfailover_cluster`` (function): the session cluster, restored before the test to the
  known topology (``node0`` primary, PgBouncer pointing at it); cheap when nothing changed.
- ``pgfailover_patroni_factory`` (session): ``factory(**PatroniCluster kwargs)`` opens an
  etcd + Patroni cluster that is closed at the end of the session.
- ``pgfailover_patroni_session_cluster`` (session): etcd + 3 Patroni members + PgBouncer in
  transaction mode, shared by the whole session.
- ``pgfailover_patroni_cluster`` (function): the Patroni session cluster, healed before the
  test (every member running, one writable leader, the others streaming from it, PgBouncer
  pointing at the leader); the leader is whichever member holds the key.

Options (command line, or ini keys without the dashes and with underscores):
``--pg-bindir`` / ``pgfailover_pg_bindir``, ``--pgbouncer-bin`` / ``pgfailover_pgbouncer``.

pytest loads this module in every run of every project that installs pgfailover, so at import
it costs nothing: it imports pytest and typing only, and the harness (its servers, its ports,
its exit hooks) is imported by the first fixture that needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .cluster import LocalCluster
    from .patroni import PatroniCluster


class ClusterFactory(Protocol):
    """The type of ``pgfailover_cluster_factory``: ``factory(**LocalCluster kwargs)``."""

    def __call__(self, **kwargs: Any) -> LocalCluster: ...


class PatroniFactory(Protocol):
    """The type of ``pgfailover_patroni_factory``: ``factory(**PatroniCluster kwargs)``."""

    def __call__(self, **kwargs: Any) -> PatroniCluster: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgfailover", "pgfailover local clusters")
    group.addoption(
        "--pg-bindir",
        dest="pgfailover_pg_bindir",
        default=None,
        help="directory of the PostgreSQL server programs (default: found automatically)",
    )
    group.addoption(
        "--pgbouncer-bin",
        dest="pgfailover_pgbouncer",
        default=None,
        help="path of the pgbouncer program (default: found on PATH)",
    )
    parser.addini("pgfailover_pg_bindir", "directory of the PostgreSQL server programs")
    parser.addini("pgfailover_pgbouncer", "path of the pgbouncer program")


def _option(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


@pytest.fixture(scope="session")
def pgfailover_cluster_factory(request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """Open clusters with the session's binaries; all are closed when the session ends."""
    from .cluster import LocalCluster  # noqa: PLC0415 - the harness loads when first used

    opened: list[LocalCluster] = []

    def factory(**kwargs: Any) -> LocalCluster:
        kwargs.setdefault("pg_bindir", _option(request.config, "pgfailover_pg_bindir"))
        kwargs.setdefault("pgbouncer_bin", _option(request.config, "pgfailover_pgbouncer"))
        cluster = LocalCluster(**kwargs)
        opened.append(cluster)
        cluster.open()
        return cluster

    try:
        yield factory
    finally:
        for cluster in opened:
            cluster.close()


@pytest.fixture(scope="session")
def pgfailover_session_cluster(pgfailover_cluster_factory: ClusterFactory) -> LocalCluster:
    """Primary + 1 streaming standby + PgBouncer (transaction mode), for the whole session."""
    return pgfailover_cluster_factory(standbys=1, pgbouncer="transaction")


@pytest.fixture
def pgfailover_cluster(pgfailover_session_cluster: LocalCluster) -> LocalCluster:
    """The session cluster, reset to ``node0`` primary with PgBouncer pointing at it."""
    pgfailover_session_cluster.reset()
    return pgfailover_session_cluster


@pytest.fixture(scope="session")
def pgfailover_patroni_factory(request: pytest.FixtureRequest) -> Iterator[PatroniFactory]:
    """Open etcd + Patroni clusters with the session's binaries; all are closed at the end.

    A cluster whose ``open()`` fails is already closed when the error reaches the test.
    """
    from .patroni import PatroniCluster  # noqa: PLC0415 - the harness loads when first used

    opened: list[PatroniCluster] = []

    def factory(**kwargs: Any) -> PatroniCluster:
        kwargs.setdefault("pg_bindir", _option(request.config, "pgfailover_pg_bindir"))
        if kwargs.get("pgbouncer"):
            kwargs.setdefault("pgbouncer_bin", _option(request.config, "pgfailover_pgbouncer"))
        cluster = PatroniCluster(**kwargs)
        opened.append(cluster)
        cluster.open()
        return cluster

    try:
        yield factory
    finally:
        for cluster in opened:
            cluster.close()


@pytest.fixture(scope="session")
def pgfailover_patroni_session_cluster(
    pgfailover_patroni_factory: PatroniFactory,
) -> PatroniCluster:
    """etcd + 3 Patroni members (ttl 10) + PgBouncer (transaction mode), for the session."""
    return pgfailover_patroni_factory(nodes=3, pgbouncer="transaction")


@pytest.fixture
def pgfailover_patroni_cluster(
    pgfailover_patroni_session_cluster: PatroniCluster,
) -> PatroniCluster:
    """The Patroni session cluster, healed: every member back, one writable leader, the
    others streaming from it, PgBouncer pointing at the leader."""
    pgfailover_patroni_session_cluster.reset()
    return pgfailover_patroni_session_cluster
