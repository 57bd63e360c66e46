"""The sweep's summary table: one row per (model, quant) plus each model's reference.

Every number comes from an evaluation record (itself parsed from the engine's log) or from
the file size on disk; nothing is estimated here. The reference of a model is what its KLD
base logits were written from: the unquantized model (row `baseline`, reference `base`) or a
configured reference quant (row named after that quant, reference = its name).

A `Record` is one evaluation record with the file it was read from, so that a missing or
malformed key is reported as a `ReportError` naming that file and key. The `gate` and
`pareto` columns are filled in by `quantsweep.report.gate.annotate`.

Speeds come from bench records (`quantsweep.report.speed`): the headline depth's median,
range, min and max of PP and TG tokens/s, and every depth's medians as the columns
`pp_tps@<depth>` / `tg_tps@<depth>` (in `Row.speeds`, written in the records' depth order).
A row without a bench record has empty speed cells.

An auto recipe (made by the size-budget allocator) has `auto` "yes" and, from its allocation
record, the budget (in words, in tensor bytes and as the file size it allows) and the predicted
mean KLD, so the report can set the prediction against the measurement and say whether the file
fits; every other row leaves those cells empty.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import ReportError
from ..settings import BASE_REFERENCE, BASELINE
from .speed import SPEED_KEYS, BenchRecord, load_record, run_words, threads_text

# Evaluation settings that must be identical for the reference and every quant of a model:
# the KLD base logits are only comparable at the same text, context and chunks.
# PPL depends on the batch sizes too (run settings: `eval.run` of a record).
SAME_EVAL_KEYS = ("ctx", "chunks", "mla", "fa", "run.batch", "run.ubatch")


# ---------------------------------------------------------------------------------------------
# evaluation records


# Keys that are a divergence or an error bar: below 0 they are a bug, not a result.
NON_NEGATIVE = frozenset({"kld_mean", "kld_err", "ppl_err", "ln_ratio_err", "same_top_p", "rms_dp"})
KLD_TOLERANCE = 1e-5  # the base file's 16-bit log-probs can leave a mean a hair below 0


@dataclass(frozen=True)
class Record:
    """One evaluation record (the JSON an eval rule writes) and where it came from."""

    source: str  # the record file, for messages
    data: dict

    @classmethod
    def load(cls, path: str | Path) -> "Record":
        return cls(str(path), load_record(path, "evaluation record"))

    def _bad(self, key: str, what: str) -> ReportError:
        return ReportError(f"evaluation record {self.source}: key {key!r} {what}")

    def number(self, key: str, required: bool = False) -> float | None:
        """The value of a numeric key; None when absent or null and not required."""
        v = self.data.get(key)
        if v is None:
            if required:
                raise self._bad(key, "is missing" if key not in self.data else "is null")
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, f"is {v!r}, not a number")
        if not math.isfinite(v):
            raise self._bad(key, f"is {v!r}, not a finite number")
        if key in NON_NEGATIVE and v < -KLD_TOLERANCE:
            raise self._bad(key, f"is {v!r}; it cannot be negative")
        return v

    def size_bytes(self) -> int:
        v = self.number("size_bytes", required=True)
        if not isinstance(v, int) or v < 0:
            raise self._bad("size_bytes", f"is {v!r}, not a byte count")
        return v

    def ppl(self) -> float:
        v = self.number("ppl", required=True)
        if not v > 0:
            raise self._bad("ppl", f"is {v!r}, not a positive perplexity")
        return v

    def kld_p99(self) -> float | None:
        pct = self._typed("kld_percentiles", dict, "an object")
        v = (pct or {}).get("99.0")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise self._bad("kld_percentiles", f"has 99.0 = {v!r}, not a finite number")
        return v

    def _typed(self, key: str, typ: type, what: str):
        v = self.data.get(key)
        if v is not None and not isinstance(v, typ):
            raise self._bad(key, f"is {v!r}, not {what}")
        return v

    @property
    def eval(self) -> dict:
        return self._typed("eval", dict, "an object") or {}

    @property
    def cmd(self) -> list[str]:
        return self._typed("cmd", list, "a list") or []

    @property
    def model_file(self) -> str:
        return self._typed("model_file", str, "a string") or ""


# ---------------------------------------------------------------------------------------------
# rows


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
    # tokens/s at the bench's headline depth (higher is better): median, max - min, min, max
    pp_tps: float | None = None
    pp_tps_spread: float | None = None
    pp_tps_min: float | None = None
    pp_tps_max: float | None = None
    tg_tps: float | None = None
    tg_tps_spread: float | None = None
    tg_tps_min: float | None = None
    tg_tps_max: float | None = None
    gate: str = ""
    pareto: str = ""
    # auto recipes only (from the allocation record): "yes", the budget in words, the tensor bytes the
    # allocator filled, the file size the budget allows (the fit verdict's limit), the predicted mean KLD
    auto: str = ""
    budget: str = ""
    budget_bytes: int | None = None
    size_limit: int | None = None
    predicted_kld: float | None = None
    # provenance (workflow-relative paths; the report links them): what made the file, what measured it
    quant_manifest: str = ""
    eval_manifest: str = ""
    # every depth's median: {"pp_tps@0": 812.1, "tg_tps@0": 95.3, ...}; CSV columns after tg_tps_max
    speeds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def columns(cls) -> list[str]:
        """The fixed columns (the per-depth ones depend on the rows: `csv_columns`)."""
        return [f.name for f in fields(cls) if f.name != "speeds"]

    @property
    def is_reference(self) -> bool:
        return self.quant == BASELINE or self.quant == self.reference

    @classmethod
    def from_csv(cls, d: dict[str, str]) -> "Row":
        """Typed row from a summary.csv line (the exact values written by to_csv)."""
        kw = {"speeds": {k: float(v) for k, v in d.items() if k and DEPTH_COLUMN.fullmatch(k) and v != ""}}
        for f in fields(cls):
            if f.name == "speeds":
                continue
            v = d[f.name]
            if f.type == "str":
                kw[f.name] = v
            elif v == "":
                kw[f.name] = None
            else:
                kw[f.name] = int(v) if f.type in ("int", "int | None") else float(v)
        return cls(**kw)

    def add_bench(self, b: BenchRecord) -> None:
        """The bench record's speeds; refuses a record of another file than the evaluated one."""
        if b.size_bytes is not None and b.size_bytes != self.size_bytes:
            raise ReportError(f"bench record {b.source}: key 'size_bytes' is {b.size_bytes}, but {self.model}/"
                              f"{self.quant} was evaluated at {self.size_bytes} bytes (not the same file)")
        head = b.speed[0]
        for k in SPEED_KEYS:
            s = getattr(head, k)
            for suffix, v in (("", s.median), ("_spread", s.spread), ("_min", s.min), ("_max", s.max)):
                setattr(self, k + suffix, v)
        self.speeds = {f"{k}@{d.depth}": getattr(d, k).median for d in b.speed for k in SPEED_KEYS}


DEPTH_COLUMN = re.compile(r"(pp|tg)_tps@\d+")


@dataclass
class ModelInfo:
    """What a model's rows were measured against, for the report's text."""

    model: str
    reference: str  # "base" or the reference quant's name
    reference_file: str
    eval: dict = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    benches: list[BenchRecord] = field(default_factory=list)  # the bench records of its rows
    record: str = ""  # the reference's evaluation record (for messages)

    @classmethod
    def from_record(cls, model: str, reference: str, base: Record,
                    benches: list[BenchRecord] | None = None) -> "ModelInfo":
        return cls(model, reference, base.model_file, base.eval, base.cmd, list(benches or []), base.source)

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
                 threads_text((e.get("run") or {}).get("threads") or e.get("threads"))]
        if self.text:
            parts.append(f"text {self.text}")
        if isinstance(e.get("run"), dict):  # the run settings (records before they existed: none)
            words = run_words(e["run"], f"evaluation record {self.record}")
            parts.append("run: " + (" ".join(words) or "engine defaults (no -ngl, -ot, -b, -ub)"))
        return ", ".join(parts)


def _ref_row(model: str, base: Record, reference: tuple[str, str, str] | None) -> Row:
    name, ftype, imat = (BASELINE, "", "") if reference is None else reference
    ref = BASE_REFERENCE if reference is None else reference[0]
    size = base.size_bytes()
    return Row(model, name, ftype, imat, ref, size, size / 2**30, base.number("bpw"),
               base.ppl(), base.number("ppl_err", required=True), 0.0, 0.0, None, None, None, None, None)


def _quant_row(model: str, name: str, ftype: str, imat: str, ref: str, base: Record, rec: Record) -> Row:
    check_same_eval(model, name, base, rec)
    ppl, base_ppl, size = rec.ppl(), base.ppl(), rec.size_bytes()
    ln = rec.number("ln_ratio")
    if ln is None:
        ln = math.log(ppl / base_ppl)
    return Row(
        model, name, ftype, imat, ref, size, size / 2**30, rec.number("bpw"),
        ppl, rec.number("ppl_err", required=True), 100.0 * (ppl / base_ppl - 1.0), ln, rec.number("ln_ratio_err"),
        rec.number("kld_mean"), rec.number("kld_err"), rec.kld_p99(), rec.number("same_top_p"),
    )


def make_rows(model: str, base: Record, quants: list[tuple[str, str, str, Record]],
              reference: tuple[str, str, str] | None = None) -> list[Row]:
    """base: the reference's record; quants: (quant name, ftype, imatrix label, record) in sweep order;
    reference: None for the unquantized model, else (name, ftype, imatrix label) of the reference quant."""
    rows = [_ref_row(model, base, reference)]
    ref = rows[0].reference
    for name, ftype, imat, rec in quants:
        rows.append(_quant_row(model, name, ftype, imat, ref, base, rec))
    return rows


def check_same_eval(model: str, quant: str, base: Record, rec: Record) -> None:
    """Refuse a quant evaluated with other settings than its reference (names record and key)."""
    a, b = _flat(base.eval), _flat(rec.eval)
    diff = [k for k in SAME_EVAL_KEYS if k in a and k in b and a[k] != b[k]]
    if diff:
        raise ReportError(f"evaluation record {rec.source} ({model}/{quant}) was evaluated with other settings than "
                          f"its reference {base.source}: " + ", ".join(f"eval.{k} {b[k]!r} vs {a[k]!r}" for k in diff))


def _flat(e: dict) -> dict:
    """eval keys with the run settings' as run.<key>."""
    run = e.get("run") if isinstance(e.get("run"), dict) else {}
    return {**e, **{f"run.{k}": v for k, v in run.items()}}


# ---------------------------------------------------------------------------------------------
# CSV and Markdown


def _fmt(v, digits: int | None) -> str:
    """CSV keeps the exact parsed value (shortest round-trip repr); Markdown rounds for reading."""
    if v is None:
        return ""
    if isinstance(v, float) and digits is not None:
        return f"{v:.{digits}f}"
    return repr(v) if isinstance(v, float) else str(v)


def csv_columns(rows: list[Row]) -> list[str]:
    """Row's columns with every depth's speed columns (first seen order) after the headline speeds."""
    cols = Row.columns()
    at = cols.index("tg_tps_max") + 1
    return cols[:at] + list(dict.fromkeys(k for r in rows for k in r.speeds)) + cols[at:]


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = csv_columns(rows)
    w.writerow(cols)
    for r in rows:
        w.writerow([_fmt(r.speeds.get(c) if "@" in c else getattr(r, c), None) for c in cols])
    return buf.getvalue()


def read_csv(path: str | Path) -> list[dict]:
    """summary.csv as dicts of the strings written."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_rows(path: str | Path) -> list[Row]:
    """summary.csv as typed rows (equal to the rows written)."""
    out = []
    for i, d in enumerate(read_csv(path), start=2):
        try:
            out.append(Row.from_csv(d))
        except KeyError as e:
            raise ReportError(f"{path}: no column {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ReportError(f"{path} line {i}: {e}") from None
    return out


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


def speed_cell(median: float, spread: float | None) -> str:
    """'812 ±15': the median to 3 significant digits (more when the ± needs them), ± half the range
    of the runs to the same decimals; the median alone when the runs agree."""
    half = (spread or 0.0) / 2
    digits = 2 - math.floor(math.log10(median)) if median > 0 else 0
    if half > 0:
        digits = max(digits, -math.floor(math.log10(half)))
    digits = min(max(digits, 0), 4)
    return f"{median:.{digits}f}" + (f" ±{half:.{digits}f}" if half > 0 else "")


# Shown after "same top p %" when any row has bench data; the cell is the median ± half the range.
SPEED_DISPLAY = [("PP t/s", "pp_tps", speed_cell), ("TG t/s", "tg_tps", speed_cell)]


def has_speed(rows: list[Row]) -> bool:
    return any(r.pp_tps is not None or r.tg_tps is not None for r in rows)


def display_columns(rows: list[Row]) -> list[tuple]:
    """DISPLAY, with SPEED_DISPLAY before the gate when any row has speeds (else as without bench)."""
    if not has_speed(rows):
        return DISPLAY
    at = [col for _, col, _ in DISPLAY].index("gate")
    return DISPLAY[:at] + SPEED_DISPLAY + DISPLAY[at:]


def display_cells(r: Row, columns: list[tuple] = DISPLAY) -> list[str]:
    out = []
    for _, col, fmt in columns:
        v = getattr(r, col)
        if r.is_reference and col in ("dppl_pct", "ln_ppl_ratio"):
            v = None  # zero by definition; blank reads better than 0.000
        if v is not None and fmt is speed_cell:
            out.append(speed_cell(v, getattr(r, f"{col}_spread")))
            continue
        out.append("" if v is None else fmt(v))
    marks = [m for m, on in (("reference", r.is_reference), ("auto", r.auto == "yes")) if on]
    if marks:
        out[1] = f"{r.quant} ({', '.join(marks)})"
    return out


# The allocated-recipes section of summary.md / summary.html (auto recipes only).
ALLOCATION_TITLE = "Allocated recipes: predicted vs measured KLD"
ALLOCATION_NOTE = ("An auto recipe is allocated by the size-budget allocator: the types that minimise its predicted "
                   "mean KLD (the measured sensitivities of its groups of tensors, summed) within the tensor bytes "
                   "its budget leaves. It fits when its file is at most the file limit: the GiB given, the named "
                   "quant's file for a size-of budget, the tensor bytes for a bpw budget (the file's header must "
                   "fit too: stricter).")
ALLOCATION_HEAD = ["model", "quant", "budget", "tensor bytes", "file limit bytes", "file limit GiB", "file bytes",
                   "file GiB", "fits", "predicted mean KLD", "measured mean KLD", "measured / predicted"]


def auto_rows(rows: list[Row]) -> list[Row]:
    """The auto recipes with a budget, except reference rows (their KLD is zero by definition)."""
    return [r for r in rows if r.auto == "yes" and r.size_limit is not None and not r.is_reference]


def allocation_cells(r: Row) -> list[str]:
    """One auto recipe's line of the allocation section (ALLOCATION_HEAD's columns)."""
    pred, meas = r.predicted_kld, r.kld_mean
    ratio = "" if pred is None or meas is None or pred <= 0 else f"{meas / pred:.3f}"
    kld = _fix(6)
    return [r.model, r.quant, r.budget, _fmt(r.budget_bytes, None), str(r.size_limit), f"{r.size_limit / 2**30:.4g}",
            str(r.size_bytes), f"{r.size_gib:.4g}", fit_text(r), "" if pred is None else kld(pred),
            "" if meas is None else kld(meas), ratio]


def fits(r: Row) -> bool:
    return r.size_limit is not None and r.size_bytes <= r.size_limit


def fit_text(r: Row) -> str:
    return "yes" if fits(r) else f"no (+{r.size_bytes - r.size_limit} bytes)"


def allocation_markdown(rows: list[Row]) -> list[str]:
    """The section's Markdown lines ([] without an auto recipe: the summary is then as before)."""
    auto = auto_rows(rows)
    if not auto:
        return []
    out = ["", f"## {ALLOCATION_TITLE}", "", ALLOCATION_NOTE, "",
           "| " + " | ".join(ALLOCATION_HEAD) + " |", "|" + "|".join("---" for _ in ALLOCATION_HEAD) + "|"]
    return out + ["| " + " | ".join(allocation_cells(r)) + " |" for r in auto]


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
    columns = display_columns(rows)
    head = [h for h, _, _ in columns] + (["Provenance"] if links else [])
    out = list(notes or [])
    if out:
        out.append("")
    out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = display_cells(r, columns)
        if links:
            cells.append(" ".join(f"[{label}]({href})" for label, href in manifest_links(r, link_dir)))
        out.append("| " + " | ".join(cells) + " |")
    out += allocation_markdown(rows)
    return "\n".join(out) + "\n"
