"""``pgfailover drill --follower``: the drill's failover with PgBouncer repointed by the real
follower process, and nobody else."""

from __future__ import annotations

from pgfailover.drill.run import DrillOptions, run_drill, stacks_named


def test_follower_drill_in_transaction_mode_heals_without_a_manual_repoint() -> None:
    """Behind PgBouncer in transaction mode, with the follower and no manual repoint: the
    report says who repointed (config and timeline), the primary is reachable once the
    follower repointed, the plain psycopg_pool app writes again after that (an operation it
    starts just after the repoint may still fail: PgBouncer refuses new work with 08P01
    "server login has been failing" after a server login failed during the outage, until
    a login of its own succeeds), and pgfailover's pool under the runner neither fails nor
    loses a write."""
    options = DrillOptions(
        target="transaction",
        follower=True,
        before=1.5,
        after=2.5,
        stacks=stacks_named(["psycopg_pool", "pgfailover pool + runner"]),
    )
    report = run_drill(options)
    assert "no manual repoint" in str(report.config["pgbouncer repoint"])
    assert report.config["repoint_delay"] is None
    names = [mark.name for mark in report.marks]
    assert "PgBouncer repointed by the follower" in names
    assert not any(name == "PgBouncer repointed" for name in names)
    assert report.reachable_at is not None
    by_name = {stack.name: stack for stack in report.stacks}
    bare = by_name["psycopg_pool"]
    assert bare.result in ("recovered", "wrote through", "still failing"), bare.errors
    runner = by_name["pgfailover pool + runner"]
    assert (runner.failed, runner.lost, runner.duplicated, runner.phantom) == (0, 0, 0, 0)
    assert runner.result == "wrote through"
    assert "PgBouncer repointed by the follower" in report.format_text()
