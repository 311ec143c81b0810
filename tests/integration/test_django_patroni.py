"""``ENGINE: "pgfailover.django"`` with ``OPTIONS {"topology": {"kind": "patroni", ...}}`` on a
real Patroni cluster (etcd + 3 members), in the test project's subprocess (see
``test_django.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pgfailover.testing.patroni import PatroniCluster

from .test_django import PGF, Project

pytestmark = pytest.mark.integration


@pytest.fixture
def project() -> Iterator[list[Project]]:
    """Projects opened by the test (append them); all closed at its end."""
    opened: list[Project] = []
    yield opened
    for p in opened:
        p.close()


def test_patroni_topology_through_options_follows_a_switchover(
    pgfailover_patroni_cluster: PatroniCluster, project: list[Project]
) -> None:
    """With a Patroni topology spec naming one member's REST API (the others are learnt from
    /cluster) and persistent connections with health checks, requests write on the leader
    Patroni names; after a switchover the first or second write request succeeds and every
    one after, on the new leader (the lost connection invalidated the topology, the next
    connection asked Patroni again)."""
    cluster = pgfailover_patroni_cluster
    old = cluster.wait_leader()
    other = next(n for n in cluster.nodes if n is not old)
    dbs: dict[str, Any] = {
        "default": {
            "ENGINE": PGF,
            "NAME": cluster.dbname,
            "USER": cluster.user,
            "PASSWORD": cluster.password,
            "CONN_MAX_AGE": 600,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": {
                "connect_timeout": 3,
                "topology": {"kind": "patroni", "urls": [other.rest_url], "timeout": 2},
            },
        }
    }
    p = Project(dbs)
    project.append(p)
    p.ask("migrate", db="default")
    served = p.request("/server/", "default")
    assert served["status"] == 200, served
    assert served["body"]["port"] == old.port

    cluster.switchover()
    new = cluster.wait_leader()
    assert new is not old
    after = [p.request("/server/", "default") for _ in range(6)]
    print([r["status"] for r in after])
    first_ok = next(i for i, r in enumerate(after) if r["status"] == 200)
    assert first_ok <= 1, after
    assert all(r["status"] == 200 for r in after[first_ok:]), after
    assert {r["body"]["port"] for r in after[first_ok:]} == {new.port}, after
