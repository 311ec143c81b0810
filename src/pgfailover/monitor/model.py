"""What the process monitor knows about one endpoint, and its decisions. No I/O.

An *endpoint* is where pools connect: a host list, ports and database (through a pooler,
the pooler's address: the pooler may send each database elsewhere). The monitor keeps one
:class:`EndpointWatch` per endpoint, whatever the number of pools that use it, feeds it what
its single watch connection saw (:meth:`EndpointWatch.observe`) and does what the returned
:class:`Change` says: purge the pools' stale connections when the endpoint stops being
writable, wake them (spread in time, :func:`spread`) when it is writable again. How long to
wait before the next look is :meth:`EndpointWatch.next_delay`: a relaxed interval while
all is well, a fast one while an outage lasts.

:class:`Health` is the frozen answer to "can this process write there now".
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Seconds between two role checks of a healthy endpoint (each with jitter, see JITTER).
INTERVAL = 1.0
#: Seconds between two looks at an endpoint while no writable primary is found there: each
#: is one query on the watch connection, or one connection attempt when that is lost. As
#: often as one pool's single-flight prober (:data:`pgfailover._state.MIN_PROBE_INTERVAL`).
OUTAGE_INTERVAL = 0.05
#: Relative jitter of the healthy interval (+/-), so that processes started together do not
#: query together.
JITTER = 0.2
#: Longest spread of the wake-ups of the pools of one endpoint (seconds).
MAX_SPREAD = 0.25
#: Spread per pool beyond the first (seconds): 2 pools 5 ms apart, 51 pools or more over
#: :data:`MAX_SPREAD`.
SPREAD_STEP = 0.005


class Status(enum.Enum):
    """What the watch found at an endpoint, last time it looked."""

    UNKNOWN = "unknown"  #: not looked yet
    WRITABLE = "primary"  #: a primary accepting writes
    READ_ONLY = "read-only"  #: a standby, or a primary whose sessions default to read-only
    DOWN = "down"  #: no connection, or the watch connection was lost
    MISCONFIGURED = "misconfigured"  #: authentication or configuration refused


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where pools connect: ``hosts`` and ``ports`` as in the conninfo (comma-separated
    lists), ``dbname`` (the user's name when none is given). Never holds a password."""

    hosts: str
    ports: str
    dbname: str

    def __str__(self) -> str:
        return f"{self.address}/{self.dbname}"

    @property
    def address(self) -> str:
        """``host:port`` (comma-separated for a host list), as the pools' errors name it."""
        hosts = self.hosts.split(",")
        ports = self.ports.split(",")
        if len(ports) == 1:
            ports = ports * len(hosts)
        return ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=False))

    @classmethod
    def of(cls, params: Mapping[str, object]) -> Endpoint:
        """The endpoint of connection parameters (``conninfo_to_dict`` output); libpq's
        defaults fill what is missing (``localhost``, ``5432``, dbname = user)."""
        host = str(params.get("host") or params.get("hostaddr") or "localhost")
        port = str(params.get("port") or "5432")
        dbname = str(params.get("dbname") or params.get("user") or "")
        return cls(host, port, dbname)


class Change(enum.Enum):
    """What a new observation changed, for the monitor to act on."""

    LOST = "lost"  #: was writable (or unknown), is no longer: purge the pools
    BACK = "back"  #: was not writable, is now: wake the pools


@dataclass(frozen=True, slots=True)
class Health:
    """Whether this process can write through an endpoint now, and why.

    ``writable`` is the answer. ``endpoint`` says where (``host:port/dbname``, no
    password), ``role`` what was found there last (``primary``, ``read-only``, ``down``,
    ``misconfigured``, ``unknown``; :func:`pgfailover.health` also answers ``closed`` for
    a pool closed, not open yet, or collected), ``since`` the wall-clock time
    (``time.time()``) at which that began (None: never looked), ``checked_at`` the
    wall-clock time of the last look (None: never), ``reason`` a sentence for an operator
    (empty when writable), and ``monitored`` whether the process monitor watches the
    endpoint (False: the answer comes from what the pool's own requests last saw).
    """

    writable: bool
    endpoint: str
    role: str
    since: float | None
    checked_at: float | None
    reason: str
    monitored: bool

    def as_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict."""
        return {
            "writable": self.writable,
            "endpoint": self.endpoint,
            "role": self.role,
            "since": self.since,
            "checked_at": self.checked_at,
            "reason": self.reason,
            "monitored": self.monitored,
        }


class EndpointWatch:
    """The monitor's knowledge of one endpoint. No I/O, no lock: the monitor's thread is
    its only writer (readers get consistent frozen values from :meth:`health`).

    ``interval`` and ``outage_interval`` are in seconds (see :data:`INTERVAL`,
    :data:`OUTAGE_INTERVAL`); times passed in are ``time.monotonic()`` values, with the
    matching ``time.time()`` given as ``wall``.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        interval: float = INTERVAL,
        outage_interval: float = OUTAGE_INTERVAL,
    ) -> None:
        self.endpoint = endpoint
        self.interval = interval
        self.outage_interval = outage_interval
        self.status = Status.UNKNOWN
        self.finding = "not checked yet"
        #: ``time.monotonic()`` when the current status began (None: never looked)
        self.since: float | None = None
        self.since_wall: float | None = None
        self.checked_wall: float | None = None
        #: ``time.monotonic()`` when the current outage began (None: none under way)
        self.outage_since: float | None = None
        #: a pool reported trouble the watch has not confirmed yet: look now
        self.suspected = False
        self.checks = 0
        self.connects = 0
        #: whether the last observation changed the status or the finding
        self.news = False

    def observe(self, status: Status, finding: str, now: float, wall: float) -> Change | None:
        """Record what one look found; the change to act on, if any.

        LOST when a writable (or never seen) endpoint is now anything else; BACK when a
        non-writable one is writable again. ``finding`` says what was found, for errors
        and readiness (never a password: the caller passes scrubbed text).
        """
        self.checks += 1
        self.checked_wall = wall
        self.suspected = False
        previous = self.status
        self.news = status is not previous or finding != self.finding
        if status is not previous:
            self.status = status
            self.since = now
            self.since_wall = wall
        self.finding = finding
        if status is Status.WRITABLE:
            if previous is not Status.WRITABLE:
                self.outage_since = None
                return Change.BACK if previous is not Status.UNKNOWN else None
            return None
        if self.outage_since is None:
            self.outage_since = now
        if previous in (Status.WRITABLE, Status.UNKNOWN):
            return Change.LOST
        return None

    def suspect(self) -> None:
        """A pool met a failover error there: look again now, whatever the schedule."""
        self.suspected = True

    def next_delay(self, rng: random.Random) -> float:
        """Seconds until the next look: 0 when suspected, the outage interval while no
        writable primary is found (misconfiguration: the healthy interval, since asking
        faster cannot help), the healthy interval with +/- :data:`JITTER` otherwise."""
        if self.suspected:
            return 0.0
        if self.status in (Status.READ_ONLY, Status.DOWN):
            return self.outage_interval
        return self.interval * (1.0 + rng.uniform(-JITTER, JITTER))

    def health(self) -> Health:
        """The frozen readiness answer for this endpoint."""
        writable = self.status is Status.WRITABLE
        return Health(
            writable=writable,
            endpoint=str(self.endpoint),
            role=self.status.value,
            since=self.since_wall,
            checked_at=self.checked_wall,
            reason="" if writable else self.finding,
            monitored=True,
        )


def standbys_finding(hosts: Sequence[str]) -> str:
    """The finding of a look that libpq refused on every host as read-only
    (``target_session_attrs``): they answer, none is a writable primary."""
    return f"no writable primary: {', '.join(hosts)} answered as standbys (read-only)"


def spread(count: int, rng: random.Random) -> list[float]:
    """Wake-up offsets (seconds) for ``count`` pools of one endpoint, in a random order.

    Evenly spaced over ``min(MAX_SPREAD, (count - 1) * SPREAD_STEP)``: one pool wakes at
    once; 100 pools spread over 0.25 s, so that no 50 ms holds more than a fifth of them and
    the last one wakes 0.25 s after the first. The order is shuffled so that no pool is
    always the last.
    """
    if count <= 0:
        return []
    window = min(MAX_SPREAD, (count - 1) * SPREAD_STEP)
    step = window / (count - 1) if count > 1 else 0.0
    offsets = [i * step for i in range(count)]
    rng.shuffle(offsets)
    return offsets
