"""The sensitivity stage's files and the allocator's input: the groups of a model (groups.json,
written before any run, so the runs can fan out), each run's mean KLD, and the table that
turns them into options (type, exact bytes, increase of mean KLD over the all-top run).

KLD, not PPL: per-group differences are far below PPL's noise (Thireus' finding), while the
mean KLD over the same tokens moves with each group. An increase below zero is measurement
noise (the group at a lower type measured better than at the top); it is kept as measured, and
the allocator then treats that type as free, which is what the additive model says.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import PlanError
from ..fileio import read_json_object
from ..gguf.reader import GGUFTable
from ..settings import AllocateSettings
from . import proxy, solver
from .external import external_table
from .groups import Group, make_groups, quantized_tensors, runs, sensitivity_recipe
from .solver import group_bytes

GROUPS_VERSION = 3  # 2: settings in the config's form (groups, pin as a mapping); 3: sensitivity sources


def settings_dict(s: AllocateSettings) -> dict:
    """What groups.json and the sensitivity table say they were made with: the allocate
    settings the runs measure, and the top and base they imply."""
    return {**{k: v for k, v in s.to_dict().items() if k in s.SENSITIVITY}, "top": s.top, "base": s.base}


def settings_from(d: dict, where: str) -> AllocateSettings:
    return AllocateSettings.from_dict({k: v for k, v in d.items() if k in AllocateSettings.SENSITIVITY}, where)


def band_groups(table: GGUFTable, s: AllocateSettings, has_imatrix: bool) -> list[dict]:
    """The band runs of a proxy table (allocator.proxy.bands_of: `s.bands` contiguous bands of
    layers per class family, pinned tensors left at their pin, lowered to `s.band`), each a group
    with its family and layers; a band the planner will not give that type is left out (its
    family then has fewer points)."""
    if s.bands == 0:
        return []
    names = [n for n in quantized_tensors(table, s.top) if not any(re.search(rx, n) for rx, _ in s.pins)]
    out = []
    for b in proxy.bands_of(names, s.bands):
        g = Group(f"band-{b['family']}.L{b['layers'][0]}-{b['layers'][1]}", b["match"], b["tensors"])
        g.bytes = group_bytes(table, [(g.name, g.match)], [s.band], s.base, has_imatrix)[g.name]
        if s.band in g.bytes:
            out.append({**g.to_dict(), "family": b["family"], "layers": b["layers"]})
    return out


def planned_runs(table: GGUFTable, s: AllocateSettings, has_imatrix: bool) -> tuple[list[Group], dict]:
    """The allocation's groups and what the sensitivity stage runs for them, by `s.sensitivity`:
    measured: a run per (group, lower type); proxy: the class groups' runs and the band runs
    (`class_groups`, `bands`); external: none. {"runs": [(group, type)], ...} as groups.json has it."""
    groups = make_groups(table, s, has_imatrix)
    if s.sensitivity == "measured":
        return groups, {"runs": [list(r) for r in runs(groups, s)]}
    if s.sensitivity == "external":
        return groups, {"runs": [], "external": s.external}
    cls = make_groups(table, s.class_level, has_imatrix)
    bands = band_groups(table, s, has_imatrix)
    return groups, {"runs": [list(r) for r in runs(cls, s)] + [[b["name"], s.band] for b in bands],
                    "class_groups": [g.to_dict() for g in cls], "bands": bands}


def groups_doc(table: GGUFTable, s: AllocateSettings, has_imatrix: bool) -> dict:
    """groups.json: the settings, every group with its bytes per type, the bytes no group holds
    (norms, biases, ffn_gate_inp: copied as they are), the model's element count (bpw budgets) and
    the runs the table is made of (planned_runs)."""
    groups, plan = planned_runs(table, s, has_imatrix)
    quantized = set(quantized_tensors(table, s.top))
    fixed = sum(t.nbytes for t in table.tensors if t.name not in quantized)  # copied as they are
    return {"version": GROUPS_VERSION, "model": str(table.path), "settings": settings_dict(s),
            "has_imatrix": has_imatrix, "fixed_bytes": fixed, "header_bytes": table.data_offset,
            "n_elements": table.n_elements,
            "n_tensors": len(table.tensors), "groups": [g.to_dict() for g in groups], **plan}


def run_groups(doc: dict) -> list[Group]:
    """The groups a run of groups.json may lower: the allocation's (measured), or the class groups
    and the bands (proxy)."""
    if doc.get("settings", {}).get("sensitivity", "measured") == "proxy":
        return [Group.from_dict(g) for g in doc["class_groups"] + doc["bands"]]
    return [Group.from_dict(g) for g in doc["groups"]]


def load_groups(path: str | Path) -> tuple[dict, AllocateSettings, list[Group]]:
    doc = read_json_object(path, "sensitivity groups")
    if doc.get("version") != GROUPS_VERSION:
        raise PlanError(f"{path}: version {doc.get('version')!r}, expected {GROUPS_VERSION} (rerun the groups step)")
    try:
        return doc, settings_from(doc["settings"], f"{path}: settings"), [Group.from_dict(g) for g in doc["groups"]]
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{path}: malformed groups file ({e})") from None


def run_key(doc: dict, group: str, typ: str) -> str:
    """What one run of groups.json measures, as text: its recipe's base and rules. The workflow
    reruns a run when this changes, not when groups.json is rewritten, so switching to
    sensitivity: proxy (or changing the bands) keeps the class runs already measured."""
    s = settings_from(doc["settings"], "groups.json: settings")
    r = sensitivity_recipe(run_groups(doc), s, group, typ)
    return json.dumps({"base": r.base, "rules": [[x.match, x.type] for x in r.rules]})


def top_key(s: AllocateSettings) -> str:
    """What the top run measures, from the settings alone (the model is its input): the pins
    and the top. Known before groups.json is, so the top run starts beside the groups step."""
    return json.dumps({"base": s.base, "top": s.top, "pin": s.pin})


def _kld(path: str | Path) -> float:
    rec = read_json_object(path, "sensitivity run")
    k = rec.get("kld_mean")
    if not isinstance(k, (int, float)) or not math.isfinite(k):
        raise PlanError(f"{path}: kld_mean is {k!r}, not a number (the run measured no KLD)")
    return float(k)


def _measured(doc: dict, s: AllocateSettings, groups: list[Group], top_run: str | Path,
              run_paths: dict[tuple[str, str], str | Path]) -> dict:
    top = _kld(top_run)
    out = []
    for g in groups:
        kld = {t: _kld(run_paths[(g.name, t)]) for t in g.bytes if (g.name, t) in run_paths}
        if not g.pinned:
            kld[s.top] = top
        out.append({**g.to_dict(), "kld": kld, "increase": {t: k - top for t, k in kld.items()}})
    return {**{k: v for k, v in doc.items() if k not in ("groups", "class_groups", "bands")}, "top_kld": top,
            "top_run": str(top_run), "groups": out}


def table(groups_path: str | Path, top_run: str | Path | None, run_paths: dict[tuple[str, str], str | Path],
          errors: str | Path | None = None, external: str | Path | None = None) -> dict:
    """The sensitivity table of groups.json's groups, by its settings' `sensitivity`: measured:
    each run's mean KLD and its increase over the top run; proxy: the class groups' table so
    made, split over the groups by the proxy's `errors` and the band runs (allocator.proxy.predict);
    external: the CSV (allocator.external). Every run groups.json lists must be given (a missing
    one is an error, not a gap)."""
    doc, s, groups = load_groups(groups_path)
    if s.sensitivity == "external":
        if external is None:
            raise PlanError(f"sensitivity table: {groups_path} reads an external CSV (sensitivity: external); give it")
        return {**external_table(external, doc), "sensitivity": "external"}
    missing = [r for r in doc["runs"] if tuple(r) not in run_paths]
    if missing:
        raise PlanError(f"sensitivity table: no run for group {missing[0][0]} at {missing[0][1]}")
    if top_run is None:
        raise PlanError("sensitivity table: no top run (every group at the ladder's top)")
    if s.sensitivity == "measured":
        return {**_measured(doc, s, groups, top_run, run_paths), "sensitivity": "measured"}
    if errors is None:
        raise PlanError(f"sensitivity table: {groups_path} splits the class runs by the proxy (sensitivity: proxy); "
                        "give its errors (quantsweep sensitivity proxy)")
    cls = [Group.from_dict(g) for g in doc["class_groups"]]
    class_table = _measured(doc, s, cls, top_run, run_paths)
    top = class_table["top_kld"]
    bands = [{"name": b["name"], "family": b["family"], "layers": b["layers"], "type": s.band,
              "measured": _kld(run_paths[(b["name"], s.band)]) - top} for b in doc["bands"]]
    err = read_json_object(errors, "proxy errors")
    if not isinstance(err.get("tensors"), dict):
        raise PlanError(f"{errors}: no tensors (not the output of quantsweep sensitivity proxy)")
    out = proxy.predict(class_table, {k: v for k, v in doc.items() if k not in ("class_groups", "bands")},
                        err["tensors"], bands)
    return {**out, "sensitivity": "proxy", "class_table": class_table["groups"], "errors": str(errors)}


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
