"""The per-type pool: each tensor quantized once per type, every recipe assembled from it.

A pool file is the model quantized by llama-quantize with one `--custom-q` rule asking every
tensor for one type (the engine's row-size fallbacks then apply as in any recipe). A recipe's
GGUF is assembled by copying each tensor's bytes from a pool file that holds it at the type the
recipe's plan gives it; a tensor quantizes the same whatever else is in the file (the engine
quantizes tensor by tensor, from its own data and imatrix entry), so the bytes equal what
llama-quantize writes for the recipe (tests/test_pool_e2e.py checks it on the real engine).

What cannot come from a pool (a tensor whose type no pool file holds, ffn_gate_inp quantized,
which the pool never does) makes the recipe not assemblable: `assembly` says why and the
quantize step runs llama-quantize for it instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import PlanError
from ..gguf.reader import GGUFTable
from .plan import Plan, compare, plan
from .recipes import Recipe, Rule

POOL_BASE = "Q8_0"  # the positional ftype of a pool run: any quantized ftype lets the rule apply


def pool_recipe(typ: str) -> Recipe:
    """What llama-quantize is told for the pool file of `typ`: every tensor at `typ`."""
    return Recipe(name=f"pool-{typ}", base=POOL_BASE, rules=(Rule(".", typ),))


def named_types(recipe: Recipe) -> list[str]:
    """The pool files a recipe can be assembled from, known without the model: the types its
    rules and its token_embd/output flags name (a tensor the base ftype's heuristics type is
    served only when one of these holds it; else the recipe goes to llama-quantize)."""
    types = [r.type for r in recipe.rules] + [t for t in (recipe.token_embd, recipe.output) if t]
    return sorted(set(types))


@dataclass
class Assembly:
    plan: Plan                      # the recipe's plan: every tensor's type and bytes
    sources: dict[str, str | None]  # tensor -> pool type that holds its bytes; None: the model's own
    pool_files: dict[str, dict[str, str]]  # pool type -> tensor -> the type its file holds (planned)

    def pools_used(self) -> list[str]:
        return sorted({t for t in self.sources.values() if t is not None})


def assembly(table: GGUFTable, recipe: Recipe, pool_types: list[str], has_imatrix: bool) -> Assembly:
    """Where each tensor of `recipe`'s GGUF comes from, given pool files for `pool_types` (their
    plans are computed here: the same planner, so a pool's tensor types are known exactly).
    PlanError naming the first tensor no pool holds at its type."""
    if recipe.pure:
        raise PlanError(f"{recipe.name}: --pure recipes are quantized by llama-quantize (no pool)")
    p = plan(table, recipe, has_imatrix=has_imatrix)
    pools = {t: {x.name: x for x in plan(table, pool_recipe(t), has_imatrix=has_imatrix, strict=False).tensors}
             for t in pool_types}
    rule_type = dict(enumerate(r.type for r in recipe.rules))
    sources: dict[str, str | None] = {}
    for t in p.tensors:
        if not t.quantized:
            sources[t.name] = next((k for k, v in pools.items() if not v[t.name].quantized), None)
            continue
        want = [t.selected, rule_type.get(t.rule) if t.rule is not None else None, t.type]
        src = next((k for k in want if k in pools and pools[k][t.name].quantized and pools[k][t.name].type == t.type),
                   None)
        if src is None:
            src = next((k for k, v in pools.items() if v[t.name].quantized and v[t.name].type == t.type), None)
        if src is None:
            raise PlanError(f"{recipe.name}: no pool file holds {t.name} at {t.type} "
                            f"(pools: {', '.join(pool_types) or 'none'})")
        sources[t.name] = src
    return Assembly(p, sources, {k: {n: x.type for n, x in v.items()} for k, v in pools.items()})


def check_pool(pool_plan: Plan, engine_types: Mapping[str, str | None]) -> None:
    """A pool file is only useful if the engine typed it as planned (assembly trusts the plan)."""
    diffs = compare(pool_plan, dict(engine_types))
    if diffs:
        raise PlanError(f"pool {pool_plan.recipe}: the engine's types differ from the plan in {len(diffs)} "
                        f"tensor(s); first: {diffs[0]}")
