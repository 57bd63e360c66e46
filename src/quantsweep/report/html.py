"""The self-contained HTML page of the report: settings and verdicts, the rounded table, the
plots (embedded as base64 PNGs) and every column of summary.csv with its exact values."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from .gate import Gate, model_notes, models_of, smallest_passing
from .speed import speed_notes
from .table import (ALLOCATION_HEAD, ALLOCATION_NOTE, ALLOCATION_TITLE, ModelInfo, Row, allocation_cells, auto_rows,
                    display_cells, display_columns, fits, has_speed, manifest_links)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1400px;color:#1f2d3d;
padding:0 1em}
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
_TEXT_COLUMNS = ("model", "quant", "ftype", "imatrix", "pareto")
_EXPLAIN = ("<p>ΔPPL % and ln(PPL(Q)/PPL(ref)) compare each quant with its model's reference on the same "
            "text, context and chunks; mean KLD is over every evaluated token. <i>Pareto</i> names the fronts "
            "(file size vs ln PPL ratio: <code>ppl</code>, vs mean KLD: <code>kld</code>) a quant is on: "
            "no other quant is both smaller and better.</p>")
_EXPLAIN_SPEED = ("<p>PP t/s and TG t/s are prompt processing and token generation speeds at the bench's "
                  "headline depth: the median of the runs ± half their range (summary.csv has the range, min, "
                  "max and every depth). The <code>speed</code> front: no other quant is both at least as fast "
                  "(TG) and at least as good (mean KLD), and better in one.</p>")
_e = html.escape


def _md_inline(s: str) -> str:
    """html-escape, then the one Markdown construct `notes` uses (**bold**)."""
    parts = html.escape(s).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _head(rows: list[Row], infos: list[ModelInfo], gate: Gate) -> list[str]:
    """Title, gate, and per model its reference, evaluation settings and verdict."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>quantsweep report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>quantsweep: quantization sweep report</h1>",
           f"<p>Quality gate: <b>{_e(gate.describe())}</b>"
           + (" against each model's reference; a quant passes when it meets every limit.</p>" if gate.active else
              ".</p>"),
           "<ul>"]
    for model, info, verdict in model_notes(rows, infos, gate):
        out.append(f"<li><b>{_e(model)}</b><ul>")
        if info:
            out.append(f"<li>reference (KLD base logits): {_e(info.describe_reference())}</li>")
            out.append(f"<li>evaluation: {_e(info.describe_eval())}</li>")
        out.append(f"<li>{_md_inline(verdict)}</li></ul></li>")
    out.append("</ul>")
    head, items = speed_notes([b for i in infos for b in i.benches])
    if head:
        out.append(f"<p>{_e(head)}</p><ul>")
        for text, sub in items:
            out.append(f"<li>{_e(text)}" + ("<ul>" + "".join(f"<li>{_e(t)}</li>" for t in sub) + "</ul>" if sub else "")
                       + "</li>")
        out.append("</ul>")
    return out


def _row_html(r: Row, cls: str, link_dir: str | Path | None, links: bool, columns: list[tuple]) -> str:
    tds = []
    for (_, col, _), v in zip(columns, display_cells(r, columns)):
        c = "t" if col in _TEXT_COLUMNS else ""
        if col == "gate" and v:
            c = v
        tds.append(f'<td class="{c}">{_e(v)}</td>' if c else f"<td>{_e(v)}</td>")
    if links:
        tds.append('<td class="t">' + " ".join(f'<a href="{_e(href)}">{_e(label)}</a>'
                                              for label, href in manifest_links(r, link_dir)) + "</td>")
    return f'<tr class="{cls}">' + "".join(tds) + "</tr>" if cls else "<tr>" + "".join(tds) + "</tr>"


def _summary_table(rows: list[Row], link_dir: str | Path | None) -> list[str]:
    """The rounded table (reference rows grey, each model's smallest passing quant bold)."""
    links = any(manifest_links(r, link_dir) for r in rows)
    columns = display_columns(rows)
    out = ["<h2>Summary</h2><table><thead><tr>"
           + "".join(f"<th>{_e(h)}</th>" for h, _, _ in columns)
           + ("<th>Provenance</th>" if links else "") + "</tr></thead><tbody>"]
    best = {model: smallest_passing(rows, model) for model in models_of(rows)}
    for r in rows:
        cls = "ref" if r.is_reference else ("best" if best.get(r.model) is r else "")
        out.append(_row_html(r, cls, link_dir, links, columns))
    out.append("</tbody></table>")
    return out


def _allocation_table(rows: list[Row]) -> list[str]:
    """Predicted vs measured KLD of the auto recipes ([] without one: the page is then as before)."""
    auto = auto_rows(rows)
    if not auto:
        return []
    text = {h: "t" for h in ("model", "quant", "budget")}
    out = [f"<h2>{_e(ALLOCATION_TITLE)}</h2>", f"<p>{_e(ALLOCATION_NOTE)}</p>",
           "<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in ALLOCATION_HEAD) + "</tr></thead><tbody>"]
    for r in auto:
        classes = {**text, "fits": "t pass" if fits(r) else "t fail"}
        out.append("<tr>" + "".join(f'<td class="{classes[h]}">{_e(v)}</td>' if h in classes else f"<td>{_e(v)}</td>"
                                    for h, v in zip(ALLOCATION_HEAD, allocation_cells(r))) + "</tr>")
    out.append("</tbody></table>")
    return out


def _exact_table(csv_text: str) -> list[str]:
    lines = list(csv.reader(io.StringIO(csv_text)))
    out = ["<details><summary>summary.csv (every column, exact values)</summary><table><thead><tr>"
           + "".join(f"<th>{_e(h)}</th>" for h in lines[0]) + "</tr></thead><tbody>"]
    for ln in lines[1:]:
        out.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in ln) + "</tr>")
    out.append("</tbody></table></details>")
    return out


def to_html(rows: list[Row], infos: list[ModelInfo], gate: Gate, pngs: dict[str, bytes],
            csv_text: str = "", link_dir: str | Path | None = None, sweep_notes: list[str] = ()) -> str:
    """A self-contained page: settings and verdict, the rounded table, the plots ({title: PNG
    bytes}, embedded as base64) and every column of summary.csv (`csv_text`) with its exact
    values; with `link_dir` (the page's directory) a Provenance column links each row's manifests."""
    out = _head(rows, infos, gate)
    if sweep_notes:
        out.append("<h2>Sweep notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in sweep_notes) + "</ul>")
    out += _summary_table(rows, link_dir)
    out.append(_EXPLAIN)
    if has_speed(rows):
        out.append(_EXPLAIN_SPEED)
    out += _allocation_table(rows)
    out.append("<h2>Plots</h2>")
    for title, data in pngs.items():
        b64 = base64.b64encode(data).decode("ascii")
        out.append(f"<h3>{_e(title)}</h3><img alt=\"{_e(title)}\" src=\"data:image/png;base64,{b64}\">")
    if csv_text:
        out += _exact_table(csv_text)
    out.append("</body></html>")
    return "\n".join(out) + "\n"
