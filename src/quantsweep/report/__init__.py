"""The sweep's report: summary table, quality gate, Pareto fronts, plots and an HTML page.

Modules, each importing only those listed before it (and quantsweep.fileio / quantsweep.errors):

- `table`: summary rows from evaluation records (`Row`, `ModelInfo`, `make_rows`), summary.csv
  and the Markdown table; `BASELINE` and `BASE_REFERENCE`.
- `entries`: what the report reads (`ModelEntry`, `QuantEntry`), built by the workflow with
  `sweep_entries`; `record_paths` lists the records, `load_rows` reads them into rows.
- `gate`: `Gate`, `annotate` (gate and Pareto columns), `smallest_passing`, the verdict text.
- `plots`: the size-vs-quality figures, and their points read back for tests.
- `html`: the self-contained page.
- `write`: `write_report`, everything the workflow's `report` rule writes.
"""

from .entries import (ModelEntry, QuantEntry, load_rows, parse_entries, record_paths, sweep_entries,
                      to_json_data)
from .gate import METRICS, Gate, annotate, gate_verdict, pareto_front, smallest_passing
from .plots import plot_metric, plotted_fronts, plotted_points, png_points, save_figure
from .table import (BASE_REFERENCE, BASELINE, ModelInfo, Record, Row, make_rows, read_csv, read_rows, to_csv,
                    to_markdown)
from .write import write_report

__all__ = [
    "BASELINE", "BASE_REFERENCE", "METRICS", "Gate", "ModelEntry", "ModelInfo", "QuantEntry", "Record", "Row",
    "annotate", "gate_verdict", "load_rows", "make_rows", "pareto_front", "parse_entries", "plot_metric",
    "plotted_fronts", "plotted_points", "png_points", "read_csv", "read_rows", "record_paths", "save_figure",
    "smallest_passing", "sweep_entries", "to_csv", "to_json_data", "to_markdown", "write_report",
]
