"""The command line's own behaviour, without servers: option checks and side effects."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

import pytest

import pgfailover.drill.run as drill_run
from pgfailover.cli import build_parser, main
from pgfailover.drill.options import STACK_NAMES, stack_key
from pgfailover.drill.report import DrillReport, build_report
from pgfailover.drill.stacks import STACKS, Endpoint


def _drill_parser() -> argparse.ArgumentParser:
    """The ``drill`` sub-command's parser."""
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    parser = commands.choices["drill"]
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``argv``, expect the parser to refuse it with status 2; its standard error."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_cli_restores_the_log_levels_it_quietens(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main(["drill", ...])`` quietens the library loggers for the drill only: a program
    (or test) that calls it keeps its own levels afterwards, even when the drill fails."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plot cannot be drawn: status 2
    logger = logging.getLogger("pgfailover")
    before = logger.level
    assert main(["drill"]) == 2  # refused before any cluster starts
    assert logger.level == before


def test_version_prints_the_installed_distribution_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``pgfailover --version`` prints the version importlib.metadata knows, status 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"pgfailover {importlib.metadata.version('pgfailover')}\n"


def test_demo_help_says_what_the_demo_does(capsys: pytest.CaptureFixture[str]) -> None:
    """``pgfailover demo --help`` describes the demo, not just its usage line."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fact in ("PgBouncer", "fail over", "25006", "repointed", "pgfailover drill"):
        assert fact in text


def test_every_drill_option_has_help_stating_its_default() -> None:
    """Each drill option has help text that names its default, and the rendered help shows
    the default's value for options that have one."""
    parser = _drill_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        assert "default" in action.help, action.option_strings
        if action.default not in (None, False):
            shown = ", ".join(action.default) if isinstance(action.default, tuple) else None
            assert shown == ", ".join(STACK_NAMES) or f"default: {action.default})" in text, (
                action.option_strings
            )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["drill", "--after", "0"], "--after: expected a number more than 0, at most 600 seconds"),
        (["drill", "--after", "-1"], "--after: expected a number more than 0, at most 600"),
        (["drill", "--before", "0"], "--before: expected a number more than 0, at most 600"),
        (["drill", "--after", "601"], "--after: expected a number more than 0, at most 600"),
        (["drill", "--repoint-delay", "-0.5"], "--repoint-delay: expected a number from 0 to 600"),
        (["drill", "--rate", "0"], "--rate: expected a number more than 0, at most 1000 writes"),
        (["drill", "--rate", "nan"], "--rate: expected a number more than 0, at most 1000"),
        (["drill", "--workers", "0"], "--workers: expected a whole number from 1 to 16 threads"),
        (["drill", "--workers", "1.5"], "--workers: expected a whole number from 1 to 16"),
        (["drill", "--workers", "17"], "--workers: expected a whole number from 1 to 16"),
    ],
)
def test_drill_refuses_nonsensical_numbers_at_parse_time(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A number the drill cannot use (no writing time after the failover, no writes, no
    workers, out of bounds) is refused by the parser: status 2, the usage line, and what
    the option accepts."""
    err = _refused(argv, capsys)
    assert err.startswith("usage: pgfailover drill")
    assert message in err
    assert repr(argv[-1]) in err


def test_drill_accepts_zero_repoint_delay() -> None:
    """``--repoint-delay 0`` (repoint as soon as the promotion ends) is a valid drill."""
    assert _drill_parser().parse_args(["--repoint-delay", "0"]).repoint_delay == 0.0


def test_drill_stacks_keys_are_the_report_names_or_their_slugs() -> None:
    """``--stacks`` takes each stack's name as the report shows it, or its slug, in any
    case; the selection comes back in the report's order, each stack once."""
    parser = _drill_parser()
    assert tuple(kind.name for kind in STACKS) == STACK_NAMES
    for name in STACK_NAMES:
        assert parser.parse_args(["--stacks", name]).stacks == (name,)
        assert parser.parse_args(["--stacks", stack_key(name)]).stacks == (name,)
    chosen = parser.parse_args(
        ["--stacks", "SQLAlchemy instrumented + runner, psycopg-pool,PSYCOPG_POOL"]
    ).stacks
    assert chosen == ("psycopg_pool", "SQLAlchemy instrumented + runner")
    assert parser.parse_args([]).stacks == STACK_NAMES


def test_drill_help_lists_the_stack_keys() -> None:
    """The ``--stacks`` help lists the slug of every stack name the report shows."""
    text = " ".join(_drill_parser().format_help().split())
    keys = [stack_key(name) for name in STACK_NAMES]
    assert keys == [
        "psycopg-pool",
        "sqlalchemy-pre-ping",
        "pgfailover-pool",
        "sqlalchemy-instrumented",
        "pgfailover-pool-runner",
        "sqlalchemy-instrumented-runner",
    ]
    assert ", ".join(keys) in text


@pytest.mark.parametrize("value", ["pool,nope", "pgfailover-sqlalchemy", " , "])
def test_drill_refuses_an_unknown_stack_key_listing_the_valid_ones(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown ``--stacks`` key (or none at all) is refused with status 2, naming what
    was not understood and listing every valid key."""
    err = _refused(["drill", "--stacks", value], capsys)
    assert "argument --stacks:" in err
    for key in (stack_key(name) for name in STACK_NAMES):
        assert key in err
    if value.strip(" ,"):
        assert repr(value.rsplit(",", maxsplit=1)[-1]) in err


def test_drill_endpoint_repr_hides_the_password() -> None:
    """The drill's endpoint (which builds conninfo strings with the password) never shows
    the password in its repr."""
    endpoint = Endpoint([("127.0.0.1", 5432)], "app", "app", "s3cret-pw")
    assert "s3cret-pw" not in repr(endpoint)
    assert "s3cret-pw" in endpoint.conninfo()


def test_drill_runs_the_chosen_stacks_under_the_names_the_report_shows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--stacks`` keys reach the drill as the stack classes of those names, in the
    report's order, and the report lists them under the same names."""
    seen: list[drill_run.DrillOptions] = []

    def fake_drill(options: drill_run.DrillOptions, **_: object) -> DrillReport:
        seen.append(options)
        stacks = [(kind.name, kind.protected) for kind in options.stacks]
        return build_report({}, (), 1.0, (0.0, 2.0), stacks, [], {})

    monkeypatch.setattr(drill_run, "run_drill", fake_drill)
    argv = ["drill", "-q", "--no-plot", "--stacks", "pgfailover-pool-runner,PSYCOPG_POOL"]
    assert main(argv) == 0
    (options,) = seen
    assert [kind.name for kind in options.stacks] == ["psycopg_pool", "pgfailover pool + runner"]
    assert _table_names(capsys.readouterr().out) == ["psycopg_pool", "pgfailover pool + runner"]


def _table_names(text: str) -> list[str]:
    """The stack names of a printed drill report's table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stack "))
    names = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        names.append(line.split("  ")[0].strip())
    return names
