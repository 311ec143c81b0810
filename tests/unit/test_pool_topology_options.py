"""``topology=`` on pgfailover's pools: a source of the wrong kind, or a conninfo that is
not a string, is a TypeError that says what to pass (checked before anything connects)."""

from __future__ import annotations

from typing import Any

import pytest

from pgfailover.pool import ConnectionPool
from pgfailover.pool_async import AsyncConnectionPool
from pgfailover.topology import AsyncHostListTopology, HostListTopology

HOSTS = "host=db1,db2 port=5432,5433 dbname=app user=app"


@pytest.mark.parametrize(
    ("pool_class", "wrong"),
    [
        (ConnectionPool, AsyncHostListTopology(HOSTS)),
        (AsyncConnectionPool, HostListTopology(HOSTS)),
        (ConnectionPool, "db1,db2"),
        (AsyncConnectionPool, ["db1", "db2"]),
    ],
    ids=["async-source-to-sync-pool", "sync-source-to-async-pool", "string", "list"],
)
def test_a_topology_of_the_wrong_kind_is_a_type_error(pool_class: Any, wrong: Any) -> None:
    """The error names the expected source class and examples of it."""
    expected = "an AsyncTopologySource" if pool_class is AsyncConnectionPool else "a TopologySource"
    with pytest.raises(TypeError, match=f"topology must be {expected} .*HostListTopology"):
        pool_class("dbname=app", topology=wrong, open=False)


@pytest.mark.parametrize(
    ("pool_class", "source"),
    [
        (ConnectionPool, HostListTopology(HOSTS)),
        (AsyncConnectionPool, AsyncHostListTopology(HOSTS)),
    ],
    ids=["sync", "async"],
)
def test_with_a_topology_the_conninfo_must_be_a_string(pool_class: Any, source: Any) -> None:
    """A callable conninfo cannot be combined with a topology (which supplies host and
    port): TypeError."""
    with pytest.raises(TypeError, match="conninfo must be a string"):
        pool_class(lambda: "dbname=app", topology=source, open=False)


@pytest.mark.parametrize(
    ("pool_class", "source"),
    [
        (ConnectionPool, HostListTopology(HOSTS)),
        (AsyncConnectionPool, AsyncHostListTopology(HOSTS)),
    ],
    ids=["sync", "async"],
)
def test_the_pool_keeps_the_topology_and_resolves_its_conninfo_through_it(
    pool_class: Any, source: Any
) -> None:
    """The pool exposes the source as ``topology`` and hands psycopg_pool a callable
    conninfo (resolved through the topology at each connection attempt)."""
    pool = pool_class("dbname=app user=app", topology=source, open=False)
    assert pool.topology is source
    assert callable(pool.conninfo)
