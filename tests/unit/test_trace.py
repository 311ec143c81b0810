"""pgfailover.testing.trace: round trips counted from libpq's protocol trace."""

from __future__ import annotations

from pgfailover.testing import round_trips

T = "2026-11-24 20:00:00.000000"


def test_each_run_of_client_messages_answered_by_the_server_is_one_round_trip() -> None:
    """Several F lines before a B line are one turn (a pipelined or multi-statement send);
    server lines without a preceding send, and non-trace lines, count nothing."""
    trace = "\n".join(
        [
            "not a trace line",
            f"{T}\tB\t5\tReadyForQuery\t I",  # nothing sent yet: no turn
            f'{T}\tF\t41\tQuery\t "BEGIN; SELECT 1"',
            f'{T}\tB\t10\tCommandComplete\t "BEGIN"',
            f"{T}\tB\t5\tReadyForQuery\t T",
            f"{T}\tF\t30\tParse\t ...",
            f"{T}\tF\t12\tBind\t ...",
            f"{T}\tF\t4\tSync",
            f"{T}\tB\t4\tParseComplete",
            f'{T}\tF\t11\tQuery\t "COMMIT"',
            f'{T}\tB\t11\tCommandComplete\t "COMMIT"',
        ]
    )
    assert round_trips(trace) == 3
    assert round_trips("") == 0
