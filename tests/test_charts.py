"""The one chart path (memprof.render.charts): what each chart draws, checked on the spec, on the matplotlib
figure's artists and on the SVG's structure and text (never on pixels); files are deterministic."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba
from test_compare import golden_result
from test_find_batch_cli import _hand_built as find_batch_result
from test_profile import _hand_built as profile_result

from memprof.errors import UsageError
from memprof.render import format_bytes
from memprof.render.charts import (
    Axis,
    HLine,
    Line,
    Points,
    VLine,
    XYChart,
    batch_chart,
    check_plot_path,
    compare_chart,
    figure,
    grid_chart,
    svg_text,
    terminal,
    ticks,
    timeline_chart,
    write,
)

GiB, MiB = 1024**3, 1024**2
SVG = "{http://www.w3.org/2000/svg}"


def _mark(chart, mark_id):
    return next(m for m in chart.marks if m.id == mark_id)


def _artist(fig, gid):
    ax = fig.axes[0]
    found = [a for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, gid
    return found[0]


def _svg_groups(text: str) -> dict[str, ET.Element]:
    root = ET.fromstring(text)
    return {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("id")}


def _svg_texts(text: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(text).iter(f"{SVG}text")]


# --------------------------------------------------------------------------- ticks
@pytest.mark.parametrize(
    "axis, expected",
    [
        (Axis("", 0, 3.4 * GiB, "bytes"), [0, GiB, 2 * GiB, 3 * GiB]),
        (Axis("", 0, 1.1 * GiB, "bytes"), [0, GiB / 2, GiB]),
        (Axis("", 0, 17.5 * MiB, "bytes"), [0, 5 * MiB, 10 * MiB, 15 * MiB]),
        (Axis("", 2.6 * GiB, 3.1 * GiB, "bytes"), [2.6 * GiB, 2.7 * GiB, 2.8 * GiB, 2.9 * GiB, 3.0 * GiB, 3.1 * GiB]),
        (Axis("", 0, 1765, "count"), [0, 500, 1000, 1500]),
        (Axis("", 0, 7, "count"), [0, 2, 4, 6]),
        (Axis("", 0, 3, "count"), [0, 1, 2, 3]),  # never a fractional batch
        (Axis("", 0, 2.5, "seconds"), [0, 0.5, 1.0, 1.5, 2.0, 2.5]),
    ],
)
def test_ticks_are_round_in_the_axis_unit(axis, expected):
    assert ticks(axis) == pytest.approx(expected)


# --------------------------------------------------------------------------- find-batch: peak vs batch
def test_batch_chart_holds_the_measurements():
    result = find_batch_result()
    chart = batch_chart(result)
    cap = result.capacity.total_bytes
    assert _mark(chart, "fits").points == ((1470, 2_899_102_720), (1633, 3_220_172_800))
    (oom,) = _mark(chart, "oom").points
    assert oom[0] == 1634 and cap < oom[1] < chart.y.hi  # drawn just above the capacity
    assert _mark(chart, "capacity").y == cap
    rec = _mark(chart, "recommended")
    assert (rec.x, rec.y0, rec.y1) == (1304, chart.y.lo, cap)
    head = _mark(chart, "headroom")
    assert (head.y0, head.y1, head.label) == (2_576_000_000, cap, "headroom 0.60 GiB")
    # the prediction's line is intercept + slope x batch, across the whole axis
    (x0, y0), (x1, y1) = _mark(chart, "predicted").points
    assert (x0, y0) == (0, 17_900_000) and x1 == chart.x.hi and y1 == pytest.approx(17_900_000 + 1_960_000 * x1)
    assert chart.x.lo == 0 and chart.x.hi > 1634 and chart.y.hi > cap


def test_batch_figure_draws_points_lines_axes_and_legend():
    result = find_batch_result()
    fig = figure(batch_chart(result))
    ax = fig.axes[0]
    fits = _artist(fig, "fits")
    assert list(fits.get_xdata()) == [1470, 1633] and fits.get_marker() == "o" and fits.get_linestyle() == "None"
    assert list(fits.get_ydata()) == [2_899_102_720, 3_220_172_800]
    oom = _artist(fig, "oom")
    assert list(oom.get_xdata()) == [1634] and oom.get_marker() == "x"
    assert list(_artist(fig, "capacity").get_ydata()) == [3 * GiB, 3 * GiB]
    assert _artist(fig, "predicted").get_linestyle() == "--"
    assert ax.get_xlabel() == "batch size" and ax.get_ylabel() == "peak live tensor bytes"
    assert ax.get_title() == "resnet18: peak live tensor bytes vs batch size"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 GiB", "1 GiB", "2 GiB", "3 GiB"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "500", "1000", "1500"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "measured (fits)",
        "out of memory",
        "capacity 3.0 GiB",
        "predicted (traced)",
        "measured fit",
        "recommended batch 1304",
        "headroom 0.60 GiB",
    ]


def test_batch_svg_structure():
    text = svg_text(batch_chart(find_batch_result()))
    groups = _svg_groups(text)
    for gid in ("fits", "oom", "capacity", "predicted", "measured-fit", "recommended", "headroom"):
        assert gid in groups, gid
    # one marker per measured point (matplotlib draws markers as <use> of one path)
    assert len(list(groups["fits"].iter(f"{SVG}use"))) == 2
    assert len(list(groups["oom"].iter(f"{SVG}use"))) == 1
    texts = _svg_texts(text)
    assert "batch size" in texts and "3 GiB" in texts and "recommended batch 1304" in texts
    assert "resnet18: peak live tensor bytes vs batch size" in texts
    assert "<dc:date>" not in text  # no timestamp: the same chart gives the same file


def test_batch_terminal_chart():
    text = terminal(batch_chart(find_batch_result())).plain
    rows = text.splitlines()
    assert rows[1].startswith("   3.0 GiB |====") and rows[1].count("o") == 1  # the batch at the capacity
    assert rows[0].strip().startswith("3.4 GiB |") and "x" in rows[0]  # the OOM above it
    assert "0                    batch size                     1765" in text
    assert "| recommended batch 1304" in text and "o measured (fits)" in text
    assert "measured fit" not in text  # a mark without a glyph stays out of the terminal
    assert max(len(r) for r in rows) <= 80


# --------------------------------------------------------------------------- compare: bars
def test_compare_chart_bars_sum_to_the_peak():
    result = golden_result()
    chart = compare_chart(result)
    traced = [r for r in result.rows if r.error is None]
    assert [b.label for b in chart.bars] == [r.label for r in traced]
    assert [s.label for s in chart.segments] == ["Parameter", "Gradient", "Optimizer state", "Activation", "Temporary"]
    for bar, row in zip(chart.bars, traced, strict=True):
        assert sum(bar.values) == bar.total == row.peak_bytes
        assert bar.highlight == row.best


def test_compare_figure_stacks_the_segments():
    chart = compare_chart(golden_result())
    fig = figure(chart)
    ax = fig.axes[0]
    for j, bar in enumerate(chart.bars):
        rects = [_artist(fig, f"bar-{j}-segment-{i}") for i in range(len(chart.segments))]
        assert [r.get_width() for r in rects] == list(bar.values), bar.label
        assert [r.get_x() for r in rects] == [sum(bar.values[:i]) for i in range(len(bar.values))]  # stacked
        assert {r.get_facecolor() for r in rects} == {to_rgba(s.color) for s in chart.segments}
        assert len({r.get_y() for r in rects}) == 1
    # the first configuration is the top bar
    assert _artist(fig, "bar-0-segment-0").get_y() > _artist(fig, "bar-3-segment-0").get_y()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[::-1] == ["fp32 (baseline)", "★ fp16", "checkpointing blocks", "amp-fp16"]
    assert [_artist(fig, f"total-{i}").get_text().strip() for i in range(4)] == [
        format_bytes(b.total) for b in chart.bars
    ]
    assert ax.get_xlabel() == "memory at the peak: torch.cuda.max_memory_allocated()"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [s.label for s in chart.segments]


# --------------------------------------------------------------------------- profile: timeline
def test_timeline_marks_the_peak():
    result = profile_result()
    chart = timeline_chart(result)
    alloc = _mark(chart, "allocated")
    assert alloc.step and alloc.points == ((0.0, 0.0), (1.25, 14 * MiB), (2.5, 8 * MiB))
    peak = _mark(chart, "peak")
    assert peak.points == ((1.25, 14 * MiB),) and peak.label == "peak 14.0 MiB at train.py:31 (backward)"
    fig = figure(chart)
    line = _artist(fig, "allocated")
    assert line.get_drawstyle() == "steps-post" and list(line.get_xdata()) == [0.0, 1.25, 2.5]
    assert list(_artist(fig, "peak").get_ydata()) == [14 * MiB]
    assert list(_artist(fig, "peak-time").get_xdata()) == [1.25, 1.25]
    assert fig.axes[0].get_xlabel() == "time since the script started"
    text = svg_text(chart)
    assert "peak 14.0 MiB at train.py:31 (backward)" in _svg_texts(text)
    assert {"allocated", "peak", "peak-time"} <= set(_svg_groups(text))


def test_timeline_downsampling_keeps_the_peak():
    n = 20_000
    t = [i / 1000 for i in range(n)]
    allocated = [1000 + (i % 7) for i in range(n)]
    allocated[12_345] = 5 * MiB  # one spike, between any two kept buckets
    result = replace(profile_result(), _timeline={"t": t, "allocated": allocated})
    chart = timeline_chart(result, max_points=500)
    points = _mark(chart, "allocated").points
    assert len(points) == 500 and max(v for _, v in points) == 5 * MiB
    # the terminal keeps it too: a step line shows the highest point inside each column
    rows = terminal(replace(chart, marks=(_mark(chart, "allocated"),), y=Axis("", 0, 6 * MiB, "bytes"))).plain
    assert any("." in r for r in rows.splitlines()[:3])


def test_timeline_shows_cuda_series_from_samples():
    from memprof.results import TimelineSample

    samples = (TimelineSample(0.0, 0, 2 * MiB, 500 * MiB), TimelineSample(1.0, 14 * MiB, 20 * MiB, 520 * MiB))
    chart = timeline_chart(replace(profile_result(cuda=True), timeline=samples))
    assert _mark(chart, "reserved").points == ((0.0, 2 * MiB), (1.0, 20 * MiB))
    assert _mark(chart, "nvml").points == ((0.0, 500 * MiB), (1.0, 520 * MiB))
    assert chart.y.hi >= 520 * MiB


# --------------------------------------------------------------------------- estimate --grid
def _grid_result():
    from types import SimpleNamespace

    from memprof.engine.fit import GridFit

    # largest batch at 128 / 512 / 2,048 / 8,192 tokens: all 7 columns, 32, 4 and none
    grid = GridFit(GiB, "reserved", (1, 2, 4, 8, 16, 32, 64), (128, 512, 2048, 8192), (64, 32, 4, None), 5)
    return SimpleNamespace(grid=grid, workload={"model": "hf:org/tiny"})


def test_grid_chart_cells_and_boundary():
    chart = grid_chart(_grid_result())
    assert [sum(row) for row in chart.cells] == [7, 6, 3, 0] and chart.row_notes == ("64+", "32", "4", "none")
    assert chart.title == "hf:org/tiny: batch size x sequence length that fit"
    fig = figure(chart)
    boundary = _artist(fig, "boundary")
    assert list(boundary.get_xdata()) == [6.5, 6.5, 5.5, 5.5, 2.5, 2.5, -0.5, -0.5]  # after each row's last fit
    assert list(boundary.get_ydata()) == [-0.5, 0.5, 0.5, 1.5, 1.5, 2.5, 2.5, 3.5]
    text = svg_text(chart)
    groups = _svg_groups(text)
    assert sum(g.endswith("-yes") for g in groups) == 16 and sum(g.endswith("-no") for g in groups) == 12
    assert "cell-1-5-yes" in groups and "cell-1-6-no" in groups
    texts = _svg_texts(text)
    assert "batch size" in texts and "2,048" in texts and "64" in texts
    assert any("fits 1.00 GiB (reserved)" in t for t in texts)


def test_grid_terminal_chart():
    assert terminal(grid_chart(_grid_result())).plain.splitlines() == [
        "            1  2  4  8 16 32 64   largest batch",
        "      128   █  █  █  █  █  █  █   64+",
        "      512   █  █  █  █  █  █│ ·   32",
        "    2,048   █  █  █│ ·  ·  ·  ·   4",
        "    8,192   ·  ·  ·  ·  ·  ·  ·   none",
    ]


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_files_are_deterministic(tmp_path, suffix, magic):
    for chart in (batch_chart(find_batch_result()), grid_chart(_grid_result())):
        a, b = write(chart, tmp_path / f"a{suffix}"), write(chart, tmp_path / f"b{suffix}")
        assert a.read_bytes().startswith(magic) and a.read_bytes() == b.read_bytes()


def test_html_holds_the_svg_inline(tmp_path):
    page = write(compare_chart(golden_result()), tmp_path / "x.html", page="<p>below</p>").read_text()
    assert page.startswith("<!doctype html>") and "<?xml" not in page and "<svg" in page
    assert page.index("</svg>") < page.index("<p>below</p>") < page.index("</body>")


def test_plot_path_checks(monkeypatch):
    with pytest.raises(UsageError, match="unknown format .gif"):
        check_plot_path(Path("x.gif"))
    check_plot_path(Path("x.PDF"))
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match="matplotlib"):
        check_plot_path(Path("x.svg"))


# --------------------------------------------------------------------------- a new chart
def test_a_new_chart_is_a_spec():
    """How another command adds a chart (here: peak vs world size): build the spec, both backends draw it."""
    cap = 80 * GiB
    peaks = ((1, 90 * GiB), (2, 52 * GiB), (4, 33 * GiB), (8, 24 * GiB))
    chart = XYChart(
        "llama-7b: peak per GPU vs world size",
        Axis("GPUs", 0, 9, "count"),
        Axis("peak per GPU", 0, 100 * GiB, "bytes"),
        (
            Line("predicted", peaks, "predicted (FSDP)", style="dashed", glyph="."),
            Points("fits", tuple(p for p in peaks if p[1] <= cap), "fits", "#27ae60"),
            Points("oom", tuple(p for p in peaks if p[1] > cap), "out of memory", "#c0392b", "x", "x"),
            HLine("capacity", cap, "capacity 80.0 GiB"),
            VLine("smallest", 2, "fewest GPUs: 2", y0=0, y1=cap),
        ),
    )
    fig = figure(chart)
    assert list(_artist(fig, "fits").get_xdata()) == [2, 4, 8] and list(_artist(fig, "oom").get_xdata()) == [1]
    assert "fewest GPUs: 2" in _svg_texts(svg_text(chart))
    text = terminal(chart).plain
    assert "x out of memory" in text and "= capacity 80.0 GiB" in text and "GPUs" in text
