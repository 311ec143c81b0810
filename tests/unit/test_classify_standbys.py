"""Unit tests for a connection refused on every host as read-only
(``target_session_attrs``): :func:`pgfailover.classify.read_only_hosts`, the READ_ONLY
verdict, the pool's error and the monitor's finding. The messages are libpq's and psycopg's
own, captured from a real cluster whose primary was stopped (the integration test
tests/integration/test_monitor_topology.py checks that they still look so)."""

from __future__ import annotations

import psycopg
from hypothesis import given
from hypothesis import strategies as st

from pgfailover._state import STANDBY_REFUSED, FailoverState
from pgfailover.classify import Kind, Phase, RetryCondition, classify, read_only_hosts
from pgfailover.monitor.model import standbys_finding

#: psycopg 3, two standbys, target_session_attrs=read-write
TWO_READ_ONLY = (
    'connection failed: connection to server at "127.0.0.1", port 29070 failed: session is'
    " read-only\nMultiple connection attempts failed. All failures were:\n- host:"
    " '127.0.0.1', port: '20366', hostaddr: '127.0.0.1': connection failed: connection to"
    " server at \"127.0.0.1\", port 20366 failed: session is read-only\n- host: '127.0.0.1',"
    " port: '29070', hostaddr: '127.0.0.1': connection failed: connection to server at"
    ' "127.0.0.1", port 29070 failed: session is read-only'
)
#: the same with target_session_attrs=primary
TWO_HOT_STANDBY = TWO_READ_ONLY.replace("session is read-only", "server is in hot standby mode")
#: the primary down, the two standbys up
ONE_DOWN = (
    'connection failed: connection to server at "127.0.0.1", port 29070 failed: session is'
    " read-only\nMultiple connection attempts failed. All failures were:\n- host:"
    " '127.0.0.1', port: '22042', hostaddr: '127.0.0.1': connection failed: connection to"
    ' server at "127.0.0.1", port 22042 failed: Connection refused\n\tIs the server running'
    " on that host and accepting TCP/IP connections?\n- host: '127.0.0.1', port: '20366',"
    " hostaddr: '127.0.0.1': connection failed: connection to server at \"127.0.0.1\", port"
    " 20366 failed: session is read-only\n- host: '127.0.0.1', port: '29070', hostaddr:"
    " '127.0.0.1': connection failed: connection to server at \"127.0.0.1\", port 29070"
    " failed: session is read-only"
)
#: one host only
SINGLE = (
    'connection failed: connection to server at "127.0.0.1", port 20366 failed: session is'
    " read-only"
)
HOSTS = ("127.0.0.1:20366", "127.0.0.1:29070")


def test_every_host_refused_as_read_only_names_the_hosts() -> None:
    """Every attempt refused as read-only (read-write or primary asked): the hosts are
    named once each, in the order tried; one host alone is named too."""
    assert read_only_hosts(TWO_READ_ONLY) == HOSTS
    assert read_only_hosts(TWO_HOT_STANDBY) == HOSTS
    assert read_only_hosts(SINGLE) == ("127.0.0.1:20366",)


def test_a_host_down_or_another_message_is_not_read_only() -> None:
    """One host down among standbys, an unrelated failure, or text without an attempt: None
    (the endpoint counts as down, as before)."""
    assert read_only_hosts(ONE_DOWN) is None
    assert read_only_hosts('connection to server at "h", port 1 failed: Connection refused') is None
    assert read_only_hosts("session is read-only") is None
    assert read_only_hosts("") is None


def test_a_unix_socket_host_is_named_by_its_path() -> None:
    """libpq's socket form (``on socket "path"``) names the socket."""
    text = 'connection to server on socket "/run/pg/.s.PGSQL.5432" failed: session is read-only'
    assert read_only_hosts(text) == ("/run/pg/.s.PGSQL.5432",)


def test_the_verdict_is_read_only_and_nothing_was_sent() -> None:
    """classify: READ_ONLY (a failover symptom: rediscover, purge), retry NOT_SENT at
    connect; with a host down it stays a lost connection."""
    verdict = classify(psycopg.OperationalError(TWO_READ_ONLY), phase=Phase.CONNECT)
    assert verdict.kind is Kind.READ_ONLY
    assert verdict.retry is RetryCondition.NOT_SENT
    assert verdict.is_failover
    assert verdict.rediscover_primary
    assert verdict.purge_generation
    assert verdict.sqlstate is None
    mixed = classify(psycopg.OperationalError(ONE_DOWN), phase=Phase.CONNECT)
    assert mixed.kind is Kind.CONNECTION_LOST


def test_the_pool_error_names_each_host_a_standby() -> None:
    """A pool's failed connect with every host refused as read-only: NoPrimaryAvailable
    names each host a standby, not the host list "down", and an outage begins."""
    state = FailoverState(pooler=False)
    verdict = classify(psycopg.OperationalError(TWO_READ_ONLY), phase=Phase.CONNECT)
    state.connect_failed("127.0.0.1:20366,127.0.0.1:29070", verdict, 1.0, HOSTS)
    error = state.no_primary(2.0)
    assert error is not None
    assert error.hosts == dict.fromkeys(HOSTS, STANDBY_REFUSED)
    assert "127.0.0.1:29070: standby" in str(error)
    assert state.outage_since == 1.0


def test_the_monitor_finding_names_the_hosts() -> None:
    """The watch's finding for such an endpoint names every host as a standby."""
    assert standbys_finding(HOSTS) == (
        "no writable primary: 127.0.0.1:20366, 127.0.0.1:29070 answered as standbys (read-only)"
    )


_hosts = st.tuples(st.sampled_from(["127.0.0.1", "db1.example", "::1"]), st.integers(1, 65535)).map(
    lambda hp: (hp[0], str(hp[1]))
)
_reasons = st.sampled_from(
    [
        "session is read-only",
        "server is in hot standby mode",
        "Connection refused\n\tIs the server running on that host and accepting TCP/IP"
        " connections?",
        'FATAL:  password authentication failed for user "app"',
        "timeout expired",
    ]
)


def _message(attempts: list[tuple[tuple[str, str], str]]) -> str:
    """psycopg's text for ``attempts`` ((host, port), reason), one or several."""

    def line(host: str, port: str, reason: str) -> str:
        return f'connection failed: connection to server at "{host}", port {port} failed: {reason}'

    (host, port), reason = attempts[-1]
    if len(attempts) == 1:
        return line(host, port, reason)
    return "\n".join(
        [line(host, port, reason), "Multiple connection attempts failed. All failures were:"]
        + [
            f"- host: '{h}', port: '{p}', hostaddr: '{h}': {line(h, p, r)}"
            for (h, p), r in attempts
        ]
    )


@given(st.lists(st.tuples(_hosts, _reasons), min_size=1, max_size=5))
def test_read_only_exactly_when_every_attempt_was_refused_as_read_only(
    attempts: list[tuple[tuple[str, str], str]],
) -> None:
    """For any hosts and failures: hosts named (each once, in order) iff every attempt was
    refused as read-only, and then the verdict is READ_ONLY; never otherwise."""
    text = _message(attempts)
    all_read_only = all(r.startswith(("session is", "server is in hot")) for _, r in attempts)
    found = read_only_hosts(text)
    kind = classify(psycopg.OperationalError(text), phase=Phase.CONNECT).kind
    if all_read_only:
        expected = tuple(dict.fromkeys(f"{h}:{p}" for (h, p), _ in attempts))
        assert found == expected
        assert kind is Kind.READ_ONLY
    else:
        assert found is None
        assert kind is not Kind.READ_ONLY
