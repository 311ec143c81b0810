"""The pytest plugin costs nothing in a run that uses none of its fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pgfailover.testing

#: Every module of the harness; only the package and its plugin may load without a fixture.
HARNESS = sorted(
    f"pgfailover.testing.{path.stem}"
    for path in Path(pgfailover.testing.__file__).parent.glob("*.py")
    if path.stem not in {"__init__", "plugin"}
)

# Loaded with -p, before the plugins of installed packages: records every atexit hook and,
# at the end of the session, every imported module.
SPY = """
import atexit, json, sys

hooks = []
_register = atexit.register


def register(fn, *args, **kwargs):
    hooks.append(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}")
    return _register(fn, *args, **kwargs)


atexit.register = register


def pytest_sessionfinish(session):
    with open("report.json", "w") as f:
        json.dump({
            "plugin": session.config.pluginmanager.has_plugin("pgfailover"),
            "modules": sorted(sys.modules),
            "hooks": hooks,
        }, f)
"""


def _run_pytest(tmp_path: Path, test_source: str) -> dict[str, Any]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "pgf_spy.py").write_text(SPY)
    (tmp_path / "test_trivial.py").write_text(test_source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pgf_spy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    assert report["plugin"], "the pgfailover plugin was not loaded"
    return report


def test_plugin_imports_no_harness_module_without_a_fixture(tmp_path: Path) -> None:
    """A pytest run using no pgfailover fixture imports no harness module and registers no
    exit hook of ours."""
    report = _run_pytest(tmp_path, "def test_nothing():\n    pass\n")
    assert "pgfailover.testing.plugin" in report["modules"]
    assert [m for m in HARNESS if m in report["modules"]] == []
    assert "pwd" not in report["modules"]
    assert [h for h in report["hooks"] if h.startswith("pgfailover")] == []


def test_plugin_imports_the_harness_when_a_fixture_is_used(tmp_path: Path) -> None:
    """Requesting the cluster factory (without opening a cluster) loads the harness: the
    check above can see it."""
    source = "def test_uses(pgfailover_cluster_factory):\n    assert pgfailover_cluster_factory\n"
    report = _run_pytest(tmp_path, source)
    assert "pgfailover.testing.cluster" in report["modules"]
    assert [h for h in report["hooks"] if h.startswith("pgfailover")] != []
