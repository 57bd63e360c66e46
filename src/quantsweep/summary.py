"""The sweep's summary table: one row per (model, quant) plus each model's baseline.

Every number comes from an evaluation record (itself parsed from the engine's log) or from
the file size on disk; nothing is estimated here.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, fields
from pathlib import Path

from .fileio import write_text

BASELINE = "baseline"


@dataclass
class Row:
    model: str
    quant: str
    ftype: str
    imatrix: str
    size_bytes: int
    bpw: float | None
    ppl: float
    ppl_err: float
    dppl_pct: float
    kld_mean: float | None
    kld_err: float | None
    same_top_p: float | None

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def make_rows(model: str, base: dict, quants: list[tuple[str, str, str, dict]]) -> list[Row]:
    """base: baseline record; quants: (quant name, ftype, imatrix label, record) in sweep order."""
    rows = [Row(model, BASELINE, "", "", base["size_bytes"], base.get("bpw"), base["ppl"], base["ppl_err"],
                0.0, None, None, None)]
    for name, ftype, imat, rec in quants:
        rows.append(Row(
            model, name, ftype, imat, rec["size_bytes"], rec.get("bpw"), rec["ppl"], rec["ppl_err"],
            100.0 * (rec["ppl"] / base["ppl"] - 1.0), rec.get("kld_mean"), rec.get("kld_err"), rec.get("same_top_p"),
        ))
    return rows


def _fmt(v, digits: int | None) -> str:
    """CSV keeps the exact parsed value (shortest round-trip repr); Markdown rounds for reading."""
    if v is None:
        return ""
    if isinstance(v, float) and digits is not None:
        return f"{v:.{digits}f}"
    return repr(v) if isinstance(v, float) else str(v)


_DIGITS = {"bpw": 4, "ppl": 4, "ppl_err": 5, "dppl_pct": 3, "kld_mean": 6, "kld_err": 6, "same_top_p": 3}


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(Row.columns())
    for r in rows:
        w.writerow([_fmt(getattr(r, c), None) for c in Row.columns()])
    return buf.getvalue()


def to_markdown(rows: list[Row]) -> str:
    cols = Row.columns()
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(getattr(r, c), _DIGITS.get(c, 6)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_summary(entries: list[dict], csv_path: Path, md_path: Path) -> list[Row]:
    """entries: [{"model", "base": path, "quants": [{"name", "ftype", "imatrix", "result": path}]}]."""
    rows: list[Row] = []
    for e in entries:
        base = json.loads(Path(e["base"]).read_text())
        quants = [(q["name"], q["ftype"], q["imatrix"], json.loads(Path(q["result"]).read_text())) for q in e["quants"]]
        rows += make_rows(e["model"], base, quants)
    write_text(csv_path, to_csv(rows))
    write_text(md_path, to_markdown(rows))
    return rows
