"""The quality gate, the Pareto fronts and the verdict text, over summary rows.

`annotate` fills the rows' `gate` ('pass' / 'fail' / '') and `pareto` ('ppl', 'kld', 'speed',
joined by '+') columns per model; `smallest_passing` and `notes` / `verdict_text` turn them
into the report's answer. The gate's speed limits and the `speed` front use the bench's
headline depth (higher tokens/s is better).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..settings import Gate
from .speed import speed_notes
from .table import ModelInfo, Row, speed_cell

def gate_verdict(row: Row, gate: Gate) -> str:
    """'pass' / 'fail' for a quant; '' for the reference row or when no gate is configured."""
    if row.is_reference or not gate.active:
        return ""
    ok = True
    if gate.max_dppl_pct is not None:
        ok = ok and row.dppl_pct <= gate.max_dppl_pct
    if gate.max_kld is not None:
        ok = ok and row.kld_mean is not None and row.kld_mean <= gate.max_kld
    if gate.min_tg_tps is not None:
        ok = ok and row.tg_tps is not None and row.tg_tps >= gate.min_tg_tps
    if gate.min_pp_tps is not None:
        ok = ok and row.pp_tps is not None and row.pp_tps >= gate.min_pp_tps
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
# Pareto fronts use the file size (the plots' bpw panels show the same points against the engine's bpw).
SIZE = "size_bytes"
# The third front: mean KLD (lower is better) against TG tokens/s (higher is better).
SPEED_TAG = "speed"


def speed_front(rows: list[Row]) -> list[Row]:
    """The rows with a mean KLD and a TG speed that no other is both as fast and as good as, and
    better in one (slowest first)."""
    have = [r for r in rows if r.kld_mean is not None and r.tg_tps is not None]
    return [have[i] for i in reversed(pareto_front([(-r.tg_tps, r.kld_mean) for r in have]))]


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
        for r in speed_front(qs):
            r.pareto = "+".join(t for t in (r.pareto, SPEED_TAG) if t)
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
    if r.tg_tps is not None:
        bits.append(f"TG {speed_cell(r.tg_tps, r.tg_tps_spread)} t/s")
    return ", ".join(bits)


def model_notes(rows: list[Row], infos: list[ModelInfo], gate: Gate) -> list[tuple[str, ModelInfo | None, str]]:
    """Per model (in row order): what it was measured against (None: not recorded) and its
    verdict; summary.md and summary.html render the same notes."""
    by_model = {i.model: i for i in infos}
    return [(model, by_model.get(model), verdict_text(rows, model, gate)) for model in models_of(rows)]


def notes(rows: list[Row], infos: list[ModelInfo], gate: Gate) -> list[str]:
    """Markdown lines above the table: reference, evaluation settings, gate and verdict per model,
    then (with bench records) how and where the speeds were measured."""
    out = ["# quantsweep summary", ""]
    out.append(f"Quality gate: {gate.describe()}" + (" (against each model's reference)." if gate.active else "."))
    out.append("")
    for model, info, verdict in model_notes(rows, infos, gate):
        out.append(f"- **{model}**")
        if info:
            out.append(f"  - reference: {info.describe_reference()}")
            out.append(f"  - evaluation: {info.describe_eval()}")
        out.append(f"  - {verdict}")
    head, items = speed_notes([b for i in infos for b in i.benches])
    if head:
        out += ["", head, ""]
        for text, sub in items:
            out += [f"- {text}"] + [f"  - {t}" for t in sub]
    return out


def verdict_text(rows: list[Row], model: str, gate: Gate) -> str:
    """The model's answer in one Markdown line: the smallest passing quant, or why there is none."""
    if not gate.active:
        return "no quality gate configured"
    best = smallest_passing(rows, model)
    if best is None:
        return f"no quant passes the gate ({gate.describe()})"
    return f"smallest passing quant: **{best.quant}** ({_describe_row(best)})"
