"""Errors raised by the test harness."""

from __future__ import annotations


class HarnessError(RuntimeError):
    """The local cluster could not do as asked (a server failed to start, a wait timed out)."""


class BinariesNotFound(HarnessError):
    """PostgreSQL or PgBouncer programs are missing; the message says how to get them."""
