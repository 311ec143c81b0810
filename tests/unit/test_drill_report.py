"""pgfailover.drill.report: per-stack numbers, validation, JSON round trip and the text table."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgfailover.drill.report import DrillReport, Mark, Op, StackReport, build_report, summarize

WINDOW = (0.0, 10.0)
MARKS = (
    Mark("primary stopped", 3.0),
    Mark("standby promoted", 4.5),
    Mark("PgBouncer repointed", 5.0),
)


def op(
    key: int,
    end: float,
    *,
    ok: bool = True,
    error: str | None = None,
    unknown: bool = False,
    stack: str = "s",
    start: float | None = None,
) -> Op:
    """An op of ``stack`` that took 10 ms (or from ``start``) and ended at ``end``."""
    begin = max(0.0, end - 0.01) if start is None else start
    return Op(stack, begin, end, key, ok, error, unknown)


def summary(
    ops: Sequence[Op],
    found: Mapping[int, int],
    *,
    reachable_at: float | None = 5.0,
    window: tuple[float, float] = WINDOW,
) -> StackReport:
    """summarize() for the stack "s" (unprotected)."""
    return summarize("s", False, ops, found, reachable_at=reachable_at, window=window)


def sample_report() -> DrillReport:
    """Three stacks: one that wrote through, one that lost and failed, one never recovered."""
    ops = [
        # "pgfailover pool": ok everywhere, one slow write across the outage
        *(op(k, 0.5 * k, stack="pgfailover pool") for k in range(1, 6)),
        op(6, 5.1234567, stack="pgfailover pool", start=3.1),
        *(op(k, 0.5 * (k - 1), stack="pgfailover pool") for k in range(7, 15)),
        # "psycopg_pool (naive)": failures during the outage, a lost ack, a phantom, a dup
        *(op(100 + k, 0.5 * k, stack="psycopg_pool (naive)") for k in range(1, 6)),
        op(106, 3.2, ok=False, error="OperationalError", stack="psycopg_pool (naive)"),
        op(107, 3.4, ok=False, error="25006", stack="psycopg_pool (naive)"),
        op(108, 4.6, ok=False, error="25006", stack="psycopg_pool (naive)"),
        op(109, 4.9, ok=False, error="57P01", unknown=True, stack="psycopg_pool (naive)"),
        op(110, 5.0125, stack="psycopg_pool (naive)"),
        op(111, 7.5, stack="psycopg_pool (naive)"),
        # "SQLAlchemy pre_ping (naive)": never wrote again after the outage
        op(200, 1.0, stack="SQLAlchemy pre_ping (naive)"),
        op(201, 6.0, ok=False, error="PoolTimeout", stack="SQLAlchemy pre_ping (naive)"),
    ]
    found = {k: 1 for k in range(1, 15)}
    found.update({101: 1, 102: 1, 103: 2, 104: 1, 105: 1, 107: 1, 109: 1, 110: 1, 200: 1})
    return build_report(
        {"mode": "pgbouncer", "stop": "immediate", "workers": 2, "versions": ("17", "1.23")},
        MARKS,
        5.0,
        WINDOW,
        [
            ("psycopg_pool (naive)", False),
            ("pgfailover pool", True),
            ("SQLAlchemy pre_ping (naive)", False),
        ],
        ops,
        found,
    )


# --- summarize ------------------------------------------------------------------------------


def test_summarize_counts_lost_duplicated_phantom_and_unknown() -> None:
    """Acked-but-absent is lost, >1 row is duplicated, failed-but-present is phantom; unknown
    outcomes are neither lost nor phantom."""
    ops = [
        op(1, 1.0),  # ok, found once
        op(2, 2.0),  # ok, absent: lost
        op(3, 3.0),  # ok, twice: duplicated
        op(4, 4.0, ok=False, error="25006"),  # failed, found: phantom
        op(5, 5.0, ok=False, error="25006"),  # failed, absent: fine
        op(6, 6.0, ok=False, error="X", unknown=True),  # unknown, found: fine
        op(7, 7.0, ok=False, error="X", unknown=True),  # unknown, absent: fine
        op(8, 8.0, ok=False, error="X", unknown=True),  # unknown, twice: duplicated
    ]
    report = summary(ops, {1: 1, 2: 0, 3: 2, 4: 1, 6: 1, 8: 2})
    assert (report.attempts, report.ok, report.failed, report.unknown) == (8, 3, 5, 3)
    assert (report.lost, report.duplicated, report.phantom) == (1, 2, 1)
    assert report.lost_keys == (2,)
    assert not report.wrote_through


def test_summarize_absent_keys_are_zero_rows_and_foreign_keys_are_ignored() -> None:
    """A key missing from ``found`` has 0 rows; keys of other stacks do not count here."""
    report = summary([op(1, 1.0), op(2, 2.0, ok=False, error="25006")], {99: 3, 98: 1})
    assert (report.lost, report.duplicated, report.phantom) == (1, 0, 0)


def test_lost_keys_keeps_the_ten_smallest_sorted() -> None:
    """lost_keys holds up to 10 examples, the smallest lost keys, in order; lost counts all."""
    ops = [op(k, 0.1 + k / 100) for k in range(30, 0, -1)]
    report = summary(ops, {})
    assert report.lost == 30
    assert report.lost_keys == tuple(range(1, 11))


def test_wrote_through_when_every_ack_is_there_once() -> None:
    """No failure, no loss, no duplicate, no phantom: the stack wrote through."""
    report = summary([op(1, 1.0), op(2, 2.0)], {1: 1, 2: 1})
    assert report.wrote_through
    assert report.errors == {}


@pytest.mark.parametrize(
    ("counts", "field"),
    [({1: 0}, "lost"), ({1: 2}, "duplicated"), ({1: 1, 2: 1}, "phantom"), ({1: 1}, "failed")],
)
def test_any_defect_means_not_wrote_through(counts: dict[int, int], field: str) -> None:
    """A single lost, duplicated, phantom or failed write is enough to fail the stack."""
    ops = [op(1, 1.0)]
    if field in ("phantom", "failed"):
        ops.append(op(2, 2.0, ok=False, error="25006"))
    report = summary(ops, counts)
    assert getattr(report, field) == 1
    assert not report.wrote_through


def test_retried_key_counts_once_per_key() -> None:
    """Several ops for one key (attempts of one write): acked if any is ok, never phantom."""
    ops = [op(1, 1.0, ok=False, error="25006"), op(1, 2.0), op(2, 3.0, ok=False, error="25006")]
    report = summary(ops, {1: 1})
    assert (report.attempts, report.ok, report.failed) == (3, 1, 2)
    assert (report.lost, report.duplicated, report.phantom) == (0, 0, 0)


def test_errors_by_count_desc_then_name() -> None:
    """errors: failed ops by code/class, most frequent first, ties by name; None is
    "unspecified"; unknown outcomes are counted under their error too."""
    ops = [
        op(1, 1.0, ok=False, error="OperationalError"),
        op(2, 1.0, ok=False, error="25006"),
        op(3, 1.0, ok=False, error="57P01", unknown=True),
        op(4, 1.0, ok=False, error="25006"),
        op(5, 1.0, ok=False),
        op(6, 1.0, ok=False, error="0A000"),
        op(7, 1.0),
    ]
    errors = summary(ops, {}).errors
    assert list(errors.items()) == [
        ("25006", 2),
        ("0A000", 1),
        ("57P01", 1),
        ("OperationalError", 1),
        ("unspecified", 1),
    ]


def test_first_ok_after_is_from_reachable_to_the_earliest_ok_end() -> None:
    """The earliest ok end at or after reachable_at, minus reachable_at; failed ops and ok
    ops that ended before do not count; ops are not assumed sorted."""
    ops = [
        op(1, 4.9),  # before reachable
        op(2, 5.2, ok=False, error="25006"),  # failed
        op(3, 6.0),
        op(4, 5.5, start=4.0),  # started before, ended after: counts
    ]
    assert summary(ops, {}, reachable_at=5.0).first_ok_after == pytest.approx(0.5)


def test_first_ok_after_counts_an_end_exactly_at_reachable() -> None:
    """An ok op ending exactly at reachable_at gives 0 seconds."""
    assert summary([op(1, 5.0)], {}, reachable_at=5.0).first_ok_after == 0.0


def test_first_ok_after_is_none_without_ok_after_or_without_reachable() -> None:
    """None when no ok op ended after reachable_at, or when the primary never came back."""
    ops = [op(1, 1.0), op(2, 6.0, ok=False, error="25006")]
    assert summary(ops, {}, reachable_at=5.0).first_ok_after is None
    assert summary([op(1, 6.0)], {}, reachable_at=None).first_ok_after is None


def test_longest_gap_takes_edges_and_inner_gaps() -> None:
    """max(first ok end - start, consecutive differences, end - last ok end)."""
    assert summary([op(1, 2.0), op(2, 3.0), op(3, 9.0)], {}).longest_gap == pytest.approx(6.0)
    assert summary([op(1, 4.0), op(2, 5.0), op(3, 6.0)], {}).longest_gap == pytest.approx(4.0)
    assert summary([op(1, 7.0), op(2, 1.0)], {}).longest_gap == pytest.approx(6.0)


def test_longest_gap_without_ok_is_the_window() -> None:
    """No ok op at all (failures do not close gaps): the whole window length."""
    ops = [op(1, 5.0, ok=False, error="25006")]
    assert summary(ops, {}, window=(2.0, 9.5)).longest_gap == 7.5
    assert summary([], {}, window=(2.0, 9.5)).longest_gap == 7.5


def test_longest_gap_ignores_ok_ends_outside_the_window_and_counts_the_bounds() -> None:
    """Ok ends before the start or after the end are ignored; ends on the bounds count."""
    outside = [op(1, 1.0), op(2, 9.99)]
    assert summary(outside, {}, window=(2.0, 8.0)).longest_gap == 6.0
    on_bounds = [op(1, 2.0, start=1.0), op(2, 5.0), op(3, 8.0)]
    assert summary(on_bounds, {}, window=(2.0, 8.0)).longest_gap == 3.0


def test_longest_gap_of_an_empty_window_is_zero() -> None:
    """A zero-length window has no gap."""
    assert summary([], {}, window=(3.0, 3.0)).longest_gap == 0.0


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": -1.0}, "must not be negative"),
        ({"end": -0.5, "start": -1.0}, "must not be negative"),
        ({"start": 2.0, "end": 1.0}, "ends .* before it starts"),
        ({"start": math.nan}, "finite"),
        ({"end": math.inf}, "finite"),
        ({"ok": True, "unknown": True}, "unknown outcome"),
        ({"ok": True, "error": "25006"}, "cannot have an error"),
    ],
)
def test_op_rejects_impossible_values(kwargs: dict[str, object], message: str) -> None:
    """Negative, non-finite or reversed times and ok-with-error/unknown raise ValueError."""
    values: dict[str, object] = {"stack": "s", "start": 1.0, "end": 2.0, "key": 1, "ok": False}
    values.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Op(**values)  # type: ignore[arg-type]


def test_mark_rejects_negative_time() -> None:
    """A mark before the drill started is an error."""
    with pytest.raises(ValueError, match="must not be negative"):
        Mark("primary stopped", -0.1)


def test_summarize_rejects_reversed_window_and_negative_reachable() -> None:
    """A window ending before it starts, or a negative reachable_at, raise ValueError."""
    with pytest.raises(ValueError, match="window is reversed"):
        summary([], {}, window=(5.0, 1.0))
    with pytest.raises(ValueError, match="window start must not be negative"):
        summary([], {}, window=(-1.0, 1.0))
    with pytest.raises(ValueError, match="reachable_at must not be negative"):
        summary([], {}, reachable_at=-2.0)


def test_summarize_rejects_an_op_of_another_stack() -> None:
    """summarize() takes one stack's ops only."""
    with pytest.raises(ValueError, match="belongs to stack 'other', not to 's'"):
        summary([op(1, 1.0), op(2, 1.0, stack="other")], {})


def test_summarize_rejects_negative_row_counts() -> None:
    """found values are row counts: negative is an error."""
    with pytest.raises(ValueError, match="negative"):
        summary([op(1, 1.0)], {1: -1})


def test_build_report_rejects_a_key_used_by_two_stacks() -> None:
    """Keys must be unique across stacks."""
    ops = [op(1, 1.0, stack="a"), op(1, 2.0, stack="b")]
    with pytest.raises(ValueError, match="key 1 is used by two stacks"):
        build_report({}, (), None, WINDOW, [("a", False), ("b", True)], ops, {})


def test_build_report_rejects_unlisted_and_repeated_stacks() -> None:
    """Every op's stack must be listed, and listed once."""
    with pytest.raises(ValueError, match="'c', which is not listed"):
        build_report({}, (), None, WINDOW, [("a", False)], [op(1, 1.0, stack="c")], {})
    with pytest.raises(ValueError, match="'a' is listed twice"):
        build_report({}, (), None, WINDOW, [("a", False), ("a", True)], [], {})


def test_build_report_rejects_reversed_window() -> None:
    """The workload window must not end before it starts."""
    with pytest.raises(ValueError, match="window is reversed"):
        build_report({}, (), None, (3.0, 2.0), [("a", False)], [], {})


def test_report_rejects_config_that_is_not_json() -> None:
    """config must survive json.dumps (no sets, no NaN)."""
    with pytest.raises(ValueError, match="config must be JSON-able"):
        build_report({"x": {1, 2}}, (), None, WINDOW, [], [], {})
    with pytest.raises(ValueError, match="config must be JSON-able"):
        build_report({"x": math.nan}, (), None, WINDOW, [], [], {})


# --- JSON -----------------------------------------------------------------------------------


def test_json_round_trip_is_exact() -> None:
    """from_json(to_json()) gives an equal report, also through json.dumps/loads."""
    report = sample_report()
    assert DrillReport.from_json(report.to_json()) == report
    text = json.dumps(report.to_json(), allow_nan=False)
    assert DrillReport.from_json(json.loads(text)) == report


def test_json_layout() -> None:
    """The JSON has the format tag, every stack field with derived ones, and compact ops."""
    report = sample_report()
    data = report.to_json()
    assert data["format"] == "pgfailover-drill/1"
    assert data["config"] == {
        "mode": "pgbouncer",
        "stop": "immediate",
        "workers": 2,
        "versions": ["17", "1.23"],
    }
    assert data["marks"] == [{"name": m.name, "at": m.at} for m in MARKS]
    assert (data["reachable_at"], data["window"]) == (5.0, [0.0, 10.0])
    stacks = data["stacks"]
    assert isinstance(stacks, list)
    naive = stacks[0]
    assert naive["name"] == "psycopg_pool (naive)"
    assert naive["wrote_through"] is False
    assert naive["errors"] == {"25006": 2, "57P01": 1, "OperationalError": 1}
    assert naive["lost_keys"] == [111]
    assert naive["first_ok_after_ms"] == round(naive["first_ok_after"] * 1000)
    assert stacks[1]["wrote_through"] is True
    assert stacks[2]["first_ok_after"] is None
    assert stacks[2]["first_ok_after_ms"] is None
    assert data["op_fields"] == ["stack", "start", "end", "key", "ok", "error", "unknown"]
    ops = data["ops"]
    assert isinstance(ops, list)
    assert len(ops) == len(report.ops)
    by_key = {row[3]: row for row in ops}
    unknown = next(o for o in report.ops if o.key == 109)
    assert by_key[109] == [0, unknown.start, 4.9, 109, False, "57P01", True]
    assert by_key[1][0] == 1  # index of "pgfailover pool" in "stacks"


def test_report_config_is_stored_in_json_form() -> None:
    """Tuples in config become lists at construction, so round trips compare equal."""
    assert sample_report().config["versions"] == ["17", "1.23"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("stacks"), "missing 'stacks'"),
        (lambda d: d.update(format="other/9"), "'format' must be"),
        (lambda d: d.update(window=[1.0]), "report.window"),
        (lambda d: d.update(window=[5.0, 1.0]), "window is reversed"),
        (lambda d: d.update(reachable_at="soon"), "reachable_at: expected a number"),
        (lambda d: d["ops"].append([7, 0.0, 1.0, 999, True, None, False]), "out of range"),
        (lambda d: d["ops"].append([0, 0.0, 1.0, 999, True]), "expected 7 items"),
        (lambda d: d["ops"].append([0, 2.0, 1.0, 999, True, None, False]), "before it starts"),
        (lambda d: d["ops"].append([0, 0.0, 1.0, True, True, None, False]), "an integer"),
        (lambda d: d["ops"].append([0, 0.0, math.nan, 9, True, None, False]), "finite"),
        (lambda d: d["stacks"][0].update(attempts="12"), r"stacks\[0\].attempts"),
        (lambda d: d["stacks"][0].update(ok=-1), "ok must not be negative"),
        (lambda d: d["stacks"][0].update(ok=0), "must equal attempts"),
        (lambda d: d["stacks"][1].pop("lost_keys"), "missing 'lost_keys'"),
        (lambda d: d["marks"].append({"name": "x"}), "missing 'at'"),
        (lambda d: d.update(marks={"name": "x"}), "expected a JSON array"),
    ],
)
def test_from_json_rejects_malformed_input(mutate: Callable[[Any], object], message: str) -> None:
    """Malformed JSON raises ValueError saying which member is wrong."""
    data = json.loads(json.dumps(sample_report().to_json()))
    mutate(data)
    with pytest.raises(ValueError, match=message):
        DrillReport.from_json(data)


def test_from_json_rejects_non_objects() -> None:
    """A JSON array or string is not a report."""
    with pytest.raises(ValueError, match="expected a JSON object"):
        DrillReport.from_json([])  # type: ignore[arg-type]


# --- text -----------------------------------------------------------------------------------


def parse_table(text: str) -> dict[str, list[str]]:
    """Stack name -> the other cells of its row in format_text()'s table."""
    lines = text.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("stack "))
    name_width = lines[header_at].index("protected")
    rows: dict[str, list[str]] = {}
    for line in lines[header_at + 2 :]:
        if not line.strip():
            break
        cells = line[name_width:].split()
        rows[line[:name_width].rstrip()] = [*cells[:11], " ".join(cells[11:])]
    return rows


def test_text_table_numbers_match_the_json() -> None:
    """Every number in the text table is the integer the JSON gives (ms via round())."""
    report = sample_report()
    rows = parse_table(report.format_text())
    stacks = report.to_json()["stacks"]
    assert isinstance(stacks, list)
    assert list(rows) == [stack["name"] for stack in stacks]
    for stack in stacks:
        row = rows[stack["name"]]
        first = stack["first_ok_after_ms"]
        expected = [
            "yes" if stack["protected"] else "no",
            str(stack["attempts"]),
            str(stack["ok"]),
            str(stack["failed"]),
            str(stack["unknown"]),
            str(stack["failed_after"]),
            "never" if first is None else str(first),
            str(stack["longest_gap_ms"]),
            str(stack["lost"]),
            str(stack["duplicated"]),
            str(stack["phantom"]),
            stack["result"],
        ]
        assert row == expected


def test_text_ms_rounding_is_half_even_like_round() -> None:
    """62.5 ms shows as 62 and 187.5 ms as 188 (round half to even), in text and JSON."""
    ops = [op(1, 0.3125, stack="a"), op(2, 0.4375, stack="b")]
    report = build_report({}, (), 0.25, (0.0, 1.0), [("a", True), ("b", True)], ops, {1: 1, 2: 1})
    assert [s.first_ok_after for s in report.stacks] == [0.0625, 0.1875]
    rows = parse_table(report.format_text())
    assert (rows["a"][6], rows["b"][6]) == ("62", "188")
    stacks = report.to_json()["stacks"]
    assert isinstance(stacks, list)
    assert [stack["first_ok_after_ms"] for stack in stacks] == [62, 188]


def test_text_has_header_marks_reachable_and_failure_lines() -> None:
    """The header lists the config, each mark with its time, and when the primary was
    reachable; stacks with failures get a "failures by error" line, losses a key list."""
    text = sample_report().format_text()
    assert "  mode: pgbouncer" in text
    assert "t=   3.000 s  primary stopped" in text
    assert "t=   5.000 s  PgBouncer repointed" in text
    assert "primary reachable at t=5.000 s" in text
    assert (
        "psycopg_pool (naive): failures by error: 25006 x2, 57P01 x1, OperationalError x1" in text
    )
    assert "psycopg_pool (naive): lost keys (examples): 111" in text
    assert "pgfailover pool: failures" not in text


def test_text_without_reachable_says_never_and_na() -> None:
    """With no reachable time: "primary never reachable" and "n/a" in the first-ok column."""
    report = build_report({}, (), None, WINDOW, [("s", False)], [op(1, 1.0)], {1: 1})
    text = report.format_text()
    assert "primary never reachable" in text
    assert parse_table(text)["s"][6] == "n/a"


# --- properties -----------------------------------------------------------------------------


@st.composite
def stack_runs(draw: st.DrawFn) -> tuple[list[Op], dict[int, int], tuple[float, float]]:
    """Random ops of stack "s" (unique keys) around a random window, and random row counts."""
    start = draw(st.floats(min_value=0, max_value=100, allow_nan=False))
    length = draw(st.floats(min_value=0, max_value=100, allow_nan=False))
    window = (start, start + length)
    specs = draw(
        st.lists(
            st.tuples(
                st.floats(min_value=0, max_value=220, allow_nan=False),
                st.floats(min_value=0, max_value=5, allow_nan=False),
                st.sampled_from(["ok", "failed", "unknown"]),
                st.integers(min_value=0, max_value=2),
            ),
            max_size=40,
        )
    )
    ops: list[Op] = []
    found: dict[int, int] = {}
    for key, (begin, duration, kind, rows) in enumerate(specs):
        ops.append(
            Op(
                "s",
                begin,
                begin + duration,
                key,
                kind == "ok",
                None if kind == "ok" else "25006",
                kind == "unknown",
            )
        )
        if rows:
            found[key] = rows
    return ops, found, window


@settings(max_examples=60)
@given(stack_runs())
def test_longest_gap_bounds(run: tuple[list[Op], dict[int, int], tuple[float, float]]) -> None:
    """0 <= longest_gap <= window length, and longest_gap >= window length / (ok + 1)."""
    ops, found, window = run
    report = summarize("s", False, ops, found, reachable_at=None, window=window)
    length = window[1] - window[0]
    assert 0.0 <= report.longest_gap <= length
    assert report.longest_gap >= length / (report.ok + 1) - 1e-9 * (1.0 + length)


@settings(max_examples=60)
@given(stack_runs())
def test_counts_add_up(run: tuple[list[Op], dict[int, int], tuple[float, float]]) -> None:
    """ok + failed == attempts; lost + acked keys found == acked keys; unknown <= failed."""
    ops, found, window = run
    report = summarize("s", False, ops, found, reachable_at=1.0, window=window)
    assert report.ok + report.failed == report.attempts == len(ops)
    assert report.unknown <= report.failed
    acked = {o.key for o in ops if o.ok}
    found_acked = sum(1 for key in acked if found.get(key, 0) > 0)
    assert report.lost + found_acked == len(acked)
    assert sum(report.errors.values()) == report.failed


@settings(max_examples=60)
@given(stack_runs(), st.booleans(), st.none() | st.floats(min_value=0, max_value=300))
def test_json_round_trip_property(
    run: tuple[list[Op], dict[int, int], tuple[float, float]],
    protected: bool,
    reachable_at: float | None,
) -> None:
    """Any report survives to_json -> json.dumps -> loads -> from_json unchanged, and its
    text table shows the JSON's numbers."""
    ops, found, window = run
    report = build_report(
        {"seed": 1},
        [Mark("primary stopped", 1.5)],
        reachable_at,
        window,
        [("s", protected)],
        ops,
        found,
    )
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert DrillReport.from_json(data) == report
    row = parse_table(report.format_text())["s"]
    assert row[7] == str(data["stacks"][0]["longest_gap_ms"])


# --- failed_after and result ----------------------------------------------------------------


def _result(ops: list[Op], found: dict[int, int], reachable_at: float | None = 5.0) -> str:
    report = summarize("s", True, ops, found, reachable_at=reachable_at, window=WINDOW)
    return report.result


def test_failed_after_counts_failures_of_ops_started_once_the_primary_was_reachable() -> None:
    """An op that started before reachable_at and failed after it is the outage's; one
    started at or after reachable_at counts in failed_after."""
    ops = [
        op(1, 5.5, ok=False, error="25006", start=4.0),  # started during the outage
        op(2, 5.2, ok=False, error="25006", start=5.0),  # started as it became reachable
        op(3, 6.0, ok=False, error="25006", start=5.9),
        op(4, 7.0),
    ]
    report = summarize("s", False, ops, {4: 1}, reachable_at=5.0, window=WINDOW)
    assert report.failed == 3
    assert report.failed_after == 2
    assert summarize("s", False, ops, {4: 1}, reachable_at=None, window=WINDOW).failed_after == 0


def test_result_names_what_the_stack_did() -> None:
    """wrote through / recovered / still failing / STUCK / LOST WRITES, in that logic."""
    outage = op(9, 4.5, ok=False, error="25006", start=4.0)
    assert _result([op(1, 1.0), op(2, 6.0)], {1: 1, 2: 1}) == "wrote through"
    assert _result([op(1, 1.0), outage, op(2, 6.0)], {1: 1, 2: 1}) == "recovered"
    late = op(3, 7.0, ok=False, error="25006", start=6.9)
    assert _result([op(1, 1.0), outage, op(2, 6.0), late], {1: 1, 2: 1}) == "still failing"
    assert _result([op(1, 1.0), outage, late], {1: 1}) == "STUCK"
    assert _result([op(1, 1.0), outage], {1: 1}, reachable_at=None) == "STUCK"
    assert _result([op(1, 1.0), op(2, 6.0)], {1: 1}) == "LOST WRITES"  # key 2 acked, absent
    assert _result([op(1, 1.0), op(2, 6.0)], {1: 2, 2: 1}) == "LOST WRITES"  # duplicated


def test_failed_after_cannot_exceed_failed() -> None:
    """A hand-built StackReport with more failures after reachable than failures is refused."""
    good = summarize(
        "s", True, [op(1, 6.0, ok=False, error="x")], {}, reachable_at=5.0, window=WINDOW
    )
    assert good.failed_after == 1
    with pytest.raises(ValueError, match="failed_after"):
        dataclasses.replace(good, failed_after=2)
