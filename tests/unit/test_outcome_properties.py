"""Property tests for pgfailover.outcome: resolve() never claims more than it can know."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta, timezone

from hypothesis import assume, given
from hypothesis import strategies as st

from pgfailover.outcome import CommitRecord, Observation, Outcome, lsn_value, resolve

STATUSES: list[str | None] = ["committed", "aborted", "in progress", "future", None]

words = st.integers(min_value=0, max_value=2**32 - 1)
lsn_pairs = st.tuples(words, words)
system_ids = st.sampled_from(["7361840593284412345", "7361840593284499999", "1"])
timelines = st.integers(min_value=1, max_value=20)
statuses = st.sampled_from(STATUSES)
times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.just(timezone.utc),
)


def as_lsn(pair: tuple[int, int], *, lower: bool = False) -> str:
    """The 'X/Y' text PostgreSQL prints for the LSN (high, low)."""
    text = f"{pair[0]:X}/{pair[1]:X}"
    return text.lower() if lower else text


lsns = st.builds(as_lsn, lsn_pairs, lower=st.booleans())


@st.composite
def records(draw: st.DrawFn) -> CommitRecord:
    """Any well-formed record of a transaction's start."""
    return CommitRecord(
        xid=str(draw(st.integers(min_value=3, max_value=2**63 - 1))),
        system_id=draw(system_ids),
        timeline=draw(timelines),
        start_lsn=draw(lsns),
        server_time=draw(times),
        endpoint=draw(st.sampled_from(["", "db1.example:5432", "[::1]:6432"])),
        marked=draw(st.booleans()),
    )


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    """Any well-formed observation (a standby may or may not report a timeline)."""
    in_recovery = draw(st.booleans())
    return Observation(
        system_id=draw(system_ids),
        in_recovery=in_recovery,
        timeline=draw(st.none() | timelines) if in_recovery else draw(timelines),
        replay_end_lsn=draw(st.none() | lsns),
        started_at=draw(times),
        status=draw(statuses),
    )


@st.composite
def related(draw: st.DrawFn) -> tuple[CommitRecord, Observation]:
    """A record and an observation that often share system, timeline and neighbourhood."""
    record = draw(records())
    seen = draw(observations())
    changes: dict[str, object] = {}
    if draw(st.booleans()):
        changes["system_id"] = record.system_id
    if draw(st.booleans()):
        changes["in_recovery"] = False
        changes["timeline"] = record.timeline + draw(st.integers(min_value=-1, max_value=2))
    if draw(st.booleans()):
        delta = draw(st.integers(min_value=-(2**33), max_value=2**33))
        value = max(0, min(2**64 - 1, lsn_value(record.start_lsn) + delta))
        changes["replay_end_lsn"] = as_lsn((value >> 32, value & 0xFFFFFFFF))
    if draw(st.booleans()):
        offset = draw(st.timedeltas(min_value=timedelta(days=-30), max_value=timedelta(days=30)))
        changes["started_at"] = record.server_time + offset
    return record, _replace(seen, changes)


def _replace(seen: Observation, changes: dict[str, object]) -> Observation:
    fields = {name: getattr(seen, name) for name in Observation.__slots__}
    fields.update(changes)
    return Observation(**fields)


@given(pair=related())
def test_resolve_is_total(pair: tuple[CommitRecord, Observation]) -> None:
    """resolve never raises and returns an Outcome with a non-empty one-line reason."""
    outcome, reason = resolve(*pair)
    assert isinstance(outcome, Outcome)
    assert isinstance(reason, str)
    assert reason
    assert "\n" not in reason


@given(pair=related())
def test_committed_needs_same_system_timeline_and_a_committed_status(
    pair: tuple[CommitRecord, Observation],
) -> None:
    """COMMITTED only from a primary of the same system saying so, on the same timeline
    or, for a marked record, on the next one whose history holds the marker."""
    record, seen = pair
    if resolve(record, seen)[0] is Outcome.COMMITTED:
        assert seen.status == "committed"
        assert seen.system_id == record.system_id
        assert not seen.in_recovery
        if seen.timeline != record.timeline:
            assert record.marked
            assert seen.timeline == record.timeline + 1
            assert seen.replay_end_lsn is not None
            assert lsn_value(seen.replay_end_lsn) >= lsn_value(record.start_lsn)


@given(pair=related())
def test_a_cut_history_commits_only_with_the_marker_replayed(
    pair: tuple[CommitRecord, Observation],
) -> None:
    """Whenever the history may have been cut since the transaction began (a server
    started since, or another timeline), COMMITTED needs a marked record whose marker the
    kept history holds: otherwise the number may have been given again."""
    record, seen = pair
    cut = seen.started_at >= record.server_time or seen.timeline != record.timeline
    if cut and seen.replay_end_lsn is not None and resolve(record, seen)[0] is Outcome.COMMITTED:
        assert record.marked
        assert lsn_value(seen.replay_end_lsn) >= lsn_value(record.start_lsn)


@given(pair=related())
def test_same_timeline_committed_is_never_not_committed(
    pair: tuple[CommitRecord, Observation],
) -> None:
    """Same system, same timeline, 'committed' and no history cut before the transaction
    began (no crash recovery that ended before its start) never gives NOT_COMMITTED."""
    record, seen = pair
    history_cut = (
        seen.started_at >= record.server_time
        and seen.replay_end_lsn is not None
        and lsn_value(seen.replay_end_lsn) < lsn_value(record.start_lsn)
    )
    if (
        seen.system_id == record.system_id
        and seen.timeline == record.timeline
        and seen.status == "committed"
        and not history_cut
    ):
        assert resolve(record, seen)[0] is not Outcome.NOT_COMMITTED


@given(pair=related())
def test_another_system_is_always_unknown(pair: tuple[CommitRecord, Observation]) -> None:
    """A different system identifier always gives UNKNOWN."""
    record, seen = pair
    if seen.system_id != record.system_id:
        assert resolve(record, seen)[0] is Outcome.UNKNOWN


@given(pair=related())
def test_a_standby_is_always_unknown(pair: tuple[CommitRecord, Observation]) -> None:
    """A server in recovery, or without a timeline, always gives UNKNOWN."""
    record, seen = pair
    if seen.in_recovery or seen.timeline is None:
        assert resolve(record, seen)[0] is Outcome.UNKNOWN


@given(
    record=records(),
    before=st.integers(min_value=1, max_value=2**40),
    up_for=st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=365)),
    status=statuses,
)
def test_fork_before_the_start_on_the_next_timeline_is_not_committed(
    record: CommitRecord, before: int, up_for: timedelta, status: str | None
) -> None:
    """Next timeline, up since before, fork point before the start LSN: NOT_COMMITTED."""
    start = lsn_value(record.start_lsn)
    assume(start > 0)  # nothing is before 0/0
    fork = max(0, start - before)
    seen = Observation(
        system_id=record.system_id,
        in_recovery=False,
        timeline=record.timeline + 1,
        replay_end_lsn=as_lsn((fork >> 32, fork & 0xFFFFFFFF)),
        started_at=record.server_time - up_for,
        status=status,
    )
    outcome, reason = resolve(record, seen)
    assert outcome is Outcome.NOT_COMMITTED
    assert record.start_lsn in reason


@given(pair=related())
def test_another_timeline_never_commits_unmarked_or_pends(
    pair: tuple[CommitRecord, Observation],
) -> None:
    """On any other timeline than the transaction's, PENDING never comes out, and
    COMMITTED only for a marked record."""
    record, seen = pair
    if seen.timeline != record.timeline:
        outcome = resolve(record, seen)[0]
        assert outcome is not Outcome.PENDING
        if not record.marked:
            assert outcome is not Outcome.COMMITTED


@given(
    record=records(),
    past=st.integers(min_value=0, max_value=2**40),
    up_for=st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=365)),
    status=statuses,
)
def test_a_replayed_marker_makes_the_new_primarys_status_the_answer(
    record: CommitRecord, past: int, up_for: timedelta, status: str | None
) -> None:
    """Next timeline, up since before, history at or past the marker: 'committed' is
    COMMITTED, aborted / in progress / unassigned are NOT_COMMITTED (never UNKNOWN for a
    known status)."""
    marked = dataclasses.replace(record, marked=True)
    fork = min(2**64 - 1, lsn_value(record.start_lsn) + past)
    seen = Observation(
        system_id=record.system_id,
        in_recovery=False,
        timeline=record.timeline + 1,
        replay_end_lsn=as_lsn((fork >> 32, fork & 0xFFFFFFFF)),
        started_at=record.server_time - up_for,
        status=status,
    )
    outcome = resolve(marked, seen)[0]
    if status == "committed":
        assert outcome is Outcome.COMMITTED
    elif status is None:
        assert outcome is Outcome.UNKNOWN
    else:
        assert outcome is Outcome.NOT_COMMITTED


@given(pair=related())
def test_a_reason_only_quotes_given_values(pair: tuple[CommitRecord, Observation]) -> None:
    """Every LSN and number a reason mentions is one of the inputs, verbatim."""
    record, seen = pair
    _, reason = resolve(record, seen)
    lsn_pattern = re.compile(r"[0-9A-Fa-f]+/[0-9A-Fa-f]+")
    for lsn in lsn_pattern.findall(reason):
        assert lsn in {record.start_lsn, seen.replay_end_lsn}
    given_numbers = {record.xid, record.system_id, seen.system_id, str(record.timeline)}
    given_numbers.add(str(seen.timeline))
    for number in re.findall(r"\d+", lsn_pattern.sub("", reason)):
        assert number in given_numbers
    if record.endpoint:
        assert record.endpoint not in reason


@given(a=lsn_pairs, b=lsn_pairs)
def test_lsn_value_is_strictly_monotone(a: tuple[int, int], b: tuple[int, int]) -> None:
    """lsn_value orders LSNs exactly as their (high, low) pairs, and equal only if equal."""
    x, y = lsn_value(as_lsn(a)), lsn_value(as_lsn(b))
    assert (x < y) == (a < b)
    assert (x == y) == (a == b)


@given(pair=lsn_pairs, lower=st.booleans())
def test_lsn_value_is_the_64_bit_position(pair: tuple[int, int], lower: bool) -> None:
    """lsn_value('X/Y') is X << 32 | Y, whatever the letter case."""
    assert lsn_value(as_lsn(pair, lower=lower)) == (pair[0] << 32) | pair[1]
