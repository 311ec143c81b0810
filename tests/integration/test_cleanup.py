"""Every process the harness starts is ended, and its directory removed, however it exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .support import interruptible

_RECORD = """
import json, os, sys
from pgfailover.testing import LocalCluster

def record(cluster, path):
    pids = [n.pid for n in cluster.nodes] + [cluster.pgbouncer.process.pid]
    with open(path, "w") as f:
        json.dump({"pids": pids, "root": str(cluster.root)}, f)
"""


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) postgres or pgbouncer process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and (b"postgres" in cmdline or b"pgbouncer" in cmdline)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _assert_all_gone(record_path: Path) -> None:
    record = json.loads(record_path.read_text())
    assert len(record["pids"]) == 3
    for pid in record["pids"]:
        assert not _alive(pid), f"process {pid} survived"
        assert _group_members(pid) == [], f"children of {pid} survived"
    assert not Path(record["root"]).exists()


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.py"
    path.write_text(_RECORD + textwrap.dedent(script))
    return subprocess.run(
        [sys.executable, str(path), str(tmp_path / "record.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("body", "expect_exit"),
    [
        ("pass", 0),
        ("raise RuntimeError('boom')", 1),
        ("raise KeyboardInterrupt", -signal.SIGINT),
    ],
    ids=["normal-exit", "exception", "keyboard-interrupt"],
)
def test_context_manager_ends_every_process(tmp_path: Path, body: str, expect_exit: int) -> None:
    """Leaving the with-block normally, by exception or by KeyboardInterrupt ends every server."""
    result = _run(
        f"""
        with LocalCluster(standbys=1, pgbouncer="transaction") as cluster:
            record(cluster, sys.argv[1])
            {body}
        """,
        tmp_path,
    )
    assert result.returncode == expect_exit, result.stderr
    _assert_all_gone(tmp_path / "record.json")


def test_interpreter_exit_ends_a_cluster_that_was_never_closed(tmp_path: Path) -> None:
    """A cluster opened without a with-block and never closed is ended at interpreter exit."""
    result = _run(
        """
        cluster = LocalCluster(standbys=1, pgbouncer="transaction")
        cluster.open()
        record(cluster, sys.argv[1])
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    _assert_all_gone(tmp_path / "record.json")


def test_ctrl_c_ends_every_process(tmp_path: Path) -> None:
    """A real SIGINT delivered while the cluster runs ends every server it started."""
    path = tmp_path / "script.py"
    record_path = tmp_path / "record.json"
    path.write_text(
        _RECORD
        + textwrap.dedent(
            """
        import time
        with LocalCluster(standbys=1, pgbouncer="transaction") as cluster:
            record(cluster, sys.argv[1])
            time.sleep(120)
        """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(path), str(record_path)],
        stderr=subprocess.PIPE,
        preexec_fn=interruptible,  # noqa: PLW1509 - only resets one signal before exec
    )
    deadline = time.monotonic() + 60
    while not record_path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert record_path.exists(), "the cluster did not start"
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(60) != 0
    _assert_all_gone(record_path)


def test_failing_pytest_session_with_plugin_fixtures_leaves_nothing(tmp_path: Path) -> None:
    """A pytest run whose tests fail while using the plugin's cluster leaves no server behind."""
    record_path = tmp_path / "record.json"
    (tmp_path / "test_uses_cluster.py").write_text(
        textwrap.dedent(
            f"""
        import json

        def test_fails(pgfailover_cluster):
            cluster = pgfailover_cluster
            cluster.failover()
            pids = [n.pid for n in cluster.nodes] + [cluster.pgbouncer.process.pid]
            with open({str(record_path)!r}, "w") as f:
                json.dump({{"pids": pids, "root": str(cluster.root)}}, f)
            assert False, "this test fails on purpose"
        """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert "1 failed" in result.stdout, result.stdout + result.stderr
    _assert_all_gone(record_path)
