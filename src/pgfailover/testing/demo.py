"""The demo behind ``make demo``: a real failover reproducing the stuck-writes problem."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg

from .cluster import LocalCluster


def run(out: Callable[[str], None] = print) -> int:
    """Start a cluster, fail over behind PgBouncer, show the write failures, repoint, tear down.

    Returns 0 when every step behaved as described (the failure reproduced and the repoint
    healed it), 1 otherwise.
    """
    ok = True
    out("starting a local cluster: primary + streaming standby + PgBouncer (transaction mode)")
    with LocalCluster(standbys=1, pgbouncer="transaction") as cluster:
        assert cluster.pgbouncer is not None
        out(f"  up: {cluster!r}, {cluster.pgbouncer!r}")
        table = f"demo_{uuid.uuid4().hex[:8]}"
        conn = psycopg.connect(cluster.pgbouncer.dsn(), prepare_threshold=None, autocommit=True)
        with conn:
            conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)")
            conn.execute(f"INSERT INTO {table} (note) VALUES ('before failover')")
            out(f"  client connected through PgBouncer wrote a row on {cluster.primary.name}")

            out("failover: stop the primary, promote the standby, old primary rejoins as standby")
            out(f"  {cluster.failover('fast')}")
            out(
                f"  new primary: {cluster.primary.name}; PgBouncer still points at "
                f"{cluster.pgbouncer.target.name if cluster.pgbouncer.target else None}"
            )
            status = conn.info.transaction_status.name
            out(f"  the client's connection: closed={conn.closed}, status={status}")

            for label, read_only in (("plain INSERT", None), ("BEGIN READ WRITE", False)):
                conn.autocommit = read_only is None
                conn.read_only = read_only
                try:
                    conn.execute(f"INSERT INTO {table} (note) VALUES ('during')")
                except psycopg.Error as ex:
                    out(f"  {label}: {type(ex).__name__} {ex.sqlstate}: {ex.diag.message_primary}")
                    conn.rollback()
                else:
                    ok = False
                    out(f"  {label}: unexpectedly succeeded")
            out(
                f"  the connection is still open: closed={conn.closed}"
                " (nothing tells a pool it is bad)"
            )

            out("repoint PgBouncer at the new primary (RELOAD)")
            out(f"  {cluster.repoint_pgbouncer(cluster.primary)}")
            conn.autocommit, conn.read_only = True, None
            conn.execute(f"INSERT INTO {table} (note) VALUES ('after repoint')")
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            out(f"  write succeeded on the same connection; rows: {row[0] if row else '?'}")
    out("cluster torn down" + ("" if ok else " (the demo did not reproduce the failure)"))
    return 0 if ok else 1
