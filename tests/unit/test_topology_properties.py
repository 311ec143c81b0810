"""Properties of the pure topology model, over generated documents and observations."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfailover.topology import (
    Member,
    Observation,
    Topology,
    TopologySchemaError,
    choose_leader,
    conninfo_for,
    fence,
    parse_cluster,
)
from pgfailover.topology.model import LEADER_ROLES, ROUTING_KEYS, inband_topology

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
member_keys = st.sampled_from(
    ["name", "role", "host", "port", "timeline", "lag", "state", "api_url", "tags"]
)
member_like = st.dictionaries(member_keys, json_values, max_size=9)
cluster_like = st.dictionaries(
    st.sampled_from(["members", "pause", "scope"]),
    st.lists(member_like, max_size=4) | json_values,
    max_size=3,
)


def _parse(body: Any) -> Topology | TopologySchemaError:
    """The topology, or the schema error (any other exception escapes and fails)."""
    try:
        return parse_cluster(body, origin="u", observed_at=0.0)
    except TopologySchemaError as ex:
        return ex


@given(st.one_of(json_values, cluster_like))
def test_any_json_document_parses_or_raises_the_schema_error(document: Any) -> None:
    """Whatever JSON a server sends, parsing gives a topology or a TopologySchemaError:
    never another exception, and a parsed leader always has an endpoint."""
    for body in (document, json.dumps(document)):
        outcome = _parse(body)
        if isinstance(outcome, TopologySchemaError):
            assert str(outcome)  # says what is wrong
            continue
        topology = outcome
        assert topology.leader is None or topology.write_target is not None


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_the_schema_error(body: bytes) -> None:
    """Arbitrary bytes (not UTF-8, not JSON) never escape as another exception type."""
    outcome = _parse(body)
    assert isinstance(outcome, (Topology, TopologySchemaError))
    assert isinstance(outcome, Topology) or str(outcome)  # an error says what is wrong


names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
roles = st.sampled_from(["replica", "sync_standby", "quorum_standby", "standby_leader"])


@st.composite
def valid_clusters(draw: st.DrawFn) -> list[dict[str, Any]]:
    members: list[dict[str, Any]] = []
    for i, name in enumerate(draw(st.lists(names, unique=True, max_size=5))):
        member: dict[str, Any] = {
            "name": name,
            "role": draw(roles),
            "host": f"10.0.0.{i}",
            "port": draw(st.integers(1, 65535)),
            "api_url": f"http://10.0.0.{i}:8008/patroni",
        }
        if draw(st.booleans()):
            member["timeline"] = draw(st.integers(0, 1000))
        member["lag"] = draw(st.one_of(st.integers(0, 2**40), st.just("unknown")))
        members.append(member)
    with_leader: bool = draw(st.booleans())
    if members and with_leader:
        members[draw(st.integers(0, len(members) - 1))]["role"] = "leader"
    return members


@given(valid_clusters())
def test_valid_member_lists_round_trip_into_the_model(members: list[dict[str, Any]]) -> None:
    """A well-formed member list parses into members with the same fields, and the leader
    is the member whose role says so (None when none does)."""
    topology = parse_cluster({"members": members}, origin="u", observed_at=0.0)
    assert [m.name for m in topology.members] == [m["name"] for m in members]
    for raw, member in zip(members, topology.members, strict=True):
        assert (member.host, member.port, member.role) == (raw["host"], raw["port"], raw["role"])
        assert member.timeline == raw.get("timeline")
        lag = None if raw["lag"] == "unknown" or raw["role"] in LEADER_ROLES else raw["lag"]
        assert member.lag == lag
    leaders = [m["name"] for m in members if m["role"] == "leader"]
    assert topology.leader == (leaders[0] if leaders else None)


observations = st.builds(
    Observation,
    host=st.just("h"),
    port=st.integers(1, 9),
    in_recovery=st.booleans(),
    writable=st.booleans(),
    timeline=st.none() | st.integers(1, 6),
    wal_lsn=st.none() | st.integers(0, 10**6),
    error=st.none() | st.just("refused"),
)


@given(st.lists(observations, max_size=6), st.none() | st.integers(1, 6))
def test_the_chosen_leader_is_a_primary_on_the_single_highest_timeline(
    found: list[Observation], min_timeline: int | None
) -> None:
    """choose_leader picks only a writable primary, never one below min_timeline, and when
    several claim it picks the strictly highest known timeline; several claimants always
    produce a note."""
    chosen, notes = choose_leader(found, min_timeline=min_timeline)
    claims = [o for o in found if o.claims_primary]
    if chosen is None:
        return
    winner = found[chosen]
    assert winner.claims_primary
    if min_timeline is not None:
        assert winner.timeline is not None
        assert winner.timeline >= min_timeline
    others = [o for i, o in enumerate(found) if o.claims_primary and i != chosen]
    if min_timeline is not None:
        others = [o for o in others if (o.timeline or 0) >= min_timeline]
    for other in others:
        assert winner.timeline is not None
        assert other.timeline is not None
        assert other.timeline < winner.timeline
    if len(claims) > 1 and others:
        assert any("split brain" in n for n in notes)


@given(st.lists(observations, min_size=1, max_size=6), observations)
def test_fence_accepts_only_a_writable_leader_not_behind_its_timeline(
    found: list[Observation], candidate: Observation
) -> None:
    """Against an in-band topology, fence accepts an observation only when it claims a
    writable primary at the leader's endpoint, on a timeline not below the leader's."""
    topology = inband_topology(found, source="in-band", origin="o", observed_at=0.0)
    verdict = fence(topology, candidate)
    if verdict.accepted:
        target = topology.write_target
        assert target is not None
        assert candidate.claims_primary
        assert (candidate.host, candidate.port) == target.endpoint
        if target.timeline is not None and candidate.timeline is not None:
            assert candidate.timeline >= target.timeline
    elif candidate.claims_primary:
        assert verdict.fenced


params = st.dictionaries(
    st.sampled_from(["dbname", "user", "password", "sslmode", "application_name", *ROUTING_KEYS]),
    st.text(alphabet="abc xyz'\\=", min_size=1, max_size=6),
    max_size=6,
)


@given(params, st.integers(1, 65535))
def test_conninfo_for_keeps_every_non_routing_parameter(base: dict[str, str], port: int) -> None:
    """Whatever the caller's parameters (quotes, spaces, backslashes), only host and port
    change and the routing keys go; everything else comes back unchanged."""
    result = conninfo_to_dict(conninfo_for(make_conninfo("", **base), Member("m", "db", port, "x")))
    expected = {k: v for k, v in base.items() if k not in ROUTING_KEYS}
    assert result == {**expected, "host": "db", "port": str(port)}
