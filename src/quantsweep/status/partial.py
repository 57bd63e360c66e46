"""The report of what a running sweep has measured so far (`quantsweep report --partial`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..errors import QuantsweepError
from ..fileio import read_json_object
from ..report import measured_so_far, parse_entries, write_report
from ..report.entries import PARTIAL_DIR, REQUEST, evaluation_paths
from ..report.table import Row
from ..settings import Gate
from .sweep import pending_eta, sweep_status

PLOTS = {"lnppl": "size_vs_lnppl.png", "kld": "size_vs_kld.png", "speed": "kld_vs_speed.png",
         "layers": "allocation_layers.png"}


def partial_report(workdir: str | Path) -> tuple[list[Row], list[tuple[str, str]], list[str], Path]:
    """The final report's table, gate, Pareto fronts and plots of the quants measured so far in
    `workdir`, from the request the sweep wrote when it started (report.entries.REQUEST), into
    PARTIAL_DIR; each quant not measured yet is a "pending" sweep note with its ETA. Returns the
    rows, the pending (model, quant), the evaluation records read and the output dir."""
    root = Path(workdir)
    with contextlib.chdir(root):  # the request's paths are the work dir's
        req = read_json_object(REQUEST, f"{root}: the sweep's report request")
        entries, pending = measured_so_far(parse_entries(req.get("entries")))
        if not entries:
            raise QuantsweepError(f"report --partial: nothing measured yet in {root} (no reference evaluated)")
        try:
            st = sweep_status(".")
        except QuantsweepError:  # no plan: pending without an ETA
            st = None
        notes = list(req.get("notes", []))
        notes += [f"pending: {model} {quant} ({pending_eta(st, model, quant)})" for model, quant in pending]
        plots = {k: PARTIAL_DIR / f for k, f in PLOTS.items()
                 if (k != "speed" or req.get("bench")) and (k != "layers" or req.get("allocate"))}
        rows = write_report(entries, Gate.from_json(json.dumps(req.get("settings", {})), "gate"),
                            PARTIAL_DIR / "summary.csv", PARTIAL_DIR / "summary.md", PARTIAL_DIR / "summary.html",
                            plots, notes)
        inputs = [str(root / p) for p in evaluation_paths(entries)]
    return rows, pending, inputs, root / PARTIAL_DIR
