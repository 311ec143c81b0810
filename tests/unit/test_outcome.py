"""Example tests for pgfailover.outcome: one per decision rule and edge of resolve()."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from pgfailover.outcome import (
    BEGIN_SQL,
    RECORD_SQL,
    UNMARKED_RECORD_SQL,
    CommitRecord,
    Observation,
    Outcome,
    ServerIdentity,
    lsn_value,
    parse_identity,
    parse_record,
    record_sql,
    resolve,
    timeline_of,
)

SYSTEM = "7361840593284412345"
OTHER_SYSTEM = "7361840593284499999"
XID = "7214836501"
TIMELINE = 3
START = "16/B374D848"  # WAL insert position when the transaction began
BEFORE_START = "16/B3000000"
PAST_START = "16/B4000010"
BEGAN = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
UP_SINCE_BEFORE = BEGAN - timedelta(days=3)  # server already running when it began
RESTARTED_SINCE = BEGAN + timedelta(seconds=7)  # server (re)started after it began

STATUSES = ["committed", "aborted", "in progress", "future", None]
NOT_COMMITTED_ON_NEW_TIMELINE = ["aborted", "in progress", "future"]


def record(**changes: Any) -> CommitRecord:
    """A record of a transaction on timeline 3, with ``changes`` applied."""
    base = CommitRecord(
        xid=XID,
        system_id=SYSTEM,
        timeline=TIMELINE,
        start_lsn=START,
        server_time=BEGAN,
        endpoint="db1.example:5432",
    )
    return dataclasses.replace(base, **changes)


def seen(**changes: Any) -> Observation:
    """A primary on the same system and timeline, up since before; ``changes`` applied."""
    base = Observation(
        system_id=SYSTEM,
        in_recovery=False,
        timeline=TIMELINE,
        replay_end_lsn=None,
        started_at=UP_SINCE_BEFORE,
        status="committed",
    )
    return dataclasses.replace(base, **changes)


def crash_restarted(replay_end: str, status: str | None) -> Observation:
    """The same primary, crash-restarted after the transaction began."""
    return seen(started_at=RESTARTED_SINCE, replay_end_lsn=replay_end, status=status)


def failed_over(fork: str | None, status: str | None, **changes: Any) -> Observation:
    """A standby promoted to the next timeline, running since before the transaction."""
    return seen(timeline=TIMELINE + 1, replay_end_lsn=fork, status=status, **changes)


# --- rule 1 and the standby guard -------------------------------------------------------


def test_another_system_identifier_is_unknown() -> None:
    """A primary of another cluster gives UNKNOWN, naming both system identifiers."""
    outcome, reason = resolve(record(), seen(system_id=OTHER_SYSTEM))
    assert outcome is Outcome.UNKNOWN
    assert OTHER_SYSTEM in reason
    assert SYSTEM in reason


@pytest.mark.parametrize("status", STATUSES)
def test_another_system_identifier_is_unknown_whatever_the_status(status: str | None) -> None:
    """Another cluster's xid status is never trusted, not even a 'committed'."""
    outcome, _ = resolve(record(), seen(system_id=OTHER_SYSTEM, status=status))
    assert outcome is Outcome.UNKNOWN


@pytest.mark.parametrize("timeline", [None, TIMELINE])
def test_a_standby_is_unknown(timeline: int | None) -> None:
    """A server in recovery gives UNKNOWN and says to ask the primary."""
    outcome, reason = resolve(record(), seen(in_recovery=True, timeline=timeline))
    assert outcome is Outcome.UNKNOWN
    assert "standby" in reason


def test_no_timeline_is_treated_as_a_standby() -> None:
    """An observation without a timeline (no WAL file name) gives UNKNOWN as a standby."""
    outcome, reason = resolve(record(), seen(timeline=None))
    assert outcome is Outcome.UNKNOWN
    assert "standby" in reason


# --- rule 2: same timeline, server up since before the transaction -----------------------


def test_same_timeline_committed_is_committed() -> None:
    """Same timeline, no restart: 'committed' gives COMMITTED."""
    outcome, reason = resolve(record(), seen(status="committed"))
    assert outcome is Outcome.COMMITTED
    assert "committed" in reason
    assert "same timeline" in reason


def test_same_timeline_aborted_is_not_committed() -> None:
    """Same timeline, no restart: 'aborted' gives NOT_COMMITTED."""
    outcome, reason = resolve(record(), seen(status="aborted"))
    assert outcome is Outcome.NOT_COMMITTED
    assert "aborted" in reason


def test_same_timeline_in_progress_is_pending() -> None:
    """Same timeline, no restart: 'in progress' gives PENDING (ask again later)."""
    outcome, reason = resolve(record(), seen(status="in progress"))
    assert outcome is Outcome.PENDING
    assert "in progress" in reason


def test_same_timeline_too_old_is_unknown() -> None:
    """Same timeline, no restart: a None status (xid too old) gives UNKNOWN."""
    outcome, reason = resolve(record(), seen(status=None))
    assert outcome is Outcome.UNKNOWN
    assert "too old" in reason


def test_same_timeline_future_is_unknown() -> None:
    """Same timeline, no restart: a not-yet-assigned xid is inconsistent and gives UNKNOWN."""
    outcome, reason = resolve(record(), seen(status="future"))
    assert outcome is Outcome.UNKNOWN
    assert "not assigned" in reason


def test_started_at_the_same_instant_is_not_up_since_before() -> None:
    """A server started exactly when the transaction began counts as restarted since: its
    'committed' may be a reused xid."""
    outcome, _ = resolve(
        record(), seen(started_at=BEGAN, replay_end_lsn=PAST_START, status="committed")
    )
    assert outcome is Outcome.UNKNOWN


def test_up_since_before_ignores_an_old_replay_end() -> None:
    """Up since before the transaction, an old replay end (its own startup) does not matter."""
    outcome, _ = resolve(record(), seen(replay_end_lsn=BEFORE_START, status="committed"))
    assert outcome is Outcome.COMMITTED


# --- rule 2: same timeline after a restart -----------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
def test_crash_restart_that_replayed_short_of_the_start_is_not_committed(
    status: str | None,
) -> None:
    """Crash recovery ending before the start LSN: nothing of the transaction survived,
    whatever the (possibly reused) xid says."""
    outcome, reason = resolve(record(), crash_restarted(BEFORE_START, status))
    assert outcome is Outcome.NOT_COMMITTED
    assert "crash restart" in reason
    assert BEFORE_START in reason


def test_crash_restart_that_replayed_past_the_start_trusts_aborted() -> None:
    """Crash recovery ending past the start LSN makes the status authoritative: aborted."""
    outcome, reason = resolve(record(), crash_restarted(PAST_START, "aborted"))
    assert outcome is Outcome.NOT_COMMITTED
    assert "aborted" in reason
    assert "same timeline" in reason


@pytest.mark.parametrize("replay_end", [START, PAST_START], ids=["at-start", "past-start"])
def test_crash_restart_committed_may_be_a_reused_xid(replay_end: str) -> None:
    """After a crash restart, 'committed' is not proof without a marker: the xid may have
    been reused."""
    outcome, reason = resolve(record(), crash_restarted(replay_end, "committed"))
    assert outcome is Outcome.UNKNOWN
    assert "pg_logical_emit_message" in reason  # says what would settle it


@pytest.mark.parametrize("replay_end", [START, PAST_START], ids=["at-marker", "past-marker"])
def test_crash_restart_that_replayed_the_marker_trusts_committed(replay_end: str) -> None:
    """Crash recovery that replayed the marker carrying the xid: the number was never
    given again, so 'committed' is ours."""
    outcome, reason = resolve(record(marked=True), crash_restarted(replay_end, "committed"))
    assert outcome is Outcome.COMMITTED
    assert "marker" in reason


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("committed", Outcome.COMMITTED),
        ("aborted", Outcome.NOT_COMMITTED),
        ("in progress", Outcome.PENDING),
        ("future", Outcome.UNKNOWN),
        (None, Outcome.UNKNOWN),
    ],
)
def test_clean_restart_is_authoritative(status: str | None, expected: Outcome) -> None:
    """A clean restart since (no replay end) leaves pg_xact_status authoritative."""
    observed = seen(started_at=RESTARTED_SINCE, replay_end_lsn=None, status=status)
    outcome, _ = resolve(record(), observed)
    assert outcome is expected


# --- rule 3: the next timeline, the new primary up since before the transaction ------------


@pytest.mark.parametrize("status", STATUSES)
def test_fork_before_the_start_is_not_committed_whatever_the_status(status: str | None) -> None:
    """The new timeline forked before the transaction began: NOT_COMMITTED, even 'committed'."""
    outcome, reason = resolve(record(), failed_over(BEFORE_START, status))
    assert outcome is Outcome.NOT_COMMITTED
    assert BEFORE_START in reason
    assert START in reason


@pytest.mark.parametrize("status", NOT_COMMITTED_ON_NEW_TIMELINE)
@pytest.mark.parametrize("fork", [START, PAST_START], ids=["at-start", "past-start"])
def test_fork_after_the_start_and_xid_not_committed_is_not_committed(
    fork: str, status: str
) -> None:
    """Forked at or after the start, an aborted/in-progress/future xid gives NOT_COMMITTED."""
    outcome, reason = resolve(record(), failed_over(fork, status))
    assert outcome is Outcome.NOT_COMMITTED
    assert status in reason
    assert XID in reason


@pytest.mark.parametrize("fork", [START, PAST_START], ids=["at-start", "past-start"])
def test_fork_after_the_start_and_xid_committed_is_unknown(fork: str) -> None:
    """Forked at or after the start of an unmarked record, 'committed' may be a reused
    xid: UNKNOWN."""
    outcome, reason = resolve(record(), failed_over(fork, "committed"))
    assert outcome is Outcome.UNKNOWN
    assert "committed" in reason
    assert XID in reason


@pytest.mark.parametrize("fork", [START, PAST_START], ids=["at-marker", "past-marker"])
def test_fork_after_the_marker_and_xid_committed_is_committed(fork: str) -> None:
    """Forked at or after the end of the marker carrying the xid: the new primary replayed
    it, so its next xid is past ours and its 'committed' is our transaction's."""
    outcome, reason = resolve(record(marked=True), failed_over(fork, "committed"))
    assert outcome is Outcome.COMMITTED
    assert XID in reason
    assert fork in reason


@pytest.mark.parametrize("status", STATUSES)
def test_fork_before_the_marker_is_not_committed_whatever_the_status(status: str | None) -> None:
    """Forked before the marker ends: the COMMIT (after the marker) is not in the new
    history, even if the number reads 'committed' there (somebody else's)."""
    outcome, _ = resolve(record(marked=True), failed_over(BEFORE_START, status))
    assert outcome is Outcome.NOT_COMMITTED


def test_fork_after_the_start_and_xid_too_old_is_unknown() -> None:
    """Forked after the start, a None status (too old) gives UNKNOWN."""
    outcome, reason = resolve(record(), failed_over(PAST_START, None))
    assert outcome is Outcome.UNKNOWN
    assert "too old" in reason


def test_fork_before_the_start_compares_lsns_numerically() -> None:
    """'F/FFFFFFFF' is before '10/0' although it sorts after it as text."""
    outcome, _ = resolve(record(start_lsn="10/0"), failed_over("F/FFFFFFFF", "committed"))
    assert outcome is Outcome.NOT_COMMITTED


def test_fork_at_the_start_compares_lsns_numerically() -> None:
    """'10/0' is not before '10/0', however the hex digits are written."""
    outcome, _ = resolve(record(start_lsn="10/0"), failed_over("10/00000000", "committed"))
    assert outcome is Outcome.UNKNOWN


def test_next_timeline_without_a_replay_end_does_not_claim_a_fork_at_none() -> None:
    """Without a replay end the reason does not invent a fork point called 'None'."""
    _, reason = resolve(record(), failed_over(None, "committed"))
    assert "None" not in reason


# --- rule 4: anything else ----------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("fork", [BEFORE_START, PAST_START, None])
def test_next_timeline_restarted_since_is_unknown(fork: str | None, status: str | None) -> None:
    """Next timeline but the new primary (re)started after the transaction began: UNKNOWN."""
    outcome, reason = resolve(record(), failed_over(fork, status, started_at=RESTARTED_SINCE))
    assert outcome is Outcome.UNKNOWN
    assert "restarted since" in reason
    assert f"timeline {TIMELINE + 1}" in reason


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("fork", [BEFORE_START, PAST_START, None])
def test_two_timelines_later_is_unknown(fork: str | None, status: str | None) -> None:
    """Two failovers later nothing is known, even with the fork before the start: UNKNOWN."""
    observed = seen(timeline=TIMELINE + 2, replay_end_lsn=fork, status=status)
    outcome, reason = resolve(record(), observed)
    assert outcome is Outcome.UNKNOWN
    assert "several failovers" in reason
    assert f"timeline {TIMELINE + 2}" in reason


@pytest.mark.parametrize("status", STATUSES)
def test_an_earlier_timeline_is_unknown(status: str | None) -> None:
    """A primary on an older timeline than the transaction's gives UNKNOWN."""
    outcome, _ = resolve(record(), seen(timeline=TIMELINE - 1, status=status))
    assert outcome is Outcome.UNKNOWN


# --- reasons ------------------------------------------------------------------------------

_LSN = re.compile(r"[0-9A-Fa-f]+/[0-9A-Fa-f]+")
_NUMBER = re.compile(r"\d+")

_CASES = [
    seen(system_id=OTHER_SYSTEM),
    seen(in_recovery=True, timeline=None),
    *(seen(status=s) for s in STATUSES),
    *(crash_restarted(BEFORE_START, s) for s in STATUSES),
    *(crash_restarted(PAST_START, s) for s in STATUSES),
    *(failed_over(BEFORE_START, s) for s in STATUSES),
    *(failed_over(PAST_START, s) for s in STATUSES),
    *(failed_over(PAST_START, s, started_at=RESTARTED_SINCE) for s in STATUSES),
    seen(timeline=TIMELINE + 2),
]


@pytest.mark.parametrize("observed", _CASES)
def test_a_reason_only_quotes_what_was_given(observed: Observation) -> None:
    """Every LSN and number in a reason is one of the given values, verbatim."""
    given = record()
    _, reason = resolve(given, observed)
    lsns = {given.start_lsn, observed.replay_end_lsn}
    numbers = {given.xid, given.system_id, observed.system_id, str(given.timeline)}
    numbers.add(str(observed.timeline))
    assert reason
    assert "\n" not in reason
    for lsn in _LSN.findall(reason):
        assert lsn in lsns
    for number in _NUMBER.findall(_LSN.sub("", reason)):
        assert number in numbers
    assert given.endpoint not in reason


# --- helpers: lsn_value, timeline_of, parse_record ----------------------------------------------


def test_lsn_value_orders_by_high_then_low_word() -> None:
    """'0/FFFFFFFF' < '1/0' < '1/1' < 'A/0', numerically rather than as text."""
    values = [lsn_value(x) for x in ["0/0", "0/FFFFFFFF", "1/0", "1/1", "9/FFFFFFFF", "A/0"]]
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_lsn_value_is_high_word_shifted_plus_low_word() -> None:
    """'16/B374D848' is 0x16 << 32 | 0xB374D848, in either letter case."""
    assert lsn_value("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert lsn_value("16/b374d848") == lsn_value("16/B374D848")
    assert lsn_value("0/0") == 0
    assert lsn_value("FFFFFFFF/FFFFFFFF") == 2**64 - 1


def test_timeline_of_reads_the_first_eight_hex_digits() -> None:
    """The timeline of a WAL file name is its first 8 hex digits."""
    assert timeline_of("0000000A0000000000000003") == 10
    assert timeline_of("000000010000001600000083") == 1
    assert timeline_of("000001FF00000000000000FF") == 511


STARTED = "1714000000.5"  # the postmaster's start, epoch
IDENTITY = f"{STARTED} {SYSTEM} true"  # ... and the role may write the marker
WALFILE = "000000030000001600000083"


def row(*, identity: str | None = IDENTITY, epoch: str = "1714564800.123456") -> list[str | None]:
    """A record row as the server sends it: five text columns."""
    return [XID, WALFILE, "16/B374D848", epoch, identity]


def test_parse_record_reads_every_field_and_the_identity() -> None:
    """A record row gives the xid, system id, timeline, position, exact server time, and
    the postmaster's identity (start time, system id, marker privilege); the record is
    marked when the identity it was written with allowed the marker."""
    got, identity = parse_record(row(), endpoint="db1.example:5432")
    expected = CommitRecord(XID, SYSTEM, 3, "16/B374D848", BEGAN, "db1.example:5432", True)
    assert got == expected
    assert got.server_time.tzinfo is not None
    started = datetime(2024, 4, 24, 23, 6, 40, 500000, tzinfo=timezone.utc)
    assert identity == ServerIdentity(started, SYSTEM, marker=True)
    unmarked, identity = parse_record(row(identity=f"{STARTED} {SYSTEM} false"))
    assert not unmarked.marked
    assert not identity.marker


def test_parse_record_marks_by_the_identity_the_statement_was_written_with() -> None:
    """Behind a pooler the server may change between records: the position column was
    chosen by the known identity, so ``marked`` follows it, not the new server's."""
    unmarked_known = ServerIdentity(BEGAN, OTHER_SYSTEM, marker=False)
    got, identity = parse_record(row(), unmarked_known)
    assert not got.marked
    assert identity.marker  # the next record on this connection writes the marker
    marked_known = ServerIdentity(BEGAN, SYSTEM, marker=True)
    assert parse_record(row(identity=None), marked_known)[0].marked


def test_parse_record_keeps_microseconds_and_short_fractions_exact() -> None:
    """Epoch fractions of any length up to 6 digits are read exactly, without a float."""
    assert parse_record(row(epoch="1714564800.5"))[0].server_time == BEGAN.replace(
        microsecond=500000
    )
    assert parse_record(row(epoch="1714564800"))[0].server_time == BEGAN.replace(microsecond=0)
    got = parse_record(row(epoch="1714564800.000001"))[0].server_time
    assert got == BEGAN.replace(microsecond=1)


def test_parse_record_reuses_the_known_identity_when_the_column_is_null() -> None:
    """A NULL identity means: the postmaster ``known`` describes (same start time)."""
    known = ServerIdentity(BEGAN, SYSTEM)
    got, identity = parse_record(row(identity=None), known)
    assert got.system_id == SYSTEM
    assert identity is known


def test_parse_record_replaces_the_known_identity_when_the_server_changed() -> None:
    """A non-NULL identity (another postmaster) wins over the known one."""
    known = ServerIdentity(BEGAN, OTHER_SYSTEM)
    got, identity = parse_record(row(), known)
    assert got.system_id == SYSTEM
    assert identity.system_id == SYSTEM


@pytest.mark.parametrize(
    ("values", "known"),
    [
        (row(identity=None), None),
        (row()[:4], None),
        ([*row(), "extra"], None),
        ([], None),
        (["x1", *row()[1:]], None),
        ([None, *row()[1:]], None),
        ([XID, "zz000003", *row()[2:]], None),
        ([XID, WALFILE, "16-B374D848", *row()[3:]], None),
        (row(epoch="1.x"), None),
        (row(identity="1.5"), None),
        (row(identity=f"{STARTED} sys"), None),
        (row(identity=f"x {SYSTEM}"), None),
        (row(identity=f"x {SYSTEM} true"), None),
        (row(identity=f"{STARTED} {SYSTEM}"), None),
        (row(identity=f"{STARTED} {SYSTEM} yes"), None),
    ],
)
def test_parse_record_rejects_malformed_rows(
    values: list[str | None], known: ServerIdentity | None
) -> None:
    """A malformed row, or a NULL identity without a known server, is a ValueError."""
    with pytest.raises(ValueError, match="not a commit record"):
        parse_record(values, known)


def test_record_sql_reads_the_control_file_only_for_an_unknown_server() -> None:
    """Without a known server the identity is always read; with one, only if the
    postmaster's start time differs (an ISO 8601 literal, parsed alike in any DateStyle)."""
    plain = record_sql()
    assert "pg_control_system" in plain
    assert "pg_postmaster_start_time() =" not in plain
    cached = record_sql(ServerIdentity(BEGAN, SYSTEM))
    expected = (
        "CASE WHEN pg_catalog.pg_postmaster_start_time() = '2024-05-01T12:00:00.123456+00:00'"
    )
    assert expected in cached
    assert cached.index("pg_current_xact_id") < cached.index("pg_current_wal_insert_lsn")
    assert BEGIN_SQL == "BEGIN; " + RECORD_SQL
    assert plain == RECORD_SQL


def test_record_sql_writes_the_marker_as_the_known_identity_says() -> None:
    """An unknown server gets the marker (a role that may not write it gets a permission
    error and is recorded again unmarked); a known one gets what its identity allows;
    ``marker=`` overrides. No statement tests the privilege per transaction."""
    marker = "pg_logical_emit_message(true, 'pgfailover', '')"
    assert marker in record_sql()
    allowed = record_sql(ServerIdentity(BEGAN, SYSTEM, marker=True), same_server=True)
    assert marker in allowed
    denied = record_sql(ServerIdentity(BEGAN, SYSTEM, marker=False), same_server=True)
    assert marker not in denied
    assert marker not in UNMARKED_RECORD_SQL
    assert "pg_control_system" in UNMARKED_RECORD_SQL  # reads the identity anew
    for sql in (allowed, denied):
        assert "has_function_privilege" not in sql
    for sql in (RECORD_SQL, allowed, denied, UNMARKED_RECORD_SQL):
        # the xid first: a standby fails with its own 25006
        assert sql.index("pg_current_xact_id") < sql.index("pg_current_wal_insert_lsn")


def test_parse_identity_reads_an_identity_and_rejects_anything_else() -> None:
    """IDENTITY_SQL's value parses to the identity; anything else is a ValueError."""
    started = datetime(2024, 4, 24, 23, 6, 40, 500000, tzinfo=timezone.utc)
    assert parse_identity(IDENTITY) == ServerIdentity(started, SYSTEM, marker=True)
    for bad in ("", STARTED, f"{STARTED} {SYSTEM}", f"{STARTED} x true", "a b c"):
        with pytest.raises(ValueError, match="not a server identity"):
            parse_identity(bad)


def test_observation_from_row_on_a_primary() -> None:
    """An OBSERVE_SQL row from a promoted primary becomes an Observation."""
    started = datetime(2024, 4, 28, 9, 30, 0, tzinfo=timezone.utc)
    row: tuple[object, ...] = (
        SYSTEM,
        False,
        "000000040000001600000090",
        "16/B4000010",
        started,
        "aborted",
    )
    got = Observation.from_row(row)
    assert got == Observation(SYSTEM, False, 4, "16/B4000010", started, "aborted")
    assert resolve(record(), got)[0] is Outcome.NOT_COMMITTED


def test_observation_from_row_on_a_standby_and_clean_start() -> None:
    """NULL WAL file, replay end and status become None; the standby is recognised."""
    started = datetime(2024, 4, 28, 9, 30, 0, tzinfo=timezone.utc)
    got = Observation.from_row((SYSTEM, True, None, None, started, None))
    assert got == Observation(SYSTEM, True, None, None, started, None)
    assert resolve(record(), got)[0] is Outcome.UNKNOWN


def test_observation_from_row_keeps_future() -> None:
    """The 'future' marker from OBSERVE_SQL's CASE is kept as the status."""
    started = datetime(2024, 4, 28, 9, 30, 0, tzinfo=timezone.utc)
    got = Observation.from_row((SYSTEM, False, "000000030000001600000090", None, started, "future"))
    assert got.status == "future"
    assert got.timeline == 3
    assert got.replay_end_lsn is None


def test_record_sql_for_the_same_server_has_no_identity_to_compare() -> None:
    """same_server=True (a direct connection) sends a plain NULL identity; without a
    known identity it still reads it (the first record on a connection)."""
    same = record_sql(ServerIdentity(BEGAN, SYSTEM), same_server=True)
    assert same.endswith(", NULL")
    assert "pg_postmaster_start_time" not in same
    assert record_sql(None, same_server=True) == RECORD_SQL
