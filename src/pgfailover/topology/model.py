"""The cluster as a source saw it, and the decisions taken from it. No I/O.

A *source* (Patroni's REST API, or in-band checks of a static host list) produces a
:class:`Topology`: the members, which one is the leader, their timelines and lag, when and
where it was observed. Everything here is a frozen value or a pure function:

- :func:`parse_cluster` turns the body of Patroni's ``GET /cluster`` into a
  :class:`Topology`, or raises :class:`TopologySchemaError` saying what is wrong;
- :func:`choose_leader` picks the primary among in-band observations (one writable primary;
  several: the highest timeline, reported; a tie or an unknown timeline: none);
- :func:`fence` says whether a connection that claims to be a writable primary may take
  writes: only the member the topology names leader, and not on a timeline older than the
  one known for it;
- :func:`conninfo_for` puts a member's host and port into a caller's conninfo, leaving
  every other parameter as it was.

Patroni's roles in ``/cluster`` (``patroni.utils.cluster_as_json``): ``leader``,
``standby_leader`` (the leader of a *standby cluster*: in recovery, it takes no writes),
``sync_standby``, ``quorum_standby`` (Patroni 4), ``replica``. A node's own ``GET /patroni``
says ``master`` (3.x) or ``primary`` (4.x); both are accepted here as the leader too. Any
other role string is kept as given and means "not the leader". ``lag`` is bytes behind the
leader, or ``"unknown"``; the leader has none.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._secrets import scrub, secret_candidates
from ..errors import InvalidConninfo

#: Roles that name the member holding Patroni's leader lock on a primary cluster.
LEADER_ROLES = frozenset({"leader", "master", "primary"})
#: The leader of a Patroni standby cluster: in recovery, never a write target.
STANDBY_LEADER_ROLE = "standby_leader"
#: Conninfo keywords dropped when a single endpoint is put into a caller's conninfo.
ROUTING_KEYS = ("host", "hostaddr", "port", "target_session_attrs", "load_balance_hosts")

SourceKind = Literal["patroni", "in-band", "in-band fallback"]


class TopologyError(Exception):
    """Base class of the topology's own errors."""


class TopologySchemaError(TopologyError, ValueError):
    """A ``/cluster`` answer is not JSON, or not the document Patroni sends.

    The message says which part is wrong (``members[1].port: expected an integer in 1-65535,
    got 'x'``). A ``ValueError`` too.
    """


class TopologyUnavailable(TopologyError, psycopg.OperationalError):
    """No source answered and nothing was known to fall back on.

    A ``psycopg.OperationalError`` too: to a caller opening a connection it is a failure to
    reach the database right now, handled like one.
    ``errors`` maps each place tried (a URL, or ``host:port``) to what happened there, in
    the order tried. The message names them all and never holds a password.
    """

    def __init__(self, reason: str, errors: Mapping[str, str] | None = None) -> None:
        self.reason = reason
        self.errors = dict(errors or {})
        found = "; ".join(f"{where}: {what}" for where, what in self.errors.items())
        super().__init__(reason + (f" ({found})" if found else ""))

    def __reduce__(self) -> tuple[type[TopologyUnavailable], tuple[str, dict[str, str]]]:
        return (type(self), (self.reason, self.errors))


class LeaderMoved(TopologyError, psycopg.OperationalError):
    """The leader changed again and again while one connection attempt was under way
    (see ``follow()`` of the topology sources). A ``psycopg.OperationalError`` too: the
    caller tries again as after any failure to connect."""


class NoLeader(TopologyError, psycopg.OperationalError):
    """The topology names no member that can take writes (Patroni is electing one, the
    cluster is a standby cluster, or in-band checks found no primary or two primaries on the
    same timeline). Writes must wait: ``topology`` is what was seen. A
    ``psycopg.OperationalError`` too, like :class:`TopologyUnavailable`."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        super().__init__(f"no leader to write to: {topology.describe()}")

    def __reduce__(self) -> tuple[type[NoLeader], tuple[Topology]]:
        return (type(self), (self.topology,))


@dataclass(frozen=True, slots=True)
class Member:
    """One member of the cluster, as a source saw it.

    ``name`` is unique in a topology (Patroni's member name; ``host:port`` for a host list).
    ``host``/``port`` are where PostgreSQL listens (None when the source does not say).
    ``role`` is the source's word: Patroni's (``leader``, ``replica``, ``sync_standby``...)
    or, in-band, ``primary``, ``standby`` or ``unreachable``. ``state`` is Patroni's
    (``running``, ``streaming``...) or, in-band, ``running`` or why the member could not be
    checked. ``timeline`` is the member's timeline, None when unknown. ``lag`` is bytes
    behind the leader (0 means caught up), None for the leader or when unknown.
    ``api_url`` is the member's Patroni REST API base URL, None for in-band members.
    """

    name: str
    host: str | None
    port: int | None
    role: str
    state: str | None = None
    timeline: int | None = None
    lag: int | None = None
    api_url: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``), ``?`` for what is unknown."""
        host = self.host or "?"
        if ":" in host and not host.startswith("/"):
            host = f"[{host}]"
        return f"{host}:{self.port if self.port is not None else '?'}"

    @property
    def endpoint(self) -> tuple[str, int] | None:
        """``(host, port)`` when both are known, else None."""
        if self.host is None or self.port is None:
            return None
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Topology:
    """The cluster as one source saw it at one moment.

    ``leader`` names the member that takes writes (None: none does right now). ``source``
    says how it was seen: ``patroni`` (a ``/cluster`` answer), ``in-band`` (queries to each
    member of a host list) or ``in-band fallback`` (the REST API failed; queries to the last
    known members). ``origin`` is where: the URL that answered, or the host list.
    ``observed_at`` is ``time.monotonic()`` when the answer was read and ``observed_wall``
    the same moment as ``time.time()``. ``generation`` counts the changes of leader
    (or of the leader's timeline) a source has seen: equal generations mean the same leader.
    ``notes`` holds what a human should know (a split brain and how it was settled, an
    unreachable member).
    """

    members: tuple[Member, ...]
    leader: str | None
    source: SourceKind
    origin: str
    observed_at: float
    observed_wall: float = 0.0
    generation: int = 0
    notes: tuple[str, ...] = field(default=())

    def member(self, name: str) -> Member | None:
        """The member called ``name``, None if there is none."""
        return next((m for m in self.members if m.name == name), None)

    @property
    def leader_member(self) -> Member | None:
        """The leader's :class:`Member`, None when there is no leader."""
        return None if self.leader is None else self.member(self.leader)

    @property
    def write_target(self) -> Member | None:
        """The member writes go to: the leader, when its host and port are known."""
        leader = self.leader_member
        return leader if leader is not None and leader.endpoint is not None else None

    def at(self, host: str, port: int) -> Member | None:
        """The member listening at ``host``:``port`` (host compared case-insensitively)."""
        key = (_norm_host(host), port)
        return next(
            (m for m in self.members if m.endpoint and (_norm_host(m.host), m.port) == key),
            None,
        )

    def age(self, now: float) -> float:
        """Seconds since the observation, ``now`` being ``time.monotonic()``."""
        return now - self.observed_at

    def describe(self) -> str:
        """One line: source, leader and every member (no password: none is held)."""
        leader = self.leader_member
        who = f"leader {leader.name} at {leader.address}" if leader else "no leader"
        tl = f" (timeline {leader.timeline})" if leader and leader.timeline is not None else ""
        members = ", ".join(f"{m.name} {m.role}" for m in self.members) or "no members"
        notes = "".join(f"; {n}" for n in self.notes)
        return f"{self.source} via {self.origin}: {who}{tl}; members: {members}{notes}"


def _norm_host(host: str | None) -> str:
    return (host or "").lower()


# ------------------------------------------------------------------------------ parsing


def parse_cluster(
    body: bytes | str | object,
    *,
    origin: str,
    observed_at: float,
    observed_wall: float = 0.0,
    generation: int = 0,
) -> Topology:
    """The :class:`Topology` described by a Patroni ``GET /cluster`` answer.

    ``body`` is the raw answer (bytes or text, parsed as JSON) or an already decoded
    document. Unknown keys are ignored (Patroni adds some across versions). A member list
    without a leader is valid: the topology's ``leader`` is then None (Patroni is electing
    one). Raises :class:`TopologySchemaError` for text that is not JSON, a document that is
    not an object with a ``members`` list, a member that is not an object or lacks a
    string ``name``/``role``, a duplicate name, a wrong type (``port`` and ``timeline``
    integers, ``lag`` an integer or ``"unknown"``, ``host``, ``state``, ``api_url``
    strings), two leaders, or a leader without host and port.
    """
    document = _decode(body) if isinstance(body, (bytes, bytearray, str)) else body
    if not isinstance(document, dict):
        raise TopologySchemaError(
            f"expected a JSON object with a 'members' list, got {_kind(document)}"
        )
    if "members" not in document:
        raise TopologySchemaError("no 'members' key: is this Patroni's /cluster endpoint?")
    raw_members = document["members"]
    if not isinstance(raw_members, list):
        raise TopologySchemaError(
            f"'members' must be a list of member objects, got {_kind(raw_members)}"
        )
    members = tuple(_member(i, raw) for i, raw in enumerate(raw_members))
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TopologySchemaError(f"duplicate member names: {', '.join(duplicates)}")
    leaders = [m for m in members if m.role in LEADER_ROLES]
    if len(leaders) > 1:
        raise TopologySchemaError(
            f"{len(leaders)} members say they are the leader: " + ", ".join(m.name for m in leaders)
        )
    leader = leaders[0] if leaders else None
    if leader is not None and leader.endpoint is None:
        raise TopologySchemaError(
            f"the leader {leader.name!r} has no host and port (Patroni's"
            " postgresql.connect_address)"
        )
    notes: tuple[str, ...] = ()
    if leader is None and any(m.role == STANDBY_LEADER_ROLE for m in members):
        notes = ("a standby cluster: its standby_leader takes no writes",)
    return Topology(
        members=members,
        leader=leader.name if leader else None,
        source="patroni",
        origin=origin,
        observed_at=observed_at,
        observed_wall=observed_wall,
        generation=generation,
        notes=notes,
    )


def _decode(body: bytes | bytearray | str) -> object:
    try:
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as ex:
        raise TopologySchemaError(f"not JSON: {ex}") from None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _member(index: int, raw: object) -> Member:
    where = f"members[{index}]"
    if not isinstance(raw, dict):
        raise TopologySchemaError(f"{where}: expected an object, got {_kind(raw)}")
    name = _text(raw, "name", where, required=True)
    role = _text(raw, "role", where, required=True)
    assert name is not None
    assert role is not None
    where = f"{where} ({name!r})"
    port = raw.get("port")
    if port is not None and not (_is_int(port) and 0 < port < 65536):
        raise TopologySchemaError(f"{where}.port: expected an integer in 1-65535, got {port!r}")
    timeline = raw.get("timeline")
    if timeline is not None and not (_is_int(timeline) and timeline >= 0):
        raise TopologySchemaError(
            f"{where}.timeline: expected a non-negative integer, got {timeline!r}"
        )
    lag = raw.get("lag")
    if lag == "unknown":
        lag = None
    if lag is not None and not (_is_int(lag) and lag >= 0):
        raise TopologySchemaError(
            f"{where}.lag: expected bytes (a non-negative integer) or 'unknown', got {lag!r}"
        )
    return Member(
        name=name,
        host=_text(raw, "host", where) or None,
        port=port,
        role=role,
        state=_text(raw, "state", where),
        timeline=timeline,
        lag=None if role in LEADER_ROLES else lag,
        api_url=_text(raw, "api_url", where) or None,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(raw: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        wanted = "a non-empty string" if required else "a string"
        raise TopologySchemaError(f"{where}.{key}: expected {wanted}, got {value!r}")
    return value


# -------------------------------------------------------------------- in-band decisions


@dataclass(frozen=True, slots=True)
class Observation:
    """What one in-band check of one endpoint found.

    ``in_recovery`` is ``pg_is_in_recovery()``; ``writable`` is true for a primary whose
    sessions are not read-only by default. ``timeline`` is the server's timeline (None when
    it could not be read), ``wal_lsn`` its current WAL position as a byte offset (a
    primary's insert position, a standby's replay position; None when unknown). ``error``
    is why the check failed (then the other fields mean nothing).
    """

    host: str | None
    port: int | None
    in_recovery: bool = False
    writable: bool = False
    timeline: int | None = None
    wal_lsn: int | None = None
    error: str | None = None

    @property
    def address(self) -> str:
        """``host:port``, as :attr:`Member.address` writes it."""
        return Member("", self.host, self.port, "").address

    @property
    def claims_primary(self) -> bool:
        """The endpoint answered and says it is a writable primary."""
        return self.error is None and not self.in_recovery and self.writable


def choose_leader(
    observations: Sequence[Observation], *, min_timeline: int | None = None
) -> tuple[int | None, tuple[str, ...]]:
    """Which observation is the primary to write to, and what to report.

    Returns the index of the chosen observation (None: no write target) and notes. One
    writable primary: that one. Several ("split brain": an old primary started by hand
    after a failover, a promotion without fencing): the one on the highest timeline, with a
    note naming the others; when the highest timeline is shared, or a claimant's timeline
    is unknown, none is chosen (guessing could send writes to the wrong history).
    ``min_timeline`` (the leader's timeline last known for sure, None if none): a primary
    on a lower timeline is an old primary and is never chosen (a note says so).
    """
    claims = [i for i, o in enumerate(observations) if o.claims_primary]
    notes: tuple[str, ...] = ()
    if min_timeline is not None:
        old = [i for i in claims if (observations[i].timeline or 0) < min_timeline]
        if old:
            notes = (
                "fenced old primaries (timeline below the last known "
                f"{min_timeline}): " + ", ".join(observations[i].address for i in old),
            )
            claims = [i for i in claims if i not in old]
    chosen, found = _choose(observations, claims)
    return chosen, (*notes, *found)


def _choose(
    observations: Sequence[Observation], claims: list[int]
) -> tuple[int | None, tuple[str, ...]]:
    if not claims:
        return None, ()
    if len(claims) == 1:
        return claims[0], ()
    listed = ", ".join(
        f"{observations[i].address} (timeline {_tl(observations[i].timeline)})" for i in claims
    )
    if any(observations[i].timeline is None for i in claims):
        return None, (f"split brain: {len(claims)} primaries, {listed}; a timeline is unknown",)
    best = max(claims, key=lambda i: observations[i].timeline or 0)
    top = observations[best].timeline
    if sum(observations[i].timeline == top for i in claims) > 1:
        return None, (f"split brain: {len(claims)} primaries, {listed}; none chosen (a tie)",)
    return best, (
        f"split brain: {len(claims)} primaries, {listed}; "
        f"chose {observations[best].address} on the highest timeline",
    )


def _tl(timeline: int | None) -> str:
    return "unknown" if timeline is None else str(timeline)


def inband_topology(
    observations: Sequence[Observation],
    *,
    source: SourceKind,
    origin: str,
    observed_at: float,
    observed_wall: float = 0.0,
    generation: int = 0,
    names: Sequence[str] | None = None,
    min_timeline: int | None = None,
) -> Topology:
    """The :class:`Topology` of in-band observations (see :func:`choose_leader`).

    ``names`` gives each observation's member name (default ``host:port``);
    ``min_timeline`` is passed to :func:`choose_leader`. A standby's
    ``lag`` is the chosen primary's WAL position minus its replay position, floored at 0,
    None when either is unknown or no primary was chosen.
    """
    chosen, notes = choose_leader(observations, min_timeline=min_timeline)
    primary_lsn = observations[chosen].wal_lsn if chosen is not None else None
    members = []
    for i, obs in enumerate(observations):
        name = names[i] if names is not None else obs.address
        if obs.error is not None:
            role, state, lag = "unreachable", obs.error, None
        else:
            role = "standby" if obs.in_recovery else "primary"
            state = "running" if obs.writable or obs.in_recovery else "running, read-only"
            lag = None
            if obs.in_recovery and primary_lsn is not None and obs.wal_lsn is not None:
                lag = max(0, primary_lsn - obs.wal_lsn)
        members.append(Member(name, obs.host, obs.port, role, state, obs.timeline, lag))
    unreachable = [o.address for o in observations if o.error is not None]
    if unreachable:
        notes = (*notes, f"unreachable: {', '.join(unreachable)}")
    return Topology(
        members=tuple(members),
        leader=members[chosen].name if chosen is not None else None,
        source=source,
        origin=origin,
        observed_at=observed_at,
        observed_wall=observed_wall,
        generation=generation,
        notes=notes,
    )


def next_generation(previous: Topology | None, leader: Member | None) -> int:
    """The generation of a new topology whose leader is ``leader``, after ``previous``.

    It stays the same while the leader keeps its name, endpoint and timeline (a timeline
    learnt where it was unknown is no change), and grows by one otherwise; 0 for the first.
    """
    if previous is None:
        return 0
    before = previous.leader_member
    same = (before is None and leader is None) or (
        before is not None
        and leader is not None
        and (before.name, before.endpoint) == (leader.name, leader.endpoint)
        and (before.timeline is None or leader.timeline in (None, before.timeline))
    )
    return previous.generation if same else previous.generation + 1


# ----------------------------------------------------------------------------- fencing


class FenceAction(enum.Enum):
    """What to do with a connection that was checked in-band."""

    ACCEPT = "accept"  #: the leader, on its timeline (or a later one): write
    REFUSE = "refuse"  #: do not write through it (``Fence.reason`` says why)


@dataclass(frozen=True, slots=True)
class Fence:
    """The fencing verdict for one in-band observation.

    ``fenced`` is True when the endpoint claims to be a writable primary but is refused
    (not the leader the topology names, or on an older timeline): a split brain or an old
    primary started by hand, reported as an event. A standby or an unreachable endpoint is
    refused without being ``fenced``. ``refresh`` says the topology looks out of date (the
    endpoint is on a newer timeline than known, or no leader is known) and should be
    refreshed.
    """

    action: FenceAction
    reason: str
    fenced: bool = False
    refresh: bool = False

    @property
    def accepted(self) -> bool:
        """Writes may go through the endpoint."""
        return self.action is FenceAction.ACCEPT


def fence(topology: Topology | None, observation: Observation) -> Fence:  # noqa: PLR0911 - one return per rule reads best
    """May writes go through the endpoint of ``observation``, given ``topology``?

    Accepted only when the endpoint is a writable primary, is the topology's write target,
    and is not on a timeline lower than the one known for the leader (a higher one is
    accepted and asks for a refresh: Patroni may not have published the new timeline yet).
    Refused otherwise, ``fenced`` when the endpoint claims to be a writable primary.
    """
    where = observation.address
    if observation.error is not None:
        return Fence(FenceAction.REFUSE, f"{where} could not be checked: {observation.error}")
    if observation.in_recovery:
        return Fence(FenceAction.REFUSE, f"{where} is a standby")
    if not observation.writable:
        return Fence(FenceAction.REFUSE, f"{where} is a read-only primary")
    target = topology.write_target if topology is not None else None
    if topology is None or target is None:
        why = "no topology yet" if topology is None else f"no leader ({topology.describe()})"
        return Fence(
            FenceAction.REFUSE,
            f"{where} says it is a writable primary, but {why}",
            fenced=True,
            refresh=True,
        )
    if (
        observation.host is None
        or observation.port is None
        or topology.at(observation.host, observation.port) is not target
    ):
        return Fence(
            FenceAction.REFUSE,
            f"{where} says it is a writable primary, but the {topology.source} topology names "
            f"{target.name} at {target.address} leader",
            fenced=True,
        )
    known, seen = target.timeline, observation.timeline
    if known is not None and seen is not None and seen < known:
        return Fence(
            FenceAction.REFUSE,
            f"{where} is a writable primary on timeline {seen}, older than the leader's "
            f"timeline {known}: an old primary",
            fenced=True,
            refresh=True,
        )
    stale = known is not None and seen is not None and seen > known
    return Fence(
        FenceAction.ACCEPT,
        f"{where} is the leader {target.name}"
        + (f" on timeline {seen}" if seen is not None else ""),
        refresh=stale,
    )


# --------------------------------------------------------------------------- conninfo


def leader_moved(
    before: Topology | None, current: Topology | None
) -> tuple[Member, Member | None] | None:
    """``(former write target, the new one or None)`` when ``current`` names another write
    target than ``before`` did (connections made before are then suspect); None when it
    names the same one, or when either is unknown or ``before`` named none."""
    if before is None or current is None or before.write_target is None:
        return None
    old, new = before.write_target, current.write_target
    if new is not None and new.address == old.address:
        return None
    return old, new


def attempt_outdated(target: Member | None, current: Topology | None) -> bool:
    """Whether a connection attempt to ``target`` (the write target it was given) should be
    abandoned because ``current`` names another write target: True only when both are
    known and their addresses differ. A topology without a leader (an election under way)
    keeps the attempt: it abandons nothing until another leader is named."""
    if target is None or current is None:
        return False
    new = current.write_target
    return new is not None and new.address != target.address


def rest_order(
    learned: Iterable[str], configured: Iterable[str], failing: Iterable[str] = ()
) -> list[str]:
    """The order a refresh asks REST API URLs in: the ``learned`` ones (the leader's first),
    then the ``configured`` ones, each once; those in ``failing`` (they gave no usable
    answer last time: a frozen or dead member) go last, in the same relative order, so a
    member that hangs costs its share of the budget once, not at every refresh."""
    ordered = list(dict.fromkeys((*learned, *configured)))
    bad = set(failing)
    return [u for u in ordered if u not in bad] + [u for u in ordered if u in bad]


def former_leader(old: Member, new: Member | None, source: str) -> str:
    """What a former write target is now, for events and errors."""
    now_leader = f"{new.address} leads now" if new is not None else "no leader now"
    return f"former leader ({now_leader}, says {source})"


def conninfo_for(base_conninfo: str, member: Member) -> str:
    """``base_conninfo`` with host and port set to ``member``'s, every other parameter
    untouched.

    ``hostaddr``, ``target_session_attrs`` and ``load_balance_hosts`` are dropped (they
    belong to the host list being replaced). Raises :class:`~pgfailover.errors.InvalidConninfo`
    (no password in its message) for a string libpq cannot parse, ``ValueError`` for a
    member without host or port.
    """
    endpoint = member.endpoint
    if endpoint is None:
        raise ValueError(f"member {member.name!r} has no host and port")
    try:
        params = conninfo_to_dict(base_conninfo)
    except psycopg.Error as ex:
        reason = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise InvalidConninfo(
            "cannot parse the connection string: " + scrub(reason, secret_candidates(base_conninfo))
        ) from None
    for key in ROUTING_KEYS:
        params.pop(key, None)
    host, port = endpoint
    return make_conninfo("", **params, host=host, port=str(port))


def endpoints_of(members: Iterable[Member]) -> list[tuple[str, int]]:
    """The distinct ``(host, port)`` of ``members`` that have both, in order."""
    seen: list[tuple[str, int]] = []
    for m in members:
        if m.endpoint is not None and m.endpoint not in seen:
            seen.append(m.endpoint)
    return seen


def check_timeout(name: str, value: object) -> float:
    """``value`` as seconds (> 0, finite); ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)
