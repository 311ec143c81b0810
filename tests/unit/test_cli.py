"""The command line's own behaviour, without servers: option checks and side effects."""

from __future__ import annotations

import logging

import pytest

from pgfailover.cli import main
from pgfailover.drill.stacks import Endpoint


def test_cli_restores_the_log_levels_it_quietens() -> None:
    """``main(["drill", ...])`` quietens the library loggers for the drill only: a program
    (or test) that calls it keeps its own levels afterwards, even when the drill fails."""
    logger = logging.getLogger("pgfailover")
    before = logger.level
    assert main(["drill", "--workers", "0"]) == 2  # rejected before any cluster starts
    assert logger.level == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["drill", "--workers", "0"], "workers must be between 1 and 16"),
        (["drill", "--rate", "0"], "rate must be > 0"),
        (["drill", "--stacks", "pool,nope"], "unknown stack(s) nope"),
    ],
)
def test_drill_rejects_bad_options_with_status_2_before_starting_anything(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad drill options give exit status 2 and a message saying what to fix."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_drill_rejects_out_of_range_seconds_at_parse_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A time option outside 0..600 s is refused by the parser (status 2)."""
    with pytest.raises(SystemExit) as info:
        main(["drill", "--after", "-1"])
    assert info.value.code == 2
    assert "expected 0 to 600 seconds" in capsys.readouterr().err


def test_drill_endpoint_repr_hides_the_password() -> None:
    """The drill's endpoint (which builds conninfo strings with the password) never shows
    the password in its repr."""
    endpoint = Endpoint([("127.0.0.1", 5432)], "app", "app", "s3cret-pw")
    assert "s3cret-pw" not in repr(endpoint)
    assert "s3cret-pw" in endpoint.conninfo()
