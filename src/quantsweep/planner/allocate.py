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
from .plan import plan
from .recipes import Recipe, Rule

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
                           comment=f"{g.name}: predicted +{self.choice[g.name].kld:.6g} KLD") for g in groups)
        return Recipe(name=name, base=base, rules=rules, description=description)

    def to_yaml(self, groups: Sequence[Group], name: str, base: str, header: Sequence[str] = ()) -> str:
        """The recipe file (config/recipes/ format), `header` lines as comments on top: what the
        budget was and where the sensitivity data came from, next to the predicted size and KLD."""
        import yaml

        r = self.recipe(groups, name, base)
        lines = [f"# {h}" for h in header]
        lines += [f"# predicted: {sum(self.bytes.values())} bytes of allocated tensors "
                  f"({', '.join(f'{k} {v}' for k, v in self.bytes.items())}), mean KLD +{self.kld:.6g}"]
        body = {"name": r.name, "description": r.description or f"allocated for a budget ({len(groups)} groups)",
                "base": r.base, "rules": [{"match": x.match, "type": x.type, "comment": x.comment} for x in r.rules]}
        return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, width=1000, allow_unicode=True)


def solve(groups: Sequence[Group], budgets: dict[str, int], resolution: int = 1 << 16) -> Allocation:
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
    for typ in types:
        recipe = Recipe(name="probe", base=base, rules=tuple(Rule(m, typ) for _, m in groups))
        try:
            p = plan(table, recipe, has_imatrix=has_imatrix, strict=False)
        except PlanError:
            continue
        by_name = {t.name: t for t in p.tensors}
        for name, match in groups:
            claimed = [n for n in members[name] if _first_group(n, groups) == name]
            out[name][typ] = sum(by_name[n].nbytes for n in claimed)
    return out


def _first_group(tensor: str, groups: Sequence[tuple[str, str]]) -> str | None:
    """The group whose rule the engine applies to `tensor` (first match wins)."""
    return next((name for name, match in groups if re.search(match, tensor)), None)
