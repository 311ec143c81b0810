"""A Django database alias as a member of the process monitor (:mod:`pgfailover.monitor`).

Django's persistent connections (``CONN_MAX_AGE``, no pool) belong to their threads: nothing
but the thread that owns one may touch it. So the alias joins the monitor through one small
:class:`AliasMember` per alias (not per thread), whose only work, called from the monitor's
thread, is on the alias's :class:`~pgfailover._state.FailoverState`:

- ``_pgf_endpoint_lost`` starts the outage and purges the current generation (no I/O): each
  thread's connection of an older generation is then closed by its own thread, at the next
  ``close_if_unusable_or_obsolete`` (request start and end) or health check
  (``is_usable()``), without a round trip, and the next request connects anew;
- ``_pgf_endpoint_back`` ends the outage (the next new connection needs no role check);
  nothing is woken: Django connects when a request needs it.

The alias joins at its first new connection (or at :func:`pgfailover.health` for it), with
the connection parameters of that moment; it joins again when they name another endpoint
(Django's test runner switches ``NAME`` to the test database), and it leaves when Django is
about to drop or clone its database (:class:`~pgfailover.django.base.DatabaseCreation`): the
watch connection would hold the database open.
"""

from __future__ import annotations

import logging
import threading
from time import monotonic

from .._state import FailoverState
from ..monitor import Health, Monitor, WatchTarget, process_monitor

logger = logging.getLogger("pgfailover.django")

_members: dict[str, AliasMember] = {}
_lock = threading.Lock()  # joining and leaving (never held by the monitor's calls)


class AliasMember:
    """The monitor's member for one database alias (a :class:`pgfailover.monitor.Member`).

    ``target`` is where the watch connects (a ``TopologyTarget`` with ``OPTIONS
    {"topology": ...}``; None: the monitor cannot watch the alias, which is then only known
    to it). The repr names the alias and the endpoint, never a password."""

    def __init__(self, alias: str, state: FailoverState, target: WatchTarget | None) -> None:
        self.alias = alias
        self._state = state
        self._target = target
        #: The monitor that watches the alias's endpoint, None when none does (no target,
        #: a closed monitor, left).
        self._pgf_monitor: Monitor | None = None
        #: The monitor the alias was asked to join (kept when it refused: a closed Monitor).
        self.wanted: Monitor | None = None

    def __repr__(self) -> str:
        where = "unwatched" if self._target is None else str(self._target.endpoint)
        return f"<{type(self).__name__} alias={self.alias!r} endpoint={where}>"

    @property
    def failover_state(self) -> FailoverState:
        """The alias's failover state, shared by its threads."""
        return self._state

    @property
    def target(self) -> WatchTarget | None:
        """Where the watch connects (None: not watched)."""
        return self._target

    def _pgf_watch_target(self) -> WatchTarget | None:
        return self._target

    def _pgf_endpoint_lost(self, endpoint: str, finding: str) -> None:
        """No writable primary at the alias's endpoint (the monitor's thread): start the
        outage and purge the current generation, once. No I/O: each connection is closed
        by its own thread (see the module doc)."""
        self._state.endpoint_lost(endpoint, finding, monotonic())

    def _pgf_endpoint_back(self) -> None:
        """A writable primary again (the monitor's thread): the outage is over, so the next
        new connection is not role-checked first. Nothing waits to be woken."""
        if self._state.primary_back():
            self._state.connected(monotonic())


def join(
    alias: str, choice: Monitor | bool, state: FailoverState, target: WatchTarget | None
) -> AliasMember | None:
    """Register ``alias`` with the monitor ``choice`` names (True: the process's; False:
    none, and leave any), once per alias; again when ``target`` names another endpoint
    than the registered one, or the monitor was replaced (the process monitor closed).
    A closed :class:`Monitor` of the caller's is logged once and the alias stays on its
    own. Returns the alias's member (None with ``choice`` False)."""
    with _lock:
        member = _members.get(alias)
        if choice is False:
            if member is not None:
                _leave(member)
            return None
        wanted = process_monitor() if choice is True else choice
        if (
            member is not None
            and member.wanted is wanted
            and _endpoint(member.target) == _endpoint(target)
            and (member._pgf_monitor is None or state.monitored)
        ):
            return member
        if member is not None:
            _leave(member)
        member = _members[alias] = AliasMember(alias, state, target)
        member.wanted = wanted
        try:
            watched = wanted.register(member)
        except RuntimeError:  # a Monitor of the settings', closed since
            logger.warning(
                "pgfailover: the monitor given to DATABASES[%r] is closed: the alias "
                "notices failovers by itself",
                alias,
            )
            return member
        if watched:  # else no target: known to the monitor, not watched
            member._pgf_monitor = wanted
        return member


def leave(alias: str) -> None:
    """Take ``alias`` off its monitor (the watch of its endpoint ends with its last member,
    within 2 s: this waits for it, so that the database can be dropped right after). It
    joins again at its next new connection. Unknown aliases are ignored."""
    with _lock:
        member = _members.pop(alias, None)
        if member is not None:
            _leave(member)


def _leave(member: AliasMember) -> None:
    _members.pop(member.alias, None)
    member._pgf_monitor = None
    if member.wanted is not None:
        member.wanted.unregister(member)  # a member it does not know is ignored


def _endpoint(target: WatchTarget | None) -> object:
    return None if target is None else target.endpoint


def member_of(alias: str) -> AliasMember | None:
    """The member of ``alias``, None before it joined (or with ``monitor`` False)."""
    with _lock:
        return _members.get(alias)


def aliases() -> list[str]:
    """The aliases that joined a monitor and are registered with it now."""
    with _lock:
        return [alias for alias, m in _members.items() if m._pgf_monitor is not None]


def monitored_health(alias: str) -> Health | None:
    """The monitor's answer for ``alias``'s endpoint, None when no monitor watches it."""
    member = member_of(alias)
    monitor = None if member is None else member._pgf_monitor
    if member is None or monitor is None:
        return None
    return monitor.health(member)
