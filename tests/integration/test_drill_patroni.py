"""``pgfailover drill --ha patroni``: the drill on a real etcd + Patroni cluster of its own,
and the options that do not go with it (refused before anything starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgfailover.cli import main
from pgfailover.drill.report import DrillReport
from pgfailover.drill.run import DrillOptions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ha", "patroni", "--target", "transaction"], "does not apply to the Patroni drill"),
        (["--ha", "patroni", "--target", "session"], "does not apply to the Patroni drill"),
        (["--ha", "patroni", "--stop", "immediate"], "applies to the local drill only"),
        (["--ha", "patroni", "--repoint-delay", "1"], "no PgBouncer to repoint"),
        (["--fault", "switchover"], "applies to the Patroni drill (--ha patroni) only"),
        (["--ha", "local", "--fault", "crash"], "applies to the Patroni drill (--ha patroni) only"),
        (["--ha", "patroni", "--fault", "reboot"], "invalid choice: 'reboot'"),
        (["--ha", "kubernetes"], "invalid choice: 'kubernetes'"),
    ],
)
def test_options_that_do_not_fit_the_cluster_are_refused_with_the_usage_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PgBouncer target, a stop mode or a repoint delay with ``--ha patroni``, a fault
    with the local drill, and an unknown fault or HA kind end with exit status 2, the
    drill's usage line and a message naming the problem, before any cluster starts."""
    with pytest.raises(SystemExit) as exit_info:
        main(["drill", "--no-plot", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pgfailover drill" in err
    assert message in err
    assert "starting" not in err


def test_each_cluster_kind_gets_its_own_defaults() -> None:
    """Left out, the options take the defaults of the chosen cluster: a local drill goes
    through PgBouncer in session mode with a fast stop, a 2 s repoint delay and asynchronous
    replication; a Patroni drill connects directly, crashes the leader and runs
    synchronous_mode, which ``synchronous=False`` turns off; ``target='direct'`` is
    accepted for it."""
    local = DrillOptions()
    assert (local.ha, local.target, local.stop, local.repoint_delay) == (
        "local",
        "session",
        "fast",
        2.0,
    )
    assert (local.synchronous, local.fault) == (False, None)
    patroni = DrillOptions(ha="patroni")
    assert (patroni.target, patroni.fault, patroni.synchronous) == ("direct", "crash", True)
    assert (patroni.stop, patroni.repoint_delay) == (None, None)
    assert DrillOptions(ha="patroni", synchronous=False).synchronous is False
    assert DrillOptions(ha="patroni", target="direct", fault="freeze").fault == "freeze"
    with pytest.raises(ValueError, match="fault must be"):
        DrillOptions(ha="patroni", fault="reboot")  # type: ignore[arg-type]


def test_patroni_leader_crash_drill_keeps_every_protected_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pgfailover drill --ha patroni`` unattended (a kill -9 of the leader, synchronous
    mode): exit status 0; the timeline shows the leader lost, the new leader named and then
    taking writes, which is when the primary counts as reachable; every stack wrote before
    the crash; no protected stack lost or duplicated a write; the runner stacks saw no
    failure at all and invented no write; nothing a protected stack started after the new
    leader took writes failed; the JSON, the printed config and the PNG are written.
    A bare protected stack (no runner) may report as failed a write whose COMMIT was in
    flight when the leader was killed and that the promoted synchronous standby holds (a
    "phantom": a lost COMMIT's outcome is unknown to the caller; resolving it is the
    runner's job): at most one per worker, the COMMITs that can be in flight at the kill
    (seen in about one full run of four since the monitor became the default)."""
    json_path, png_path = tmp_path / "drill.json", tmp_path / "drill.png"
    argv = ["drill", "-q", "--ha", "patroni", "--before", "1.5", "--after", "2.5"]
    code = main([*argv, "--json", str(json_path), "--plot", str(png_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = DrillReport.from_json(json.loads(json_path.read_text()))
    assert report.config["ha"] == "patroni"
    assert report.config["fault"] == "crash"
    assert report.config["replication"] == "synchronous_mode"
    assert "  ha: patroni\n" in out

    names = [mark.name for mark in report.marks]
    assert len(names) == 3, names
    assert names[0].endswith("killed (leader lost)"), names
    assert names[1].endswith("named leader"), names
    assert names[2].endswith("takes writes (new leader)"), names
    lost, named, writable = (mark.at for mark in report.marks)
    assert lost < named <= writable
    assert report.reachable_at == writable

    stacks = {stack.name: stack for stack in report.stacks}
    assert len(stacks) == 6
    for stack in stacks.values():
        assert stack.ok > 0, stack
        if stack.protected:
            assert (stack.lost, stack.duplicated) == (0, 0), stack
            in_flight = 0 if "runner" in stack.name else int(str(report.config["workers"]))
            assert stack.phantom <= in_flight, stack
            assert stack.failed_after == 0, stack
            assert stack.first_ok_after is not None, stack
    assert stacks["pgfailover pool + runner"].failed == 0
    assert stacks["SQLAlchemy instrumented + runner"].failed == 0
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
