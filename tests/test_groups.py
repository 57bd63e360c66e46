"""Sensitivity groups, the sensitivity table, budgets and the pool's assembly plan (issue 13),
on the DeepSeek-V3-shaped tensor table (gguf.deepseek2: the real model's shapes, no weights)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from quantsweep.allocator import sensitivity as sens
from quantsweep.allocator import solver as alloc
from quantsweep.allocator.groups import GPU, RAM, make_groups, runs, sensitivity_recipe, tensor_class
from quantsweep.config import ConfigError, load, load_yaml
from quantsweep.errors import PlanError, RecipeError
from quantsweep.gguf.deepseek2 import deepseek_v3_table
from quantsweep.planner.plan import plan
from quantsweep.planner.pool import assembly, named_types, pool_recipe
from quantsweep.planner.recipes import Recipe, Rule, load_recipe
from quantsweep.settings import AllocateSettings, Budget

from conftest import ROOT

LADDER = ["iq2_ks", "iq3_ks", "iq4_ks", "iq5_ks", "q8_0"]


@pytest.fixture(scope="module")
def v3():
    return deepseek_v3_table()


RES = AllocateSettings().resolution


def settings(**kw) -> AllocateSettings:
    return AllocateSettings.from_dict({"ladder": LADDER, **kw})


def test_tensor_class_joins_gate_and_up():
    assert tensor_class("blk.3.ffn_up_exps.weight") == (3, "ffn_gate_up_exps")
    assert tensor_class("blk.3.ffn_gate_exps.weight") == (3, "ffn_gate_up_exps")
    assert tensor_class("blk.0.ffn_gate.weight") == (0, "ffn_gate_up")
    assert tensor_class("blk.7.ffn_up_shexp.weight") == (7, "ffn_gate_up_shexp")
    assert tensor_class("blk.7.ffn_down_exps.weight") == (7, "ffn_down_exps")
    assert tensor_class("blk.7.ffn_gate_inp.weight") == (7, "ffn_gate_inp")
    assert tensor_class("output.weight") == (None, "output")


@pytest.mark.parametrize("section, key", [
    ({"ladder": ["q8_0"]}, "allocate.ladder"),
    ({"ladder": ["q8_0", "iq2_ks"]}, "fewest bits"),
    ({"ladder": ["iq2_ks", "iq2_ks"]}, "twice"),
    ({"ladder": ["IQ2_KS", "q8_0"]}, "allocate.ladder[0]"),
    ({"ladder": LADDER, "groups": "experts"}, "allocate.groups"),
    ({"ladder": LADDER, "groups": [{"match": "exps", "per": "block"}]}, "allocate.groups[0].per"),
    ({"ladder": LADDER, "groups": [{"match": "(exps"}]}, "allocate.groups[0].match"),
    ({"ladder": LADDER, "pin": {"attn_kv_b": "Q8_0"}}, "allocate.pin"),
])
def test_bad_settings_name_the_key(section, key):
    with pytest.raises((ConfigError, RecipeError)) as e:
        AllocateSettings.from_dict(section, "allocate")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_class_groups_cover_every_quantized_tensor_once_with_exact_regexes(v3):
    s = settings()
    groups = make_groups(v3, s)
    quantized = [t.name for t in plan(v3, pool_recipe("q8_0"), has_imatrix=True).tensors if t.quantized]
    members = [n for g in groups for n in g.tensors]
    assert sorted(members) == sorted(quantized)
    for g in groups:
        assert sorted(n for n in quantized if re.search(g.match, n)) == sorted(g.tensors), g.name
    by_name = {g.name: g for g in groups}
    assert len(by_name["ffn_gate_up_exps"].tensors) == 2 * 58  # gate and up of every MoE layer together
    assert set(by_name["ffn_gate_up_exps"].bytes) == set(LADDER)
    assert len(runs(groups, s)) == len(groups) * (len(LADDER) - 1)


def test_group_bytes_are_the_planners_bytes(v3):
    s = settings()
    groups = make_groups(v3, s)
    g = next(g for g in groups if g.name == "attn_k_b")  # 128 columns: 256-block types fall back
    for typ in LADDER:
        p = plan(v3, Recipe(name="x", base="Q8_0", rules=(Rule(g.match, typ), Rule(".", "q8_0"))), has_imatrix=True)
        assert g.bytes[typ] == sum(t.nbytes for t in p.tensors if t.name in g.tensors)
    assert g.bytes["iq2_ks"] == g.bytes["iq3_ks"]  # both fall back to iq4_nl on 128 columns


def test_pins_come_first_with_one_option(v3):
    groups = make_groups(v3, settings(pin={"attn_kv_b": "q8_0"}))
    assert groups[0].pinned == "q8_0" and list(groups[0].bytes) == ["q8_0"]
    assert all("attn_kv_b" in n for n in groups[0].tensors)
    assert not any("attn_kv_b" in n for g in groups[1:] for n in g.tensors)


def test_layers_ranges_and_items(v3):
    s = AllocateSettings.from_dict({"ladder": LADDER, "groups": [{"match": r"_exps\.", "per": 10}, {"match": "attn_"}]})
    groups = make_groups(v3, s)
    names = [g.name for g in groups]
    assert "g0-ffn_down_exps+ffn_gate_up_exps.L3-9" in names  # MoE layers start at 3
    assert "g0-ffn_down_exps+ffn_gate_up_exps.L60" in names
    assert len([n for n in names if n.startswith("g0-")]) == 7
    attn = next(g for g in groups if g.name.startswith("g1-"))
    assert all("attn_" in n for n in attn.tensors) and len(attn.tensors) == 61 * 7
    layers = make_groups(v3, AllocateSettings.from_dict({"ladder": LADDER, "groups": "layers"}))
    assert len([g for g in layers if g.name.startswith("ffn_gate_up_exps.L")]) == 58


def test_gate_and_up_cannot_be_parted(v3):
    s = AllocateSettings.from_dict({"ladder": LADDER, "groups": [{"match": "ffn_gate_exps"}]})
    with pytest.raises(PlanError, match="ffn_gate and ffn_up of a layer must share a type"):
        make_groups(v3, s)


def test_split_budgets_need_experts_apart(v3):
    groups = make_groups(v3, settings())
    assert {g.name: g.budget for g in groups}["ffn_down_exps"] == RAM
    assert {g.name: g.budget for g in groups}["attn_q_b"] == GPU
    mixed = AllocateSettings.from_dict({"ladder": LADDER, "groups": [{"match": "ffn_down"}]})
    assert {g.name: g.budget for g in make_groups(v3, mixed)}["g0-ffn_down+ffn_down_shexp+ffn_down_exps"] == "mixed"


def test_imatrix_types_drop_out_without_an_imatrix(v3):
    s = AllocateSettings.from_dict({"ladder": ["iq2_xxs", "iq4_ks", "q8_0"]})
    with_im = {g.name: g for g in make_groups(v3, s, has_imatrix=True)}
    without = {g.name: g for g in make_groups(v3, s, has_imatrix=False)}
    assert "iq2_xxs" in with_im["ffn_down_exps"].bytes
    assert "iq2_xxs" not in without["ffn_down_exps"].bytes


def test_sensitivity_recipe_lowers_only_its_group(v3):
    s = settings(pin={"attn_kv_b": "q8_0"})
    groups = make_groups(v3, s)
    r = sensitivity_recipe(groups, s, "ffn_down_exps", "iq2_ks")
    types = {t.name: t.type for t in plan(v3, r, has_imatrix=True).tensors if t.quantized}
    assert {types[n] for n in types if "ffn_down_exps" in n} == {"iq2_ks"}
    assert {types[n] for n in types if "ffn_down_exps" not in n and "attn_k_b" not in n} == {"q8_0"}
    top = sensitivity_recipe(groups, s, None, None)
    assert {t.type for t in plan(v3, top, has_imatrix=True).tensors if t.quantized} == {"q8_0"}
    with pytest.raises(PlanError, match="no group"):
        sensitivity_recipe(groups, s, "nope", "iq2_ks")


def _table(tmp_path, v3, s, kld):
    """groups.json and fake runs: kld(group, type) -> mean KLD; the top run at 0.001."""
    doc = sens.groups_doc(v3, s, True)
    (tmp_path / "groups.json").write_text(json.dumps(doc))
    (tmp_path / "top.json").write_text(json.dumps({"kld_mean": 0.001}))
    paths = {}
    for g, t in doc["runs"]:
        p = tmp_path / f"{g}@{t}.json"
        p.write_text(json.dumps({"kld_mean": kld(g, t), "group": g, "type": t}))
        paths[(g, t)] = p
    return doc, paths


def test_sensitivity_table_increases_and_missing_runs(tmp_path, v3):
    s = settings()
    bits = {t: i for i, t in enumerate(reversed(LADDER))}
    doc, paths = _table(tmp_path, v3, s, lambda g, t: 0.001 + 0.01 * bits[t])
    t = sens.table(tmp_path / "groups.json", tmp_path / "top.json", paths)
    g = t["groups"][0]
    assert g["increase"]["q8_0"] == 0 and g["increase"]["iq2_ks"] == pytest.approx(0.04)
    assert t["top_kld"] == 0.001 and t["fixed_bytes"] == doc["fixed_bytes"] > 0
    first = next(iter(paths))
    kept = paths.pop(first)
    with pytest.raises(PlanError, match="no run for group"):
        sens.table(tmp_path / "groups.json", tmp_path / "top.json", paths)
    paths[first] = kept
    (tmp_path / "top.json").write_text(json.dumps({"kld_mean": None}))
    with pytest.raises(PlanError, match="not a number"):
        sens.table(tmp_path / "groups.json", tmp_path / "top.json", paths)


@pytest.fixture(scope="module")
def v3_table(tmp_path_factory, v3):
    """A V3 sensitivity table where experts are cheap to lower and attention is dear."""
    tmp = tmp_path_factory.mktemp("sens")
    s = settings()
    bits = {"iq2_ks": 4, "iq3_ks": 3, "iq4_ks": 2, "iq5_ks": 1, "q8_0": 0}
    _, paths = _table(tmp, v3, s, lambda g, t: 0.001 + bits[t] * (0.002 if "exps" in g else 0.02))
    return sens.table(tmp / "groups.json", tmp / "top.json", paths)


@pytest.mark.parametrize("budget", [{"gib": 250}, {"bpw": 3.0}, {"size_of": "IQ2_KS"}])
def test_allocation_fits_and_its_recipe_plans_to_the_predicted_bytes(v3, v3_table, budget):
    b = Budget.from_dict(budget, "b")
    size = plan(v3, "IQ2_KS", has_imatrix=True).total_bytes if b.size_of else None
    a, info = alloc.allocate_budget(v3_table, b, sens.options(v3_table), size, RES)
    text = alloc.Allocation.to_yaml(a, sens.options(v3_table), b.name, "Q8_0", ["header line"])
    path = ROOT / "tests" / ".tmp-allocated.yaml"
    try:
        path.write_text(text)
        r = load_recipe(path)
    finally:
        path.unlink(missing_ok=True)
    p = plan(v3, r, has_imatrix=True)
    assert p.total_bytes == info["predicted"]["tensor_bytes"] <= info["budget"]["bytes"]
    if b.gib:
        assert p.file_bytes(v3.data_offset) <= 250 * 2**30
    if size:
        assert p.total_bytes <= size
    assert info["predicted"]["kld_mean"] == pytest.approx(0.001 + a.kld)
    choice = info["choice"]
    assert choice["ffn_gate_up_exps"] in LADDER and text.startswith("# header line\n")
    # cheap experts go down before dear attention
    assert LADDER.index(choice["ffn_gate_up_exps"]) <= LADDER.index(choice["attn_q_b"])


def test_split_budget_keeps_each_side(v3, tmp_path):
    doc, paths = _table(tmp_path, v3, settings(), lambda g, t: 0.001 + 0.01 * (4 - LADDER.index(t)))
    table = sens.table(tmp_path / "groups.json", tmp_path / "top.json", paths)
    b = Budget.from_dict({"gpu_gib": 20, "ram_gib": 200}, "b")
    a, info = alloc.allocate_budget(table, b, sens.options(table), None, RES)
    assert b.name == "auto-gpu20-ram200"
    assert info["predicted"]["bytes_by_budget"]["ram"] <= 200 * 2**30
    assert info["predicted"]["bytes_by_budget"]["gpu"] + doc["fixed_bytes"] <= 20 * 2**30
    whole = Budget.from_dict({"gib": 220}, "b")  # the same groups serve a whole-file budget
    predicted = alloc.allocate_budget(table, whole, sens.options(table), None, RES)[1]["predicted"]
    assert sum(predicted["bytes_by_budget"].values()) + doc["fixed_bytes"] <= 220 * 2**30
    mixed = {**table, "groups": [{**g, "budget": "mixed" if g["name"] == "attn_q_b" else g["budget"]}
                                 for g in table["groups"]]}
    with pytest.raises(PlanError, match="group attn_q_b mixes routed experts and other tensors"):
        alloc.allocate_budget(mixed, b, sens.options(mixed), None, RES)


@pytest.mark.parametrize("d, msg", [({}, "exactly one of"), ({"gib": 1, "bpw": 2}, "exactly one of"),
                                    ({"gpu_gib": 1}, "go together"), ({"gib": -1}, "positive")])
def test_bad_budgets(d, msg):
    with pytest.raises(ConfigError, match=msg):
        Budget.from_dict(d, "allocate.budgets[0]")


def test_a_budget_below_the_smallest_choice_is_refused(v3_table):
    with pytest.raises(PlanError, match="below the"):
        alloc.allocate_budget(v3_table, Budget.from_dict({"bpw": 1.0}, "b"), sens.options(v3_table), None, RES)


def test_pool_assembly_plan(v3):
    r = load_recipe(ROOT / "config" / "recipes" / "deepseek-v3-iq2_k_r4.yaml")
    a = assembly(v3, r, named_types(r), has_imatrix=True)
    pools = {t: {x.name: x for x in plan(v3, pool_recipe(t), has_imatrix=True, strict=False).tensors}
             for t in a.pools_used()}
    for t in a.plan.tensors:
        src = a.sources[t.name]
        if t.quantized:
            assert pools[src][t.name].type == t.type
        elif src is not None:
            assert not pools[src][t.name].quantized
    with pytest.raises(PlanError, match="no pool file holds"):
        assembly(v3, r, [named_types(r)[0]], has_imatrix=True)


def test_config_adds_one_auto_quant_per_budget():
    cfg = load_yaml(ROOT / "config" / "config.yaml")

    def sweep_quants(cfg):
        return load(cfg, ROOT).quants

    qs = sweep_quants(cfg)
    auto = [q for q in qs if q.auto]
    assert [q.name for q in auto] == [f"auto-{b['size_of']}" for b in cfg["allocate"]["budgets"]]
    cfg["allocate"]["budgets"] = [{"size_of": "IQ1_S"}]
    with pytest.raises(ConfigError, match=r"allocate.budgets\[0\].size_of"):
        sweep_quants(cfg)
    cfg["allocate"]["budgets"] = [{"name": "Q8_0", "gib": 1}]
    with pytest.raises(ConfigError, match="already a quant"):
        sweep_quants(cfg)
    cfg["allocate"]["enabled"] = False
    assert not any(q.auto for q in sweep_quants(cfg))
    assert yaml.safe_dump  # the config stays plain YAML


def test_allocate_help_explains_the_knobs():
    import subprocess

    out = subprocess.run(["quantsweep", "allocate", "--help"], capture_output=True, text=True, check=True).stdout
    for knob in ("--gib", "--bpw", "--size-of", "--gpu-gib", "--ram-gib", "--resolution", "additive",
                 "multiple-choice knapsack", "ffn_gate and ffn_up", "pinned", "imatrix", "alignment padding"):
        assert knob in out, knob


def test_refinement_sets_each_step_to_what_was_measured_in_the_recipe():
    g = alloc.Group("exps", "x", (alloc.Option("iq2_ks", 10, 0.05), alloc.Option("iq4_ks", 20, 0.01),
                                  alloc.Option("q8_0", 40, 0.0)))
    top = alloc.Group("attn", "y", (alloc.Option("iq4_ks", 5, 0.02), alloc.Option("q8_0", 10, 0.0)))
    fixed, shifts = alloc.refined_groups([g, top], {"exps": "iq2_ks", "attn": "q8_0"}, measured=0.07,
                                         context={"exps": 0.01})
    new = {o.type: o.kld for o in fixed[0].options}
    # in the recipe, raising exps to iq4_ks gained 0.06 (the additive model said 0.04)
    assert new["iq2_ks"] - new["iq4_ks"] == pytest.approx(0.06)
    assert new["iq4_ks"] == 0.01 and new["q8_0"] == 0.0  # the rungs above the choice keep theirs
    assert shifts == {"exps": pytest.approx(0.02)}
    assert fixed[1] is top  # at its top: nothing measured, nothing changed


def test_refined_allocation_is_anchored_at_the_measurement(v3, v3_table, tmp_path):
    from quantsweep.steps import allocate as allocate_step

    (tmp_path / "sens.json").write_text(json.dumps(v3_table))
    b = Budget.from_dict({"gib": 250}, "b")
    text, info = allocate_step(tmp_path / "sens.json", b, None, RES)
    (tmp_path / "a.json").write_text(json.dumps(info))
    measured = info["predicted"]["kld_mean"] + 0.5  # interactions the additive model missed
    (tmp_path / "m.json").write_text(json.dumps({"kld_mean": measured}))
    groups = {g.name: g for g in sens.options(v3_table)}
    runs = []
    for name, t in info["choice"].items():  # each step measured exactly as the additive model says
        up = alloc.next_up(groups[name], t)
        p = tmp_path / f"{name}.json"
        kld = None if up is None else measured - (next(o.kld for o in groups[name].options if o.type == t) - up.kld)
        p.write_text(json.dumps({"group": name, "raised": up and up.type, "kld_mean": kld,
                                 "allocation": str(tmp_path / "a.json")}))
        runs.append(p)
    text2, info2 = allocate_step(tmp_path / "sens.json", b, None, RES,
                                 refine=(tmp_path / "a.json", tmp_path / "m.json", runs))
    assert info2["choice"] == info["choice"]  # nothing to correct: the same recipe
    assert info2["predicted"]["kld_mean"] == pytest.approx(measured)  # anchored at the measurement
    assert info2["refined_from"]["context_runs"] == sum(1 for r in runs if json.loads(r.read_text())["raised"])
    assert "measured" in text2.splitlines()[1]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"group": "attn_q_b", "raised": "iq5_ks", "kld_mean": 0.1, "allocation": "x.json"}))
    with pytest.raises(PlanError, match="not .*a.json"):
        allocate_step(tmp_path / "sens.json", b, None, RES, refine=(tmp_path / "a.json", tmp_path / "m.json", [bad]))
