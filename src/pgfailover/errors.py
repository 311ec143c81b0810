"""pgfailover's own exception types (few: driver errors propagate unchanged)."""

from __future__ import annotations

from collections.abc import Mapping

from psycopg_pool import PoolTimeout


class NoPrimaryAvailable(PoolTimeout):
    """No writable primary could be reached before the request's timeout.

    A subclass of ``psycopg_pool.PoolTimeout``, so existing ``except PoolTimeout`` code keeps
    working. ``hosts`` maps each endpoint tried (``host:port``, or the conninfo's host list
    for a failed multi-host connect) to what was found there last: ``standby``, ``read-only``,
    ``down: <reason>``, ``auth failure: <reason>``. ``timeout`` is the request's timeout in
    seconds. The message names every host and never contains a password.
    """

    def __init__(self, timeout: float, hosts: Mapping[str, str]) -> None:
        self.timeout = timeout
        self.hosts = dict(hosts)
        found = "; ".join(f"{host}: {what}" for host, what in self.hosts.items())
        super().__init__(
            f"no writable primary found within {timeout:.2f} s"
            + (f" ({found})" if found else " (no host answered yet)")
        )
