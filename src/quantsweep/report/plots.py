"""Size-vs-quality and speed-vs-quality figures of the summary rows, and reading their points back.

One figure per metric (`METRICS`): a row of two panels per model (file size in GiB, bits per
weight); and `plot_speed`: one panel per model, mean KLD against TG tokens/s at the bench's
headline depth. Every plotted point carries a gid `point|<model>|<quant>|<x column>` and every
PNG carries its points as a `quantsweep-points` text chunk, so tests can compare the drawing
with the table. Auto recipes (allocated for a size budget) are drawn as diamonds, every other
quant as a circle. matplotlib is imported only when a figure is made.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..fileio import partial_path
from .gate import METRICS, SPEED_TAG, Gate, Metric, models_of, quant_rows, smallest_passing
from .speed import brief_host
from ..settings import BASE_REFERENCE
from .table import ModelInfo, Row, has_speed

PNG_POINTS_KEY = "quantsweep-points"
X_AXES = (("size_gib", "file size (GiB)"), ("bpw", "bits per weight"))

_PASS, _FAIL, _NOGATE, _FRONT, _GATE, _BEST = "#2a9d55", "#c0392b", "#2b6cb0", "#1f2d3d", "#c0392b", "#e69500"
_REF = "0.45"
_MARKER, _AUTO_MARKER = "o", "D"  # a quant, an auto recipe


def _marker(r: Row) -> str:
    return _AUTO_MARKER if r.auto == "yes" else _MARKER


def _any_auto(rows: list[Row]) -> bool:
    return any(r.auto == "yes" and not r.is_reference for r in rows)


def _yscale(ax, ys: list[float]) -> None:
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    else:
        # linear only within the smallest |value| (rounded down to 1, 2 or 5 × 10^k): no empty decades
        nz = [abs(y) for y in ys if y != 0]
        lin = 1e-3
        if nz:
            p = 10 ** math.floor(math.log10(min(nz)))
            lin = max(f * p for f in (1, 2, 5) if f * p <= min(nz))
        ax.set_yscale("symlog", linthresh=lin)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


_CANDIDATES = [(7, 4, "left", "bottom"), (7, -4, "left", "top"), (-7, 4, "right", "bottom"),
               (-7, -4, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
               (10, 0, "left", "center"), (-10, 0, "right", "center"), (16, 14, "left", "bottom"),
               (16, -14, "left", "top"), (-16, 14, "right", "bottom"), (-16, -14, "right", "top"),
               (0, 22, "center", "bottom"), (0, -22, "center", "top"), (26, 24, "left", "bottom"),
               (-26, -24, "right", "top"), (26, -24, "left", "top"), (-26, 24, "right", "bottom")]


def _line_boxes(ax, xy: list[tuple[float, float]], half: float):
    """Thin display-space boxes along a polyline given in data coordinates (for label avoidance)."""
    from matplotlib.transforms import Bbox

    pts = [ax.transData.transform(p) for p in xy]
    return [Bbox.from_extents(min(a[0], b[0]) - half, min(a[1], b[1]) - half, max(a[0], b[0]) + half,
                              max(a[1], b[1]) + half) for a, b in zip(pts, pts[1:])]


def _place_labels(ax, items: list[tuple[float, float, str, bool]], renderer, lines=()) -> None:
    """Greedy label placement: for each (x, y, text, bold), the first candidate offset whose
    box overlaps no placed label, no other marker, no drawn line (`lines`: display boxes) and
    stays inside the axes; else the least bad one."""
    from matplotlib.transforms import Bbox

    px = ax.figure.dpi / 72.0
    marks = [ax.transData.transform((x, y)) for x, y, _, _ in items]
    mboxes = [Bbox.from_bounds(mx - 5 * px, my - 5 * px, 10 * px, 10 * px) for mx, my in marks]
    frame = ax.get_window_extent(renderer)
    placed = []
    for k, (x, y, text, bold) in enumerate(items):
        best = None
        for dx, dy, ha, va in _CANDIDATES:
            far = abs(dx) > 12 or abs(dy) > 12
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=8.5, fontweight="bold" if bold else "normal",
                            color=_FRONT if bold else "0.25", zorder=5,
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.55", "shrinkA": 0, "shrinkB": 4}
                            if far else None)
            t.set_in_layout(False)
            bb = t.get_window_extent(renderer)
            cost = sum(_overlap(bb, p) for p in placed)
            cost += sum(_overlap(bb, m) for j, m in enumerate(mboxes) if j != k)
            cost += 0.5 * sum(_overlap(bb, b) for b in lines)
            inside = _overlap(bb, frame)
            cost += 10 * (bb.width * bb.height - inside)
            cost += 0.01 * (abs(dx) + abs(dy))  # prefer near positions among equals
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, bb)
            else:
                t.remove()
            if cost < 1:
                break
        placed.append(best[2])


@dataclass
class _ModelPlot:
    """What every panel of one model draws."""

    model: str
    quants: list[Row]  # quant rows with a value of the metric
    best: Row | None  # smallest passing
    reference: str  # for the title: the reference's name, size and bpw


def _model_plot(rows: list[Row], model: str, m: Metric, info: ModelInfo | None) -> _ModelPlot:
    qs = [r for r in quant_rows(rows, model) if getattr(r, m.column) is not None]
    ref = next((r for r in rows if r.model == model and r.is_reference), None)
    reftxt = (info.reference if info else (ref.reference if ref else BASE_REFERENCE))
    refsize = f", {ref.size_gib:.4g} GiB, {ref.bpw:.2f} bpw" if ref is not None and ref.bpw else ""
    return _ModelPlot(model, qs, smallest_passing(rows, model), reftxt + refsize)


def _draw_points(ax, model: str, pts: list[Row], xcol: str, ycol: str) -> None:
    """One marker per row with its gid; filled when it passes the gate, hollow when it fails; a
    diamond for an auto recipe, so an allocated recipe stands out among the fixed ones."""
    for r in pts:
        color = _NOGATE if not r.gate else (_PASS if r.gate == "pass" else _FAIL)
        face = "white" if r.gate == "fail" else color
        ax.scatter([getattr(r, xcol)], [getattr(r, ycol)], s=46, marker=_marker(r), facecolors=face, edgecolors=color,
                   linewidths=1.6, zorder=4, gid=f"point|{model}|{r.quant}|{xcol}")


def _draw_front(ax, model: str, front: list[Row], xcol: str, ycol: str, drawstyle: str) -> None:
    """The front as a staircase: steps-post when smaller x is better, steps-pre when larger x is."""
    if front:
        ax.plot([getattr(r, xcol) for r in front], [getattr(r, ycol) for r in front], drawstyle=drawstyle,
                color=_FRONT, lw=1.3, alpha=0.75, zorder=2, gid=f"front|{model}|{xcol}")


def _draw_gate_y(ax, y: float | None, text: str) -> None:
    if y is not None:
        ax.axhline(y, color=_GATE, ls="--", lw=1.1, zorder=1, gid="gate")
        ax.annotate(f"gate: {text}", (1, y), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=8, color=_GATE).set_in_layout(False)


def _draw_best(ax, best: Row | None, xcol: str, ycol: str) -> None:
    if best is not None and getattr(best, xcol) is not None and getattr(best, ycol) is not None:
        ax.scatter([getattr(best, xcol)], [getattr(best, ycol)], s=260, facecolors="none",
                   edgecolors=_BEST, linewidths=2.2, zorder=3)


def _draw_marks(ax, mp: _ModelPlot, pts: list[Row], m: Metric, xcol: str, gate: Gate,
                gate_y: float | None) -> list[Row]:
    """The points, the Pareto staircase, the gate line and the smallest-passing ring; returns the front."""
    _draw_points(ax, mp.model, pts, xcol, m.column)
    front = sorted((r for r in pts if m.tag in r.pareto.split("+")), key=lambda r: (r.size_bytes, r.quant))
    _draw_front(ax, mp.model, front, xcol, m.column, "steps-post")
    _draw_gate_y(ax, gate_y, gate.describe(m.key))
    _draw_best(ax, mp.best, xcol, m.column)
    return front


def _draw_frame(ax, mp: _ModelPlot, pts: list[Row], m: Metric, xcol: str, xlabel: str,
                gate_y: float | None) -> None:
    """Freeze the view, then the error bars, the failing side of the gate, grid, labels and title."""
    ax.margins(x=0.1, y=0.15)
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())  # frozen: error bars and shading do not move the view
    for r in pts:  # ± one standard error; clipped by the axes (on a log axis, down to its bottom)
        x, y, err = getattr(r, xcol), getattr(r, m.column), getattr(r, m.err)
        if err:
            ax.errorbar([x], [y], yerr=[[err], [err]], fmt="none", ecolor="0.65", elinewidth=0.9, zorder=3)
    if gate_y is not None:
        ax.axhspan(gate_y, ax.get_ylim()[1], color=_GATE, alpha=0.045, lw=0, zorder=0)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(m.label)
    ax.set_title(f"{mp.model}: {m.short} vs {xlabel}   (reference: {mp.reference})", fontsize=10)


def _draw_panel(ax, mp: _ModelPlot, m: Metric, xcol: str, xlabel: str, gate: Gate,
                gate_y: float | None) -> list[tuple[float, float, str, bool]]:
    """One panel; returns its labels (x, y, quant, on the front), front first, to place later."""
    pts = [r for r in mp.quants if getattr(r, xcol) is not None]
    ys = [getattr(r, m.column) for r in pts]
    _yscale(ax, ys + ([gate_y] if gate_y else []))
    front = _draw_marks(ax, mp, pts, m, xcol, gate, gate_y)
    _draw_frame(ax, mp, pts, m, xcol, xlabel, gate_y)
    on_front = {id(r) for r in front}
    return [(getattr(r, xcol), getattr(r, m.column), r.quant, id(r) in on_front) for r in
            sorted(pts, key=lambda r: (id(r) not in on_front, r.size_bytes))]


def _legend(ax, gate: Gate, front: str = "Pareto front (size vs this metric)", reference: bool = False,
            loc: str = "upper right", auto: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_FRONT, lw=1.3, label=front)]
    if reference:
        handles.append(Line2D([], [], color=_REF, ls=":", lw=1.1, label="reference's speed"))
    if gate.active:
        handles += [
            Line2D([], [], ls="", marker="o", color=_PASS, label="passes gate"),
            Line2D([], [], ls="", marker="o", mfc="white", mec=_FAIL, mew=1.6, label="fails gate"),
            Line2D([], [], ls="--", color=_GATE, label="gate"),
            Line2D([], [], ls="", marker="o", ms=15, mfc="none", mec=_BEST, mew=2.2, label="smallest passing"),
        ]
    else:
        handles.append(Line2D([], [], ls="", marker="o", color=_NOGATE, label="quant (no gate configured)"))
    if auto:
        handles.append(Line2D([], [], ls="", marker=_AUTO_MARKER, mfc="none", mec="0.3", mew=1.6,
                              label="auto recipe (allocated for a budget)"))
    ax.legend(handles=handles, loc=loc, fontsize=8.5, framealpha=0.9)


def _line_obstacles(ax, px: float) -> list:
    """Display boxes along the panel's front staircase and gate line, for label avoidance."""
    boxes = []
    for line in ax.lines:
        gid = line.get_gid() or ""
        if gid.startswith("front|"):
            xy = [tuple(p) for p in line.get_xydata()]
            pre = line.get_drawstyle() == "steps-pre"
            steps = [q for a, b in zip(xy, xy[1:]) for q in (a, (a[0], b[1]) if pre else (b[0], a[1]))] + xy[-1:]
            boxes += _line_boxes(ax, steps, 2 * px)
        elif gid == "gate":
            y = line.get_ydata()[0]
            boxes += _line_boxes(ax, [(ax.get_xlim()[0], y), (ax.get_xlim()[1], y)], 2 * px)
        elif gid == "gate|x" or gid.startswith("reference|"):
            x = line.get_xdata()[0]
            boxes += _line_boxes(ax, [(x, ax.get_ylim()[0]), (x, ax.get_ylim()[1])], 2 * px)
    return boxes


def _label_panels(fig, labels: list) -> None:
    """Place every panel's labels once the layout is final (label boxes measured where they end up)."""
    fig.draw_without_rendering()  # runs the layout
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    for ax, items in labels:
        _place_labels(ax, items, renderer, _line_obstacles(ax, px))


def plot_metric(rows: list[Row], metric: str, gate: Gate, infos: list[ModelInfo] | None = None):
    """One figure: a row of two panels per model (file size in GiB, bits per weight) against the
    metric; reference rows are not plotted (they are the zero of every axis), the Pareto front
    (from the rows' `pareto` column) is drawn as a staircase and labelled in bold, the gate is a
    dashed line, passing quants are filled and failing ones hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = METRICS[metric]
    models = models_of(rows)
    by_model = {i.model: i for i in infos or []}
    fig = Figure(figsize=(14, 5.8 * len(models) + 0.6), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), len(X_AXES), squeeze=False)
    gate_y = gate.max_kld if metric == "kld" else gate.max_ln_ppl_ratio
    labels = []
    for mi, model in enumerate(models):
        mp = _model_plot(rows, model, m, by_model.get(model))
        for ai, (xcol, xlabel) in enumerate(X_AXES):
            labels.append((axes[mi][ai], _draw_panel(axes[mi][ai], mp, m, xcol, xlabel, gate, gate_y)))
    _legend(axes[0][-1], gate, auto=_any_auto(rows))
    ev = next(iter(by_model.values())).describe_eval() if len(by_model) == 1 else ""
    fig.suptitle(f"Quant size vs {m.short}" + (f"   ·   eval: {ev}" if ev else ""), fontsize=11)
    _label_panels(fig, labels)
    return fig


def _speed_marks(ax, rows: list[Row], model: str, pts: list[Row], gate: Gate) -> list[Row]:
    """Points with min..max bars, the speed front (slowest first), the gate's KLD and TG limits,
    the reference's speed as a dotted vertical line and the smallest-passing ring; returns the front."""
    _draw_points(ax, model, pts, "tg_tps", "kld_mean")
    for r in pts:
        if r.tg_tps_min is not None and r.tg_tps_max is not None:
            ax.errorbar([r.tg_tps], [r.kld_mean], xerr=[[r.tg_tps - r.tg_tps_min], [r.tg_tps_max - r.tg_tps]],
                        fmt="none", ecolor="0.6", elinewidth=0.9, capsize=2.5, zorder=3)
    front = sorted((r for r in pts if SPEED_TAG in r.pareto.split("+")), key=lambda r: (r.tg_tps, r.kld_mean))
    _draw_front(ax, model, front, "tg_tps", "kld_mean", "steps-pre")
    _draw_gate_y(ax, gate.max_kld, gate.describe("kld"))
    vlines = [(gate.min_tg_tps, "gate|x", _GATE, "--", f"gate: {gate.describe('tg')}")]
    ref = next((r for r in rows if r.model == model and r.is_reference), None)
    if ref is not None:
        vlines.append((ref.tg_tps, f"reference|{model}|tg_tps", _REF, ":", f"reference ({ref.quant})"))
    for x, gid, color, ls, text in vlines:
        if x is not None:
            ax.axvline(x, color=color, ls=ls, lw=1.1, zorder=1, gid=gid)
            ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -4), textcoords="offset points",
                        ha="left", va="top", rotation=90, fontsize=8, color=color).set_in_layout(False)
    _draw_best(ax, smallest_passing(rows, model), "tg_tps", "kld_mean")
    return front


def _speed_panel(ax, rows: list[Row], model: str, gate: Gate, info: ModelInfo | None,
                 xlabel: str) -> list[tuple[float, float, str, bool]]:
    """One model's panel (mean KLD vs TG t/s); returns its labels, front first, to place later."""
    pts = [r for r in quant_rows(rows, model) if r.tg_tps is not None and r.kld_mean is not None]
    _yscale(ax, [r.kld_mean for r in pts] + ([gate.max_kld] if gate.max_kld else []))
    front = _speed_marks(ax, rows, model, pts, gate)
    ax.margins(x=0.08, y=0.15)
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())  # frozen: the shading does not move the view
    if gate.max_kld is not None:
        ax.axhspan(gate.max_kld, ax.get_ylim()[1], color=_GATE, alpha=0.045, lw=0, zorder=0)
    if gate.min_tg_tps is not None:
        ax.axvspan(ax.get_xlim()[0], gate.min_tg_tps, color=_GATE, alpha=0.045, lw=0, zorder=0)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KLD against the reference")
    ax.set_title(f"{model}: mean KLD vs generation speed   (reference: "
                 f"{info.reference if info else BASE_REFERENCE})", fontsize=10)
    on_front = {id(r) for r in front}
    return [(r.tg_tps, r.kld_mean, r.quant, id(r) in on_front) for r in
            sorted(pts, key=lambda r: (id(r) not in on_front, -r.tg_tps))]


def _no_speed_figure():
    """What the speed plot shows when no row has a bench record (the workflow still lists the PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.4), dpi=100)
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, "No speed data: no row of this report has a bench record\n"
             "(the sweep ran without the bench step: bench.enabled: false).", ha="center", va="center", fontsize=11)
    return fig


def plot_speed(rows: list[Row], gate: Gate, infos: list[ModelInfo] | None = None):
    """One panel per model: mean KLD against TG tokens/s at the bench's headline depth, the runs'
    min..max as bars; the `speed` Pareto front (from the rows' `pareto` column) as a staircase,
    labelled in bold; the gate's KLD and TG limits dashed; the reference's speed as a dotted line
    (its KLD is zero by definition, so it is not a point). Rows without a speed or a KLD are not
    drawn; without any speed the figure says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not has_speed(rows):
        return _no_speed_figure()
    models = models_of(rows)
    by_model = {i.model: i for i in infos or []}
    benches = [b for i in infos or [] for b in i.benches]
    fig = Figure(figsize=(11, 5.8 * len(models) + 0.6), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), 1, squeeze=False)
    depth = f"depth {benches[0].speed[0].depth}" if benches else "the headline depth"
    xlabel = f"TG tokens/s at {depth} (median; bars: min to max of the runs)"
    labels = [(axes[mi][0], _speed_panel(axes[mi][0], rows, model, gate, by_model.get(model), xlabel))
              for mi, model in enumerate(models)]
    refs = any(r.is_reference and r.tg_tps is not None for r in rows)
    _legend(axes[0][0], gate, "Pareto front (speed vs mean KLD)", reference=refs, loc="best",
            auto=_any_auto([r for r in rows if r.tg_tps is not None]))
    host = brief_host(benches)
    fig.suptitle(f"Mean KLD vs generation speed (TG at {depth})" + (f"   ·   host {host}" if host else ""), fontsize=11)
    _label_panels(fig, labels)
    return fig


def plotted_points(fig) -> list[dict]:
    """The drawn points, read back from the figure's artists: model, quant, x column, x, y."""
    out = []
    for ax in fig.axes:
        for c in ax.collections:
            gid = c.get_gid() or ""
            if gid.startswith("point|"):
                _, model, quant, xcol = gid.split("|")
                for x, y in c.get_offsets():
                    out.append({"model": model, "quant": quant, "x_col": xcol, "x": float(x), "y": float(y)})
    return out


def plotted_fronts(fig) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(model, x column) -> the front staircase's vertices as drawn."""
    out = {}
    for ax in fig.axes:
        for line in ax.lines:
            gid = line.get_gid() or ""
            if gid.startswith("front|"):
                _, model, xcol = gid.split("|")
                out[(model, xcol)] = [(float(x), float(y)) for x, y in line.get_xydata()]
    return out


def save_png(fig, path: str | Path, key: str, drawn: list[dict]) -> list[dict]:
    """Write the PNG with what it draws (JSON) in its text chunk `key`, so a test can compare the
    picture with the records; returns `drawn`."""
    with partial_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={key: json.dumps(drawn)})
    return drawn


def png_chunk(path: str | Path, key: str) -> list[dict]:
    """What a PNG written by save_png says it draws."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text[key])


def save_figure(fig, path: str | Path) -> list[dict]:
    """Write the PNG with its plotted points in a text chunk; returns those points."""
    return save_png(fig, path, PNG_POINTS_KEY, plotted_points(fig))


def png_points(path: str | Path) -> list[dict]:
    """The points a PNG written by save_figure says it shows."""
    return png_chunk(path, PNG_POINTS_KEY)
