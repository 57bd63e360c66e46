"""Per-layer sensitivity at class-level cost without the engine: the proxy's sampling, weights and
errors, the predicted layer table (each class's measured increase split over its layers, the class
total kept), the depth correction from band runs, Spearman, and a publisher's single-tensor CSV
read into the solver's table. The engine's dequantizer and the measured validation are in
test_e2e and benchmarks/perlayer_proxy.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from quantsweep import config
from quantsweep.allocator.external import external_table
from quantsweep.allocator.groups import tensor_class
from quantsweep.allocator.sensitivity import groups_doc, run_key, table, top_key
from quantsweep.allocator.proxy import (TensorShape, band_prediction, bands_of, depth_multipliers, predict_table, sample_rows,
                                        spearman, tensor_errors, weighted_error, weights_of)
from quantsweep.errors import ConfigError, PlanError
from quantsweep.settings import AllocateSettings

TOP = "q8_0"


@pytest.fixture(scope="module")
def v3_table():
    from quantsweep.gguf.deepseek2 import deepseek_v3_table

    return deepseek_v3_table()


@pytest.fixture(scope="module")
def tiny12_table():
    """A 12-layer mainline DeepSeek of small shapes (the benchmark's model is of this kind)."""
    from quantsweep.gguf.deepseek2 import deepseek2_table

    return deepseek2_table(layout="mainline", n_layer=12, n_dense=1, n_expert=8, n_embd=256, n_head=4, q_lora=256,
                           kv_lora=256, qk_nope=64, qk_rope=32, v_head=64, n_ff=512, n_ff_exp=256, n_vocab=1024)


def test_sample_rows_spread_over_the_tensor_and_every_expert():
    assert sample_rows(10, 64) == [(0, 10)]
    spans = sample_rows(8 * 2048, 64)
    assert sum(n for _, n in spans) == 64 and spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == 8 * 2048
    experts = {first // 2048 for first, _ in spans}
    assert experts == set(range(8))  # 8 runs over 8 experts: each visited


def test_weights_are_the_experts_own_and_errors_weigh_by_them():
    sh = TensorShape("blk.1.ffn_down_exps.weight", ne0=4, ne1=3, n_mat=2)
    means = np.array([1, 2, 3, 4, 10, 20, 30, 40], dtype=np.float32)  # expert 0, then expert 1
    w = weights_of(sh, means, [(2, 2)])  # rows 2 (expert 0) and 3 (expert 1)
    assert w.tolist() == [[1, 2, 3, 4], [10, 20, 30, 40]]
    assert weights_of(sh, None, [(0, 1)]).tolist() == [[1, 1, 1, 1]]
    with pytest.raises(PlanError, match="imatrix entry blk.1.ffn_down_exps.weight: 3 values"):
        weights_of(sh, np.ones(3), [(0, 1)])
    x, q = np.array([[1.0, 1, 1, 1]]), np.array([[0.0, 1, 1, 3]])
    assert weighted_error(x, q, np.array([[1.0, 2, 3, 4]])) == (1 * 1 + 4 * 4, 1 + 2 + 3 + 4)


def test_tensor_errors_reads_each_file_once_and_scales_to_the_whole_tensor():
    rng = np.random.default_rng(0)
    shapes = [TensorShape("blk.0.attn_output.weight", 8, 100, 1), TensorShape("blk.1.attn_output.weight", 8, 100, 1)]
    src = {s.name: rng.normal(size=(100, 8)).astype(np.float32) for s in shapes}
    noise = {"iq2_ks": 0.3, "iq4_ks": 0.05}
    calls = []

    def read(key, wanted):
        calls.append(key)
        out = {}
        for name, spans in wanted:
            rows = np.concatenate([src[name][f:f + n] for f, n in spans])
            out[name] = rows if key == "source" else rows + noise[key] * np.sign(rows)
        return out

    e = tensor_errors(shapes, ["iq2_ks", "iq4_ks"], read, {}, rows=16)
    assert calls == ["source", "iq2_ks", "iq4_ks"]
    for name in src:
        assert e[name]["iq2_ks"]["err"] == pytest.approx(0.09 * 8 * 100)  # (0.3)^2 per value, every row
        assert e[name]["iq2_ks"]["err"] > e[name]["iq4_ks"]["err"] > 0


def _class_table() -> dict:
    g = {"name": "attn_output", "match": "x", "tensors": [f"blk.{i}.attn_output.weight" for i in range(4)],
         "increase": {"iq2_ks": 0.4, "iq4_ks": 0.04, TOP: 0.0}, "bytes": {"iq2_ks": 1, "iq4_ks": 2, TOP: 4}}
    return {"settings": {"top": TOP}, "top_kld": 0.001, "top_run": "top.json", "groups": [g]}


def _layer_groups() -> dict:
    return {"settings": {"top": TOP}, "groups": [
        {"name": f"blk.{i}.attn_output", "match": "x", "tensors": [f"blk.{i}.attn_output.weight"],
         "bytes": {"iq2_ks": 1, "iq4_ks": 2, TOP: 4}, "pinned": None} for i in range(4)]}


ERRORS = {f"blk.{i}.attn_output.weight": {"iq2_ks": {"err": e}, "iq4_ks": {"err": e / 10}}
          for i, e in enumerate([1.0, 2.0, 3.0, 4.0])}


def test_predicted_layers_split_their_class_run_and_keep_its_total():
    flat = depth_multipliers([], 4)
    t = predict_table(_class_table(), _layer_groups(), ERRORS, flat)
    inc = [g["increase"]["iq2_ks"] for g in t["groups"]]
    assert inc == pytest.approx([0.04, 0.08, 0.12, 0.16]) and sum(inc) == pytest.approx(0.4)
    assert all(g["increase"][TOP] == 0 for g in t["groups"]) and t["groups"][0]["kld"]["iq2_ks"] == pytest.approx(0.041)
    # a band run that measured the top layers at half what the proxy predicts moves damage down
    depth = depth_multipliers([{"family": "attention", "layers": [0, 1], "measured": 0.12, "predicted": 0.12},
                               {"family": "attention", "layers": [2, 3], "measured": 0.14, "predicted": 0.28}], 4)
    # band centres 0.5 and 2.5: 1.0 and 0.5 there, linear between, flat beyond
    assert depth["attention"] == pytest.approx([1.0, 0.875, 0.625, 0.5]) and depth["experts_down"] == [1.0] * 4
    t = predict_table(_class_table(), _layer_groups(), ERRORS, depth)
    inc = [g["increase"]["iq2_ks"] for g in t["groups"]]
    assert sum(inc) == pytest.approx(0.4) and inc[3] / inc[2] == pytest.approx((4 * 0.5) / (3 * 0.625))
    bad = _layer_groups()
    bad["groups"][0]["tensors"] = ["blk.0.ffn_down_exps.weight"]
    with pytest.raises(PlanError, match="layer group blk.0.attn_output"):
        predict_table(_class_table(), bad, ERRORS, flat)


def test_band_prediction_is_the_bands_share_of_its_class_runs():
    assert band_prediction(_class_table(), ERRORS, ["blk.2.attn_output.weight", "blk.3.attn_output.weight"],
                           "iq2_ks") == pytest.approx(0.4 * 7 / 10)


def test_spearman_ranks_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # scipy.stats.spearmanr's value
    assert math.isnan(spearman([1, 1], [1, 2]))


def test_an_external_single_tensor_csv_becomes_the_solvers_table(tmp_path):
    csv = tmp_path / "kld_results.csv"
    csv.write_text("QTYPE,blk.0.attn_output.weight,blk.1.attn_output.weight,blk\\.[23]\\.attn_output\\.weight,group0\n"
                   "iq2_ks,0.0135,0.0235,0.0335,0.5\n"
                   "IQ4_KS,0.0045,404,0.0055,0.02\n")
    t = external_table(csv, _layer_groups())
    inc = {g["name"]: g["increase"] for g in t["groups"]}
    assert inc["blk.0.attn_output"] == pytest.approx({"iq2_ks": 0.009, "iq4_ks": 0.0, TOP: 0.0})  # floor 0.0045
    assert inc["blk.1.attn_output"] == pytest.approx({"iq2_ks": 0.019, TOP: 0.0})  # 404: not an option
    assert inc["blk.3.attn_output"] == pytest.approx({"iq2_ks": 0.029, "iq4_ks": 0.001, TOP: 0.0})  # by regex
    assert external_table(csv, _layer_groups(), floor=0.0)["groups"][0]["increase"]["iq2_ks"] == pytest.approx(0.0135)
    (tmp_path / "bad.csv").write_text("type,a\niq2_ks,1\n")
    with pytest.raises(PlanError, match="the first column must be QTYPE"):
        external_table(tmp_path / "bad.csv", _layer_groups())
    (tmp_path / "bad2.csv").write_text("QTYPE,blk.0.attn_output.weight\niq2_ks,high\n")
    with pytest.raises(PlanError, match="line 2, column blk.0.attn_output.weight: 'high' is not a number"):
        external_table(tmp_path / "bad2.csv", _layer_groups())


def test_bands_cover_each_familys_layers_in_contiguous_runs():
    import re

    tensors = ([f"blk.{i}.ffn_down_exps.weight" for i in range(1, 8)] + [f"blk.{i}.ffn_up_exps.weight" for i in range(1, 8)]
               + [f"blk.{i}.ffn_gate_exps.weight" for i in range(1, 8)] + ["blk.0.ffn_down.weight", "output.weight"])
    bands = bands_of(tensors, 3)
    assert [(b["family"], b["layers"]) for b in bands] == [
        ("experts_down", [1, 2]), ("experts_down", [3, 4]), ("experts_down", [5, 7]),
        ("experts_gate_up", [1, 2]), ("experts_gate_up", [3, 4]), ("experts_gate_up", [5, 7])]
    for b in bands:  # each band's regex matches exactly its tensors
        assert [t for t in tensors if re.match(b["match"], t)] == b["tensors"]
    assert sorted(t for b in bands for t in b["tensors"]) == sorted(tensors[:-2])


# ---- the workflow's sensitivity sources: settings, groups.json, the table, the plan -----------


def _alloc(**kw) -> AllocateSettings:
    return AllocateSettings.from_dict({"enabled": True, "ladder": ["iq2_ks", "iq3_ks", "iq4_ks", "iq5_ks", TOP],
                                       "budgets": [{"bpw": 3}], **kw}, "allocate")


def test_sensitivity_settings_are_checked_when_the_run_starts(tmp_path):
    with pytest.raises(ConfigError, match="allocate.sensitivity: proxy splits the class runs over finer groups"):
        _alloc(sensitivity="proxy")
    with pytest.raises(ConfigError, match="allocate.external: required with sensitivity: external"):
        _alloc(sensitivity="external")
    with pytest.raises(ConfigError, match="allocate.external: given, but sensitivity is measured"):
        _alloc(external="x.csv")
    with pytest.raises(ConfigError, match="allocate.band_type: q8_0 is not a ladder type below the top"):
        _alloc(sensitivity="proxy", groups="layers", band_type=TOP)
    with pytest.raises(ConfigError, match="allocate.sensitivity: 'guess' is not one of measured, proxy, external"):
        _alloc(sensitivity="guess")
    s = _alloc(sensitivity="proxy", groups=[{"match": "exps", "per": "layer"}, {"match": "attn", "per": 4}])
    assert [it.per for it in s.class_level.items] == ["all", "all"] and s.class_level.sensitivity == "measured"
    assert s.band == "iq2_ks" and _alloc(sensitivity="proxy", groups="layers").class_level.groups == "classes"
    # an external CSV is read when the sweep's config is loaded: a bad cell is one line naming it
    bad = tmp_path / "kld.csv"
    bad.write_text("QTYPE,blk.0.attn_output.weight\niq2_ks,0.01x\n")
    cfg = config.merged(config.load_yaml(ROOT / "config" / "config.yaml"),
                        {"allocate": {"sensitivity": "external", "external": str(bad)}})
    with pytest.raises(ConfigError, match=r"config allocate.external: .*kld.csv line 2, column blk.0.attn_output"
                                          r".weight: '0.01x' is not a number"):
        config.load(cfg, ROOT)
    cfg["allocate"]["external"] = str(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="config allocate.external: .*missing.csv: No such file"):
        config.load(cfg, ROOT)


def test_v3_proxy_groups_list_the_class_runs_and_the_bands(v3_table):
    """DeepSeek-V3 with groups: layers: measured, every (layer group, lower type) is a run; proxy,
    the class groups' runs and 3 band runs per family (75 in all); a class run measures the
    same recipe either way (the workflow reruns a run only when its recipe changes)."""
    measured = groups_doc(v3_table, _alloc(groups="layers"), True)
    proxy_doc = groups_doc(v3_table, _alloc(groups="layers", sensitivity="proxy"), True)
    classes = groups_doc(v3_table, _alloc(), True)
    assert len(measured["runs"]) == 2668 and len(classes["runs"]) == 60
    assert len(proxy_doc["runs"]) == 60 + 15 and proxy_doc["groups"] == measured["groups"]
    assert [g["name"] for g in proxy_doc["class_groups"]] == [g["name"] for g in classes["groups"]]
    bands = proxy_doc["bands"]
    assert [(b["family"], b["layers"]) for b in bands if b["family"] in ("dense", "experts_down")] == [
        ("experts_down", [3, 21]), ("experts_down", [22, 40]), ("experts_down", [41, 60]),
        ("dense", [0, 0]), ("dense", [1, 1]), ("dense", [2, 2])]
    names = [t.name for t in v3_table.tensors]
    for b in bands:  # the engine reads each band's regex alike: exactly its tensors
        assert [n for n in names if re.search(b["match"], n)] == b["tensors"] and b["bytes"]["iq2_ks"] > 0
    for g, t in classes["runs"]:
        assert run_key(proxy_doc, g, t) == run_key(classes, g, t)
    tops = {top_key(_alloc(**kw)) for kw in ({}, {"groups": "layers"}, {"groups": "layers", "sensitivity": "proxy"})}
    assert len(tops) == 1 and top_key(_alloc(pin={"attn_kv_b": TOP})) not in tops  # a pin changes the top run
    assert json.loads(run_key(proxy_doc, bands[0]["name"], "iq2_ks"))["rules"][0] == [bands[0]["match"], "iq2_ks"]
    # pinned tensors stay at their pin: no band lowers them
    pinned = groups_doc(v3_table, _alloc(groups="layers", sensitivity="proxy", pin={"attn_kv_b": TOP}), True)
    assert not any("attn_kv_b" in t for b in pinned["bands"] for t in b["tensors"])
    ext = groups_doc(v3_table, _alloc(groups="layers", sensitivity="external", external="x.csv"), True)
    assert ext["runs"] == [] and ext["external"] == "x.csv"


def _record(path: Path, kld: float) -> Path:
    path.write_text(json.dumps({"kld_mean": kld}))
    return path


def test_proxy_table_splits_the_class_runs_with_the_band_runs_depth(tmp_path, tiny12_table):
    """The table step in proxy mode: the class groups' table from their runs, split over the layer
    groups by the proxy's errors and the bands' measured / predicted; each class keeps its total."""
    s = _alloc(groups="layers", sensitivity="proxy", ladder=["iq2_ks", TOP])
    doc = groups_doc(tiny12_table, s, True)
    gpath = tmp_path / "groups.json"
    gpath.write_text(json.dumps(doc))
    names = sorted({t for g in doc["groups"] for t in g["tensors"]})
    # the proxy: error grows with depth; the band runs measure the deepest band at 3x its share
    errors = {n: {"iq2_ks": {"err": 1.0 + (tensor_class(n)[0] or 0)}, TOP: {"err": 0.0}} for n in names}
    epath = tmp_path / "errors.json"
    epath.write_text(json.dumps({"tensors": errors}))
    runs = {}
    for i, (g, t) in enumerate(doc["runs"]):
        runs[(g, t)] = _record(tmp_path / f"r{i}.json", 0.01 + 0.001 * (i + 1))
    top = _record(tmp_path / "top.json", 0.01)
    table_doc = table(gpath, top, runs, epath)
    assert table_doc["sensitivity"] == "proxy" and len(table_doc["bands"]) == len(doc["bands"])
    by_class = {}
    for g in table_doc["groups"]:
        by_class.setdefault(g["class_group"], []).append(g["increase"]["iq2_ks"])
    for cg in table_doc["class_table"]:
        assert sum(by_class[cg["name"]]) == pytest.approx(cg["increase"]["iq2_ks"])
    for b in table_doc["bands"]:  # what each band run measured, beside what the class runs predicted
        assert b["measured"] == pytest.approx(json.loads(runs[(b["name"], "iq2_ks")].read_text())["kld_mean"] - 0.01)
    with pytest.raises(PlanError, match="splits the class runs by the proxy"):
        table(gpath, top, runs)
    with pytest.raises(PlanError, match="no run for group"):
        table(gpath, top, dict(list(runs.items())[1:]), epath)


def test_v3_plan_counts_the_proxy_runs_and_the_proxy_job(tmp_path, v3_gguf):
    """At scale, on paper: DeepSeek-V3 (own GGUF, header only) with groups: layers: measured asks
    for 2,668 runs, proxy for 75 and one proxy job that reads a sliver of the files."""
    from test_capacity import example, plan_of

    cfg = example("own-gguf.yaml", tmp_path, v3_gguf)
    _, measured = plan_of({**cfg, "allocate": {"groups": "layers"}})
    _, prox = plan_of({**cfg, "allocate": {"groups": "layers", "sensitivity": "proxy"}})
    n = {p: sum(j.count for j in plan.jobs if j.rule == "sensitivity_run") for p, plan in (("m", measured), ("p", prox))}
    assert n == {"m": 2668, "p": 75}
    (pj,) = [j for j in prox.jobs if j.rule == "sensitivity_proxy"]
    assert pj.read_bytes < 0.01 * v3_gguf.stat().st_size and pj.ram_bytes < 4 * 2**30 and pj.seconds < 3600
    hours = {p: sum(j.seconds * j.count for j in plan.jobs if j.rule == "sensitivity_run") / 3600
             for p, plan in (("m", measured), ("p", prox))}
    assert hours["p"] == pytest.approx(hours["m"] * 75 / 2668) and hours["p"] > 10  # every run holds the top


def test_proxy_needs_the_dequant_tool_in_a_prebuilt_engine(tmp_path):
    """engine.source: bin_dir (a user's own build) has no quantsweep-dequant: refused at the start,
    naming the setting that needs it; a measured sweep does not need it."""
    for tool in ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-sweep-bench"):
        (tmp_path / tool).write_text("")
    base = config.merged(config.load_yaml(ROOT / "config" / "config.yaml"),
                         {"engine": {"source": "bin_dir", "bin_dir": str(tmp_path)}})
    assert "quantsweep-dequant" not in [t.name for t in config.load(base, ROOT).tools()]
    cfg = config.merged(base, {"allocate": {"groups": "layers", "sensitivity": "proxy"}})
    with pytest.raises(ConfigError, match=r"engine.bin_dir: .* has no quantsweep-dequant \(allocate.sensitivity: proxy "
                                          r"runs it; quantsweep builds it with the engine"):
        config.load(cfg, ROOT)
    (tmp_path / "quantsweep-dequant").write_text("")
    assert "quantsweep-dequant" in [t.name for t in config.load(cfg, ROOT).tools()]


def test_external_sensitivity_measures_nothing(tmp_path):
    """sensitivity: external: the table is the CSV's (no top run, no run, no proxy step); the
    workflow plans the rest as before."""
    from conftest import make_workdir, smk
    from test_scale import dry_run_jobs

    csv = tmp_path / "kld.csv"
    csv.write_text("QTYPE,blk.1.ffn_down_exps.weight\niq2_ks,0.01\niq4_ks,0.004\n")
    wd = make_workdir(tmp_path / "wd", {"allocate": {"groups": "layers", "sensitivity": "external",
                                                     "external": str(csv)}})
    r = smk(wd, "-n", "--cores", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rules = {j["rule"] for j in dry_run_jobs(r.stdout + r.stderr)}
    assert {"sensitivity_groups", "sensitivity_table", "allocate"} <= rules
    assert not rules & {"sensitivity_run", "sensitivity_top", "sensitivity_proxy"}
    assert f"--external {csv}" in r.stdout
