"""Per-layer sensitivity at class-level cost without the engine: the proxy's sampling, weights and
errors, the predicted layer table (each class's measured increase split over its layers, the class
total kept), the depth correction from band runs, Spearman, and a publisher's single-tensor CSV
read into the solver's table. The engine's dequantizer and the measured validation are in
test_e2e and benchmarks/perlayer_proxy.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantsweep.allocator.external import external_table
from quantsweep.allocator.proxy import (TensorShape, band_prediction, bands_of, depth_multipliers, predict_table, sample_rows,
                                        spearman, tensor_errors, weighted_error, weights_of)
from quantsweep.errors import PlanError

TOP = "q8_0"


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
