"""The size-budget allocator: which type each group of tensors gets so that the predicted KLD is
lowest and the file fits (issue 13's solver; the sensitivity measurements feed it).

A *group* is a set of tensors that always share a type (one recipe rule: a tensor class across
layers, a layer, one tensor; ffn_up and ffn_gate of a layer belong in one group, the fused MoE
kernel wants them alike, ik_llama.cpp #495; a pinned tensor is a group with one option). Each
option of a group is a type with its exact bytes (from the planner: row-size fallbacks included)
and the predicted increase of mean KLD when only that group is lowered to it. The predicted KLD
of a recipe is the sum over its groups (additive model), so the best recipe under a byte budget
is a multiple-choice knapsack, solved exactly here by dynamic programming over sizes rounded up
to 1/`resolution` of the budget (a rounded size never underestimates, so the answer always fits;
with budgets below `resolution` bytes the rounding is exact). Groups may count against separate
budgets (GPU tensors vs experts in RAM): each budget is its own knapsack.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PlanError
from ..gguf.reader import GGUFTable
from ..gguf.types import needs_imatrix
from ..planner.plan import plan
from ..planner.recipes import Recipe, Rule
from ..settings import Budget

TOTAL = "total"  # the budget a group counts against when there is one budget


@dataclass(frozen=True)
class Option:
    type: str    # the engine's type name (a recipe rule's type)
    bytes: int   # the group's tensor bytes at this type
    kld: float   # predicted increase of mean KLD (0 for the reference choice)


@dataclass(frozen=True)
class Group:
    name: str
    match: str                  # regex over tensor names: the recipe rule
    options: tuple[Option, ...]
    budget: str = TOTAL         # which budget its bytes count against


@dataclass
class Allocation:
    choice: dict[str, Option]   # group name -> chosen option
    bytes: dict[str, int]       # per budget: exact bytes of the chosen options
    kld: float                  # predicted: sum of the chosen options' kld

    def recipe(self, groups: Sequence[Group], name: str, base: str, description: str = "") -> Recipe:
        """The allocation as a recipe: one rule per group in group order (first match wins, so
        groups listed first take precedence over broader ones listed later)."""
        rules = tuple(Rule(g.match, self.choice[g.name].type,
                           comment=f"{g.name}: predicted {self.choice[g.name].kld:+.6g} KLD") for g in groups)
        return Recipe(name=name, base=base, rules=rules, description=description)

    def to_yaml(self, groups: Sequence[Group], name: str, base: str, header: Sequence[str] = ()) -> str:
        """The recipe file (config/recipes/ format), `header` lines as comments on top: what the
        budget was and where the sensitivity data came from, next to the predicted size and KLD."""
        import yaml

        r = self.recipe(groups, name, base)
        lines = [f"# {h}" for h in header]
        lines += [f"# predicted: {sum(self.bytes.values())} bytes of allocated tensors "
                  f"({', '.join(f'{k} {v}' for k, v in self.bytes.items())}), mean KLD {self.kld:+.6g}"]
        body = {"name": r.name, "description": r.description or f"allocated for a budget ({len(groups)} groups)",
                "base": r.base, "rules": [{"match": x.match, "type": x.type, "comment": x.comment} for x in r.rules]}
        return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, width=1000, allow_unicode=True)


def solve(groups: Sequence[Group], budgets: dict[str, int], resolution: int) -> Allocation:
    """The choice per group with the lowest total predicted KLD whose bytes fit every budget.
    PlanError when even the smallest options do not fit, or a group names no budget given."""
    _check(groups, budgets)
    choice: dict[str, Option] = {}
    for key, cap in budgets.items():
        mine = [g for g in groups if g.budget == key]
        if mine:
            choice.update(_knapsack(mine, cap, resolution, key))
    used = {key: sum(choice[g.name].bytes for g in groups if g.budget == key) for key in budgets}
    return Allocation(choice, used, math.fsum(o.kld for o in choice.values()))


def _check(groups: Sequence[Group], budgets: dict[str, int]) -> None:
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise PlanError(f"allocate: group {next(n for n in names if names.count(n) > 1)!r} is listed twice")
    for g in groups:
        if not g.options:
            raise PlanError(f"allocate: group {g.name!r} has no option")
        if g.budget not in budgets:
            raise PlanError(f"allocate: group {g.name!r} counts against budget {g.budget!r}, which is not given "
                            f"(budgets: {', '.join(budgets)})")
        bad = next((o for o in g.options if o.bytes < 0 or not math.isfinite(o.kld)), None)
        if bad is not None:
            raise PlanError(f"allocate: group {g.name!r} option {bad.type}: bytes {bad.bytes}, KLD {bad.kld}")


def _knapsack(groups: Sequence[Group], cap: int, resolution: int, key: str) -> dict[str, Option]:
    """Exact multiple-choice knapsack over sizes in units of ceil(cap / resolution) bytes."""
    unit = max(1, -(-cap // resolution))
    slots = cap // unit
    least = sum(min(o.bytes for o in g.options) for g in groups)
    if least > cap:
        raise PlanError(f"allocate: budget {key!r} of {cap} bytes is below the {least} bytes of the smallest "
                        "option of every group")
    best = np.zeros(slots + 1)  # best[c]: lowest KLD of the groups so far within c units
    picks = np.empty((len(groups), slots + 1), dtype=np.int16)
    for gi, g in enumerate(groups):
        new = np.full(slots + 1, np.inf)
        for oi, o in enumerate(g.options):
            w = -(-o.bytes // unit)
            if w > slots:
                continue
            cand = np.full(slots + 1, np.inf)
            cand[w:] = best[: slots + 1 - w] + o.kld
            better = cand < new
            new[better] = cand[better]
            picks[gi][better] = oi
        best = new
    if not math.isfinite(best[slots]):
        raise PlanError(f"allocate: nothing fits budget {key!r} of {cap} bytes once sizes are rounded to "
                        f"{unit}-byte units; raise the resolution")
    out, c = {}, slots
    for gi in range(len(groups) - 1, -1, -1):
        o = groups[gi].options[picks[gi][c]]
        out[groups[gi].name] = o
        c -= -(-o.bytes // unit)
    return out


def group_bytes(table: GGUFTable, groups: Sequence[tuple[str, str]], types: Sequence[str], base: str,
                has_imatrix: bool = True) -> dict[str, dict[str, int]]:
    """Exact bytes of each (name, match) group at each type, as the engine would write them (the
    planner: row-size fallbacks, first-match order of the groups' rules: a tensor counts for the
    first group that matches it). A type the planner refuses (one that needs an imatrix, with
    has_imatrix False) is left out of every group's dict."""
    names = [t.name for t in table.tensors]
    members = {name: [n for n in names if re.search(match, n)] for name, match in groups}
    if empty := [name for name, m in members.items() if not m]:
        raise PlanError(f"allocate: group {empty[0]!r} matches no tensor of {getattr(table, 'path', 'the model')}")
    out: dict[str, dict[str, int]] = {name: {} for name, _ in groups}
    claimed = {name: [n for n in m if _first_group(n, groups) == name] for name, m in members.items()}
    for typ in types:
        recipe = Recipe(name="probe", base=base, rules=tuple(Rule(m, typ) for _, m in groups))
        try:
            p = plan(table, recipe, has_imatrix=has_imatrix, strict=False)
        except PlanError:
            continue
        by_name = {t.name: t for t in p.tensors}
        for name, _ in groups:
            if not has_imatrix and any(_refused(by_name[n], p.ftype) for n in claimed[name]):
                continue
            out[name][typ] = sum(by_name[n].nbytes for n in claimed[name])
    return out


def _refused(t, ftype: str) -> bool:
    """The engine aborts on this tensor's type without an imatrix (token_embd/output exempt)."""
    return (t.quantized and t.name not in ("token_embd.weight", "output.weight")
            and needs_imatrix(t.selected, ftype))


def _first_group(tensor: str, groups: Sequence[tuple[str, str]]) -> str | None:
    """The group whose rule the engine applies to `tensor` (first match wins)."""
    return next((name for name, match in groups if re.search(match, tensor)), None)


SLACK_PER_TENSOR = 32    # a tensor's data is padded to the file's alignment (32 unless the model says more)
SLACK_HEADER = 4096      # the assembled file's own KVs (recipe, pools) beside the engine's


def budget_bytes(b: Budget, sens: dict, size_of_bytes: int | None = None) -> dict[str, int]:
    """The knapsack's capacities in tensor bytes of the groups, from a sensitivity table (its
    fixed bytes, header size, element and tensor counts): the whole file must fit, so the copied
    tensors, the header and each tensor's alignment padding come off the top."""
    slack = SLACK_PER_TENSOR * int(sens["n_tensors"]) + SLACK_HEADER
    fixed, header = int(sens["fixed_bytes"]), int(sens.get("header_bytes", 0))
    if b.split:
        return {"gpu": int(b.gpu_gib * 2**30) - fixed - header - slack, "ram": int(b.ram_gib * 2**30)}
    if b.size_of:
        if size_of_bytes is None:
            raise PlanError(f"budget {b.name}: the size of {b.size_of} is needed (its planned tensor bytes)")
        total = size_of_bytes - slack   # both files have a header: the quant's as large as ours, less our KVs
    elif b.gib is not None:
        total = int(b.gib * 2**30) - header - slack
    else:
        total = int(b.bpw * int(sens["n_elements"]) / 8)
    return {TOTAL: total - fixed}


def allocate_budget(sens: dict, b: Budget, groups: Sequence[Group], size_of_bytes: int | None,
                    resolution: int) -> tuple[Allocation, dict]:
    """The allocation for one budget, and what the allocator predicts of it (the JSON the report
    reads: budget, predicted mean KLD = top run's KLD + the chosen increases, predicted bytes)."""
    caps = budget_bytes(b, sens, size_of_bytes)
    if b.split:
        bad = next((g for g in groups if g.budget not in caps), None)
        if bad is not None:
            raise PlanError(f"budget {b.name}: group {bad.name} mixes routed experts and other tensors; a split "
                            "budget needs them in separate groups (groups: items per class)")
    elif any(g.budget != TOTAL for g in groups):
        groups = [Group(g.name, g.match, g.options, TOTAL) for g in groups]
    a = solve(groups, caps, resolution)
    kind, value = b.kind()
    fixed = int(sens["fixed_bytes"])
    info = {"budget": {"name": b.name, "kind": kind, "value": value, "describe": b.describe(),
                       "bytes": sum(caps.values()) + fixed, "group_bytes": caps},
            "predicted": {"kld_mean": float(sens["top_kld"]) + a.kld, "tensor_bytes": fixed + sum(a.bytes.values()),
                          "bytes_by_budget": a.bytes, "top_kld": float(sens["top_kld"]), "sum_increase": a.kld},
            "choice": {name: o.type for name, o in a.choice.items()}}
    return a, info


def next_up(g: Group, current: str) -> Option | None:
    """The option after `current` in the group's ladder order (more bits), None at the top."""
    types = [o.type for o in g.options]
    i = types.index(current)
    return g.options[i + 1] if i + 1 < len(types) else None


def refined_groups(groups: Sequence[Group], choice: dict[str, str], measured: float,
                   context: dict[str, float]) -> tuple[list[Group], dict[str, float]]:
    """The refinement: the sensitivities corrected by what raising each group one rung *inside the
    allocated recipe* gained (context[g] = that recipe's KLD with g one rung up, measured = its
    own). The additive model's step from the chosen type to the next is replaced by the measured
    one, and the rungs below move with it (their differences kept), so the corrected model
    reproduces the measured marginals where the recipe stands. Returns the groups and each
    group's shift (measured step minus predicted step)."""
    out, shifts = [], {}
    for g in groups:
        c = choice[g.name]
        up = next_up(g, c)
        if up is None or g.name not in context:
            out.append(g)
            continue
        cur = next(o for o in g.options if o.type == c)
        shift = (measured - context[g.name]) - (cur.kld - up.kld)
        shifts[g.name] = shift
        at_or_below = {o.type for o in g.options[: [o.type for o in g.options].index(c) + 1]}
        out.append(Group(g.name, g.match, tuple(Option(o.type, o.bytes, o.kld + shift if o.type in at_or_below
                                                       else o.kld) for o in g.options), g.budget))
    return out, shifts
