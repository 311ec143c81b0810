# pgfailover: generate-sync
"""The cluster as Patroni's REST API describes it (``GET /cluster``), with an in-band
fallback.

``AsyncPatroniTopology(urls)`` (``PatroniTopology`` in the generated ``patroni.py``) asks
``/cluster`` of the REST APIs it knows, in order, until one answers: first the ``api_url``
of every member of the last good answer (the leader's first), then the URLs it was given.
So the member list follows the cluster: a node added to Patroni is used, one removed is
dropped, without a restart, and the configured URLs only need to reach one member once.
A URL that gave no usable answer is asked last from then on, until it answers again
(:func:`~.model.rest_order`): a frozen member, whose REST API accepts the connection and
never answers, costs its share of the budget once, not at every refresh.

Every HTTP call has a timeout; a refresh spends at most ``timeout`` seconds on the REST
API, each URL getting an equal share of what is left (a URL that refuses at once leaves its
share to the next). The call runs in a daemon thread awaited with a deadline, so an async
caller never blocks its event loop (see :mod:`pgfailover.topology._io`).

When no URL gives a usable answer (unreachable, HTTP error, not JSON, not Patroni's
schema), the last known members are checked in-band instead (connect, ``pg_is_in_recovery()``
and the timeline; see :mod:`.source_async`) and the leader is chosen by the fencing rules of
:func:`~.model.choose_leader`, never below the timeline Patroni last gave the leader. The
first fallback of an episode is reported once as a ``in-band fallback``
:class:`~pgfailover.events.TopologyEvent`; ``REST API answers again`` ends it. With no
member known yet (the first refresh) or no conninfo to connect with,
:class:`~.model.TopologyUnavailable` says what each URL answered.

A valid answer without a leader (Patroni is electing one) is not a failure: the topology
has no leader and :meth:`conninfo_for_leader` raises :class:`~.model.NoLeader`, so writes
wait for the election instead of going to a node Patroni did not choose.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
import urllib.parse
from collections.abc import Sequence

from . import _io
from .model import (
    Topology,
    TopologySchemaError,
    TopologyUnavailable,
    conninfo_for,
    inband_topology,
    next_generation,
    parse_cluster,
    rest_order,
)
from .source_async import GRACE, AsyncTopologySource


def normalize_url(url: str) -> str:
    """A REST API base URL (``http[s]://host:port``, a path kept, a trailing ``/cluster`` or
    ``/patroni`` dropped: a member's ``api_url`` ends in ``/patroni``); ``ValueError``
    saying what is wrong for anything else (no credentials in the message)."""
    if not isinstance(url, str):
        raise TypeError(f"a Patroni REST API URL must be a string, got {type(url).__name__}")
    parts = urllib.parse.urlsplit(url.strip())
    if "@" in parts.netloc:
        raise ValueError(
            "a Patroni REST API URL must not hold credentials (GET /cluster needs none):"
            f" give http://{parts.netloc.rpartition('@')[2]}"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a Patroni REST API URL must look like http://host:8008, got {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(
            f"a Patroni REST API URL must look like http://host:8008, got {url!r} (bad port)"
        ) from None
    path = parts.path.rstrip("/")
    for endpoint in ("/cluster", "/patroni"):
        if path.endswith(endpoint):
            path = path[: -len(endpoint)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class AsyncPatroniTopology(AsyncTopologySource):
    """The cluster according to Patroni's REST API (see the module docstring).

    ``urls``: one REST API base URL or a sequence of them (``http://db1:8008``); at least
    one. ``conninfo``: the base conninfo for in-band fallback checks (user, database,
    password; host and port are replaced by each member's), "" to use the one last given to
    :meth:`conninfo_for_leader`. ``timeout`` (seconds): the REST budget of a refresh, and
    the bound of each in-band check. ``max_age`` (seconds or None): how old the cached
    topology may get before :meth:`conninfo_for_leader` asks again (default 10). ``ssl_context``
    for ``https`` URLs (None: Python's default verification).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        conninfo: str = "",
        timeout: float = 2.0,
        max_age: float | None = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(conninfo=conninfo, timeout=timeout, max_age=max_age)
        given = [urls] if isinstance(urls, str) else list(urls)
        if not given:
            raise ValueError("give at least one Patroni REST API URL (http://host:8008)")
        self.urls = tuple(dict.fromkeys(normalize_url(u) for u in given))
        self.ssl_context = ssl_context
        self._learned: tuple[str, ...] = ()
        self._failing: frozenset[str] = frozenset()  # URLs that gave no usable answer
        self._api_failing = False

    @property
    def description(self) -> str:
        return f"PatroniTopology({', '.join(self.urls)})"

    def urls_to_try(self) -> list[str]:
        """The REST API URLs a refresh tries, in order: the learnt ones (the leader's first),
        then the configured ones; those that gave no usable answer last time they were
        asked go last."""
        return rest_order(self._learned, self.urls, self._failing)

    async def _discover(self, previous: Topology | None) -> Topology:
        errors: dict[str, str] = {}
        urls = self.urls_to_try()
        deadline = time.monotonic() + self.timeout
        for i, url in enumerate(urls):
            left = deadline - time.monotonic()
            if left <= 0:
                errors[url] = "not tried: out of time"
                continue
            try:
                body = await self._get(url + "/cluster", left / (len(urls) - i))
                topology = parse_cluster(
                    body, origin=url, observed_at=time.monotonic(), observed_wall=time.time()
                )
            except _io.HttpError as ex:
                errors[url] = str(ex)
                self._failing |= {url}
                continue
            except TopologySchemaError as ex:
                errors[url] = f"not Patroni's /cluster answer: {ex}"
                self._failing |= {url}
                continue
            self._failing -= {url}
            return self._answered(previous, topology)
        return await self._fall_back(previous, errors)

    async def _get(self, url: str, timeout: float) -> bytes:
        future = _io.start_get(url, timeout, self.ssl_context)
        if True:  # ASYNC
            return await _io.wait_async(future, timeout + GRACE)
        else:
            return _io.wait_sync(future, timeout + GRACE)

    def _answered(self, previous: Topology | None, topology: Topology) -> Topology:
        leader = topology.leader_member
        learned = [m.api_url for m in (leader,) if m is not None and m.api_url]
        learned += [m.api_url for m in topology.members if m.api_url]
        usable = []
        for url in dict.fromkeys(learned):
            try:
                usable.append(normalize_url(url))
            except (TypeError, ValueError):
                continue
        self._learned = tuple(usable)
        if self._api_failing:
            self._api_failing = False
            self._event("REST API answers again", f"{topology.origin} answered", leader)
        generation = next_generation(previous, leader)
        return dataclasses.replace(topology, generation=generation)

    async def _fall_back(self, previous: Topology | None, errors: dict[str, str]) -> Topology:
        members = [m for m in (previous.members if previous else ()) if m.endpoint is not None]
        if not members:
            raise TopologyUnavailable(
                "no Patroni REST API gave a usable /cluster answer and no member is known yet",
                errors,
            )
        if not self._conninfo:
            raise TopologyUnavailable(
                "no Patroni REST API gave a usable /cluster answer and there is no conninfo"
                " to check the last known members in-band (pass conninfo=)",
                errors,
            )
        if not self._api_failing:
            self._api_failing = True
            failures = "; ".join(f"{url}: {what}" for url, what in errors.items())
            self._event(
                "in-band fallback",
                f"the REST API failed ({failures}); checking "
                + ", ".join(m.address for m in members)
                + " in-band",
                previous.write_target if previous else None,
            )
        conninfos = [conninfo_for(self._conninfo, m) for m in members]
        observations = await self._check(members, conninfos)
        known = previous.leader_member if previous is not None else None
        topology = inband_topology(
            observations,
            source="in-band fallback",
            origin=", ".join(m.address for m in members),
            observed_at=time.monotonic(),
            observed_wall=time.time(),
            names=[m.name for m in members],
            min_timeline=known.timeline if known is not None else None,
        )
        by_name = {m.name: m for m in members}
        topology = dataclasses.replace(
            topology,
            members=tuple(
                dataclasses.replace(m, api_url=by_name[m.name].api_url) for m in topology.members
            ),
        )
        generation = next_generation(previous, topology.leader_member)
        return dataclasses.replace(topology, generation=generation)
