"""``pgfailover drill --follower``: which options go with it, and the defaults it implies."""

from __future__ import annotations

import pytest

from pgfailover.cli import main
from pgfailover.drill.run import DrillOptions, follower_config


def test_follower_drill_defaults_to_pgbouncer_in_session_mode_without_repoint_delay() -> None:
    """With the follower nobody repoints PgBouncer by hand: no repoint delay, PgBouncer in
    session mode unless told otherwise, for the local and the Patroni drill alike; the
    report's config says who repoints."""
    local = DrillOptions(follower=True)
    assert (local.target, local.repoint_delay, local.follower) == ("session", None, True)
    assert DrillOptions(follower=True, target="transaction").target == "transaction"
    patroni = DrillOptions(ha="patroni", follower=True, target="transaction")
    assert (patroni.target, patroni.fault, patroni.repoint_delay) == ("transaction", "crash", None)
    assert DrillOptions(ha="patroni", follower=True).target == "session"
    said = follower_config(local)["pgbouncer repoint"]
    assert isinstance(said, str)
    assert "follower" in said
    assert "no manual repoint" in said
    assert follower_config(DrillOptions()) == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "direct"}, "choose a PgBouncer target"),
        ({"repoint_delay": 1.0}, "nobody repoints PgBouncer by hand"),
        ({"ha": "patroni", "target": "direct"}, "choose a PgBouncer target"),
    ],
)
def test_follower_refuses_options_that_contradict_it(
    kwargs: dict[str, object], message: str
) -> None:
    """A direct target (no PgBouncer to follow) or a manual repoint delay with the follower
    is a ValueError saying what to change."""
    with pytest.raises(ValueError, match=message):
        DrillOptions(follower=True, **kwargs)  # type: ignore[arg-type]


def test_a_pgbouncer_target_for_patroni_still_needs_the_follower() -> None:
    """Without the follower the Patroni drill refuses a PgBouncer target, and says the
    follower is how to get one."""
    with pytest.raises(ValueError, match="--follower"):
        DrillOptions(ha="patroni", target="session")


def test_cli_follower_with_repoint_delay_ends_with_the_usage_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``drill --follower --repoint-delay 1`` stops before any cluster starts: exit status
    2, the drill's usage line and the reason."""
    with pytest.raises(SystemExit) as info:
        main(["drill", "--no-plot", "--follower", "--repoint-delay", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pgfailover drill" in err
    assert "nobody repoints PgBouncer by hand" in err
