"""``pgfailover drill --stacks`` with the Django stacks: naive (the stock backend) and
protected (``pgfailover.django`` under ``pgfailover.django.atomic``'s runner).

The drill configures Django in its own process (``settings.configure()``), so it runs as a
subprocess here: this test process's Django stays unconfigured for the other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgfailover.drill.options import OPTIONAL_STACK_NAMES, STACK_NAMES, select_stacks
from pgfailover.drill.report import DrillReport
from pgfailover.drill.run import stacks_named
from pgfailover.drill.stacks import OPTIONAL_STACKS, STACKS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Bound of the whole drill subprocess (it writes ~5 s; starting and failing over a cluster
#: on a loaded machine takes the rest).
DRILL_TIMEOUT = 300.0


def test_django_stacks_are_selected_by_name_and_shown_naive_first() -> None:
    """--stacks accepts the Django stacks' keys (they are not in the default set), orders
    every selection naive stacks first, and stacks_named maps the names to their classes."""
    assert tuple(kind.name for kind in OPTIONAL_STACKS) == OPTIONAL_STACK_NAMES
    assert not set(OPTIONAL_STACK_NAMES) & set(STACK_NAMES)
    chosen = select_stacks("django-pgfailover-runner, pgfailover pool,Django postgresql")
    assert chosen == ("Django postgresql", "pgfailover pool", "Django pgfailover + runner")
    kinds = stacks_named(chosen)
    assert [kind.name for kind in kinds] == list(chosen)
    assert kinds[0] in OPTIONAL_STACKS
    assert kinds[1] in STACKS
    assert [kind.protected for kind in kinds] == [False, True, True]
    with pytest.raises(ValueError, match="django-postgresql"):
        select_stacks("django")  # unknown: the message lists the valid keys


def test_drill_django_stacks_session_mode(tmp_path: Path) -> None:
    """Behind PgBouncer in session mode with persistent connections and health checks, the
    stock Django backend never writes again after the failover (25006: its SELECT 1 health
    check passes on the standby), while pgfailover.django under its runner loses,
    duplicates and invents no write, sees no failed write, writes again after the repoint,
    and the drill's exit status is 0."""
    json_path = tmp_path / "drill.json"
    argv = [
        "drill",
        "-q",
        "--no-plot",
        "--stacks",
        "django-postgresql,django-pgfailover-runner",
        "--before",
        "1.5",
        "--repoint-delay",
        "1",
        "--after",
        "2.5",
        "--json",
        str(json_path),
    ]
    code = "import sys; from pgfailover.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DRILL_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
    report = DrillReport.from_json(json.loads(json_path.read_text()))
    stacks = {stack.name: stack for stack in report.stacks}
    assert list(stacks) == list(OPTIONAL_STACK_NAMES)
    naive, ours = stacks["Django postgresql"], stacks["Django pgfailover + runner"]
    print(done.stdout)
    assert naive.ok > 0
    assert ours.ok > 0
    assert naive.result == "STUCK", naive
    assert naive.errors.get("25006", 0) > 0, naive
    assert (ours.lost, ours.duplicated, ours.phantom) == (0, 0, 0), ours
    assert ours.failed == 0, ours
    assert ours.first_ok_after is not None, ours
    assert ours.failed_after == 0, ours
