"""pgfailover's own exception types (few: driver errors propagate unchanged)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from .probe import RoleReport

try:
    from psycopg_pool import PoolTimeout as _TimeoutBase
except ImportError:  # pragma: no cover - the pool extra is optional (e.g. SQLAlchemy only)
    _TimeoutBase = psycopg.OperationalError  # type: ignore[assignment,misc]


class NoPrimaryAvailable(_TimeoutBase):
    """No writable primary could be reached before the request's timeout.

    A subclass of ``psycopg_pool.PoolTimeout`` (itself a ``psycopg.OperationalError``) when
    psycopg_pool is installed, of ``psycopg.OperationalError`` otherwise, so existing
    ``except PoolTimeout`` code keeps working. Raised by the pgfailover pools and by
    SQLAlchemy engines instrumented with :func:`pgfailover.sqlalchemy.instrument`.

    ``hosts`` maps each endpoint tried (``host:port``, or the conninfo's host list for a
    failed multi-host connect) to what was found there last: ``standby``, ``read-only
    primary``, ``down: <reason>``, ``auth or configuration failure: <reason>``. ``timeout``
    is the request's timeout in seconds. The message names every host and never contains a
    password.
    """

    def __init__(self, timeout: float, hosts: Mapping[str, str]) -> None:
        self.timeout = timeout
        self.hosts = dict(hosts)
        found = "; ".join(f"{host}: {what}" for host, what in self.hosts.items())
        super().__init__(
            f"no writable primary found within {timeout:.2f} s"
            + (f" ({found})" if found else " (no host answered yet)")
        )

    def __reduce__(self) -> tuple[type[NoPrimaryAvailable], tuple[float, dict[str, str]]]:
        return (type(self), (self.timeout, self.hosts))


class InvalidConninfo(psycopg.ProgrammingError, ValueError):
    """A connection string or URL cannot be parsed, or its host, hostaddr and port lists do
    not match.

    A ``psycopg.ProgrammingError`` (what psycopg raises for the same string) and a
    ``ValueError``. The message says what is wrong and never contains a password: libpq's
    own parse errors, which may quote a piece of the string, are scrubbed.
    """


class NotWritable(psycopg.OperationalError):
    """A new connection reached a server that cannot take writes (a standby, or a primary
    whose sessions default to read-only).

    Raised from a pgfailover pool's connection set-up, the connection closed first.
    ``report`` is the probe's :class:`~pgfailover.probe.RoleReport`, ``endpoint`` the
    ``host:port`` connected to, ``finding`` what was found there (``standby``, ``read-only
    primary``, with the server behind a pooler when known).
    """

    def __init__(self, report: RoleReport, endpoint: str, finding: str) -> None:
        self.report = report
        self.endpoint = endpoint
        self.finding = finding
        super().__init__(f"{endpoint} leads to a {finding}, not a writable primary")

    def __reduce__(self) -> tuple[type[NotWritable], tuple[RoleReport, str, str]]:
        return (type(self), (self.report, self.endpoint, self.finding))


class CommitOutcomeUnknown(Exception):
    """A COMMIT was lost in flight and whether it committed could not be established.

    Never a guess: the transaction may have committed. Running the work again could apply it
    twice; not running it could lose it. ``reason`` says why the outcome is unknown,
    ``record`` is what was recorded when the transaction began (xid, system identifier,
    timeline, WAL position, server time; None if nothing could be recorded), and
    ``__cause__`` is the driver's error that lost the COMMIT. Not a database error class:
    generic retry predicates never retry it.
    """

    def __init__(self, reason: str, record: object | None = None) -> None:
        self.reason = reason
        self.record = record
        xid = getattr(record, "xid", None)
        super().__init__(
            "the COMMIT was lost and its outcome is unknown"
            + (f" (xid {xid})" if xid else "")
            + f": {reason}"
        )

    def __reduce__(self) -> tuple[type[CommitOutcomeUnknown], tuple[str, object | None]]:
        return (type(self), (self.reason, self.record))
