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

While something is amiss (no leader, a leader not confirmed yet, a source or a PgBouncer
that does not answer) rounds come every :data:`FAST_INTERVAL` seconds instead of
``interval``, for at most :data:`FAST_WINDOW` seconds: a failover seen half-way (the old
primary gone, the new one not yet promoted) is followed as soon as the promotion ends. Each
PgBouncer's admin console connection is kept from one round to the next (opened again when
it fails).
"""

from __future__ import annotations

import threading
import time
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
#: Seconds between two rounds while something is amiss (at most ``interval``).
FAST_INTERVAL = 0.05
#: Seconds of fast rounds at most, from the first round that found something amiss.
FAST_WINDOW = 30.0


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
    action. :meth:`step` keeps each PgBouncer's console connection open for the next
    round: call :meth:`close` when done with it (:meth:`run` does).
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
        self._consoles: dict[str, AdminConsole] = {}  # admin DSN -> console kept open
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
        ok, confirmed = True, [False]
        for dsn in self.admins:
            label = admin_label(dsn)
            try:
                kept = dsn in self._consoles
                try:
                    done = self._follow_on(self._console(dsn), leader, label, confirmed)
                except AdminError:
                    if not kept:
                        raise
                    # the connection kept from an earlier round may be the one that failed
                    self._drop(dsn)
                    done = self._follow_on(self._console(dsn), leader, label, confirmed)
                if not done:
                    return False
            except (AdminError, IniError) as ex:
                ok = False
                self._drop(dsn)
                self._once(label, f"error {ex}", f"{label}: {ex}")
        return ok

    def _follow_on(
        self, admin: AdminConsole, leader: Member, label: str, confirmed: list[bool]
    ) -> bool:
        """Point one PgBouncer at ``leader`` unless it already is; False when the leader is
        not confirmed in-band (``confirmed[0]`` caches a confirmation for the round)."""
        if self._points_at(admin, leader):
            self._once(label, f"at {leader.address}", f"{label}: points at {leader.address}")
            return True
        confirmed[0] = confirmed[0] or self._confirmed(leader)
        if not confirmed[0]:
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
        return True

    def _console(self, dsn: str) -> AdminConsole:
        """The console of ``dsn`` kept from an earlier round, or a new one."""
        console = self._consoles.get(dsn)
        if console is None:
            console = self._consoles[dsn] = AdminConsole(dsn)
        return console

    def _drop(self, dsn: str) -> None:
        console = self._consoles.pop(dsn, None)
        if console is not None:
            console.close()

    def close(self) -> None:
        """Close the admin console connections kept between rounds (idempotent)."""
        for dsn in list(self._consoles):
            self._drop(dsn)

    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set (checked between rounds and during the pause):
        ``interval`` apart, :data:`FAST_INTERVAL` apart for up to :data:`FAST_WINDOW`
        seconds after a round that did not end with every PgBouncer on the confirmed
        leader. Closes the kept consoles on the way out."""
        amiss_since: float | None = None
        try:
            while not stop.is_set():
                ok = self.step()
                now = time.monotonic()
                if ok:
                    amiss_since = None
                elif amiss_since is None:
                    amiss_since = now
                fast = amiss_since is not None and now - amiss_since < FAST_WINDOW
                stop.wait(min(self.interval, FAST_INTERVAL) if fast else self.interval)
        finally:
            self.close()
