"""What a pool (or an instrumented engine) knows about failovers, and its decisions. No I/O.

:class:`FailoverState` is shared by :mod:`pgfailover.pool` and :mod:`pgfailover.sqlalchemy`:
generations and their purges, the outage under way, what each host was found to be, the
single-flight gate for reconnecting, and the counters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from .classify import Kind, Verdict
from .errors import NoPrimaryAvailable
from .events import PoolEvent
from .probe import RoleReport

#: Smallest wait between two role probes of new connections while no primary is reachable.
MIN_PROBE_INTERVAL = 0.05


#: What a host libpq refused as read-only (``target_session_attrs``) is called in errors.
STANDBY_REFUSED = "standby (libpq refused it as read-only)"


def finding(report: RoleReport) -> str:
    """What a probe that found no writable primary says about the server, for errors."""
    where = f" (server {report.server_address})" if report.via_pooler else ""
    return ("standby" if report.role.value == "standby" else "read-only primary") + where


class FailoverState:
    """What a pool knows about failovers, and the decisions it makes. No I/O.

    Thread-safe: every method takes a short internal lock (never held across I/O), so the
    same object serves threads and asyncio tasks.

    ``on_event`` receives a :class:`~pgfailover.events.PoolEvent` for each purge and each
    return of a primary after an outage, called after the lock is released (the shells
    pass the events module's ``_emit``; None: no events). ``name`` names the pool in them.
    """

    def __init__(
        self,
        *,
        pooler: bool | None,
        name: str = "",
        on_event: Callable[[PoolEvent], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.name = name
        self._on_event = on_event
        #: Bumped at each purge; connections remember the generation they were made in.
        self.generation = 0
        #: Configured or detected: does a multiplexing pooler sit in front of the servers?
        self.pooler = pooler
        #: ``time.monotonic()`` when the current outage was first noticed, None when healthy.
        self.outage_since: float | None = None
        #: The error of the last connect if it was an auth/configuration failure, else None.
        self.fatal: BaseException | None = None
        #: Per endpoint, what was found there last (for NoPrimaryAvailable).
        self.hosts: dict[str, str] = {}
        self._probing = False
        self._last_probe = 0.0
        #: True while the process monitor watches the pool's endpoint: during an outage the
        #: pool then makes no connection attempt but the one the monitor grants at a time
        #: (:meth:`grant`) until the monitor has seen a writable primary there
        #: (:meth:`primary_back`); see :mod:`pgfailover.monitor`.
        self.monitored = False
        self._released = False  # the monitor saw the primary back since the outage began
        # the monitor's grant of one connection attempt during an outage: offered (not
        # taken yet), then running (taken by an attempt under way); each holds the callback
        # that tells the monitor how the attempt ended (see grant)
        self._grant: Callable[[bool], None] | None = None
        self._grant_running: Callable[[bool], None] | None = None
        self._grant_ok = False
        #: Called (outside the lock) when the pool meets trouble the monitor should look
        #: at now: an outage begins, or a connection attempt after a release failed.
        self.on_suspect: Callable[[], None] | None = None
        self.counters = {
            "failovers_detected": 0,
            "connections_poisoned": 0,
            "generations_purged": 0,
            "probes_run": 0,
            "connections_rejected": 0,
            "recovery_ms_last": 0,
        }

    # -- what happened
    def poisoned(self, generation: int, verdict: Verdict, now: float) -> bool:
        """A poisoned connection came back. True if the caller must purge the generation."""
        with self._lock:
            self.counters["connections_poisoned"] += 1
            suspect = verdict.is_failover and self._outage(now)
            purge = verdict.purge_generation and generation == self.generation
            if purge:
                self.generation += 1
                self.counters["generations_purged"] += 1
        if suspect:
            self._suspect()
        if purge:
            self._event("generation purged", reason=verdict.reason)
        return purge

    def not_primary(self, endpoint: str, finding: str, now: float, generation: int) -> bool:
        """A probe found no writable primary at ``endpoint``. True if the caller must purge."""
        with self._lock:
            self.counters["connections_rejected"] += 1
            self.hosts[endpoint] = finding
            suspect = self._outage(now)
            purge = generation == self.generation
            if purge:
                self.generation += 1
                self.counters["generations_purged"] += 1
        if suspect:
            self._suspect()
        if purge:
            self._event("generation purged", reason=f"{endpoint} leads to a {finding}")
        return purge

    def connect_failed(
        self, endpoint: str, verdict: Verdict, now: float, standbys: Sequence[str] = ()
    ) -> None:
        """Opening a connection failed with ``verdict``. ``standbys``: the hosts libpq
        reached and refused as read-only, when it refused every host so
        (:func:`~pgfailover.classify.read_only_hosts`); each is then named a standby in
        :meth:`no_primary`'s error instead of the endpoint being called down."""
        suspect = False
        with self._lock:
            if verdict.kind is Kind.CONFIGURATION:
                self.hosts[endpoint] = f"auth or configuration failure: {verdict.message}"
            elif standbys:
                self.hosts.pop(endpoint, None)
                for host in standbys:
                    self.hosts[host] = STANDBY_REFUSED
                suspect = self._outage(now)
            else:
                self.hosts[endpoint] = f"down: {verdict.message}"
                if verdict.is_failover:
                    suspect = self._outage(now)
        if suspect:
            self._suspect()

    def no_leader(self, source: str, reason: str, now: float) -> None:
        """The topology ``source`` named no leader to connect to (or could not be read)."""
        with self._lock:
            self.hosts[source] = reason
            suspect = self._outage(now)
        if suspect:
            self._suspect()

    def connected(self, now: float) -> None:
        """A new connection reached a writable primary: the outage, if any, is over."""
        with self._lock:
            self.fatal = None
            recovery = None
            if self.outage_since is not None:
                recovery = now - self.outage_since
                self.counters["recovery_ms_last"] = int(recovery * 1000)
                self.outage_since = None
                self.hosts.clear()
            if self._grant_running is not None:
                self._grant_ok = True
        if recovery is not None:
            self._event("primary reached again", recovery=recovery)

    def probed(self, report: RoleReport) -> None:
        """Record a probe's outcome: count queries, learn whether a pooler is in front."""
        with self._lock:
            if report.source == "query":
                self.counters["probes_run"] += 1
            if self.pooler is None and report.via_pooler is not None:
                self.pooler = report.via_pooler

    def _event(self, action: str, *, reason: str = "", recovery: float | None = None) -> None:
        if self._on_event is not None:
            self._on_event(PoolEvent(action, self.name, self.generation, reason, recovery))

    def _outage(self, now: float) -> bool:
        """Note an outage (under the lock). True if the monitor should look now: the
        outage begins, or it goes on after the monitor had released the pool."""
        if self.outage_since is None:
            self.outage_since = now
            self.counters["failovers_detected"] += 1
            self._released = False
            self._grant = None  # one offered in an outage past is not for this one
            return True
        if self._released:
            self._released = False
            return True
        return False

    def _suspect(self) -> None:
        if self.monitored and (hook := self.on_suspect) is not None:
            hook()

    def primary_back(self) -> bool:
        """The monitor found a writable primary at the pool's endpoint: connection attempts
        may go (the monitor spreads the pools; the pool sends them one at a time). True if an outage
        was under way (the caller then wakes the attempts it held back)."""
        with self._lock:
            self._released = True
            return self.outage_since is not None

    def waking(self) -> bool:
        """The monitor saw the primary back and released the pool's held attempts, none of
        which has connected yet (the outage is not over for the pool)."""
        with self._lock:
            return self.monitored and self._released and self.outage_since is not None

    def endpoint_lost(self, endpoint: str, finding: str, now: float) -> bool:
        """The monitor found no writable primary at the pool's endpoint (``finding`` says
        what it found). Starts an outage, without asking the monitor back; True if the
        caller must purge the current generation: when the pool knew of no outage (one
        that knew has purged already, when its own requests met the failure)."""
        with self._lock:
            self.hosts[endpoint] = finding
            purge = self.outage_since is None
            self._outage(now)
            if purge:
                self.generation += 1
                self.counters["generations_purged"] += 1
        if purge:
            self._event("generation purged", reason=f"{endpoint}: {finding} (seen by the monitor)")
        return purge

    def grant(self, report: Callable[[bool], None]) -> bool:
        """The monitor lets one connection attempt of the pool go during an outage (it is
        then the monitor's look at the endpoint). ``report`` is called once, with True if
        that attempt connected to a writable primary, False if it failed (from the thread
        that ran it, outside the lock). False (nothing granted) when the pool knows of no
        outage, was released already, or has a granted attempt under way."""
        with self._lock:
            if (
                self.outage_since is None
                or self._released
                or not self.monitored
                or self._grant_running is not None
            ):
                return False
            self._grant = report
            return True

    def grant_unused(self) -> None:
        """The granted attempt is not there any more (it gave up, the pool closed): the
        grant is withdrawn and reported as failed, unless an attempt took it already."""
        with self._lock:
            report, self._grant = self._grant, None
        if report is not None:
            report(False)

    # -- decisions
    def may_connect(self, now: float) -> bool:
        """Single flight: during an outage, one connection attempt at a time, and not more
        often than MIN_PROBE_INTERVAL. Call :meth:`connect_done` after a True answer.

        While the monitor watches the endpoint (:attr:`monitored`), the pool makes no
        attempt of its own during an outage until the monitor has seen a writable primary
        (:meth:`primary_back`), then every held attempt may go; before that, one attempt
        may go when the monitor granted it (:meth:`grant`)."""
        with self._lock:
            if self.outage_since is None:
                return True
            if self.monitored:
                if self._released:
                    return True
                if self._grant is not None and self._grant_running is None:
                    self._grant_running, self._grant = self._grant, None
                    self._grant_ok = False
                    return True
                return False
            if self._probing or now - self._last_probe < MIN_PROBE_INTERVAL:
                return False
            self._probing = True
            self._last_probe = now
            return True

    def connect_done(self) -> None:
        """The attempt allowed by :meth:`may_connect` is over (a granted one is reported
        to the monitor: connected, i.e. :meth:`connected` was called, or not)."""
        with self._lock:
            self._probing = False
            report, self._grant_running = self._grant_running, None
            ok = self._grant_ok
        if report is not None:
            report(ok)

    def needs_check(
        self, generation: int, returned_at: float, recheck_interval: float | None, now: float
    ) -> bool:
        """Whether a connection leaving the pool must be probed first.

        It must if it belongs to an older generation, if an outage is under way, or if it
        has been idle (since ``returned_at``) at least ``recheck_interval`` seconds; None
        never rechecks an idle connection, 0 rechecks at every checkout.
        """
        if generation != self.generation or self.outage_since is not None:
            return True
        if recheck_interval is None:
            return False
        # 0 always checks: ``now`` may be taken before a wait for a connection handed over
        # just after its return, which would make its idle time look negative.
        return recheck_interval == 0 or now - returned_at >= recheck_interval

    def no_primary(self, timeout: float) -> NoPrimaryAvailable | None:
        """The error for a request that timed out during an outage, None outside one."""
        with self._lock:
            if self.outage_since is None and not self.hosts:
                return None
            return NoPrimaryAvailable(timeout, self.hosts)

    def stats(self) -> dict[str, int]:
        """The failover counters, for ``get_stats()``."""
        with self._lock:
            return dict(self.counters)
