"""The sweep's report: quality gate, Pareto fronts, plots and a self-contained HTML page.

Pure functions over summary rows (quantsweep.summary.Row); `write_report` ties them together
for the workflow's `report` rule. The plots and the HTML are made from summary.csv as written
(re-read from disk), so what is drawn is what the table says; every plotted point carries a gid
`point|<model>|<quant>|<x column>` and every PNG carries its points as a `quantsweep-points`
text chunk, so tests can compare the drawing with the table.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .fileio import partial_path, write_text
from .summary import (BASE_REFERENCE, DISPLAY, ModelInfo, Row, display_cells, load_entries, manifest_links,
                      read_rows, to_csv, to_markdown)

PNG_POINTS_KEY = "quantsweep-points"


# ---------------------------------------------------------------------------------------------
# gate and Pareto front


@dataclass(frozen=True)
class Gate:
    """Limits a quant must meet against its model's reference; None = not checked."""

    max_dppl_pct: float | None = None
    max_kld: float | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "Gate":
        d = d or {}
        return cls(d.get("max_dppl_pct"), d.get("max_kld"))

    @property
    def active(self) -> bool:
        return self.max_dppl_pct is not None or self.max_kld is not None

    @property
    def max_ln_ppl_ratio(self) -> float | None:
        """The ΔPPL limit on the ln(PPL(Q)/PPL(ref)) axis."""
        return None if self.max_dppl_pct is None else math.log1p(self.max_dppl_pct / 100.0)

    def describe(self, only: str | None = None) -> str:
        """The limits in words; only='lnppl' or 'kld' names just the one a plot's axis shows."""
        parts = []
        if self.max_dppl_pct is not None and only in (None, "lnppl"):
            parts.append(f"ΔPPL ≤ {self.max_dppl_pct:g} %")
        if self.max_kld is not None and only in (None, "kld"):
            parts.append(f"mean KLD ≤ {self.max_kld:g}")
        return " and ".join(parts) if parts else "none configured"


def gate_verdict(row: Row, gate: Gate) -> str:
    """'pass' / 'fail' for a quant; '' for the reference row or when no gate is configured."""
    if row.is_reference or not gate.active:
        return ""
    ok = True
    if gate.max_dppl_pct is not None:
        ok = ok and row.dppl_pct <= gate.max_dppl_pct
    if gate.max_kld is not None:
        ok = ok and row.kld_mean is not None and row.kld_mean <= gate.max_kld
    return "pass" if ok else "fail"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (smaller is better on both axes), by x.

    A point is dominated when another is at most as large on both axes and smaller on one;
    identical points do not dominate each other."""
    front = []
    for i, (xi, yi) in enumerate(points):
        if not any(xj <= xi and yj <= yi and (xj < xi or yj < yi) for j, (xj, yj) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


@dataclass(frozen=True)
class Metric:
    key: str  # file stem part and plot id
    column: str  # Row attribute on the y axis
    err: str  # its standard error
    label: str  # y axis label
    short: str  # in titles
    tag: str  # what the `pareto` column says for this metric's front


METRICS = {
    "lnppl": Metric("lnppl", "ln_ppl_ratio", "ln_ppl_ratio_err", "ln(PPL(Q) / PPL(ref))", "ln(PPL(Q)/PPL(ref))", "ppl"),
    "kld": Metric("kld", "kld_mean", "kld_err", "mean KLD against the reference", "mean KLD", "kld"),
}
# Pareto fronts use the file size; the bpw panels show the same points against the engine's bpw.
SIZE = "size_bytes"
X_AXES = (("size_gib", "file size (GiB)"), ("bpw", "bits per weight"))


def models_of(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.model for r in rows))


def quant_rows(rows: list[Row], model: str) -> list[Row]:
    return [r for r in rows if r.model == model and not r.is_reference]


def annotate(rows: list[Row], gate: Gate) -> list[Row]:
    """Fill each row's `gate` and `pareto` (e.g. 'ppl+kld') columns, per model; returns rows."""
    for r in rows:
        r.gate = gate_verdict(r, gate)
        r.pareto = ""
    for model in models_of(rows):
        qs = quant_rows(rows, model)
        for m in METRICS.values():
            have = [r for r in qs if getattr(r, m.column) is not None]
            for i in pareto_front([(getattr(r, SIZE), getattr(r, m.column)) for r in have]):
                have[i].pareto = "+".join(t for t in (have[i].pareto, m.tag) if t)
    return rows


def smallest_passing(rows: list[Row], model: str) -> Row | None:
    """The smallest file among the model's quants that pass the gate (None: none passes)."""
    passing = [r for r in quant_rows(rows, model) if r.gate == "pass"]
    return min(passing, key=lambda r: (r.size_bytes, r.quant)) if passing else None


def _describe_row(r: Row) -> str:
    bits = [f"{r.size_gib:.4g} GiB"]
    if r.bpw is not None:
        bits.append(f"{r.bpw:.3f} bpw")
    bits.append(f"ΔPPL {r.dppl_pct:.3f} %")
    if r.kld_mean is not None:
        bits.append(f"mean KLD {r.kld_mean:.6f}")
    return ", ".join(bits)


def notes(rows: list[Row], infos: list[ModelInfo], gate: Gate) -> list[str]:
    """Markdown lines above the table: reference, evaluation settings, gate and verdict per model."""
    out = ["# quantsweep summary", ""]
    out.append(f"Quality gate: {gate.describe()}" + (" (against each model's reference)." if gate.active else "."))
    out.append("")
    by_model = {i.model: i for i in infos}
    for model in models_of(rows):
        info = by_model.get(model)
        out.append(f"- **{model}**")
        if info:
            out.append(f"  - reference: {info.describe_reference()}")
            out.append(f"  - evaluation: {info.describe_eval()}")
        out.append(f"  - {verdict_text(rows, model, gate)}")
    return out


def verdict_text(rows: list[Row], model: str, gate: Gate) -> str:
    if not gate.active:
        return "no quality gate configured"
    best = smallest_passing(rows, model)
    if best is None:
        return f"no quant passes the gate ({gate.describe()})"
    return f"smallest passing quant: **{best.quant}** ({_describe_row(best)})"


# ---------------------------------------------------------------------------------------------
# plots

_PASS, _FAIL, _NOGATE, _FRONT, _GATE, _BEST = "#2a9d55", "#c0392b", "#2b6cb0", "#1f2d3d", "#c0392b", "#e69500"


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


def plot_metric(rows: list[Row], metric: str, gate: Gate, infos: list[ModelInfo] | None = None):
    """One figure: a row of two panels per model (file size in GiB, bits per weight) against the
    metric; reference rows are not plotted (they are the zero of every axis), the Pareto front
    (from the rows' `pareto` column) is drawn as a staircase and labelled in bold, the gate is a
    dashed line, passing quants are filled and failing ones hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    m = METRICS[metric]
    models = models_of(rows)
    by_model = {i.model: i for i in infos or []}
    fig = Figure(figsize=(14, 5.8 * len(models) + 0.6), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), len(X_AXES), squeeze=False)
    gate_y = gate.max_kld if metric == "kld" else gate.max_ln_ppl_ratio
    labels = []
    for mi, model in enumerate(models):
        qs = [r for r in quant_rows(rows, model) if getattr(r, m.column) is not None]
        best = smallest_passing(rows, model)
        ref = next((r for r in rows if r.model == model and r.is_reference), None)
        for ai, (xcol, xlabel) in enumerate(X_AXES):
            ax = axes[mi][ai]
            pts = [r for r in qs if getattr(r, xcol) is not None]
            ys = [getattr(r, m.column) for r in pts]
            _yscale(ax, ys + ([gate_y] if gate_y else []))
            for r in pts:
                x, y = getattr(r, xcol), getattr(r, m.column)
                color = _NOGATE if not r.gate else (_PASS if r.gate == "pass" else _FAIL)
                face = "white" if r.gate == "fail" else color
                ax.scatter([x], [y], s=46, facecolors=face, edgecolors=color, linewidths=1.6, zorder=4,
                           gid=f"point|{model}|{r.quant}|{xcol}")
            front = sorted((r for r in pts if m.tag in r.pareto.split("+")), key=lambda r: (r.size_bytes, r.quant))
            if front:
                ax.plot([getattr(r, xcol) for r in front], [getattr(r, m.column) for r in front],
                        drawstyle="steps-post", color=_FRONT, lw=1.3, alpha=0.75, zorder=2,
                        gid=f"front|{model}|{xcol}")
            if gate_y is not None:
                ax.axhline(gate_y, color=_GATE, ls="--", lw=1.1, zorder=1, gid="gate")
                ax.annotate(f"gate: {gate.describe(metric)}", (1, gate_y), xycoords=("axes fraction", "data"),
                            xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8,
                            color=_GATE).set_in_layout(False)
            if best is not None and getattr(best, xcol) is not None:
                ax.scatter([getattr(best, xcol)], [getattr(best, m.column)], s=260, facecolors="none",
                           edgecolors=_BEST, linewidths=2.2, zorder=3)
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
            info = by_model.get(model)
            reftxt = (info.reference if info else (ref.reference if ref else BASE_REFERENCE))
            refsize = f", {ref.size_gib:.4g} GiB, {ref.bpw:.2f} bpw" if ref is not None and ref.bpw else ""
            ax.set_title(f"{model}: {m.short} vs {xlabel}   (reference: {reftxt}{refsize})", fontsize=10)
            on_front = {id(r) for r in front}
            labels.append((ax, [(getattr(r, xcol), getattr(r, m.column), r.quant, id(r) in on_front) for r in
                                sorted(pts, key=lambda r: (id(r) not in on_front, r.size_bytes))]))
    handles = [Line2D([], [], color=_FRONT, lw=1.3, label="Pareto front (size vs this metric)")]
    if gate.active:
        handles += [
            Line2D([], [], ls="", marker="o", color=_PASS, label="passes gate"),
            Line2D([], [], ls="", marker="o", mfc="white", mec=_FAIL, mew=1.6, label="fails gate"),
            Line2D([], [], ls="--", color=_GATE, label="gate"),
            Line2D([], [], ls="", marker="o", ms=15, mfc="none", mec=_BEST, mew=2.2, label="smallest passing"),
        ]
    else:
        handles.append(Line2D([], [], ls="", marker="o", color=_NOGATE, label="quant (no gate configured)"))
    axes[0][-1].legend(handles=handles, loc="upper right", fontsize=8.5, framealpha=0.9)
    ev = next(iter(by_model.values())).describe_eval() if len(by_model) == 1 else ""
    fig.suptitle(f"Quant size vs {m.short}" + (f"   ·   eval: {ev}" if ev else ""), fontsize=11)
    fig.draw_without_rendering()  # runs the layout so label boxes are measured where they end up
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    for ax, items in labels:
        boxes = []
        for line in ax.lines:
            if (line.get_gid() or "").startswith("front|"):
                xy = [tuple(p) for p in line.get_xydata()]
                steps = [q for a, b in zip(xy, xy[1:]) for q in (a, (b[0], a[1]))] + xy[-1:]
                boxes += _line_boxes(ax, steps, 2 * px)
            elif line.get_gid() == "gate":
                y = line.get_ydata()[0]
                boxes += _line_boxes(ax, [(ax.get_xlim()[0], y), (ax.get_xlim()[1], y)], 2 * px)
        _place_labels(ax, items, renderer, boxes)
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


def save_figure(fig, path: str | Path) -> list[dict]:
    """Write the PNG with its plotted points in a text chunk; returns those points."""
    pts = plotted_points(fig)
    with partial_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={PNG_POINTS_KEY: json.dumps(pts)})
    return pts


def png_points(path: str | Path) -> list[dict]:
    """The points a PNG written by save_figure says it shows."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text[PNG_POINTS_KEY])


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1400px;color:#1f2d3d;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}
th,td{border:1px solid #d5dbe3;padding:.25em .55em;text-align:right;white-space:nowrap}
th{background:#eef2f6}td.t{text-align:left}
tr.ref td{color:#667;font-style:italic;background:#f7f8fa}
tr.best td{font-weight:bold;background:#fff6e0}
td.pass{color:#1e7a40;font-weight:bold}td.fail{color:#c0392b}
img{max-width:100%;border:1px solid #e3e7ec;margin:.5em 0}
ul{line-height:1.5}code{background:#f2f4f7;padding:0 .25em}
details{margin-top:1.5em}
"""


def _md_inline(s: str) -> str:
    """html-escape, then the one Markdown construct `notes` uses (**bold**)."""
    parts = html.escape(s).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(rows: list[Row], infos: list[ModelInfo], gate: Gate, pngs: dict[str, bytes],
            csv_text: str = "", link_dir: str | Path | None = None) -> str:
    """A self-contained page: settings and verdict, the rounded table, the plots (base64 PNGs)
    and every column of summary.csv with its exact values."""
    e = html.escape
    by_model = {i.model: i for i in infos}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>quantsweep report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>quantsweep: quantization sweep report</h1>",
           f"<p>Quality gate: <b>{e(gate.describe())}</b>"
           + (" against each model's reference; a quant passes when it meets every limit.</p>" if gate.active else
              ".</p>"),
           "<ul>"]
    for model in models_of(rows):
        info = by_model.get(model)
        out.append(f"<li><b>{e(model)}</b><ul>")
        if info:
            out.append(f"<li>reference (KLD base logits): {e(info.describe_reference())}</li>")
            out.append(f"<li>evaluation: {e(info.describe_eval())}</li>")
        out.append(f"<li>{_md_inline(verdict_text(rows, model, gate))}</li></ul></li>")
    out.append("</ul>")
    links = any(manifest_links(r, link_dir) for r in rows)
    out.append("<h2>Summary</h2><table><thead><tr>"
               + "".join(f"<th>{e(h)}</th>" for h, _, _ in DISPLAY)
               + ("<th>Provenance</th>" if links else "") + "</tr></thead><tbody>")
    best = {model: smallest_passing(rows, model) for model in models_of(rows)}
    for r in rows:
        cls = "ref" if r.is_reference else ("best" if best.get(r.model) is r else "")
        cells = display_cells(r)
        tds = []
        for (_, col, _), v in zip(DISPLAY, cells):
            c = "t" if col in ("model", "quant", "ftype", "imatrix", "pareto") else ""
            if col == "gate" and v:
                c = v
            tds.append(f'<td class="{c}">{e(v)}</td>' if c else f"<td>{e(v)}</td>")
        if links:
            tds.append('<td class="t">' + " ".join(f'<a href="{e(href)}">{e(label)}</a>'
                                                  for label, href in manifest_links(r, link_dir)) + "</td>")
        out.append(f'<tr class="{cls}">' + "".join(tds) + "</tr>" if cls else "<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    out.append("<p>ΔPPL % and ln(PPL(Q)/PPL(ref)) compare each quant with its model's reference on the same "
               "text, context and chunks; mean KLD is over every evaluated token. <i>Pareto</i> names the fronts "
               "(file size vs ln PPL ratio: <code>ppl</code>, vs mean KLD: <code>kld</code>) a quant is on: "
               "no other quant is both smaller and better.</p>")
    out.append("<h2>Plots</h2>")
    for title, data in pngs.items():
        b64 = base64.b64encode(data).decode("ascii")
        out.append(f"<h3>{e(title)}</h3><img alt=\"{e(title)}\" src=\"data:image/png;base64,{b64}\">")
    if csv_text:
        lines = list(csv.reader(io.StringIO(csv_text)))
        out.append("<details><summary>summary.csv (every column, exact values)</summary><table><thead><tr>"
                   + "".join(f"<th>{e(h)}</th>" for h in lines[0]) + "</tr></thead><tbody>")
        for ln in lines[1:]:
            out.append("<tr>" + "".join(f"<td>{e(v)}</td>" for v in ln) + "</tr>")
        out.append("</tbody></table></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# everything, for the workflow's rule


PLOT_TITLES = {"lnppl": "Size vs ln(PPL(Q)/PPL(ref))", "kld": "Size vs mean KLD"}


def write_report(entries: list[dict], gate: Gate, csv_path: str | Path, md_path: str | Path,
                 html_path: str | Path, plots: dict[str, str | Path]) -> list[Row]:
    """summary.csv, then from it (re-read) summary.md, the plots ({"lnppl": png, "kld": png}) and
    summary.html with the plots embedded."""
    rows, infos = load_entries(entries)
    annotate(rows, gate)
    csv_text = to_csv(rows)
    write_text(csv_path, csv_text)
    table = read_rows(csv_path)
    write_text(md_path, to_markdown(table, notes(table, infos, gate), Path(md_path).parent))
    pngs = {}
    for key, path in plots.items():
        save_figure(plot_metric(table, key, gate, infos), path)
        pngs[PLOT_TITLES[key]] = Path(path).read_bytes()
    write_text(html_path, to_html(table, infos, gate, pngs, csv_text, Path(html_path).parent))
    return table
