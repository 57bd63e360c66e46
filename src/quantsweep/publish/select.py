"""Which quants of a model are published: its rows of the sweep's summary.csv, chosen by name or
by the report's marks (a Pareto front, the gate), and where each row's files are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PublishError
from ..fileio import read_json_object
from ..report.table import Row, read_rows
from ..settings import BASELINE
from ..settings.publish import SELECTORS, PublishSettings


@dataclass(frozen=True)
class Chosen:
    """One quant to publish: its summary row and the files the sweep made it with."""

    row: Row
    gguf: Path            # the unsplit quant
    record: Path          # its quantize record (recipe, pools, imatrix)
    quant_manifest: Path
    eval_record: Path
    eval_manifest: Path

    @property
    def name(self) -> str:
        return self.row.quant

    def quantize_record(self) -> dict:
        return read_json_object(self.record, "quantize record")


def model_rows(summary: str | Path, model: str) -> tuple[Row | None, list[Row]]:
    """A model's reference row ("baseline": the unquantized model) and its quant rows, in the
    report's order."""
    rows = [r for r in read_rows(summary) if r.model == model]
    if not rows:
        raise PublishError(f"{summary}: no row of model {model!r}")
    base = next((r for r in rows if r.quant == BASELINE), None)
    return base, [r for r in rows if r.quant != BASELINE]


def selected(rows: list[Row], s: PublishSettings, summary: str | Path) -> list[Row]:
    """The rows publish.quants names, in the report's order: names as given, `pareto` every row
    on a front, `gate` those of them that pass the gate (an unchecked gate passes)."""
    by_name = {r.quant: r for r in rows}
    want: set[str] = set()
    for n in s.names():
        if n not in by_name:
            raise PublishError(f"publish.quants: {n!r} is not a quant of {summary} "
                               f"({', '.join(by_name) or 'none'})")
        want.add(n)
    for sel in s.selectors():
        want |= {r.quant for r in rows if r.pareto and (sel == "pareto" or r.gate != "fail")}
    out = [r for r in rows if r.quant in want]
    if not out:
        picks = " and ".join(f"{k} ({SELECTORS[k]})" for k in s.selectors())
        raise PublishError(f"publish.quants: {picks} selects no quant of {rows[0].model if rows else '?'} in "
                           f"{summary}; name the quants to publish")
    return out


def chosen(row: Row, summary: str | Path) -> Chosen:
    """Where a summary row's files are: the GGUF and records its quantize and eval manifests name."""
    if not row.quant_manifest or not row.eval_manifest:
        raise PublishError(f"{summary}: {row.model}/{row.quant} names no quantize or eval manifest")
    qm = read_json_object(row.quant_manifest, "quantize manifest")
    outs = [Path(o["path"]) for o in qm.get("outputs", [])]
    ggufs = [p for p in outs if p.suffix == ".gguf"]
    records = [p for p in outs if p.suffix == ".json"]
    em = read_json_object(row.eval_manifest, "eval manifest")
    evals = [Path(o["path"]) for o in em.get("outputs", []) if o["path"].endswith(".json")]
    if len(ggufs) != 1 or len(records) != 1 or not evals:
        raise PublishError(f"{row.quant_manifest}: names {len(ggufs)} GGUF and {len(records)} record outputs "
                           f"(one of each expected), {row.eval_manifest} {len(evals)} evaluation records")
    for p in (ggufs[0], records[0], evals[0]):
        if not p.is_file():
            raise PublishError(f"{p}: missing (named by the manifests of {row.quant}); rerun the sweep")
    return Chosen(row, ggufs[0], records[0], Path(row.quant_manifest), evals[0], Path(row.eval_manifest))


def choose(summary: str | Path, model: str, s: PublishSettings) -> tuple[Row | None, list[Chosen]]:
    base, rows = model_rows(summary, model)
    return base, [chosen(r, summary) for r in selected(rows, s, summary)]
