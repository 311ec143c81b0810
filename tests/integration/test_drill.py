"""``pgfailover drill`` end to end: a real cluster, real failover, every write verified."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgfailover.cli import main
from pgfailover.drill.report import DrillReport
from pgfailover.drill.run import DrillOptions, run_drill

from .support import interruptible

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table(text: str) -> dict[str, list[str]]:
    """The report's table: stack name -> its cells (split on runs of 2+ spaces)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stack "))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        name, *cells = re.split(r"\s{2,}", line.strip())
        rows[name] = cells
    return rows


def test_drill_shows_naive_stacks_stuck_and_protected_ones_writing_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Behind PgBouncer in session mode the naive stacks never write again after the
    failover, the protected ones resume after the repoint (well before the run ends; how
    fast is the benchmarks' business) with no write lost,
    duplicated or invented, the runner stacks see no failure at all, the exit status is 0,
    the printed table, the JSON and the PNG agree, and the config records the conditions of
    the timings (repoint delay, PgBouncer's server_login_retry)."""
    json_path, png_path = tmp_path / "drill.json", tmp_path / "drill.png"
    argv = ["drill", "-q", "--before", "1.5", "--repoint-delay", "1", "--after", "2.5"]
    code = main([*argv, "--json", str(json_path), "--plot", str(png_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = DrillReport.from_json(json.loads(json_path.read_text()))
    stacks = {stack.name: stack for stack in report.stacks}
    assert len(stacks) == 6
    for stack in stacks.values():
        assert stack.ok > 0, stack
        if not stack.protected:
            assert stack.result == "STUCK", stack
            assert stack.errors.get("25006", 0) > 0, stack
        else:
            assert (stack.lost, stack.duplicated, stack.phantom) == (0, 0, 0), stack
            assert stack.first_ok_after is not None
            assert stack.first_ok_after < 2.0, stack  # of the run's 2.5 s after the repoint
            assert stack.failed_after == 0, stack
    assert stacks["pgfailover pool + runner"].failed == 0
    assert stacks["SQLAlchemy instrumented + runner"].failed == 0
    assert [mark.name for mark in report.marks][-1] == "PgBouncer repointed"
    assert report.config["repoint_delay"] == 1.0
    assert report.config["server_login_retry"] == 0.1
    assert "  server_login_retry: 0.1\n" in out

    rows = _table(out)
    data = json.loads(json_path.read_text())
    assert list(rows) == [stack["name"] for stack in data["stacks"]]
    for stack in data["stacks"]:
        first = stack["first_ok_after_ms"]
        assert rows[stack["name"]] == [
            "yes" if stack["protected"] else "no",
            *(str(stack[k]) for k in ("attempts", "ok", "failed", "unknown", "failed_after")),
            "never" if first is None else str(first),
            *(str(stack[k]) for k in ("longest_gap_ms", "lost", "duplicated", "phantom")),
            stack["result"],
        ]
    png = png_path.read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert len(png) > 20_000


def _processes_under(root: str) -> list[int]:
    """Live processes whose command line mentions ``root`` (the cluster's servers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if root.encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_ctrl_c_during_a_drill_tears_everything_down(tmp_path: Path) -> None:
    """SIGINT while the stacks write ends the drill with status 130, every server the
    drill started is gone and its directory removed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgfailover.cli", "drill", "--no-plot", "--before", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=interruptible,  # noqa: PLW1509 - only resets one signal before exec
    )
    assert proc.stderr is not None
    root = None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        match = re.search(r"files in (\S+)", line)
        if match:
            root = match.group(1)
        if "writing through" in line or time.monotonic() > deadline:
            break
    assert root is not None, "the drill did not start its cluster"
    assert len(_processes_under(root)) >= 3  # two postmasters and PgBouncer, at least
    match = None
    for line in proc.stderr:  # a progress line (one per second) with acknowledged writes
        match = re.search(r"writes ok\s+(\d+)", line)
        if (match and int(match.group(1)) > 0) or time.monotonic() > deadline:
            break
    assert match is not None, "no progress line before the deadline"
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 130
    assert "interrupted" in proc.stderr.read()
    assert _processes_under(root) == []
    assert not Path(root).exists()


def test_drill_in_transaction_mode_heals_every_stack_after_the_repoint() -> None:
    """Behind PgBouncer in transaction mode every stack writes again once PgBouncer is
    repointed (server connections are reassigned per transaction), nothing started after
    that fails (no prepared-statement errors: the stacks disable them, as PgBouncer < 1.21
    requires), and the runner stacks see no failure at all."""
    options = DrillOptions(target="transaction", before=1.5, repoint_delay=1.0, after=2.5)
    report = run_drill(options)
    for stack in report.stacks:
        assert stack.result in ("recovered", "wrote through"), stack
        assert (stack.lost, stack.duplicated, stack.phantom) == (0, 0, 0), stack
        assert not {"26000", "42P05"} & set(stack.errors), stack
        if "runner" in stack.name:
            assert stack.failed == 0, stack
