"""The pytest plugin costs nothing in a run that uses none of its fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pgfailover.testing

#: Every module of the harness; only the package and its plugin may load without a fixture.
HARNESS = sorted(
    f"pgfailover.testing.{path.stem}"
    for path in Path(pgfailover.testing.__file__).parent.glob("*.py")
    if path.stem not in {"__init__", "plugin"}
)

# Loaded with -p, before the plugins of installed packages: records every atexit hook, and
# when each test starts (its fixtures set up) the imported modules and the hooks so far.
SPY = """
import atexit, json, sys

hooks = []
seen = {}
_register = atexit.register


def register(fn, *args, **kwargs):
    hooks.append(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}")
    return _register(fn, *args, **kwargs)


atexit.register = register


def pytest_runtest_call(item):
    seen[item.name] = {"modules": sorted(sys.modules), "hooks": list(hooks)}


def pytest_sessionfinish(session):
    seen["plugin"] = session.config.pluginmanager.has_plugin("pgfailover")
    with open("report.json", "w") as f:
        json.dump(seen, f)
"""
# Run in this order: the first test uses no fixture of ours, the second requests one.
TRIVIAL = """
def test_without_fixture():
    pass


def test_with_fixture(pgfailover_cluster_factory):
    assert pgfailover_cluster_factory
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a pytest run of TRIVIAL in a fresh directory imported, test by test."""
    tmp_path = tmp_path_factory.mktemp("plugin")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "pgf_spy.py").write_text(SPY)
    (tmp_path / "test_trivial.py").write_text(TRIVIAL)
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
    seen: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    assert seen["plugin"], "the pgfailover plugin was not loaded"
    return seen


def test_plugin_imports_no_harness_module_without_a_fixture(report: dict[str, Any]) -> None:
    """Until a pgfailover fixture is used, a pytest run has imported no harness module and
    registered no exit hook of ours."""
    before = report["test_without_fixture"]
    assert "pgfailover.testing.plugin" in before["modules"]
    assert [m for m in HARNESS if m in before["modules"]] == []
    assert "pwd" not in before["modules"]
    assert [h for h in before["hooks"] if h.startswith("pgfailover")] == []


def test_plugin_imports_the_harness_when_a_fixture_is_used(report: dict[str, Any]) -> None:
    """Requesting the cluster factory (without opening a cluster) loads the harness: the
    check above can see it."""
    after = report["test_with_fixture"]
    assert "pgfailover.testing.cluster" in after["modules"]
    assert [h for h in after["hooks"] if h.startswith("pgfailover")] != []
