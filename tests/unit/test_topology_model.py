"""The pure topology model: /cluster parsing, leader choice, fencing, conninfo rewriting."""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import pgfailover
from pgfailover.errors import InvalidConninfo
from pgfailover.events import TopologyEvent, _emit
from pgfailover.topology import (
    AsyncHostListTopology,
    AsyncPatroniTopology,
    HostListTopology,
    Member,
    NoLeader,
    Observation,
    PatroniTopology,
    Topology,
    TopologySchemaError,
    TopologyUnavailable,
    choose_leader,
    conninfo_for,
    fence,
    parse_cluster,
)
from pgfailover.topology.model import (
    former_leader,
    inband_topology,
    leader_moved,
    next_generation,
)
from pgfailover.topology.patroni import normalize_url

#: What Patroni 3.0 answers on /cluster (patroni.utils.cluster_as_json), trimmed.
PATRONI_3 = {
    "members": [
        {
            "name": "pg1",
            "role": "leader",
            "state": "running",
            "api_url": "http://10.0.0.1:8008/patroni",
            "host": "10.0.0.1",
            "port": 5432,
            "timeline": 4,
        },
        {
            "name": "pg2",
            "role": "sync_standby",
            "state": "streaming",
            "api_url": "http://10.0.0.2:8008/patroni",
            "host": "10.0.0.2",
            "port": 5432,
            "timeline": 4,
            "lag": 0,
        },
        {
            "name": "pg3",
            "role": "replica",
            "state": "running",
            "api_url": "http://10.0.0.3:8008/patroni",
            "host": "10.0.0.3",
            "port": 5432,
            "timeline": 3,
            "lag": "unknown",
            "tags": {"nofailover": True},
        },
    ]
}


def _parse(document: Any) -> Topology:
    return parse_cluster(document, origin="http://10.0.0.1:8008", observed_at=100.0)


def _topology(leader_timeline: int | None = 4) -> Topology:
    doc = json.loads(json.dumps(PATRONI_3))
    doc["members"][0]["timeline"] = leader_timeline
    return _parse(doc)


def test_patroni_3_cluster_parses_into_members_leader_timelines_and_lag() -> None:
    """A Patroni 3 /cluster answer gives every member with role, state, endpoint, timeline,
    lag (bytes; 'unknown' is None) and api_url, and names the leader."""
    topology = _parse(json.dumps(PATRONI_3).encode())
    assert topology.leader == "pg1"
    assert topology.source == "patroni"
    assert topology.observed_at == 100.0
    assert [m.name for m in topology.members] == ["pg1", "pg2", "pg3"]
    pg1, pg2, pg3 = topology.members
    assert pg1 == Member(
        "pg1", "10.0.0.1", 5432, "leader", "running", 4, None, "http://10.0.0.1:8008/patroni"
    )
    assert (pg2.role, pg2.state, pg2.lag, pg2.timeline) == ("sync_standby", "streaming", 0, 4)
    assert (pg3.lag, pg3.timeline) == (None, 3)
    assert topology.write_target is pg1
    assert topology.at("10.0.0.2", 5432) is pg2


def test_patroni_4_roles_and_unknown_keys_are_accepted() -> None:
    """Patroni 4's quorum_standby role, its lsn/receive/replay fields and unknown top-level
    keys parse; a node's own 'primary'/'master' wording also counts as the leader."""
    doc: dict[str, Any] = {
        "scope": "demo",
        "members": [
            {"name": "a", "role": "primary", "host": "h1", "port": 5432, "timeline": 2},
            {
                "name": "b",
                "role": "quorum_standby",
                "host": "h2",
                "port": 5433,
                "lsn": "0/3000060",
                "receive_lag": 0,
                "replay_lag": 16,
                "lag": 16,
            },
        ],
        "pause": True,
    }
    topology = _parse(doc)
    assert topology.leader == "a"
    assert topology.member("b") == Member("b", "h2", 5433, "quorum_standby", lag=16)
    doc["members"][0]["role"] = "master"
    assert _parse(doc).leader == "a"


def test_a_member_list_without_a_leader_is_valid_and_has_no_write_target() -> None:
    """While Patroni elects a leader /cluster lists only replicas: a topology without
    leader, no write target, and conninfo_for_leader's error type NoLeader describes it."""
    doc = {"members": [{"name": "a", "role": "replica", "host": "h", "port": 1}]}
    topology = _parse(doc)
    assert (topology.leader, topology.write_target) == (None, None)
    assert "no leader" in str(NoLeader(topology))
    assert isinstance(NoLeader(topology), psycopg.OperationalError)


def test_a_standby_cluster_has_no_write_target_and_says_so() -> None:
    """A standby cluster's standby_leader is in recovery: not a write target, noted."""
    doc = {"members": [{"name": "a", "role": "standby_leader", "host": "h", "port": 1}]}
    topology = _parse(doc)
    assert topology.write_target is None
    assert any("standby cluster" in n for n in topology.notes)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>500</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[]", "expected a JSON object"),
        ("null", "expected a JSON object"),
        ('{"leader": "a"}', "no 'members' key"),
        ('{"members": {"a": 1}}', "'members' must be a list"),
        ('{"members": ["a"]}', "members[0]: expected an object"),
        ('{"members": [{"role": "leader"}]}', "members[0].name"),
        ('{"members": [{"name": "", "role": "leader"}]}', "members[0].name"),
        ('{"members": [{"name": "a", "role": 1}]}', "members[0].role"),
        ('{"members": [{"name": "a", "role": "replica", "port": "5432"}]}', ".port"),
        ('{"members": [{"name": "a", "role": "replica", "port": 0}]}', ".port"),
        ('{"members": [{"name": "a", "role": "replica", "port": true}]}', ".port"),
        ('{"members": [{"name": "a", "role": "replica", "host": 5}]}', ".host"),
        ('{"members": [{"name": "a", "role": "replica", "timeline": -1}]}', ".timeline"),
        ('{"members": [{"name": "a", "role": "replica", "timeline": "4"}]}', ".timeline"),
        ('{"members": [{"name": "a", "role": "replica", "lag": "big"}]}', ".lag"),
        ('{"members": [{"name": "a", "role": "replica", "api_url": []}]}', ".api_url"),
        ('{"members": [{"name": "a", "role": "replica", "state": 3}]}', ".state"),
        (
            '{"members": [{"name": "a", "role": "replica"}, {"name": "a", "role": "replica"}]}',
            "duplicate member names: a",
        ),
        (
            '{"members": [{"name": "a", "role": "leader", "host": "h", "port": 1},'
            ' {"name": "b", "role": "leader", "host": "h", "port": 2}]}',
            "2 members say they are the leader",
        ),
        ('{"members": [{"name": "a", "role": "leader"}]}', "has no host and port"),
    ],
)
def test_each_kind_of_wrong_schema_is_a_typed_error_saying_what_is_wrong(
    body: str | bytes, message: str
) -> None:
    """Garbage and wrong schemas raise TopologySchemaError (a ValueError) naming the part."""
    with pytest.raises(TopologySchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _parse(body)
    assert issubclass(TopologySchemaError, ValueError)


def _obs(
    port: int,
    *,
    primary: bool = True,
    timeline: int | None = 1,
    lsn: int | None = None,
    error: str | None = None,
    host: str = "h",
) -> Observation:
    return Observation(host, port, not primary, primary, timeline, lsn, error)


def test_choose_leader_picks_the_one_primary() -> None:
    """One writable primary among standbys and unreachable hosts is the leader; no notes."""
    found = [_obs(1, primary=False), _obs(2), _obs(3, error="refused: connection refused")]
    assert choose_leader(found) == (1, ())
    assert choose_leader([_obs(1, primary=False)]) == (None, ())


def test_two_primaries_prefer_the_higher_timeline_and_report_it() -> None:
    """Two nodes claim to be primary: the higher timeline wins, and a note names both."""
    chosen, notes = choose_leader([_obs(1, timeline=3), _obs(2, timeline=4)])
    assert chosen == 1
    assert len(notes) == 1
    assert "split brain" in notes[0]
    assert "h:1 (timeline 3)" in notes[0]
    assert "chose h:2" in notes[0]


def test_two_primaries_on_one_timeline_or_an_unknown_one_choose_none() -> None:
    """A tie, or a claimant whose timeline is unknown, leaves no leader (and says why)."""
    chosen, notes = choose_leader([_obs(1, timeline=4), _obs(2, timeline=4)])
    assert chosen is None
    assert "a tie" in notes[0]
    chosen, notes = choose_leader([_obs(1, timeline=None), _obs(2, timeline=4)])
    assert chosen is None
    assert "unknown" in notes[0]


def test_a_primary_below_the_last_known_timeline_is_never_chosen() -> None:
    """An old primary (timeline below the leader's last known one) is fenced even alone."""
    chosen, notes = choose_leader([_obs(1, timeline=3)], min_timeline=4)
    assert chosen is None
    assert "fenced old primaries" in notes[0]
    chosen, _ = choose_leader([_obs(1, timeline=3), _obs(2, timeline=4)], min_timeline=4)
    assert chosen == 1


def test_inband_topology_computes_standby_lag_from_wal_positions() -> None:
    """A standby's lag is the primary's WAL position minus its replay position (floored at
    0); unreachable members are noted; member names default to host:port."""
    topology = inband_topology(
        [
            _obs(1, lsn=1000, timeline=2),
            _obs(2, primary=False, lsn=600),
            _obs(3, primary=False, lsn=1200),
            _obs(4, error="timeout: no answer"),
        ],
        source="in-band",
        origin="hosts",
        observed_at=5.0,
    )
    assert topology.leader == "h:1"
    assert [m.lag for m in topology.members] == [None, 400, 0, None]
    assert [m.role for m in topology.members] == ["primary", "standby", "standby", "unreachable"]
    assert topology.member("h:4") is not None
    assert topology.notes == ("unreachable: h:4",)


def test_fence_accepts_only_the_leader_on_its_timeline() -> None:
    """The leader's endpoint claiming primary on the known (or a later) timeline is accepted;
    a later timeline asks for a refresh; host names compare case-insensitively."""
    topology = _topology()
    verdict = fence(topology, _obs(5432, timeline=4, host="10.0.0.1"))
    assert (verdict.accepted, verdict.fenced, verdict.refresh) == (True, False, False)
    verdict = fence(topology, _obs(5432, timeline=5, host="10.0.0.1"))
    assert (verdict.accepted, verdict.refresh) == (True, True)
    doc = json.loads(json.dumps(PATRONI_3))
    doc["members"][0]["host"] = "DB1.example"
    assert fence(_parse(doc), _obs(5432, timeline=4, host="db1.example")).accepted


def test_fence_refuses_a_writable_node_that_is_not_the_leader() -> None:
    """A node that accepts writes but is not the leader the store names is refused and
    marked fenced, however it answers in-band."""
    verdict = fence(_topology(), _obs(5432, timeline=9, host="10.0.0.2"))
    assert (verdict.accepted, verdict.fenced) == (False, True)
    assert "names pg1 at 10.0.0.1:5432 leader" in verdict.reason


def test_fence_refuses_the_leader_endpoint_on_an_older_timeline() -> None:
    """The leader's endpoint answering on a timeline older than the leader's is an old
    primary: refused, fenced, and the topology should be refreshed."""
    verdict = fence(_topology(), _obs(5432, timeline=3, host="10.0.0.1"))
    assert (verdict.accepted, verdict.fenced, verdict.refresh) == (False, True, True)
    assert "older than the leader's timeline 4" in verdict.reason


def test_fence_refuses_standbys_and_failures_without_calling_them_fenced() -> None:
    """A standby, a read-only primary or a failed check is refused but not a fencing event."""
    topology = _topology()
    for observation in (
        _obs(5432, primary=False, host="10.0.0.1"),
        Observation("10.0.0.1", 5432, in_recovery=False, writable=False),
        _obs(5432, host="10.0.0.1", error="lost"),
    ):
        verdict = fence(topology, observation)
        assert (verdict.accepted, verdict.fenced) == (False, False)


def test_fence_without_a_leader_refuses_and_asks_for_a_refresh() -> None:
    """No topology yet, or no leader in it: a writable node is refused (fenced) and the
    verdict asks for a refresh."""
    for topology in (None, _parse({"members": [{"name": "a", "role": "replica"}]})):
        verdict = fence(topology, _obs(5432))
        assert (verdict.accepted, verdict.fenced, verdict.refresh) == (False, True, True)


def test_fence_with_an_unknown_timeline_trusts_the_endpoint() -> None:
    """When either timeline is unknown the endpoint decides alone."""
    assert fence(_topology(None), _obs(5432, timeline=1, host="10.0.0.1")).accepted
    assert fence(_topology(), _obs(5432, timeline=None, host="10.0.0.1")).accepted


def test_conninfo_for_sets_host_and_port_and_keeps_everything_else() -> None:
    """The caller's conninfo keeps its parameters (password included); host lists, hostaddr
    and multi-host routing options are replaced by the member's endpoint."""
    base = (
        "host=a,b hostaddr=10.1.1.1,10.1.1.2 port=1,2 dbname=app user=u password=s3cret "
        "target_session_attrs=read-write load_balance_hosts=random connect_timeout=3"
    )
    params = conninfo_to_dict(conninfo_for(base, Member("m", "10.0.0.9", 6432, "leader")))
    assert params == {
        "host": "10.0.0.9",
        "port": "6432",
        "dbname": "app",
        "user": "u",
        "password": "s3cret",
        "connect_timeout": "3",
    }
    assert conninfo_to_dict(conninfo_for("", Member("m", "h", 1, "leader"))) == {
        "host": "h",
        "port": "1",
    }


def test_conninfo_for_rejects_bad_input_without_leaking_the_password() -> None:
    """An unparseable conninfo is InvalidConninfo without the password; a member without
    an endpoint is a ValueError."""
    with pytest.raises(InvalidConninfo) as info:
        conninfo_for("password='s3cret dbname=x", Member("m", "h", 1, "leader"))
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="no host and port"):
        conninfo_for("", Member("m", None, 1, "leader"))


def test_generation_changes_with_the_leader_and_its_timeline_only() -> None:
    """The generation grows when the leader's name, endpoint or timeline changes, not when
    only a replica changes or a timeline becomes known."""
    before = _topology()
    assert next_generation(None, before.leader_member) == 0
    assert next_generation(before, before.leader_member) == before.generation
    moved = _parse(
        {
            "members": [
                {"name": "pg2", "role": "leader", "host": "10.0.0.2", "port": 5432, "timeline": 5}
            ]
        }
    )
    assert next_generation(before, moved.leader_member) == before.generation + 1
    promoted = Member("pg1", "10.0.0.1", 5432, "leader", timeline=5)
    assert next_generation(before, promoted) == before.generation + 1
    assert next_generation(before, None) == before.generation + 1
    unknown = _topology(None)
    assert next_generation(unknown, before.leader_member) == unknown.generation


def test_rest_urls_are_normalized_and_bad_ones_rejected_without_credentials() -> None:
    """Base URLs lose a trailing /cluster or /patroni (a member's api_url); a URL that is not
    http(s) with a host is a ValueError that never shows a password."""
    assert normalize_url("http://h:8008/") == "http://h:8008"
    assert normalize_url("http://h:8008/patroni") == "http://h:8008"
    assert normalize_url("https://h:8008/cluster") == "https://h:8008"
    assert normalize_url("http://h/prefix/") == "http://h/prefix"
    for bad in ("h:8008", "ftp://h", "http://", "http://h:notaport"):
        with pytest.raises(ValueError, match="host"):
            normalize_url(bad)
    with pytest.raises(ValueError, match="credentials") as info:
        normalize_url("http://user:s3cret@h:1")
    assert "s3cret" not in str(info.value)


def test_sources_reject_bad_configuration_with_errors_naming_the_option() -> None:
    """No URL, a bad timeout or max_age, a non-string conninfo, an unparseable host list:
    each is an immediate error that names what to fix."""
    with pytest.raises(ValueError, match="at least one"):
        PatroniTopology([])
    with pytest.raises(ValueError, match="timeout"):
        AsyncPatroniTopology("http://h:8008", timeout=0)
    with pytest.raises(TypeError, match="max_age"):
        PatroniTopology("http://h:8008", max_age="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="conninfo"):
        HostListTopology(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidConninfo, match="ports"):
        AsyncHostListTopology("host=a,b,c port=1,2")
    with pytest.raises(ValueError, match="needs every host"):
        HostListTopology("dbname=app")


def test_patroni_source_tries_learned_urls_first() -> None:
    """The configured URLs are deduplicated and normalized; before any answer they are all
    that is tried; the cache is empty."""
    source = PatroniTopology(["http://a:8008/", "http://a:8008", "http://b:8008/patroni"])
    assert source.urls == ("http://a:8008", "http://b:8008")
    assert source.urls_to_try() == ["http://a:8008", "http://b:8008"]
    assert source.current() is None


def test_host_list_source_lists_the_conninfo_hosts_as_members() -> None:
    """A host list source's members are the conninfo's hosts, in order, with their ports."""
    source = HostListTopology("host=a,b port=5432,5433 dbname=app password=s3cret")
    assert [(m.host, m.port) for m in source.members] == [("a", 5432), ("b", 5433)]
    assert "s3cret" not in source.description


def test_topology_unavailable_names_every_place_tried_and_pickles() -> None:
    """The error lists what each URL answered, is an OperationalError, and survives pickle."""
    error = TopologyUnavailable("nothing", {"http://a:8008": "HTTP 500", "http://b": "refused"})
    assert "http://a:8008: HTTP 500; http://b: refused" in str(error)
    assert isinstance(error, psycopg.OperationalError)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert (copy.reason, copy.errors) == (error.reason, error.errors)


def test_topology_event_is_logged_once_at_warning_and_exported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TopologyEvent is public, logged once at WARNING with its summary, and delivered."""
    seen: list[pgfailover.Event] = []
    unsubscribe = pgfailover.subscribe(seen.append)
    try:
        with caplog.at_level(logging.WARNING, logger="pgfailover.events"):
            _emit(pgfailover.TopologyEvent("fenced", "PatroniTopology(x)", "h:1 refused", "h:2"))
    finally:
        unsubscribe()
    assert len(seen) == 1
    assert isinstance(seen[0], TopologyEvent)
    assert [r.getMessage() for r in caplog.records] == [
        "topology PatroniTopology(x): fenced: h:1 refused (leader h:2)"
    ]


def test_leader_moved_names_the_former_and_new_write_target_only_when_they_differ() -> None:
    """leader_moved: None for an unknown side or the same write target; (old, new) when the
    leader changed, (old, None) when none leads now; former_leader says so in words."""
    before = _topology()
    assert before.write_target is not None
    assert leader_moved(None, before) is None
    assert leader_moved(before, None) is None
    assert leader_moved(before, _topology()) is None  # the same leader, seen again
    doc = json.loads(json.dumps(PATRONI_3))
    doc["members"][0]["role"], doc["members"][1]["role"] = "replica", "leader"
    moved = leader_moved(before, _parse(doc))
    assert moved is not None
    old, new = moved
    assert old.address == before.write_target.address
    assert new is not None
    assert new.address != old.address
    assert f"{new.address} leads now" in former_leader(old, new, "src")
    doc["members"][1]["role"] = "replica"
    leaderless = _parse(doc)
    assert leader_moved(before, leaderless) == (before.write_target, None)
    assert "no leader now" in former_leader(old, None, "src")
    assert leader_moved(leaderless, before) is None  # nobody led before: nothing suspect
