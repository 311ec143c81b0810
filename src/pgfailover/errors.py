"""pgfailover's own exception types (few: driver errors propagate unchanged)."""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

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
