"""pgfailover.drill.plot: the timeline PNG. matplotlib comes with the dev install: a
missing one fails these tests rather than skipping them."""

from __future__ import annotations

import struct
import sys
from itertools import combinations
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from pgfailover.drill.plot import figure, render
from pgfailover.drill.report import DrillReport, Mark, Op, build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STACKS = [
    ("psycopg_pool (naive)", False),
    ("pgfailover pool", True),
    ("pgfailover pool + retry runner", True),
]
MARKS = [
    Mark("primary stopped", 10.0),
    Mark("standby promoted", 12.5),
    Mark("PgBouncer repointed", 13.0),
    Mark("old primary rejoined", 20.0),
]


def expected_size(stacks: int) -> tuple[int, int]:
    """The documented figure size in pixels: 12 x (2 + 0.6 * stacks) inches at 100 dpi."""
    return 12 * 100, round((2 + 0.6 * stacks) * 100)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def drill(per_stack: int, duration: float = 30.0) -> DrillReport:
    """A report where every stack writes ``per_stack`` times across a 3 s outage at t=10;
    naive stacks keep failing half their writes until t=20 and lose a few acks."""
    ops: list[Op] = []
    found: dict[int, int] = {}
    key = 0
    for name, protected in STACKS:
        for i in range(per_stack):
            key += 1
            start = i * duration / per_stack
            end = start + 0.004 + (i % 7) * 0.002
            outage = 10.0 <= start < 13.0
            flaky = not protected and 13.0 <= start < 20.0 and i % 2 == 0
            if outage or flaky:
                unknown = protected and i % 23 == 0
                error = "25006" if i % 3 else "OperationalError"
                ops.append(Op(name, start, end, key, False, error, unknown))
                found[key] = 1 if unknown and i % 2 else 0
            else:
                ops.append(Op(name, start, end, key, True))
                found[key] = 0 if not protected and i % 997 == 0 else 1
    return build_report({"target": "session"}, MARKS, 13.0, (0.0, duration), STACKS, ops, found)


def test_render_writes_a_png_of_the_documented_size(tmp_path: Path) -> None:
    """3 stacks and a few thousand ops: a PNG over 20 kB of 1200 x 380 pixels at the path."""
    target = tmp_path / "timeline.png"
    written = render(drill(1000), target)
    assert written == target
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000
    assert png_size(data) == expected_size(3) == (1200, 380)


def test_render_accepts_a_str_path_and_returns_a_path(tmp_path: Path) -> None:
    """A str path works too; the returned value is a pathlib.Path."""
    written = render(drill(50), str(tmp_path / "small.png"))
    assert isinstance(written, Path)
    assert written.read_bytes().startswith(PNG_SIGNATURE)


def test_render_an_empty_report(tmp_path: Path) -> None:
    """No ops, no marks, never reachable, a zero-length window: still a valid PNG."""
    report = build_report({}, (), None, (0.0, 0.0), STACKS[:2], [], {})
    data = render(report, tmp_path / "empty.png").read_bytes()
    assert png_size(data) == expected_size(2)


def test_render_a_report_without_stacks(tmp_path: Path) -> None:
    """Zero stacks: the base 12 x 2 inch picture."""
    report = DrillReport({}, (Mark("primary stopped", 1.0),), None, (0.0, 5.0), (), ())
    assert png_size(render(report, tmp_path / "none.png").read_bytes()) == expected_size(0)


def test_render_many_ops_draws_counts(tmp_path: Path) -> None:
    """50,000 ops (drawn as per-100 ms counts instead of one marker each) still give a
    PNG of the documented size."""
    report = drill(50_000 // len(STACKS) + 1)
    data = render(report, tmp_path / "many.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert png_size(data) == expected_size(3)


def test_render_without_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib: ModuleNotFoundError naming the pgfailover[cli] extra, no file."""
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: cannot import
    target = tmp_path / "nothing.png"
    with pytest.raises(ModuleNotFoundError) as info:
        render(drill(5), target)
    assert str(info.value) == "the drill's plot needs matplotlib: pip install 'pgfailover[cli]'"
    assert not target.exists()


@pytest.mark.parametrize("n_stacks", [0, 2, 6])
def test_failover_step_labels_do_not_overlap_when_steps_are_10_ms_apart(n_stacks: int) -> None:
    """Five failover steps 10 ms apart: each step's label is drawn once, inside the axes,
    and no two labels (nor their white boxes) intersect, whatever the number of lanes."""
    names = [
        "failover started",
        "node0 stopped",
        "node1 promoted",
        "node0 rejoined as standby",
        "PgBouncer repointed",
    ]
    marks = [Mark(name, 10.0 + 0.01 * i) for i, name in enumerate(names)]
    stacks = [(f"stack {i}", i % 2 == 0) for i in range(n_stacks)]
    ops = [
        Op(name, t / 10, t / 10 + 0.005, 1000 * i + t, True)
        for i, (name, _) in enumerate(stacks)
        for t in range(300)
    ]
    report = build_report({}, marks, marks[-1].at, (0.0, 30.0), stacks, ops, {})
    fig = figure(report)
    assert isinstance(fig.canvas, FigureCanvasAgg)
    fig.draw_without_rendering()  # places the labels' boxes as saving does
    (ax,) = fig.axes
    assert [text.get_text() for text in ax.texts] == names
    extents = [text.get_window_extent() for text in ax.texts]  # the Agg canvas's renderer
    boxes = []
    for text in ax.texts:
        patch = text.get_bbox_patch()
        assert patch is not None
        boxes.append(patch.get_window_extent())
    for a, b in [*combinations(extents, 2), *combinations(boxes, 2)]:
        assert not a.overlaps(b), (a, b)
    frame = ax.get_window_extent()
    for extent in extents:
        assert frame.contains(extent.x0, extent.y0), (frame, extent)
        assert frame.contains(extent.x1, extent.y1), (frame, extent)


def test_the_title_names_what_the_stacks_wrote_through() -> None:
    """The title counts the stacks that wrote through and names the drill's --target (the
    key the drill's config really has)."""
    titles = [ax.get_title() for ax in figure(drill(10)).axes]
    assert any(title.endswith("(target: session)") for title in titles), titles
