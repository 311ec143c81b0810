"""Errors raised by the test harness."""

from __future__ import annotations


class HarnessError(RuntimeError):
    """The local cluster could not do what was asked (a server failed to start, a step timed out)."""


class BinariesNotFound(HarnessError):
    """PostgreSQL or PgBouncer programs are missing; the message says how to install or point at them."""
