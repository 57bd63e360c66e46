"""The sweep's report: summary table, quality gate, Pareto fronts, plots and an HTML page.

Modules, each importing only those listed before it (and quantsweep.fileio / quantsweep.errors):

- `speed`: bench records (`BenchRecord`: speeds per depth, host, run settings) and how the
  speeds were measured, in words.
- `table`: summary rows from evaluation and bench records (`Row`, `ModelInfo`, `make_rows`),
  summary.csv and the Markdown table.
- `entries`: what the report reads (`ModelEntry`, `QuantEntry`), built by the workflow with
  `sweep_entries`; `record_paths` lists the records (`evaluation_paths`, `bench_paths`,
  `allocation_paths` each kind), `load_rows` reads them into rows (an auto recipe's budget and
  predicted KLD from its `AllocationRecord`).
- `gate`: `annotate` (gate and Pareto columns against the config's `settings.Gate`), `smallest_passing`,
  the verdict text.
- `plots`: the size-vs-quality and speed-vs-quality figures, and their points read back for tests.
- `html`: the self-contained page.
- `write`: `write_report`, everything the workflow's `report` rule writes.
"""

from .entries import (AllocationRecord, ModelEntry, QuantEntry, allocation_paths, bench_paths, evaluation_paths,
                      load_rows, measured_so_far, parse_entries, record_paths, sweep_entries, to_json_data)
from .gate import METRICS, annotate, gate_verdict, pareto_front, smallest_passing, speed_front
from .plots import plot_metric, plot_speed, plotted_fronts, plotted_points, png_points, save_figure
from .speed import BenchRecord
from .table import ModelInfo, Record, Row, csv_columns, make_rows, read_csv, read_rows, to_csv, to_markdown
from .write import write_report

__all__ = [
    "AllocationRecord", "METRICS", "BenchRecord", "ModelEntry", "ModelInfo",
    "QuantEntry", "Record", "Row", "allocation_paths", "annotate", "bench_paths", "csv_columns", "evaluation_paths",
    "gate_verdict", "load_rows", "make_rows", "measured_so_far", "pareto_front", "parse_entries", "plot_metric", "plot_speed",
    "plotted_fronts", "plotted_points", "png_points", "read_csv", "read_rows", "record_paths", "save_figure",
    "smallest_passing", "speed_front", "sweep_entries", "to_csv", "to_json_data", "to_markdown", "write_report",
]
