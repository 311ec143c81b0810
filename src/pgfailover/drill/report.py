"""The pure part of ``pgfailover drill``: what happened to every write, per stack.

The drill runs the same write workload through several *stacks* (a driver/pool/retry
combination, e.g. ``"psycopg_pool (naive)"`` or ``"pgfailover pool"``) while a cluster fails
over. Each write attempt is recorded as an :class:`Op`; each failover phase the drill
performed as a :class:`Mark`. After the run, the final primary is asked how many rows exist
for every key, and :func:`build_report` turns ops + marks + those counts into a
:class:`DrillReport`: one :class:`StackReport` per stack, a text rendering
(:meth:`DrillReport.format_text`) and a JSON form (:meth:`DrillReport.to_json`, inverted by
:meth:`DrillReport.from_json`).

Conventions used throughout:

* every time is a float number of **seconds since the drill started** (never negative,
  always finite); durations are seconds too, and the text rendering and the ``*_ms`` JSON
  fields give them as integer **milliseconds** computed with :func:`_ms` (``round()``: half to
  even);
* ``None`` for a time means "did not happen" (e.g. the primary never became reachable);
* a key is *acknowledged* when at least one op with that key is ok. Keys are unique across
  stacks; within one stack a key may appear in several ops (e.g. one op per attempt of the
  same logical write), and the loss / duplicate / phantom counts are then per **key**, while
  ``attempts``, ``ok``, ``failed`` and ``unknown`` count **ops**.

Nothing here does I/O; the plot lives in :mod:`pgfailover.drill.plot`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["DrillReport", "Mark", "Op", "StackReport", "build_report", "summarize"]

_JSON_FORMAT: Final = "pgfailover-drill/1"
"""The value of the ``format`` member of :meth:`DrillReport.to_json`."""

_OP_FIELDS: Final = ("stack", "start", "end", "key", "ok", "error", "unknown")
"""The layout of each compact op list in the JSON (``stack`` is an index into ``stacks``)."""

_UNSPECIFIED_ERROR: Final = "unspecified"
"""The error bucket of a failed op recorded without an ``error``."""

_LOST_KEY_EXAMPLES: Final = 10
"""How many lost keys a :class:`StackReport` keeps as examples (the smallest ones)."""

_STACK_FIELDS: Final = (
    "name",
    "protected",
    "attempts",
    "ok",
    "failed",
    "unknown",
    "failed_after",
    "errors",
    "first_ok_after",
    "longest_gap",
    "lost",
    "duplicated",
    "phantom",
    "lost_keys",
)


def _ms(seconds: float) -> int:
    """``seconds`` as whole milliseconds, rounded half to even (``round(seconds * 1000)``).

    The one rounding used by both the text table and the ``*_ms`` JSON fields.
    """
    return round(seconds * 1000)


def _check_time(value: float, what: str) -> None:
    """Raise ValueError unless ``value`` is a finite, non-negative number of seconds."""
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ValueError(
            f"{what} must not be negative (seconds since the drill started), got {value!r}"
        )


def _check_window(window: Sequence[float]) -> tuple[float, float]:
    """Validate a ``(start, end)`` window and return it as a tuple."""
    if len(window) != 2:
        raise ValueError(f"window must be a (start, end) pair, got {window!r}")
    start, end = window
    _check_time(start, "window start")
    _check_time(end, "window end")
    if end < start:
        raise ValueError(f"window is reversed: end {end!r} is before start {start!r}")
    return (start, end)


@dataclass(frozen=True, slots=True)
class Op:
    """One write attempt as the application saw it (times: seconds since the drill started).

    ``start`` is when the application began the write, ``end`` when it got its answer
    (acknowledgement or exception); ``end >= start >= 0``. ``key`` is the unique integer the
    write inserts. ``ok`` means the write was acknowledged to the application. When not ok,
    ``error`` is the SQLSTATE (e.g. ``"25006"``) or, without one, the exception class name
    (e.g. ``"OperationalError"``, ``"PoolTimeout"``); ``None`` is counted as
    ``"unspecified"``. ``unknown`` marks a failed write whose outcome is unknown
    (:class:`pgfailover.CommitOutcomeUnknown`): its row may or may not exist.

    Raises ValueError for negative, non-finite or reversed times, for an ok op that has an
    ``error`` or is ``unknown``.
    """

    stack: str
    start: float
    end: float
    key: int
    ok: bool
    error: str | None = None
    unknown: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end < math.inf:  # the fast path: False for NaN too
            self._explain_times()
        if self.ok and self.unknown:
            raise ValueError(
                f"op {self.key}: an ok (acknowledged) op cannot have an unknown outcome"
            )
        if self.ok and self.error is not None:
            raise ValueError(f"op {self.key}: an ok op cannot have an error ({self.error!r})")

    def _explain_times(self) -> None:
        """Raise the ValueError saying what is wrong with ``start`` / ``end``."""
        _check_time(self.start, f"op {self.key} start")
        _check_time(self.end, f"op {self.key} end")
        if self.end < self.start:
            raise ValueError(
                f"op {self.key} of stack {self.stack!r} ends ({self.end!r}) before it starts "
                f"({self.start!r})"
            )


@dataclass(frozen=True, slots=True)
class Mark:
    """A failover phase the drill performed, ``at`` seconds since the drill started.

    e.g. ``"primary stopped"``, ``"standby promoted"``, ``"PgBouncer repointed"``, ``"old
    primary rejoined"``. Raises ValueError for a negative or non-finite ``at``.
    """

    name: str
    at: float

    def __post_init__(self) -> None:
        _check_time(self.at, f"mark {self.name!r}")


@dataclass(frozen=True, slots=True)
class StackReport:
    """What one stack's writes did, as computed by :func:`summarize`.

    ``attempts``, ``ok``, ``failed`` (not ok, unknown included) and ``unknown`` count ops.
    ``errors`` counts failed ops by error code/class, ordered by count descending then name.
    ``first_ok_after`` is the number of seconds from ``reachable_at`` to the end of the first
    ok op that ended at or after it; ``None`` if the primary never became reachable or no ok
    op ended after that. ``longest_gap`` is the longest stretch of the workload window
    ``(ws, we)`` without an acknowledged write, in seconds: with ``e1 <= ... <= ek`` the
    sorted ``end`` times of the ok ops that ended within the window (``ws <= e <= we``,
    bounds included; other ok ops ignored, failed ops never count), it is ``max(e1 - ws,
    e2 - e1, ..., ek - e(k-1), we - ek)``, and ``we - ws`` when ``k == 0``. ``lost`` counts
    acknowledged keys missing on the final primary, ``duplicated`` keys found more than once,
    ``phantom`` keys whose writes all failed with a known outcome (no ok, no unknown op) yet
    found anyway. ``lost_keys`` are up to 10 lost keys (the smallest), sorted.

    Raises ValueError for inconsistent numbers: a negative count, ``ok + failed !=
    attempts``, ``unknown > failed``, ``errors`` not adding up to ``failed``, negative or
    non-finite durations, more lost key examples than lost keys.
    """

    name: str
    protected: bool
    attempts: int
    ok: int
    failed: int
    unknown: int
    failed_after: int
    errors: dict[str, int]
    first_ok_after: float | None
    longest_gap: float
    lost: int
    duplicated: int
    phantom: int
    lost_keys: tuple[int, ...]

    def __post_init__(self) -> None:
        counts = {
            "attempts": self.attempts,
            "ok": self.ok,
            "failed": self.failed,
            "unknown": self.unknown,
            "failed_after": self.failed_after,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "phantom": self.phantom,
        }
        for field, value in counts.items():
            if value < 0:
                raise ValueError(f"stack {self.name!r}: {field} must not be negative, got {value}")
        if self.ok + self.failed != self.attempts:
            raise ValueError(
                f"stack {self.name!r}: ok ({self.ok}) + failed ({self.failed}) must equal "
                f"attempts ({self.attempts})"
            )
        if self.unknown > self.failed:
            raise ValueError(
                f"stack {self.name!r}: unknown ({self.unknown}) cannot exceed failed "
                f"({self.failed})"
            )
        if self.failed_after > self.failed:
            raise ValueError(
                f"stack {self.name!r}: failed_after ({self.failed_after}) cannot exceed failed "
                f"({self.failed})"
            )
        if sum(self.errors.values()) != self.failed:
            raise ValueError(
                f"stack {self.name!r}: errors {self.errors!r} must add up to failed ({self.failed})"
            )
        if self.first_ok_after is not None:
            _check_time(self.first_ok_after, f"stack {self.name!r} first_ok_after")
        _check_time(self.longest_gap, f"stack {self.name!r} longest_gap")
        if len(self.lost_keys) > min(self.lost, _LOST_KEY_EXAMPLES):
            raise ValueError(
                f"stack {self.name!r}: {len(self.lost_keys)} lost key examples for {self.lost} "
                "lost keys"
            )

    @property
    def wrote_through(self) -> bool:
        """True when the stack kept every write: nothing failed, lost, duplicated or phantom."""
        return self.failed == 0 and self.lost == 0 and self.duplicated == 0 and self.phantom == 0

    @property
    def result(self) -> str:
        """One word for the table: ``lost writes`` (lost, duplicated or phantom writes),
        ``wrote through`` (no failure at all), ``recovered`` (failures only while the
        primary was unreachable, and writes resumed), ``still failing`` (writes resumed but
        ops started after the primary was reachable failed too), ``STUCK`` (no write
        succeeded after the primary was reachable)."""
        if self.lost or self.duplicated or self.phantom:
            return "LOST WRITES"
        if self.failed == 0:
            return "wrote through"
        if self.first_ok_after is None:
            return "STUCK"
        return "recovered" if self.failed_after == 0 else "still failing"


def _stack_json(stack: StackReport) -> dict[str, object]:
    """One stack's numbers as a JSON object: every field, plus the derived
    ``wrote_through`` and ``first_ok_after_ms`` / ``longest_gap_ms`` (see :func:`_ms`;
    ``first_ok_after_ms`` is null when ``first_ok_after`` is None)."""
    return {
        "name": stack.name,
        "protected": stack.protected,
        "attempts": stack.attempts,
        "ok": stack.ok,
        "failed": stack.failed,
        "unknown": stack.unknown,
        "failed_after": stack.failed_after,
        "errors": dict(stack.errors),
        "first_ok_after": stack.first_ok_after,
        "first_ok_after_ms": None if stack.first_ok_after is None else _ms(stack.first_ok_after),
        "longest_gap": stack.longest_gap,
        "longest_gap_ms": _ms(stack.longest_gap),
        "lost": stack.lost,
        "duplicated": stack.duplicated,
        "phantom": stack.phantom,
        "lost_keys": list(stack.lost_keys),
        "wrote_through": stack.wrote_through,
        "result": stack.result,
    }


def _longest_gap(ok_ends: Iterable[float], window: Sequence[float]) -> float:
    """The longest interval of ``window`` without an acknowledged write, in seconds.

    Only the ends of ok ops inside the window (``start <= end_time <= end``, bounds included)
    count; the others are ignored. With those ends sorted as ``e1 <= ... <= ek``, the gap is
    ``max(e1 - start, e2 - e1, ..., ek - e(k-1), end - ek)``; with no ok end in the window it
    is the whole window length ``end - start``. So it is always within ``[0, end - start]``
    and at least ``(end - start) / (k + 1)``.
    """
    start, end = _check_window(window)
    inside = sorted(t for t in ok_ends if start <= t <= end)
    previous = start
    gap = 0.0
    for t in inside:
        gap = max(gap, t - previous)
        previous = t
    return max(gap, end - previous)


def _error_counts(ops: Iterable[Op]) -> dict[str, int]:
    """Failed ops by error (None -> "unspecified"), ordered by count desc then name."""
    counts: dict[str, int] = {}
    for op in ops:
        if not op.ok:
            name = _UNSPECIFIED_ERROR if op.error is None else op.error
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def summarize(
    name: str,
    protected: bool,
    ops: Sequence[Op],
    found: Mapping[int, int],
    *,
    reachable_at: float | None,
    window: tuple[float, float],
) -> StackReport:
    """Compute one stack's :class:`StackReport`.

    ``ops`` are this stack's ops only (ValueError if one belongs to another stack). ``found``
    maps a key to the number of rows with that key on the final primary; an absent key means
    0 rows, and keys not written by these ops are ignored (so the map for all stacks can be
    passed). ``reachable_at`` is when the primary became reachable for the stacks (seconds
    since the drill started; ``None``: never, which makes ``first_ok_after`` None).
    ``window`` is the workload's ``(start, end)``, used for ``longest_gap`` (the longest
    stretch of it between ok ends, see :class:`StackReport`).

    A key counts as acknowledged if any of its ops is ok, as unknown if none is ok and one
    is unknown, as failed otherwise: ``lost`` = acknowledged keys with 0 rows,
    ``duplicated`` = keys (any status) with more than 1 row, ``phantom`` = failed keys with
    at least 1 row. Raises ValueError for a negative row count, a negative or non-finite
    ``reachable_at`` or a reversed window.
    """
    window = _check_window(window)
    if reachable_at is not None:
        _check_time(reachable_at, "reachable_at")
    acked: set[int] = set()
    unknown_keys: set[int] = set()
    keys: set[int] = set()
    ok = unknown = 0
    for op in ops:
        if op.stack != name:
            raise ValueError(f"op {op.key} belongs to stack {op.stack!r}, not to {name!r}")
        keys.add(op.key)
        if op.ok:
            ok += 1
            acked.add(op.key)
        elif op.unknown:
            unknown += 1
            unknown_keys.add(op.key)
    rows: dict[int, int] = {}
    for key in keys:
        count = found.get(key, 0)
        if count < 0:
            raise ValueError(f"found[{key}] is negative ({count}): it must be a row count")
        rows[key] = count
    lost_keys = sorted(key for key in acked if rows[key] == 0)
    first_ok_after: float | None = None
    failed_after = 0
    if reachable_at is not None:
        after = [op.end for op in ops if op.ok and op.end >= reachable_at]
        if after:
            first_ok_after = min(after) - reachable_at
        failed_after = sum(1 for op in ops if not op.ok and op.start >= reachable_at)
    return StackReport(
        name=name,
        protected=protected,
        attempts=len(ops),
        ok=ok,
        failed=len(ops) - ok,
        unknown=unknown,
        failed_after=failed_after,
        errors=_error_counts(ops),
        first_ok_after=first_ok_after,
        longest_gap=_longest_gap((op.end for op in ops if op.ok), window),
        lost=len(lost_keys),
        duplicated=sum(1 for count in rows.values() if count > 1),
        phantom=sum(
            1
            for key, count in rows.items()
            if count > 0 and key not in acked and key not in unknown_keys
        ),
        lost_keys=tuple(lost_keys[:_LOST_KEY_EXAMPLES]),
    )


def _check_ops(ops: Iterable[Op], stack_names: Iterable[str]) -> None:
    """ValueError if an op names an unlisted stack or a key is used by two stacks."""
    names = set(stack_names)
    owner: dict[int, str] = {}
    for op in ops:
        if op.stack not in names:
            raise ValueError(f"op {op.key} belongs to stack {op.stack!r}, which is not listed")
        other = owner.setdefault(op.key, op.stack)
        if other != op.stack:
            raise ValueError(
                f"key {op.key} is used by two stacks ({other!r} and {op.stack!r}): keys must be "
                "unique across stacks"
            )


def _unique_names(names: Sequence[str]) -> None:
    """ValueError if a stack name is listed twice."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"stack {name!r} is listed twice")
        seen.add(name)


def _json_config(config: Mapping[str, object]) -> dict[str, object]:
    """``config`` in its JSON form (a deep copy through json); ValueError if not JSON-able."""
    try:
        normalized: dict[str, object] = json.loads(json.dumps(dict(config), allow_nan=False))
    except (TypeError, ValueError) as ex:
        raise ValueError(f"config must be JSON-able: {ex}") from ex
    return normalized


@dataclass(frozen=True)
class DrillReport:
    """The whole drill: options, failover marks, per-stack numbers and every op.

    ``config`` holds the run's JSON-able options (mode, stop mode, durations, versions...);
    it is stored in its JSON form (deep-copied through :mod:`json`: tuples become lists,
    keys strings), so :meth:`from_json` gives back an equal report. ``marks`` are the
    failover phases in the order performed. ``reachable_at`` is when the primary became
    reachable for the stacks (``None``: never). ``window`` is the workload's ``(start, end)``.
    ``stacks`` are in display order; ``ops`` are every op of every stack (each op's stack
    must be listed, a key may not be used by two stacks). All times are seconds since the
    drill started. Raises ValueError when any of that does not hold.
    """

    config: dict[str, object]
    marks: tuple[Mark, ...]
    reachable_at: float | None
    window: tuple[float, float]
    stacks: tuple[StackReport, ...]
    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", _json_config(self.config))
        object.__setattr__(self, "marks", tuple(self.marks))
        object.__setattr__(self, "window", _check_window(self.window))
        object.__setattr__(self, "stacks", tuple(self.stacks))
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.reachable_at is not None:
            _check_time(self.reachable_at, "reachable_at")
        names = [stack.name for stack in self.stacks]
        _unique_names(names)
        _check_ops(self.ops, names)

    def to_json(self) -> dict[str, object]:
        """The report as a :func:`json.dumps`-able dict (the layout ``pgfailover-drill/1``).

        Members: ``format`` (``"pgfailover-drill/1"``), ``config``, ``marks`` (a list of
        ``{"name", "at"}``), ``reachable_at`` (seconds or null), ``window`` (``[start,
        end]``), ``stacks`` (one object per stack in display order, with every
        :class:`StackReport` field under its own name, ``lost_keys`` as a list, plus the
        derived ``wrote_through``, ``first_ok_after_ms`` (null when ``first_ok_after`` is)
        and ``longest_gap_ms``), ``op_fields`` (the names of the op list items) and ``ops``:
        one compact list per op, ``[stack index into "stacks", start, end, key, ok, error or
        null, unknown]``. Times are seconds as given (not rounded), so :meth:`from_json`
        round-trips exactly; the ``*_ms`` members are the integers the text table shows.
        """
        index = {stack.name: i for i, stack in enumerate(self.stacks)}
        return {
            "format": _JSON_FORMAT,
            "config": _json_config(self.config),
            "marks": [{"name": mark.name, "at": mark.at} for mark in self.marks],
            "reachable_at": self.reachable_at,
            "window": list(self.window),
            "stacks": [_stack_json(stack) for stack in self.stacks],
            "op_fields": list(_OP_FIELDS),
            "ops": [
                [index[op.stack], op.start, op.end, op.key, op.ok, op.error, op.unknown]
                for op in self.ops
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> DrillReport:
        """The report :meth:`to_json` produced (also after a :func:`json.dumps`/``loads``
        trip): ``DrillReport.from_json(r.to_json()) == r``.

        The derived members (``wrote_through``, ``*_ms``) are not read back: they are
        recomputed. Raises ValueError naming the offending member on malformed input.
        """
        data = _mapping(data, "report")
        if data.get("format") != _JSON_FORMAT:
            raise ValueError(
                f"report: 'format' must be {_JSON_FORMAT!r}, got {data.get('format')!r}"
            )
        config = _mapping(_member(data, "config", "report"), "report.config")
        marks = tuple(
            _parse_mark(item, f"report.marks[{i}]")
            for i, item in enumerate(_list(_member(data, "marks", "report"), "report.marks"))
        )
        reachable_at = _opt_float(_member(data, "reachable_at", "report"), "report.reachable_at")
        window_items = _list(_member(data, "window", "report"), "report.window")
        if len(window_items) != 2:
            raise ValueError(f"report.window: expected [start, end], got {window_items!r}")
        window = (
            _float(window_items[0], "report.window[0]"),
            _float(window_items[1], "report.window[1]"),
        )
        stacks = tuple(
            _parse_stack(item, f"report.stacks[{i}]")
            for i, item in enumerate(_list(_member(data, "stacks", "report"), "report.stacks"))
        )
        fields = data.get("op_fields", list(_OP_FIELDS))
        if fields != list(_OP_FIELDS):
            raise ValueError(f"report.op_fields: expected {list(_OP_FIELDS)!r}, got {fields!r}")
        names = [stack.name for stack in stacks]
        ops = tuple(
            _parse_op(item, names, f"report.ops[{i}]")
            for i, item in enumerate(_list(_member(data, "ops", "report"), "report.ops"))
        )
        try:
            return cls(
                config={str(k): v for k, v in config.items()},
                marks=marks,
                reachable_at=reachable_at,
                window=window,
                stacks=stacks,
                ops=ops,
            )
        except ValueError as ex:
            raise ValueError(f"report: {ex}") from ex

    def format_text(self) -> str:
        """The human report, as lines ending with a newline.

        A header (the config, the workload window, every mark with its time, and "primary
        reachable at t=... s" or "primary never reachable"); a fixed-width table with one row
        per stack: stack, protected (yes/no), attempts, ok, failed, unknown, first ok after
        reachable (ms; "never" if no ok write ended after it, "n/a" if the primary never
        became reachable), longest gap (ms), lost, duplicated, phantom, and "wrote through"
        or "FAILED"; then, per stack with failures, "<stack>: failures by error: 25006 x12,
        0A000 x3" and, with lost writes, the lost key examples. Milliseconds are the same
        integers as the ``*_ms`` members of :meth:`to_json` (see :func:`_ms`).
        """
        lines = ["pgfailover drill report", ""]
        if self.config:
            lines.append("config:")
            lines.extend(
                f"  {key}: {value if isinstance(value, str) else json.dumps(value)}"
                for key, value in self.config.items()
            )
        start, end = self.window
        lines.append(f"workload: t={start:.3f} s .. t={end:.3f} s ({end - start:.3f} s)")
        if self.marks:
            lines.append("failover:")
            lines.extend(f"  t={mark.at:8.3f} s  {mark.name}" for mark in self.marks)
        if self.reachable_at is None:
            lines.append("primary never reachable")
        else:
            lines.append(f"primary reachable at t={self.reachable_at:.3f} s")
        lines.append("")
        lines.extend(_table(self.stacks, reachable=self.reachable_at is not None))
        details: list[str] = []
        for stack in self.stacks:
            if stack.errors:
                errors = ", ".join(f"{name} x{count}" for name, count in stack.errors.items())
                details.append(f"{stack.name}: failures by error: {errors}")
            if stack.lost:
                examples = ", ".join(str(key) for key in stack.lost_keys)
                more = ", ..." if stack.lost > len(stack.lost_keys) else ""
                details.append(f"{stack.name}: lost keys (examples): {examples}{more}")
        if details:
            lines.append("")
            lines.extend(details)
        return "\n".join(lines) + "\n"


_TABLE_HEADERS: Final = (
    "stack",
    "protected",
    "attempts",
    "ok",
    "failed",
    "unknown",
    "failed after reachable",
    "first ok after reachable (ms)",
    "longest gap (ms)",
    "lost",
    "duplicated",
    "phantom",
    "result",
)
"""The column headers of the table in :meth:`DrillReport.format_text`."""


def _table(stacks: Sequence[StackReport], *, reachable: bool) -> list[str]:
    """The fixed-width stack table: header, rule, one row per stack."""
    rows = [list(_TABLE_HEADERS)]
    for stack in stacks:
        if stack.first_ok_after is not None:
            first = str(_ms(stack.first_ok_after))
        else:
            first = "never" if reachable else "n/a"
        rows.append(
            [
                stack.name,
                "yes" if stack.protected else "no",
                str(stack.attempts),
                str(stack.ok),
                str(stack.failed),
                str(stack.unknown),
                str(stack.failed_after),
                first,
                str(_ms(stack.longest_gap)),
                str(stack.lost),
                str(stack.duplicated),
                str(stack.phantom),
                stack.result,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_TABLE_HEADERS))]
    last = len(_TABLE_HEADERS) - 1

    def line(cells: list[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            # text columns (stack, protected, result) left-aligned, numbers right-aligned
            parts.append(cell.ljust(widths[i]) if i in (0, 1, last) else cell.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows[1:])
    return out


def build_report(  # noqa: PLR0917 - the drill CLI's documented positional API
    config: Mapping[str, object],
    marks: Sequence[Mark],
    reachable_at: float | None,
    window: tuple[float, float],
    stacks: Sequence[tuple[str, bool]],
    ops: Sequence[Op],
    found: Mapping[int, int],
) -> DrillReport:
    """Summarize every stack (:func:`summarize`) into a :class:`DrillReport`.

    ``stacks`` are ``(name, protected)`` pairs in display order; ``ops`` the ops of all
    stacks (kept in the given order); ``found`` maps every key to its row count on the final
    primary (absent: 0). Times are seconds since the drill started; ``reachable_at`` None
    means the primary never became reachable. Raises ValueError for a stack listed twice,
    an op of an unlisted stack, a key used by two stacks, or invalid times (see
    :class:`DrillReport`).
    """
    names = [name for name, _ in stacks]
    _unique_names(names)
    _check_ops(ops, names)
    by_stack: dict[str, list[Op]] = {name: [] for name in names}
    for op in ops:
        by_stack[op.stack].append(op)
    reports = tuple(
        summarize(name, protected, by_stack[name], found, reachable_at=reachable_at, window=window)
        for name, protected in stacks
    )
    return DrillReport(
        config=dict(config),
        marks=tuple(marks),
        reachable_at=reachable_at,
        window=window,
        stacks=reports,
        ops=tuple(ops),
    )


# --- JSON parsing helpers: each raises ValueError naming where the bad value is -------------


def _malformed(where: str, expected: str, value: object) -> ValueError:
    """The error for a JSON value that is not what ``where`` needs."""
    shown = type(value).__name__ if isinstance(value, (Mapping, list, tuple)) else repr(value)
    return ValueError(f"{where}: expected {expected}, got {shown}")


def _mapping(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise _malformed(where, "a JSON object", value)
    return value


def _member(data: Mapping[str, object], key: str, where: str) -> object:
    if key not in data:
        raise ValueError(f"{where}: missing {key!r}")
    return data[key]


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, (list, tuple)):
        raise _malformed(where, "a JSON array", value)
    return list(value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _malformed(where, "a string", value)
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _malformed(where, "true or false", value)
    return value


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(where, "an integer", value)
    return value


def _float(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _malformed(where, "a number", value)
    if not math.isfinite(value):
        raise _malformed(where, "a finite number", value)
    return value


def _opt_float(value: object, where: str) -> float | None:
    return None if value is None else _float(value, where)


def _parse_mark(value: object, where: str) -> Mark:
    item = _mapping(value, where)
    name = _str(_member(item, "name", where), f"{where}.name")
    at = _float(_member(item, "at", where), f"{where}.at")
    try:
        return Mark(name, at)
    except ValueError as ex:
        raise ValueError(f"{where}: {ex}") from ex


def _parse_stack(value: object, where: str) -> StackReport:
    item = _mapping(value, where)
    for key in _STACK_FIELDS:
        _member(item, key, where)
    errors_in = _mapping(item["errors"], f"{where}.errors")
    errors = {str(k): _int(v, f"{where}.errors[{k!r}]") for k, v in errors_in.items()}
    lost_keys = tuple(
        _int(k, f"{where}.lost_keys[{i}]")
        for i, k in enumerate(_list(item["lost_keys"], f"{where}.lost_keys"))
    )
    try:
        return StackReport(
            name=_str(item["name"], f"{where}.name"),
            protected=_bool(item["protected"], f"{where}.protected"),
            attempts=_int(item["attempts"], f"{where}.attempts"),
            ok=_int(item["ok"], f"{where}.ok"),
            failed=_int(item["failed"], f"{where}.failed"),
            unknown=_int(item["unknown"], f"{where}.unknown"),
            failed_after=_int(item["failed_after"], f"{where}.failed_after"),
            errors=errors,
            first_ok_after=_opt_float(item["first_ok_after"], f"{where}.first_ok_after"),
            longest_gap=_float(item["longest_gap"], f"{where}.longest_gap"),
            lost=_int(item["lost"], f"{where}.lost"),
            duplicated=_int(item["duplicated"], f"{where}.duplicated"),
            phantom=_int(item["phantom"], f"{where}.phantom"),
            lost_keys=lost_keys,
        )
    except ValueError as ex:
        if str(ex).startswith(where):
            raise
        raise ValueError(f"{where}: {ex}") from ex


def _parse_op(value: object, names: Sequence[str], where: str) -> Op:
    items = _list(value, where)
    if len(items) != len(_OP_FIELDS):
        raise ValueError(f"{where}: expected {len(_OP_FIELDS)} items {list(_OP_FIELDS)!r}")
    index = _int(items[0], f"{where}[0] (stack index)")
    if not 0 <= index < len(names):
        raise ValueError(f"{where}: stack index {index} is out of range (0..{len(names) - 1})")
    error = items[5]
    try:
        return Op(
            stack=names[index],
            start=_float(items[1], f"{where}[1] (start)"),
            end=_float(items[2], f"{where}[2] (end)"),
            key=_int(items[3], f"{where}[3] (key)"),
            ok=_bool(items[4], f"{where}[4] (ok)"),
            error=None if error is None else _str(error, f"{where}[5] (error)"),
            unknown=_bool(items[6], f"{where}[6] (unknown)"),
        )
    except ValueError as ex:
        if str(ex).startswith(where):
            raise
        raise ValueError(f"{where}: {ex}") from ex
