"""Reading libpq's protocol trace (``conn.pgconn.trace(fileno)``): how many round trips."""

from __future__ import annotations


def round_trips(trace: str) -> int:
    """Client-to-server turns in a libpq trace: each run of ``F`` (frontend) lines followed
    by a ``B`` (backend) line counts once. Lines that are not trace records are ignored.

    A pipelined or multi-statement message is one turn however many statements it carries,
    which is what a round-trip budget is about.
    """
    turns, sending = 0, False
    for line in trace.splitlines():
        direction = line.split("\t")[1] if line.count("\t") >= 2 else ""
        if direction == "F":
            sending = True
        elif direction == "B" and sending:
            turns += 1
            sending = False
    return turns
