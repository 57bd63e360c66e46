"""The sweep's summary table: one row per (model, quant) plus each model's reference.

Every number comes from an evaluation record (itself parsed from the engine's log) or from
the file size on disk; nothing is estimated here. The reference of a model is what its KLD
base logits were written from: the unquantized model (row `baseline`, reference `base`) or a
configured reference quant (row named after that quant, reference = its name).

The `gate` and `pareto` columns are filled in by `quantsweep.report.annotate`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .fileio import write_text

BASELINE = "baseline"
BASE_REFERENCE = "base"
# Evaluation settings that must be identical for the reference and every quant of a model:
# the KLD base logits are only comparable at the same text, context and chunks.
SAME_EVAL_KEYS = ("ctx", "chunks", "mla", "fa", "batch")


@dataclass
class Row:
    model: str
    quant: str
    ftype: str
    imatrix: str
    reference: str
    size_bytes: int
    size_gib: float
    bpw: float | None
    ppl: float
    ppl_err: float
    dppl_pct: float
    ln_ppl_ratio: float | None
    ln_ppl_ratio_err: float | None
    kld_mean: float | None
    kld_err: float | None
    kld_p99: float | None
    same_top_p: float | None
    gate: str = ""
    pareto: str = ""
    # provenance (workflow-relative paths; the report links them): what made the file, what measured it
    quant_manifest: str = ""
    eval_manifest: str = ""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def is_reference(self) -> bool:
        return self.quant == BASELINE or self.quant == self.reference

    @classmethod
    def from_csv(cls, d: dict[str, str]) -> "Row":
        """Typed row from a summary.csv line (the exact values written by to_csv)."""
        kw = {}
        for f in fields(cls):
            v = d[f.name]
            if f.type == "str":
                kw[f.name] = v
            elif v == "":
                kw[f.name] = None
            else:
                kw[f.name] = int(v) if f.type == "int" else float(v)
        return cls(**kw)


@dataclass
class ModelInfo:
    """What a model's rows were measured against, for the report's text."""

    model: str
    reference: str  # "base" or the reference quant's name
    reference_file: str
    eval: dict = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The evaluation text (the reference run's -f argument)."""
        return self.cmd[self.cmd.index("-f") + 1] if "-f" in self.cmd[:-1] else ""

    def describe_reference(self) -> str:
        if self.reference == BASE_REFERENCE:
            return f"unquantized model ({self.reference_file})"
        return f"reference quant {self.reference} ({self.reference_file}); the unquantized model was not evaluated"

    def describe_eval(self) -> str:
        e = self.eval
        if not e:
            return "not recorded"
        parts = [f"ctx {e.get('ctx')}", f"{e.get('chunks')} chunks", f"-mla {e.get('mla')} -fa {e.get('fa')}",
                 f"{e.get('threads')} threads"]
        if e.get("batch"):
            parts.append(f"batch {e['batch']}")
        if self.text:
            parts.append(f"text {self.text}")
        return ", ".join(parts)


def _ref_row(model: str, base: dict, reference: dict | None) -> Row:
    name, ftype, imat = (BASELINE, "", "") if reference is None else (
        reference["name"], reference["ftype"], reference["imatrix"])
    ref = BASE_REFERENCE if reference is None else reference["name"]
    return Row(model, name, ftype, imat, ref, base["size_bytes"], base["size_bytes"] / 2**30, base.get("bpw"),
               base["ppl"], base["ppl_err"], 0.0, 0.0, None, None, None, None, None)


def make_rows(model: str, base: dict, quants: list[tuple[str, str, str, dict]],
              reference: dict | None = None) -> list[Row]:
    """base: the reference's record; quants: (quant name, ftype, imatrix label, record) in sweep order;
    reference: None for the unquantized model, else {"name", "ftype", "imatrix"} of the reference quant."""
    rows = [_ref_row(model, base, reference)]
    ref = rows[0].reference
    for name, ftype, imat, rec in quants:
        _check_same_eval(model, name, base, rec)
        ln = rec.get("ln_ratio")
        if ln is None:
            ln = math.log(rec["ppl"] / base["ppl"])
        rows.append(Row(
            model, name, ftype, imat, ref, rec["size_bytes"], rec["size_bytes"] / 2**30, rec.get("bpw"),
            rec["ppl"], rec["ppl_err"], 100.0 * (rec["ppl"] / base["ppl"] - 1.0), ln, rec.get("ln_ratio_err"),
            rec.get("kld_mean"), rec.get("kld_err"), (rec.get("kld_percentiles") or {}).get("99.0"),
            rec.get("same_top_p"),
        ))
    return rows


def _check_same_eval(model: str, quant: str, base: dict, rec: dict) -> None:
    a, b = base.get("eval") or {}, rec.get("eval") or {}
    diff = [k for k in SAME_EVAL_KEYS if k in a and k in b and a[k] != b[k]]
    if diff:
        raise ValueError(f"{model}/{quant} was evaluated with other settings than its reference: "
                         + ", ".join(f"{k} {b[k]!r} vs {a[k]!r}" for k in diff))


def _fmt(v, digits: int | None) -> str:
    """CSV keeps the exact parsed value (shortest round-trip repr); Markdown rounds for reading."""
    if v is None:
        return ""
    if isinstance(v, float) and digits is not None:
        return f"{v:.{digits}f}"
    return repr(v) if isinstance(v, float) else str(v)


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(Row.columns())
    for r in rows:
        w.writerow([_fmt(getattr(r, c), None) for c in Row.columns()])
    return buf.getvalue()


# The columns shown in summary.md / summary.html: (heading, column, format).
def _sig(n: int):
    return lambda v: f"{v:.{n}g}"


def _fix(n: int):
    return lambda v: f"{v:.{n}f}"


DISPLAY = [
    ("model", "model", str),
    ("quant", "quant", str),
    ("ftype", "ftype", str),
    ("imatrix", "imatrix", str),
    ("size GiB", "size_gib", _sig(4)),
    ("bpw", "bpw", _fix(3)),
    ("PPL", "ppl", _fix(4)),
    ("± PPL", "ppl_err", _fix(4)),
    ("ΔPPL %", "dppl_pct", _fix(3)),
    ("ln(PPL(Q)/PPL(ref))", "ln_ppl_ratio", _fix(5)),
    ("mean KLD", "kld_mean", _fix(6)),
    ("KLD 99%", "kld_p99", _fix(5)),
    ("same top p %", "same_top_p", _fix(2)),
    ("gate", "gate", str),
    ("Pareto", "pareto", str),
]


def display_cells(r: Row) -> list[str]:
    out = []
    for _, col, fmt in DISPLAY:
        v = getattr(r, col)
        if r.is_reference and col in ("dppl_pct", "ln_ppl_ratio"):
            v = None  # zero by definition; blank reads better than 0.000
        out.append("" if v is None else fmt(v))
    if r.is_reference:
        out[1] = f"{r.quant} (reference)"
    return out


def manifest_links(r: Row, link_dir: str | Path | None) -> list[tuple[str, str]]:
    """(label, href relative to link_dir) of a row's manifests, for the report's Provenance column."""
    if link_dir is None:
        return []
    return [(label, os.path.relpath(path, link_dir)) for label, path in
            (("quantize", r.quant_manifest), ("eval", r.eval_manifest)) if path]


def to_markdown(rows: list[Row], notes: list[str] | None = None, link_dir: str | Path | None = None) -> str:
    """The table for reading (rounded); `notes` are lines printed above it; with `link_dir` (the
    directory the file is written to) a Provenance column links each row's manifests."""
    links = any(manifest_links(r, link_dir) for r in rows)
    head = [h for h, _, _ in DISPLAY] + (["Provenance"] if links else [])
    out = list(notes or [])
    if out:
        out.append("")
    out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = display_cells(r)
        if links:
            cells.append(" ".join(f"[{label}]({href})" for label, href in manifest_links(r, link_dir)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_rows(path: str | Path) -> list[Row]:
    return [Row.from_csv(d) for d in read_csv(path)]


def load_entries(entries: list[dict]) -> tuple[list[Row], list[ModelInfo]]:
    """entries: [{"model", "reference": "base" | {"name", "ftype", "imatrix"}, "base": path,
    "quants": [{"name", "ftype", "imatrix", "result": path}]}]."""
    rows: list[Row] = []
    infos: list[ModelInfo] = []
    for e in entries:
        base = json.loads(Path(e["base"]).read_text())
        ref = e.get("reference", BASE_REFERENCE)
        ref = None if ref == BASE_REFERENCE else ref
        quants = [(q["name"], q["ftype"], q["imatrix"], json.loads(Path(q["result"]).read_text())) for q in e["quants"]]
        model_rows = make_rows(e["model"], base, quants, ref)
        # the reference row was measured by the baseline run; a reference quant was also made by quantize
        model_rows[0].eval_manifest = e.get("base_manifest", "")
        if ref is not None:
            model_rows[0].quant_manifest = (ref.get("manifests") or {}).get("quantize", "")
        for row, q in zip(model_rows[1:], e["quants"]):
            row.quant_manifest = (q.get("manifests") or {}).get("quantize", "")
            row.eval_manifest = (q.get("manifests") or {}).get("eval", "")
        rows += model_rows
        infos.append(ModelInfo(e["model"], rows[-len(quants) - 1].reference, base.get("model_file", ""),
                               base.get("eval") or {}, base.get("cmd") or []))
    return rows, infos


def write_summary(entries: list[dict], csv_path: Path, md_path: Path, gate=None) -> list[Row]:
    """summary.csv and summary.md only (quantsweep.report.write_report also writes plots and HTML).
    gate: a quantsweep.report.Gate, or None for no gate."""
    from .report import Gate, annotate, notes

    gate = gate or Gate()
    rows, infos = load_entries(entries)
    annotate(rows, gate)
    write_text(csv_path, to_csv(rows))
    write_text(md_path, to_markdown(rows, notes(rows, infos, gate), Path(md_path).parent))
    return rows
