"""The sensitivity stage's files and the allocator's input: the groups of a model (groups.json,
written before any run, so the runs can fan out), each run's mean KLD, and the table that
turns them into options (type, exact bytes, increase of mean KLD over the all-top run).

KLD, not PPL: per-group differences are far below PPL's noise (Thireus' finding), while the
mean KLD over the same tokens moves with each group. An increase below zero is measurement
noise (the group at a lower type measured better than at the top); it is kept as measured, and
the allocator then treats that type as free, which is what the additive model says.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import PlanError
from ..fileio import read_json_object
from ..gguf.reader import GGUFTable
from ..settings import AllocateSettings
from . import solver
from .groups import Group, make_groups, quantized_tensors, runs

GROUPS_VERSION = 2  # 2: settings in the config's form (groups, pin as a mapping)


def settings_dict(s: AllocateSettings) -> dict:
    """What groups.json and the sensitivity table say they were made with: the allocate
    settings the runs measure, and the top and base they imply."""
    return {**{k: v for k, v in s.to_dict().items() if k in s.SENSITIVITY}, "top": s.top, "base": s.base}


def settings_from(d: dict, where: str) -> AllocateSettings:
    return AllocateSettings.from_dict({k: v for k, v in d.items() if k in AllocateSettings.SENSITIVITY}, where)


def groups_doc(table: GGUFTable, s: AllocateSettings, has_imatrix: bool) -> dict:
    """groups.json: the settings, every group with its bytes per type, the bytes no group holds
    (norms, biases, ffn_gate_inp: copied as they are) and the model's element count (bpw budgets)."""
    groups = make_groups(table, s, has_imatrix)
    quantized = set(quantized_tensors(table, s.top))
    fixed = sum(t.nbytes for t in table.tensors if t.name not in quantized)  # copied as they are
    return {"version": GROUPS_VERSION, "model": str(table.path), "settings": settings_dict(s),
            "has_imatrix": has_imatrix, "fixed_bytes": fixed, "header_bytes": table.data_offset,
            "n_elements": table.n_elements,
            "n_tensors": len(table.tensors), "groups": [g.to_dict() for g in groups],
            "runs": [list(r) for r in runs(groups, s)]}


def load_groups(path: str | Path) -> tuple[dict, AllocateSettings, list[Group]]:
    doc = read_json_object(path, "sensitivity groups")
    if doc.get("version") != GROUPS_VERSION:
        raise PlanError(f"{path}: version {doc.get('version')!r}, expected {GROUPS_VERSION} (rerun the groups step)")
    try:
        return doc, settings_from(doc["settings"], f"{path}: settings"), [Group.from_dict(g) for g in doc["groups"]]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{path}: malformed groups file ({e})") from None


def _kld(path: str | Path) -> float:
    rec = read_json_object(path, "sensitivity run")
    k = rec.get("kld_mean")
    if not isinstance(k, (int, float)) or not math.isfinite(k):
        raise PlanError(f"{path}: kld_mean is {k!r}, not a number (the run measured no KLD)")
    return float(k)


def table(groups_path: str | Path, top_run: str | Path, run_paths: dict[tuple[str, str], str | Path]) -> dict:
    """The sensitivity table: groups.json plus each run's mean KLD and its increase over the
    top run. Every run groups.json lists must be given (a missing one is an error, not a gap)."""
    doc, s, groups = load_groups(groups_path)
    top = _kld(top_run)
    missing = [r for r in doc["runs"] if tuple(r) not in run_paths]
    if missing:
        raise PlanError(f"sensitivity table: no run for group {missing[0][0]} at {missing[0][1]}")
    out = []
    for g in groups:
        kld = {t: _kld(run_paths[(g.name, t)]) for t in g.bytes if (g.name, t) in run_paths}
        if not g.pinned:
            kld[s.top] = top
        out.append({**g.to_dict(), "kld": kld, "increase": {t: k - top for t, k in kld.items()}})
    return {**{k: v for k, v in doc.items() if k != "groups"}, "top_kld": top, "top_run": str(top_run),
            "groups": out}


def options(sens: dict) -> list[solver.Group]:
    """The allocator's groups from a sensitivity table: each type with its bytes and increase
    (a pinned group: its one type, no increase)."""
    out = []
    for g in sens["groups"]:
        if g.get("pinned"):
            opts = (solver.Option(g["pinned"], int(g["bytes"][g["pinned"]]), 0.0),)
        else:
            opts = tuple(solver.Option(t, int(b), float(g["increase"][t])) for t, b in g["bytes"].items()
                         if t in g["increase"])
        out.append(solver.Group(g["name"], g["match"], opts, g.get("budget", solver.TOTAL)))
    return out
