"""End to end: per-layer allocation at class-level cost in the workflow (allocate.groups: layers,
sensitivity: proxy) on the tiny model and the real engine: the class runs and the band runs are
all that is measured, the proxy step dequantizes the pool with the engine, the table splits each
class run over its layers, the auto recipe is per layer, and the report draws which layer got
which type. benchmarks/perlayer_proxy.py measures how well it chooses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import make_workdir, smk
from quantsweep.report import read_csv
from quantsweep.report.layers import png_layers

pytestmark = pytest.mark.e2e

LADDER = ["iq2_ks", "iq4_ks", "q8_0"]
ALLOCATE = {"enabled": True, "ladder": LADDER, "budgets": [{"size_of": "IQ2_KS"}], "groups": "layers",
            "sensitivity": "proxy"}


def finished(out: str) -> list[str]:
    return re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", out, re.M)


@pytest.fixture(scope="module")
def perlayer(tmp_path_factory) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("perlayer"), {
        "quants": ["IQ2_KS"], "bench": {"enabled": False}, "eval": {"chunks": 8}, "allocate": ALLOCATE})
    r = smk(wd, "--cores", "all")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    (wd / "snakemake.out").write_text(r.stdout + r.stderr)
    return wd


def load(p: Path) -> dict:
    return json.loads(p.read_text())


def test_only_the_class_runs_and_the_band_runs_are_measured(perlayer):
    sens = perlayer / "results" / "sensitivity" / "tiny"
    doc = load(sens / "groups.json")
    ran = finished((perlayer / "snakemake.out").read_text())
    assert ran.count("sensitivity_run") == len(doc["runs"]) and ran.count("sensitivity_proxy") == 1
    class_names = {g["name"] for g in doc["class_groups"]}
    band_names = {b["name"] for b in doc["bands"]}
    assert {g for g, _ in doc["runs"]} == class_names - {g["name"] for g in doc["class_groups"] if g["pinned"]} | band_names
    # every family with 3+ layers has 3 bands (the demo's one dense layer has none)
    assert sorted({b["family"] for b in doc["bands"]}) == ["attention", "experts_down", "experts_gate_up", "shared"]
    assert len(doc["bands"]) == 12
    assert sorted(p.name for p in (sens / "runs").glob("*.json") if not p.name.endswith("manifest.json")) == sorted(
        f"{g}@{t}.json" for g, t in doc["runs"])
    errors = load(sens / "errors.json")
    for t in errors["tensors"].values():  # the engine's own dequantization: fewer bits, more error
        assert t["iq2_ks"]["err"] > t["iq4_ks"]["err"] > t["q8_0"]["err"] >= 0


def test_the_table_splits_each_class_run_over_its_layers(perlayer):
    table = load(perlayer / "results" / "sensitivity" / "tiny.json")
    assert table["sensitivity"] == "proxy" and len(table["groups"]) > len(table["class_table"])
    runs = perlayer / "results" / "sensitivity" / "tiny" / "runs"
    top = load(perlayer / "results" / "sensitivity" / "tiny" / "top.json")["kld_mean"]
    assert table["top_kld"] == top
    for cg in table["class_table"]:
        parts = [g for g in table["groups"] if g["class_group"] == cg["name"]]
        for t, inc in cg["increase"].items():
            if t != LADDER[-1]:
                assert inc == pytest.approx(load(runs / f"{cg['name']}@{t}.json")["kld_mean"] - top)
                assert sum(g["increase"][t] for g in parts) == pytest.approx(inc, abs=1e-12)
    for b in table["bands"]:
        assert b["measured"] == pytest.approx(load(runs / f"{b['name']}@iq2_ks.json")["kld_mean"] - top)
    # the depth correction: one multiplier per layer per family, from the bands
    assert all(len(m) == 4 for m in table["depth"].values())
    assert table["depth"]["shared"] != [1.0] * 4


def test_the_auto_recipe_is_per_layer_and_the_report_draws_it(perlayer):
    alloc = load(perlayer / "results" / "allocate" / "tiny" / "auto-IQ2_KS.json")
    assert alloc["source"] == "proxy"
    layers = alloc["layers"]
    # the map is the recipe's: each layer's class cell says the type its rule gives
    recipe = yaml.safe_load((perlayer / "results" / "allocate" / "tiny" / "auto-IQ2_KS.yaml").read_text())
    for c, row in layers["types"].items():
        for layer, t in enumerate(row):
            if t is not None:  # first match wins; gate and up share their class's cell
                name = f"blk.{layer}.{c.replace('gate_up', 'gate')}.weight"
                rule = next((r["type"] for r in recipe["rules"] if re.search(r["match"], name)), recipe["base"])
                assert rule.lower() == t, (name, rule, t)
    assert any(len(set(row) - {None}) > 1 for row in layers["types"].values())  # a class split over types
    cells = png_layers(perlayer / "results" / "report" / "allocation_layers.png")
    want = [{"model": "tiny", "quant": "auto-IQ2_KS", "class": c, "layer": i, "type": t}
            for c in layers["classes"] for i, t in enumerate(layers["types"][c]) if t is not None]
    assert cells == want
    html = (perlayer / "results" / "report" / "summary.html").read_text()
    assert "Allocated types by layer and tensor class" in html
    rows = {r["quant"]: r for r in read_csv(perlayer / "results" / "report" / "summary.csv")}
    assert float(rows["auto-IQ2_KS"]["size_bytes"]) <= float(rows["IQ2_KS"]["size_bytes"])


def test_changing_the_bands_reruns_only_the_new_band_runs(perlayer):
    """The class runs are the same measurement whatever the bands (or groups: layers vs classes):
    the workflow reruns a run only when its recipe changes."""
    cfg_path = perlayer / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["allocate"]["bands"] = 1
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = smk(perlayer, "--cores", "all", "results/sensitivity/tiny.json")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    ran = re.findall(r"^\s+output: results/sensitivity/tiny/runs/(\S+)@", r.stdout + r.stderr, re.M)
    doc = load(perlayer / "results" / "sensitivity" / "tiny" / "groups.json")
    assert sorted(ran) == sorted(b["name"] for b in doc["bands"]) and len(ran) == 5  # 4 families + dense
    assert "sensitivity_proxy" not in finished(r.stdout + r.stderr)
