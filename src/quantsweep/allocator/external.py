"""External per-tensor measurements as the allocator's input: the single-tensor KLD (or PPL) tables
publishers share, read into the same sensitivity table the runs give.

Format (Thireus' GGUF-Tool-Suite `benchmark_each_tensor.sh`, kld_results.csv):

    QTYPE,blk.0.attn_q_a.weight,blk.0.ffn_down_exps.weight,...,group0
    iq2_ks,0.0061,0.0047,...,0.31
    iq3_ks,0.0042,0.0039,...,0.09

one row per type the tensors were lowered to (lower case or upper), one column per tensor (its GGUF
name, or a regex of names, which then holds for each tensor it matches), each cell the whole-model
mean KLD with that tensor alone at that type and the rest at the baseline; `404` (or empty) = not
measured; other columns that name no tensor (`group0`: the pure-type runs) are ignored. A per-run
floor (the baseline's own KLD, ~0.0035 in his V3.1 table) is in every cell: it is subtracted once
per tensor (`floor`, default the smallest cell), so a group's increase is the sum of its tensors'
cells less the floor each: damage adds up.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from ..errors import PlanError

NOT_MEASURED = {"", "404", "nan"}


def read_csv(path: str | Path) -> tuple[dict[str, dict[str, float]], float]:
    """{type: {column: value}} of the measured cells, and their smallest value."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise PlanError(f"{path}: {e.strerror or e}") from None
    if not rows or not rows[0] or rows[0][0].strip().upper() != "QTYPE":
        raise PlanError(f"{path}: the first column must be QTYPE (a type per row, a tensor per column)")
    head = [h.strip() for h in rows[0]]
    out: dict[str, dict[str, float]] = {}
    low = math.inf
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        typ = row[0].strip().lower()
        cells = {}
        for col, cell in zip(head[1:], row[1:]):
            cell = cell.strip()
            if cell.lower() in NOT_MEASURED:
                continue
            try:
                v = float(cell)
            except ValueError:
                raise PlanError(f"{path} line {n}, column {col}: {cell!r} is not a number") from None
            if not math.isfinite(v):
                raise PlanError(f"{path} line {n}, column {col}: {cell!r} is not finite")
            cells[col] = v
            low = min(low, v)
        out[typ] = cells
    if not out or low == math.inf:
        raise PlanError(f"{path}: no measured cell")
    return out, low


def _cell(cells: dict[str, float], tensor: str, path: Path) -> float | None:
    if tensor in cells:
        return cells[tensor]
    hits = [v for col, v in cells.items() if col != tensor and _matches(col, tensor)]
    if len(hits) > 1:
        raise PlanError(f"{path}: {tensor} matches {len(hits)} columns")
    return hits[0] if hits else None


def _matches(col: str, tensor: str) -> bool:
    try:
        return re.fullmatch(col, tensor) is not None
    except re.error:
        return False


def external_table(path: str | Path, groups_doc: dict, floor: float | None = None) -> dict:
    """The sensitivity table of `groups_doc`'s groups from an external CSV: each group's increase at
    each ladder type its tensors were all measured at (the top type: 0; a type some tensor lacks is
    not an option of the group)."""
    path = Path(path)
    cells, low = read_csv(path)
    floor = low if floor is None else floor
    top = groups_doc["settings"]["top"]
    out = []
    for g in groups_doc["groups"]:
        inc = {top: 0.0}
        if not g.get("pinned"):
            for t in g["bytes"]:
                if t == top or t not in cells:
                    continue
                vals = [_cell(cells[t], x, path) for x in g["tensors"]]
                if all(v is not None for v in vals):
                    inc[t] = sum(v - floor for v in vals)
        out.append({**g, "increase": inc, "kld": {t: floor + v for t, v in inc.items()}})
    if not any(len(g["increase"]) > 1 for g in out if not g.get("pinned")):
        raise PlanError(f"{path}: none of its columns is a tensor of the model at a ladder type "
                        f"({', '.join(sorted(cells))} rows)")
    return {**{k: v for k, v in groups_doc.items() if k != "groups"}, "top_kld": floor, "top_run": str(path),
            "predicted_from": f"external measurements {path.name} (floor {floor:g} subtracted per tensor)",
            "groups": out}
