"""Everything the workflow's `report` rule writes, from the report entries.

summary.csv first; the Markdown table, the plots and the HTML page are then made from
summary.csv as written (re-read from disk), so what is drawn is what the table says. The speed
plot is written even when no row has a bench record (it then says so; the workflow lists the
file either way), but the page only embeds it when there are speeds.
"""

from __future__ import annotations

from pathlib import Path

from ..fileio import write_text
from .entries import ModelEntry, load_rows
from .gate import Gate, annotate, notes
from .html import to_html
from .layers import layer_maps, plot_layers, save_layers
from .plots import plot_metric, plot_speed, save_figure
from .table import Row, has_speed, read_rows, to_csv, to_markdown

PLOT_TITLES = {"lnppl": "Size vs ln(PPL(Q)/PPL(ref))", "kld": "Size vs mean KLD", "speed": "KLD vs generation speed",
               "layers": "Allocated types by layer and tensor class"}


def write_report(entries: list[ModelEntry] | list[dict], gate: Gate, csv_path: str | Path, md_path: str | Path,
                 html_path: str | Path, plots: dict[str, str | Path], sweep_notes: list[str] = ()) -> list[Row]:
    """summary.csv, then from it (re-read) summary.md, the plots ({"lnppl": png, "kld": png,
    "speed": png}, any of them) and summary.html with the plots embedded; returns the rows as
    written; "layers": the auto recipes' heat map, embedded when one has a layer map). entries:
    ModelEntry objects or their JSON form (validated; a bad entry or record
    raises ReportError). sweep_notes: what the sweep's settings decided that the records do not
    say (a budget skipped, the model the imatrix was computed on), listed on both pages."""
    rows, infos = load_rows(entries)
    annotate(rows, gate)
    csv_text = to_csv(rows)
    write_text(csv_path, csv_text)
    table = read_rows(csv_path)
    extra = ["", "Sweep notes:", "", *(f"- {n}" for n in sweep_notes)] if sweep_notes else []
    write_text(md_path, to_markdown(table, notes(table, infos, gate) + extra, Path(md_path).parent))
    pngs = {}
    maps = layer_maps(entries) if "layers" in plots else []
    for key, path in plots.items():
        if key == "layers":
            save_layers(plot_layers(maps), path)
        else:
            save_figure(plot_speed(table, gate, infos) if key == "speed" else plot_metric(table, key, gate, infos),
                        path)
        if (key != "speed" or has_speed(table)) and (key != "layers" or maps):
            pngs[PLOT_TITLES[key]] = Path(path).read_bytes()
    write_text(html_path, to_html(table, infos, gate, pngs, csv_text, Path(html_path).parent, list(sweep_notes)))
    return table
