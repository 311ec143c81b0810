"""The follower: watch the cluster's topology and keep every given PgBouncer pointed at the
confirmed leader.

Each round (every ``interval`` seconds): refresh the topology source (Patroni's REST API,
or the in-band host list); with no leader, or a source that cannot answer, change nothing.
Otherwise look at each PgBouncer's ``SHOW DATABASES``; when one points elsewhere, confirm the
leader in-band first (a connection to it, ``pg_is_in_recovery()`` and timeline judged by the
source's fencing rules: never a node that is not the confirmed leader), then
:func:`~.repoint.repoint` that PgBouncer. Every action is one line through ``log``; a state
that does not change (no leader, a PgBouncer unreachable) is logged once. Idempotent, and
safe to run on several machines at once: each repoint is a no-op when already done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .._secrets import scrub, secret_candidates
from ..topology import Member, TopologyError, TopologySource, conninfo_for
from .admin import AdminConsole, AdminError
from .ini import IniError
from .repoint import repoint

#: Seconds between two rounds when the caller gives none.
DEFAULT_INTERVAL = 0.5
#: Seconds a ``PAUSE`` may take with ``pause=True`` before the repoint goes on without it.
PAUSE_TIMEOUT = 2.0


def admin_label(dsn: str) -> str:
    """``host:port`` of an admin DSN, for log lines (never the password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "pgbouncer"
    return f"pgbouncer {params.get('host', 'localhost')}:{params.get('port', '6432')}"


class Follower:
    """Keep the PgBouncers of ``admins`` (admin console DSNs) pointed at ``source``'s leader.

    ``check_conninfo`` is the base conninfo (user, database, password; host and port are
    replaced) of the in-band confirmation of a new leader; "" uses libpq's environment
    (``PGUSER``, ``PGPASSFILE``...). ``ini`` is the pgbouncer.ini to rewrite for every
    PgBouncer (None: each one's ``conffile``); ``databases`` selects entries as
    :func:`~.repoint.repoint` does (None: every entry with a TCP host). ``interval`` is the
    pause between rounds, in seconds. ``pause`` holds clients with ``PAUSE`` during each
    repoint (see :func:`~.repoint.repoint`; each ``PAUSE`` bounded by
    :data:`PAUSE_TIMEOUT`); False repoints while they run. ``log`` receives one line per
    action.
    """

    def __init__(
        self,
        source: TopologySource,
        admins: Sequence[str],
        *,
        check_conninfo: str = "",
        ini: str | Path | None = None,
        databases: Iterable[str] | None = None,
        interval: float = DEFAULT_INTERVAL,
        pause: bool = False,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        if not admins:
            raise ValueError("give at least one PgBouncer admin DSN")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.source = source
        self.admins = list(admins)
        self.check_conninfo = check_conninfo
        self.ini = ini
        self.databases = None if databases is None else list(databases)
        self.interval = interval
        self.pause = pause
        self._log = log
        self._said: dict[str, str] = {}  # subject -> last state logged
        self._secrets = [s for dsn in [*admins, check_conninfo] for s in secret_candidates(dsn)]

    def _once(self, subject: str, state: str, line: str) -> None:
        """Log ``line`` when ``subject``'s state changes."""
        if self._said.get(subject) != state:
            self._said[subject] = state
            self._log(scrub(line, self._secrets))

    def _prefixed(self, label: str) -> Callable[[str], None]:
        def log(line: str) -> None:
            self._log(f"{label}: {line}")

        return log

    def _points_at(self, admin: AdminConsole, leader: Member) -> bool:
        rows = [
            r
            for r in admin.databases()
            if (r.name in self.databases if self.databases is not None else r.host)
            and not (r.host or "").startswith("/")
        ]
        return bool(rows) and all((r.host, r.port) == leader.endpoint for r in rows)

    def _confirmed(self, leader: Member) -> bool:
        """Whether ``leader`` is, checked in-band now, the source's writable leader."""
        try:
            conninfo = conninfo_for(self.check_conninfo, leader)
            with psycopg.connect(
                conninfo,
                autocommit=True,
                prepare_threshold=None,
                connect_timeout=max(2, round(self.source.timeout)),
            ) as conn:
                verdict = self.source.validate(conn)
        except (psycopg.Error, ValueError) as ex:
            reason = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
            self._once(
                "confirm",
                f"error {leader.address}",
                f"leader {leader.address} not confirmed in-band: {reason}; nothing changed",
            )
            return False
        if not verdict.accepted:
            self._once(
                "confirm",
                f"refused {leader.address}",
                f"leader {leader.address} not confirmed: {verdict.reason}; nothing changed",
            )
            return False
        return True

    def step(self) -> bool:
        """One round; True when every PgBouncer points at the confirmed leader after it."""
        try:
            topology = self.source.refresh()
        except TopologyError as ex:
            self._once(
                "topology", f"unavailable {ex}", f"topology unavailable: {ex}; nothing changed"
            )
            return False
        leader = topology.write_target
        if leader is None:
            self._once(
                "topology", "no leader", f"no leader ({topology.describe()}); nothing changed"
            )
            return False
        self._once(
            "topology",
            f"leader {leader.address}",
            "leader "
            + (
                leader.address
                if leader.name == leader.address
                else f"{leader.name} at {leader.address}"
            ),
        )
        ok, confirmed = True, False
        for dsn in self.admins:
            label = admin_label(dsn)
            try:
                with AdminConsole(dsn) as admin:
                    if self._points_at(admin, leader):
                        self._once(
                            label, f"at {leader.address}", f"{label}: points at {leader.address}"
                        )
                        continue
                    confirmed = confirmed or self._confirmed(leader)
                    if not confirmed:
                        return False
                    host, port = leader.endpoint or ("", 0)
                    repoint(
                        admin,
                        host,
                        port,
                        ini_path=self.ini,
                        databases=self.databases,
                        log=self._prefixed(label),
                        pause=PAUSE_TIMEOUT if self.pause else None,
                    )
                    self._said[label] = f"at {leader.address}"
            except (AdminError, IniError) as ex:
                ok = False
                self._once(label, f"error {ex}", f"{label}: {ex}")
        return ok

    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set (checked between rounds and during the pause)."""
        while not stop.is_set():
            self.step()
            stop.wait(self.interval)
