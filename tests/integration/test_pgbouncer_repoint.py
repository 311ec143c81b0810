"""``pgfailover pgbouncer repoint`` against a real PgBouncer after a real failover: writes
through PgBouncer work again without the harness's own repoint, a second run changes
nothing, and a change PgBouncer does not take is reported (status 1)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgfailover.cli import main
from pgfailover.testing import LocalCluster
from pgfailover.testing.plugin import ClusterFactory

from .support import bouncer_cluster, eventually, table


@pytest.fixture
def cluster(pgfailover_cluster_factory: ClusterFactory) -> Iterator[LocalCluster]:
    """The session's transaction-mode cluster, reset; after the test the harness is told
    its PgBouncer's target is unknown, so that the next reset rewrites the file."""
    cluster = bouncer_cluster(pgfailover_cluster_factory, "transaction")
    yield cluster
    assert cluster.pgbouncer is not None
    cluster.pgbouncer.target = None


def _insert(conn: psycopg.Connection[object], name: str) -> bool:
    """Whether one insert into ``name`` succeeded on ``conn``."""
    try:
        conn.execute(f"INSERT INTO {name} (writer) VALUES (1)")
    except psycopg.Error:
        return False
    return True


def _database_lines(text: str) -> set[int]:
    return {
        i for i, line in enumerate(text.splitlines()) if line.startswith(("app =", "postgres ="))
    }


def test_repoint_after_failover_restores_writes_and_is_idempotent(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a failover, writes through PgBouncer fail (it still points at the demoted
    node); repoint rewrites only the [databases] lines (owner and mode kept), RELOADs and
    RECONNECTs, and writes succeed again, on a new client connection and on one opened
    before the failover; a second repoint changes nothing and says so."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    name = table(cluster)
    before_text = bouncer.config_path.read_text()
    before_stat = bouncer.config_path.stat()
    with psycopg.connect(bouncer.dsn(), autocommit=True, prepare_threshold=None) as old_client:
        assert _insert(old_client, name)
        cluster.failover()
        new = cluster.primary
        with (
            psycopg.connect(bouncer.dsn(), autocommit=True, prepare_threshold=None) as conn,
            pytest.raises(psycopg.Error),  # 25006 on the demoted node
        ):
            conn.execute(f"INSERT INTO {name} (writer) VALUES (2)")
        argv = ["pgbouncer", "repoint", "--admin", bouncer.admin_dsn(), "--to", new.address]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "RELOAD" in out
        assert f"app, postgres at {new.address}" in out
        with psycopg.connect(bouncer.dsn(), autocommit=True, prepare_threshold=None) as conn:
            eventually(lambda: _insert(conn, name), timeout=10)
        eventually(lambda: _insert(old_client, name), timeout=10)

    after_text = bouncer.config_path.read_text()
    after_stat = bouncer.config_path.stat()
    old_lines, new_lines = before_text.splitlines(), after_text.splitlines()
    changed = {i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b}
    assert changed == _database_lines(before_text)
    assert all(f"port={new.port}" in new_lines[i] for i in changed)
    assert (after_stat.st_uid, after_stat.st_mode) == (before_stat.st_uid, before_stat.st_mode)

    assert main(argv) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert bouncer.config_path.read_text() == after_text
    assert bouncer.config_path.stat().st_ino == after_stat.st_ino  # not even rewritten


def test_repoint_of_a_file_pgbouncer_does_not_read_exits_1(
    cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Repointing a copy of the file that PgBouncer does not read: the RELOAD changes
    nothing, SHOW DATABASES still shows the old address, status 1 and a message saying so;
    PgBouncer's own file is untouched."""
    bouncer = cluster.pgbouncer
    assert bouncer is not None
    real = bouncer.config_path.read_text()
    copy = tmp_path / "pgbouncer.ini"
    shutil.copyfile(bouncer.config_path, copy)
    standby = cluster.standbys[0]
    argv = ["pgbouncer", "repoint", "--admin", bouncer.admin_dsn(), "--to", standby.address]
    assert main([*argv, "--ini", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "still shows app at" in err
    assert "does PgBouncer read" in err
    assert bouncer.config_path.read_text() == real
    assert f"port={standby.port}" in copy.read_text()
