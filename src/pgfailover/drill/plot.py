"""The drill's timeline picture: one lane per stack, writes over time, the failover marked.

:func:`render` draws a :class:`~pgfailover.drill.report.DrillReport` into a PNG file with
matplotlib's Agg renderer, used directly (:class:`matplotlib.figure.Figure` and
``FigureCanvasAgg``, never pyplot): the user's global matplotlib backend is left alone and
no display is needed; :func:`figure` returns the same picture as a Figure. matplotlib is
optional (the ``cli`` extra) and imported only when one of them is called.

The picture (x axis: seconds since the drill started):

* one horizontal lane per stack, in the report's order from the top, labelled with the
  stack's name, ``✓`` and green for pgfailover (protected) stacks, ``(naive)`` and grey for
  the others;
* within a lane, each write at the time the application got its answer (the op's ``end``):
  acknowledged writes as green ticks above the lane's centre, failed ones as red crosses
  below it, unknown outcomes as orange dots further below; with more than
  :data:`_MAX_MARKERS` ops in the report, per-100 ms counts instead (green bars up, red and
  orange bars down, scaled to the lane's busiest bin) so the picture stays readable and fast;
* a dashed vertical line per failover mark, its name written horizontally next to it in a
  band above the lanes: labels that would collide (steps a few milliseconds apart) go on
  separate rows, so no two overlap; a solid blue line when the primary became reachable;
  the outage (earliest mark to ``reachable_at``, or to the end when the primary never
  became reachable) shaded;
* a legend on the right and a title saying how many stacks wrote through.

The figure is 12 inches wide and ``2 + 0.6 * stacks`` inches high, at 100 dpi: 1200 pixels
by ``round(100 * (2 + 0.6 * stacks))`` pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .report import DrillReport, Op

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from .report import Mark

__all__ = ["figure", "render"]

_NEEDS_MATPLOTLIB: Final = "the drill's plot needs matplotlib: pip install 'pgfailover[cli]'"

_DPI: Final = 100
_WIDTH_IN: Final = 12.0
_BASE_HEIGHT_IN: Final = 2.0
_LANE_HEIGHT_IN: Final = 0.6

_MAX_MARKERS: Final = 20_000
"""Above this many ops in the report, lanes show per-bin counts instead of one mark per op."""
_BIN_SECONDS: Final = 0.1

_OK_COLOR: Final = "#2ca02c"
_FAILED_COLOR: Final = "#d62728"
_UNKNOWN_COLOR: Final = "#ff7f0e"
_MARK_COLOR: Final = "0.3"
_REACHABLE_COLOR: Final = "#1f77b4"
_OUTAGE_COLOR: Final = "0.85"
_NAIVE_LABEL_COLOR: Final = "0.35"

_LABEL_FONTSIZE: Final = 7
_LABEL_PAD_PT: Final = 1.0
"""Padding of the white box behind a mark's label, in points."""
_LABEL_NUDGE_PT: Final = 2.0
"""Horizontal distance from a mark's line to its label, in points."""
_LABEL_GAP_PX: Final = 6.0
"""Least horizontal distance between two labels on one row, boxes included, in pixels."""
_LABEL_TOP_PX: Final = 4.0
"""Space above the first row of labels, in pixels."""
_MAX_BAND: Final = 0.6
"""The label band takes at most this fraction of the axes' height away from the lanes."""

_OK_OFFSET: Final = 0.2
_FAILED_OFFSET: Final = -0.15
_UNKNOWN_OFFSET: Final = -0.32
_BAR_HEIGHT: Final = 0.42


def _size_px(n_stacks: int) -> tuple[int, int]:
    """The PNG's (width, height) in pixels for ``n_stacks`` lanes."""
    height_in = _BASE_HEIGHT_IN + _LANE_HEIGHT_IN * n_stacks
    return round(_WIDTH_IN * _DPI), round(height_in * _DPI)


def _inches(pixels: int) -> float:
    """``pixels / dpi`` nudged up so that Agg, which truncates ``inches * dpi``, gives back
    exactly ``pixels``."""
    inches = pixels / _DPI
    while int(inches * _DPI) < pixels:
        inches = math.nextafter(inches, math.inf)
    return inches


def _lane_label(name: str, protected: bool) -> str:
    """The y tick label of a stack: its name, marked as pgfailover-protected or naive."""
    lowered = name.lower()
    if protected:
        return f"✓ {name}" if "pgfailover" in lowered else f"✓ {name} (pgfailover)"
    return name if "naive" in lowered else f"{name} (naive)"


def _x_range(report: DrillReport) -> tuple[float, float]:
    """The x axis limits (seconds): the window widened to every op, mark and reachable_at."""
    start, end = report.window
    times = [end]
    times.extend(op.end for op in report.ops)
    times.extend(mark.at for mark in report.marks)
    if report.reachable_at is not None:
        times.append(report.reachable_at)
    low = min([start, *(op.end for op in report.ops)])
    high = max(times)
    if high - low <= 0:
        high = low + 1.0
    pad = (high - low) * 0.01
    return max(0.0, low - pad), high + pad


def render(report: DrillReport, path: str | os.PathLike[str]) -> Path:
    """Draw ``report``'s timeline into a PNG file at ``path`` and return that path.

    The file is written as PNG whatever its suffix; its parent directory must exist. The
    image is 1200 x ``round(100 * (2 + 0.6 * len(report.stacks)))`` pixels. Raises
    ModuleNotFoundError (with the pip command to run) when matplotlib is not installed.
    """
    fig = figure(report)
    out = Path(path)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


def figure(report: DrillReport) -> Figure:
    """``report``'s timeline as a :class:`matplotlib.figure.Figure`, laid out and ready to
    save (what :func:`render` writes), with an Agg canvas attached and pyplot untouched.

    Its one :class:`~matplotlib.axes.Axes` holds the lanes; the failover steps' labels are
    its texts (``fig.axes[0].texts``), one per mark, in the report's order. Raises
    ModuleNotFoundError (with the pip command to run) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional
        from matplotlib.figure import Figure  # noqa: PLC0415 - the cli extra
    except ModuleNotFoundError as ex:
        raise ModuleNotFoundError(_NEEDS_MATPLOTLIB, name="matplotlib") from ex

    stacks = report.stacks
    width_px, height_px = _size_px(len(stacks))
    fig = Figure(figsize=(_inches(width_px), _inches(height_px)), dpi=_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: Agg without touching pyplot
    ax = fig.add_subplot()

    x0, x1 = _x_range(report)
    binned = len(report.ops) > _MAX_MARKERS
    by_stack: dict[str, list[Op]] = {stack.name: [] for stack in stacks}
    for op in report.ops:
        by_stack[op.stack].append(op)
    lanes = [len(stacks) - 1 - i for i in range(len(stacks))]  # the first stack on top
    for stack, lane in zip(stacks, lanes, strict=True):
        ax.axhline(lane, color="0.9", linewidth=0.8, zorder=1)
        ends = _ends_by_kind(by_stack[stack.name])
        if binned:
            _draw_bins(ax, lane, ends, (x0, x1))
        else:
            _draw_markers(ax, lane, ends)
    handles = _kind_handles(binned) + _draw_failover(ax, report, x1)

    ax.set_xlim(x0, x1)
    lanes_bottom, lanes_top = -0.6, max(len(stacks), 1) - 0.4
    ax.set_ylim(lanes_bottom, lanes_top)
    ax.set_yticks(lanes, [_lane_label(stack.name, stack.protected) for stack in stacks])
    for tick, stack in zip(ax.get_yticklabels(), stacks, strict=True):
        tick.set_color(_OK_COLOR if stack.protected else _NAIVE_LABEL_COLOR)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("seconds since start")
    ax.grid(axis="x", color="0.92", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False
    )
    ax.set_title(_title(report), fontsize=11)
    labels = _mark_labels(ax, report.marks)
    fig.tight_layout()
    band = _place_labels(fig, ax, labels, report.marks)
    if band > 0:  # room above the top lane for the labels' rows
        ax.set_ylim(lanes_bottom, lanes_bottom + (lanes_top - lanes_bottom) / (1 - band))
    return fig


_KINDS: Final = (
    # kind, color, y offset from the lane centre, marker, marker size, legend label
    ("ok", _OK_COLOR, _OK_OFFSET, "|", 7.0, "acknowledged"),
    ("failed", _FAILED_COLOR, _FAILED_OFFSET, "x", 4.0, "failed"),
    ("unknown", _UNKNOWN_COLOR, _UNKNOWN_OFFSET, "o", 3.5, "outcome unknown"),
)


def _ends_by_kind(ops: Sequence[Op]) -> dict[str, list[float]]:
    """The ``end`` times (seconds) of ``ops``, split into ok / failed / unknown."""
    ends: dict[str, list[float]] = {"ok": [], "failed": [], "unknown": []}
    for op in ops:
        ends["ok" if op.ok else "unknown" if op.unknown else "failed"].append(op.end)
    return ends


def _draw_markers(ax: Axes, lane: int, ends: dict[str, list[float]]) -> None:
    """One marker per op: ticks above the lane centre for ok, crosses/dots below."""
    for kind, color, offset, marker, size, _ in _KINDS:
        xs = ends[kind]
        ax.plot(
            xs,
            [lane + offset] * len(xs),
            linestyle="none",
            marker=marker,
            markersize=size,
            color=color,
            zorder=4 if kind == "unknown" else 3,
        )


def _draw_bins(
    ax: Axes, lane: int, ends: dict[str, list[float]], x_range: tuple[float, float]
) -> None:
    """Per-bin counts: ok up from the lane centre, failed then unknown down, all scaled to
    the lane's busiest bin (so at most ``_BAR_HEIGHT`` of a lane, which is 1 high)."""
    import numpy as np  # noqa: PLC0415 - comes with matplotlib, optional like it

    edges = np.arange(x_range[0], x_range[1] + _BIN_SECONDS, _BIN_SECONDS)
    ok = np.histogram(ends["ok"], edges)[0]
    failed = np.histogram(ends["failed"], edges)[0]
    down = failed + np.histogram(ends["unknown"], edges)[0]
    scale = _BAR_HEIGHT / max(1, int(ok.max(initial=0)), int(down.max(initial=0)))
    bars = (
        (lane + ok * scale, lane, _OK_COLOR),
        (lane - failed * scale, lane, _FAILED_COLOR),
        (lane - down * scale, lane - failed * scale, _UNKNOWN_COLOR),
    )
    for values, baseline, color in bars:
        ax.stairs(values, edges, baseline=baseline, fill=True, color=color, zorder=3)


def _kind_handles(binned: bool) -> list[Artist]:
    """Legend entries for ok / failed / unknown, as drawn (markers or per-bin bars)."""
    from matplotlib.lines import Line2D  # noqa: PLC0415 - matplotlib is optional
    from matplotlib.patches import Patch  # noqa: PLC0415

    per_bin = f" per {_BIN_SECONDS * 1000:.0f} ms"
    handles: list[Artist] = []
    for _, color, _, marker, size, label in _KINDS:
        if binned:
            handles.append(Patch(color=color, label=label + per_bin))
        else:
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker=marker,
                    markersize=size,
                    color=color,
                    label=label,
                )
            )
    return handles


def _draw_failover(ax: Axes, report: DrillReport, x_end: float) -> list[Artist]:
    """Draw the marks, the reachable line and the outage; return their legend handles."""
    from matplotlib.lines import Line2D  # noqa: PLC0415 - matplotlib is optional
    from matplotlib.patches import Patch  # noqa: PLC0415

    handles: list[Artist] = []
    outage_start = min((mark.at for mark in report.marks), default=None)
    if outage_start is not None:
        outage_end = x_end if report.reachable_at is None else report.reachable_at
        if outage_end > outage_start:
            ax.axvspan(
                outage_start, outage_end, color=_OUTAGE_COLOR, alpha=0.6, zorder=0, linewidth=0
            )
            if report.reachable_at is None:
                label = "outage (primary never reachable)"
            else:
                label = f"outage ({outage_end - outage_start:.2f} s)"
            handles.append(Patch(color=_OUTAGE_COLOR, alpha=0.6, label=label))
    for mark in report.marks:
        ax.axvline(mark.at, color=_MARK_COLOR, linestyle="--", linewidth=1, zorder=2)
    if report.marks:
        handles.append(
            Line2D([], [], color=_MARK_COLOR, linestyle="--", linewidth=1, label="failover step")
        )
    if report.reachable_at is not None:
        ax.axvline(report.reachable_at, color=_REACHABLE_COLOR, linewidth=1.2, zorder=2)
        handles.append(
            Line2D(
                [],
                [],
                color=_REACHABLE_COLOR,
                linewidth=1.2,
                label=f"primary reachable (t={report.reachable_at:.2f} s)",
            )
        )
    return handles


def _title(report: DrillReport) -> str:
    """'pgfailover drill: k of n stacks wrote through' plus what the stacks wrote through
    (the drill's ``--target``: a PgBouncer mode or ``direct``) when the config says, or for
    a Patroni drill the fault (``Patroni, leader crash``)."""
    through = sum(1 for stack in report.stacks if stack.wrote_through)
    title = f"pgfailover drill: {through} of {len(report.stacks)} stacks wrote through"
    if report.config.get("ha") == "patroni":
        fault = report.config.get("fault")
        shown = {"crash": "leader crash", "freeze": "frozen leader"}.get(str(fault), fault)
        return f"{title} (Patroni, {shown})"
    target = report.config.get("target")
    return f"{title} (target: {target})" if isinstance(target, str) and target else title


def _mark_labels(ax: Axes, marks: Sequence[Mark]) -> list[Text]:
    """One text per mark, in order, placed by :func:`_place_labels` once the axes are laid
    out (left out of the layout: they stay inside the axes)."""
    labels = []
    for mark in marks:
        text = ax.text(
            mark.at,
            1.0,
            mark.name,
            transform=ax.get_xaxis_transform(),
            ha="left",
            va="top",
            fontsize=_LABEL_FONTSIZE,
            color=_MARK_COLOR,
            zorder=5,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": _LABEL_PAD_PT},
        )
        text.set_in_layout(False)
        labels.append(text)
    return labels


def _place_labels(fig: Figure, ax: Axes, labels: Sequence[Text], marks: Sequence[Mark]) -> float:
    """Put each mark's label next to its line (right of it, or left when it would leave the
    axes), in rows from the top of the axes: a label goes on the first row where it keeps
    :data:`_LABEL_GAP_PX` from the labels already there, the marks taken left to right.
    Returns the fraction of the axes' height the rows take (0 without marks), capped at
    :data:`_MAX_BAND` so the lanes keep the rest.
    """
    from matplotlib.transforms import offset_copy  # noqa: PLC0415 - matplotlib is optional

    if not labels:
        return 0.0
    axes_box = ax.get_window_extent()  # pixels, measured with the figure's Agg renderer
    pad_px = _LABEL_PAD_PT * _DPI / 72
    nudge_px = _LABEL_NUDGE_PT * _DPI / 72
    spans: list[tuple[float, float, int]] = []  # (left px, right px, label index)
    height = 0.0
    for i, (text, mark) in enumerate(zip(labels, marks, strict=True)):
        extent = text.get_window_extent()
        width = extent.width + 2 * pad_px
        height = max(height, extent.height + 2 * pad_px)
        x = float(ax.transData.transform((mark.at, 0.0))[0])
        if x + nudge_px + width <= axes_box.x1:
            text.set_horizontalalignment("left")
            spans.append((x + nudge_px - pad_px, x + nudge_px + width - pad_px, i))
        else:
            text.set_horizontalalignment("right")
            spans.append((x - nudge_px - width + pad_px, x - nudge_px + pad_px, i))
    row_ends: list[float] = []  # right edge of the last label of each row
    rows = [0] * len(labels)
    for left, right, i in sorted(spans):
        row = next((r for r, end in enumerate(row_ends) if end + _LABEL_GAP_PX <= left), None)
        if row is None:
            row = len(row_ends)
            row_ends.append(right)
        row_ends[row] = right
        rows[i] = row
    row_px = height + 1.0
    for text, mark, row in zip(labels, marks, rows, strict=True):
        left = text.get_horizontalalignment() == "left"
        text.set_transform(
            offset_copy(
                ax.get_xaxis_transform(),
                fig=fig,
                x=_LABEL_NUDGE_PT if left else -_LABEL_NUDGE_PT,
                y=-(_LABEL_TOP_PX + row * row_px + pad_px) * 72 / _DPI,
                units="points",
            )
        )
        text.set_position((mark.at, 1.0))
    band_px = _LABEL_TOP_PX + len(row_ends) * row_px
    return min(band_px / axes_box.height, _MAX_BAND) if axes_box.height > 0 else 0.0
