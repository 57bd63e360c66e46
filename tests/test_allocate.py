"""The size-budget allocator (quantsweep.allocator.solver): optimal against brute force on small
instances, split budgets, what does not fit, exact group bytes from the planner on the demo
model, and the recipe it writes."""

from __future__ import annotations

import itertools
import math
import random
import re

import pytest

from quantsweep.errors import PlanError
from quantsweep.gguf.reader import read_model
from quantsweep.allocator.solver import TOTAL, Group, Option, group_bytes, solve
from quantsweep.planner.plan import plan
from quantsweep.planner.recipes import recipe_from_dict
from quantsweep.settings import AllocateSettings

RES = AllocateSettings().resolution  # the solver's default resolution


def _random_groups(rnd: random.Random, n: int, budgets: tuple[str, ...] = (TOTAL,)) -> list[Group]:
    """Groups whose options get smaller and worse down a ladder, as real types do, with noise."""
    groups = []
    for i in range(n):
        size, kld, opts = rnd.randint(50, 400), 0.0, []
        for t in range(rnd.randint(1, 4)):
            opts.append(Option(f"t{t}", size, round(kld, 6)))
            size = max(1, int(size * rnd.uniform(0.4, 0.9)))
            kld += rnd.uniform(0.0, 0.05)
        groups.append(Group(f"g{i}", f"g{i}$", tuple(opts), rnd.choice(budgets)))
    return groups


def _brute(groups: list[Group], budgets: dict[str, int]) -> float:
    """The lowest total KLD over every combination of options that fits every budget."""
    best = math.inf
    for combo in itertools.product(*(g.options for g in groups)):
        used = {k: 0 for k in budgets}
        for g, o in zip(groups, combo):
            used[g.budget] += o.bytes
        if all(used[k] <= budgets[k] for k in budgets):
            best = min(best, math.fsum(o.kld for o in combo))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_optimal_against_brute_force(seed):
    rnd = random.Random(seed)
    split = seed % 2 == 1
    keys = ("gpu", "ram") if split else (TOTAL,)
    groups = _random_groups(rnd, rnd.randint(2, 6), keys)
    budgets = {}
    for k in keys:
        lo = sum(min(o.bytes for o in g.options) for g in groups if g.budget == k)
        hi = sum(max(o.bytes for o in g.options) for g in groups if g.budget == k)
        budgets[k] = rnd.randint(lo, max(lo, hi))
    a = solve(groups, budgets, RES)
    assert a.kld == pytest.approx(_brute(groups, budgets), abs=1e-12)
    for k in keys:  # the answer fits, and its bytes are what it says
        assert a.bytes[k] == sum(a.choice[g.name].bytes for g in groups if g.budget == k) <= budgets[k]
    assert a.kld == pytest.approx(math.fsum(o.kld for o in a.choice.values()), abs=1e-15)


def test_rounded_sizes_still_fit_and_stay_near_optimal():
    """A budget far above `resolution` bytes: sizes are rounded up to units, so the answer fits
    the exact budget; it can only lose what one unit per group could have bought."""
    rnd = random.Random(7)
    groups = [Group(g.name, g.match, tuple(Option(o.type, o.bytes * 10_007, o.kld) for o in g.options))
              for g in _random_groups(rnd, 6)]
    budget = sum(min(o.bytes for o in g.options) for g in groups) * 3 // 2
    exact = _brute(groups, {TOTAL: budget})
    a = solve(groups, {TOTAL: budget}, resolution=64)  # units of ~1/64 of the budget
    assert a.bytes[TOTAL] <= budget
    assert a.kld >= exact - 1e-12
    shrunk = _brute(groups, {TOTAL: budget - len(groups) * -(-budget // 64)})
    assert a.kld <= shrunk + 1e-12


def test_more_budget_never_predicts_more_kld():
    groups = _random_groups(random.Random(3), 8)
    lo = sum(min(o.bytes for o in g.options) for g in groups)
    hi = sum(max(o.bytes for o in g.options) for g in groups)
    klds = [solve(groups, {TOTAL: b}, RES).kld for b in range(lo, hi + 1, max(1, (hi - lo) // 40))]
    assert all(b <= a + 1e-12 for a, b in zip(klds, klds[1:]))
    assert solve(groups, {TOTAL: hi}, RES).kld == sum(min(o.kld for o in g.options) for g in groups)  # all fit


@pytest.mark.parametrize("groups, budgets, said", [
    ([Group("a", "a", (Option("q8_0", 100, 0.0), Option("iq2_ks", 40, 0.1)))], {TOTAL: 39},
     "budget 'total' of 39 bytes is below the 40 bytes of the smallest option of every group"),
    ([Group("a", "a", (Option("q8_0", 100, 0.0),), "ram")], {TOTAL: 500}, "counts against budget 'ram'"),
    ([Group("a", "a", ()), ], {TOTAL: 5}, "group 'a' has no option"),
    ([Group("a", "a", (Option("x", 1, 0.0),)), Group("a", "b", (Option("x", 1, 0.0),))], {TOTAL: 5},
     "group 'a' is listed twice"),
    ([Group("a", "a", (Option("x", 1, math.nan),))], {TOTAL: 5}, "option x: bytes 1, KLD nan"),
])
def test_what_cannot_be_solved_is_named(groups, budgets, said):
    with pytest.raises(PlanError, match=said.replace("(", r"\(").replace(")", r"\)")):
        solve(groups, budgets, RES)


# groups of the demo model: each a recipe rule; ffn_up and ffn_gate of the experts share one
GROUPS = [("attn", r"blk\.[0-9]+\.attn_"), ("dense", r"blk\.0\.ffn_(gate|up|down)\.weight"),
          ("shexp", r"ffn_(gate|up|down)_shexp\.weight"), ("exps_up_gate", r"ffn_(gate|up)_exps\.weight"),
          ("exps_down", r"ffn_down_exps\.weight")]
LADDER = ("q8_0", "iq6_k", "iq4_ks", "iq3_ks", "iq2_ks")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return read_model(tiny_gguf())


def test_group_bytes_are_what_the_planner_gives_the_recipe(tiny):
    """Bytes per group and type from one planner run per type; a recipe made of the chosen types
    is planned to exactly those bytes per group (first match wins, fallbacks included)."""
    sizes = group_bytes(tiny, GROUPS, LADDER, "Q8_0", has_imatrix=True)
    assert set(sizes) == {name for name, _ in GROUPS}
    for name, by_type in sizes.items():
        assert list(by_type) == list(LADDER)
        assert by_type["q8_0"] > by_type["iq6_k"] > by_type["iq4_ks"] > by_type["iq3_ks"] > by_type["iq2_ks"], name
    rnd = random.Random(0)
    groups = [Group(n, m, tuple(Option(t, sizes[n][t], i * rnd.uniform(0.001, 0.01)) for i, t in enumerate(LADDER)))
              for n, m in GROUPS]
    budget = sum(sizes[n]["iq3_ks"] for n in sizes)
    a = solve(groups, {TOTAL: budget}, RES)
    p = plan(tiny, a.recipe(groups, "auto", "Q8_0"), has_imatrix=True)
    planned = {t.name: t.nbytes for t in p.tensors}
    for n, m in GROUPS:
        got = sum(b for t, b in planned.items() if next((g for g, mm in GROUPS if re.search(mm, t)), None) == n)
        assert got == a.choice[n].bytes, n
    assert a.bytes[TOTAL] <= budget


def test_group_that_matches_nothing_is_refused(tiny):
    with pytest.raises(PlanError, match="group 'typo' matches no tensor"):
        group_bytes(tiny, [("typo", r"ffn_upp_exps")], LADDER, "Q8_0")


def test_allocation_writes_a_recipe_the_recipe_loader_reads():
    import yaml

    groups = [Group("exps", r"ffn_(gate|up)_exps\.weight", (Option("q8_0", 100, 0.0), Option("iq2_ks", 30, 0.2))),
              Group("attn", r"attn_", (Option("q8_0", 50, 0.0), Option("iq4_ks", 25, 0.01)))]
    a = solve(groups, {TOTAL: 80}, RES)
    assert {g: o.type for g, o in a.choice.items()} == {"exps": "iq2_ks", "attn": "q8_0"}
    text = a.to_yaml(groups, "auto-80", "Q8_0", header=["budget: 80 bytes", "sensitivity: test"])
    assert text.startswith("# budget: 80 bytes\n# sensitivity: test\n# predicted: 80 bytes")
    r = recipe_from_dict(yaml.safe_load(text), "auto.yaml")
    assert r.name == "auto-80" and r.base == "Q8_0"
    assert [(x.match, x.type) for x in r.rules] == [(r"ffn_(gate|up)_exps\.weight", "iq2_ks"), ("attn_", "q8_0")]
