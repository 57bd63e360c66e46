"""The quantize planner (quantsweep.planner) and recipes (quantsweep.planner.recipes).

The planner is a port of llama-quantize's type selection; the e2e tests hold it to the engine
itself, tensor by tensor: for every ftype, with and without an imatrix, on the tiny model in
both layouts and on header-only models (sparse GGUFs) whose shapes reach the branches the tiny
model cannot (61 DeepSeek layers, llama GQA, 8B/70B llama, Mixtral, tied embeddings), and for
every recipe in config/recipes. The unit tests check the recipe loader's one-line errors and
the DeepSeek-V3 recipes against the sizes published with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from quantsweep import imatrix as imx
from quantsweep.engine import argv, logparse
from quantsweep.engine import run as engine_run
from quantsweep.errors import ImatrixError, PlanError, QuantsweepError, RecipeError, StepError
from quantsweep.gguf import deepseek2, types
from quantsweep.gguf.reader import GGUFTable, TensorInfo, read_table
from quantsweep.gguf.types import BY_NAME, ftype_names
from quantsweep.gguf.writer import write_shape_gguf
from quantsweep.planner import recipes as R
from quantsweep.planner import selection as S
from quantsweep.planner.plan import Plan, as_options, compare, plan
from quantsweep.tinymodel import TinySpec

RECIPES = ROOT / "config" / "recipes"
PF = FIXTURES / "plan"
V3_RECIPES = sorted(RECIPES.glob("deepseek-*.yaml"))
TINY_RECIPES = sorted(RECIPES.glob("tiny-*.yaml"))
e2e = pytest.mark.e2e


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tiny_gguf) -> dict[str, Path]:
    """The tiny model in both layouts (attn_kv_b only; plus 2-D attn_k_b/attn_v_b)."""
    return {"kv_b": tiny_gguf(), "split": tiny_gguf(TinySpec(split_kv_b=True))}


@pytest.fixture(scope="module")
def imatrices(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """tests/fixtures/tiny-mla.dat remapped for each layout (what the pipeline feeds quantize)."""
    d = tmp_path_factory.mktemp("imatrix")
    out = {}
    for layout, model in tiny_models.items():
        im, _ = imx.remap(imx.read_any(FIXTURES / "tiny-mla.dat"), read_table(model))
        out[layout] = d / f"{layout}.dat"
        imx.write_dat(im, out[layout])
    return out


def _llama(n_layer=16, n_embd=512, n_head=8, n_head_kv=2, n_vocab=1000, tied=False, n_expert=0) -> GGUFTable:
    """A llama-architecture table (attn_q/k/v/output, dense or Mixtral-style FFN)."""
    bf16, f32 = BY_NAME["bf16"].id, BY_NAME["f32"].id
    t: list[TensorInfo] = []

    def add(name, shape, ty=bf16):
        t.append(TensorInfo(name, tuple(shape), ty, 0))

    hd = n_embd // n_head
    add("token_embd.weight", (n_embd, n_vocab))
    for il in range(n_layer):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", (n_embd,), f32)
        add(p + "attn_q.weight", (n_embd, n_embd))
        add(p + "attn_k.weight", (n_embd, n_head_kv * hd))
        add(p + "attn_v.weight", (n_embd, n_head_kv * hd))
        add(p + "attn_output.weight", (n_embd, n_embd))
        add(p + "ffn_norm.weight", (n_embd,), f32)
        if n_expert:
            add(p + "ffn_gate_inp.weight", (n_embd, n_expert), f32)
            add(p + "ffn_gate_exps.weight", (n_embd, 768, n_expert))
            add(p + "ffn_up_exps.weight", (n_embd, 768, n_expert))
            add(p + "ffn_down_exps.weight", (768, n_embd, n_expert))
        else:
            add(p + "ffn_gate.weight", (n_embd, 768))
            add(p + "ffn_up.weight", (n_embd, 768))
            add(p + "ffn_down.weight", (768, n_embd))
    add("output_norm.weight", (n_embd,), f32)
    if not tied:
        add("output.weight", (n_embd, n_vocab))
    a = "llama"
    kv = {"general.architecture": a, "general.file_type": 32, f"{a}.block_count": n_layer,
          f"{a}.context_length": 4096, f"{a}.embedding_length": n_embd, f"{a}.feed_forward_length": 768,
          f"{a}.attention.head_count": n_head, f"{a}.attention.head_count_kv": n_head_kv,
          f"{a}.rope.dimension_count": hd, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{a}.vocab_size": n_vocab}
    if n_expert:
        kv[f"{a}.expert_count"], kv[f"{a}.expert_used_count"] = n_expert, 2
    return GGUFTable(Path("llama"), 3, kv, t, 0)


def _mini_v3() -> GGUFTable:
    """DeepSeek-V3's names, order and 61 layers (3 dense) with small matrices; attn_k_b keeps its
    128 columns and attn_kv_a_mqa its 576 rows, so fallbacks and counters behave as on V3."""
    return deepseek2.deepseek2_table(n_embd=256, n_head=4, q_lora=256, n_ff=768, n_ff_exp=256, n_expert=8, n_vocab=1002)


SHAPES = {
    "mini-v3-61-layers": _mini_v3,
    "llama-gqa4": lambda: _llama(n_vocab=1004),  # 1004 rows: a multiple of 4, not of 8
    "llama-gqa2": lambda: _llama(n_head_kv=4),
    "llama-gqa1-tied": lambda: _llama(n_layer=12, n_head_kv=8, tied=True),
    "llama-8b-like": lambda: _llama(n_layer=32, n_embd=256, n_vocab=128256),
    "llama-70b-like": lambda: _llama(n_layer=80, n_embd=256, n_head_kv=1, n_vocab=128256),
    "mixtral-like": lambda: _llama(n_layer=8, n_expert=8),
}


def _one_entry_imatrix(table: GGUFTable, path: Path) -> Path:
    """An imatrix with one (right-sized) entry: enough for the engine to run with has_imatrix."""
    t = next(t for t in table.tensors if t.name.endswith("attn_output.weight"))
    imx.write_dat(imx.Imatrix({t.name: imx.Entry(1, np.ones(t.shape[0], dtype=np.float32))}, chunks=1), path)
    return path


def _dry_run(bin_dir: Path, model: Path, spec, imatrix=None, check_imatrix: bool = False) -> engine_run.DryRun:
    """The engine's own selection with the flags a plan models (ftype, recipe or EngineOptions)."""
    opts, _ = as_options(spec)
    return engine_run.dry_run(bin_dir, model, opts.ftype, opts.argv(), Path(imatrix) if imatrix else None,
                              check_imatrix=check_imatrix)


def _mismatches(planned: Plan, run: engine_run.DryRun) -> list[str]:
    out = compare(planned, run.types)
    if round(planned.mib, 2) != run.quant_mib:
        out.append(f"quant size: plan {planned.mib:.2f} MiB, engine {run.quant_mib:.2f}")
    if round(planned.src_bytes / 2**20, 2) != run.model_mib:
        out.append(f"model size: plan {planned.src_bytes / 2**20:.2f} MiB, engine {run.model_mib:.2f}")
    if planned.n_fallback != run.n_fallback:
        out.append(f"fallbacks: plan {planned.n_fallback}, engine {run.n_fallback}")
    return out


# --------------------------------------------------------------------------------------
# the planner against the engine (e2e)
# --------------------------------------------------------------------------------------


@e2e
@pytest.mark.parametrize("ftype", ftype_names())
def test_every_ftype_matches_engine_on_tiny_model(ftype, tiny_models, imatrices, bin_dir):
    """Both layouts, with and without --imatrix (which changes IQ3_XXS/IQ4_* heuristics)."""
    problems = []
    for layout, model in tiny_models.items():
        table = read_table(model)
        for im in (None, imatrices[layout]):
            run = _dry_run(bin_dir, model, ftype, imatrix=im)
            planned = plan(table, ftype, has_imatrix=im is not None)
            assert len(run.types) == len(table.tensors)
            problems += [f"{layout} imatrix={im is not None}: {m}" for m in _mismatches(planned, run)]
    assert not problems, "\n".join(problems[:20])


@e2e
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_ftype_matches_engine_on_header_only_models(shape, bin_dir, tmp_path):
    """Sparse GGUFs (zero weights) with shapes that exercise the layer counters, the GQA and
    8B/70B branches, tied embeddings and Mixtral-style experts."""
    table = SHAPES[shape]()
    model = tmp_path / f"{shape}.gguf"
    write_shape_gguf(table, model)
    im = _one_entry_imatrix(table, tmp_path / "one.dat")
    problems, distinct = [], set()
    for ftype in ftype_names():
        for imatrix in (None, im):
            run = _dry_run(bin_dir, model, ftype, imatrix=imatrix)
            planned = plan(read_table(model), ftype, has_imatrix=imatrix is not None)
            distinct.add(tuple(sorted(planned.types().items(), key=lambda kv: kv[0])))
            problems += [f"{ftype} imatrix={imatrix is not None}: {m}" for m in _mismatches(planned, run)]
    assert not problems, "\n".join(problems[:20])
    assert len(distinct) > 40  # the comparisons are not between near-identical plans


@e2e
@pytest.mark.parametrize("recipe", TINY_RECIPES, ids=lambda p: p.stem)
def test_tiny_recipes_match_engine(recipe, tiny_models, imatrices, bin_dir):
    r = R.load_recipe(recipe)
    problems = []
    for layout, model in tiny_models.items():
        table = read_table(model)
        for im in (None, imatrices[layout]):
            run = _dry_run(bin_dir, model, r, imatrix=im)
            planned = plan(table, r, im)
            problems += [f"{layout} imatrix={im is not None}: {m}" for m in _mismatches(planned, run)]
            custom = sum(1 for t in planned.tensors if t.rule is not None)
            assert custom == run.text.count("Using custom type"), layout
    assert not problems, "\n".join(problems[:20])


@e2e
@pytest.mark.parametrize("recipe", V3_RECIPES, ids=lambda p: p.stem)
def test_deepseek_v3_recipes_match_engine_on_v3_topology(recipe, bin_dir, tmp_path):
    """V3's 1147 tensor names, order and layer count (small matrices): the recipes' rules and the
    engine's counters act exactly as on the real model."""
    r = R.load_recipe(recipe)
    table = _mini_v3()
    model = tmp_path / "mini-v3.gguf"
    write_shape_gguf(table, model)
    im = _one_entry_imatrix(table, tmp_path / "one.dat")
    run = _dry_run(bin_dir, model, r, imatrix=im)
    planned = plan(read_table(model), r, has_imatrix=True)
    assert len(planned.tensors) == 1147
    assert not _mismatches(planned, run)
    assert sum(1 for t in planned.tensors if t.rule is not None) == run.text.count("Using custom type")


@e2e
@pytest.mark.parametrize("layout,spec", [("kv_b", "tiny-mix-iq2"), ("split", "tiny-mix-iq2"), ("split", "Q4_K_M"),
                                         ("kv_b", "tiny-iq4_ks-overrides")])
def test_quantized_file_is_the_planned_size(layout, spec, tiny_models, bin_dir, tmp_path):
    """A real llama-quantize run: the file holds the planned types, the 'quant size' line is the
    planned size, and the file is its header plus each tensor's planned bytes, 32-byte aligned."""
    model = tiny_models[layout]
    r = R.load_recipe(RECIPES / f"{spec}.yaml") if spec.startswith("tiny") else spec
    planned = plan(read_table(model), r)
    args = R.engine_args(r) if spec.startswith("tiny") else [spec]
    out, log = tmp_path / "q.gguf", tmp_path / "q.log"
    done = engine_run.run_logged(argv.quantize_cmd(bin_dir, model, out, args[-1], 2, None, args[:-1]), log)
    rc, text = done.rc, done.text
    assert rc == 0, text[-2000:]
    assert logparse.parse_quantize(text).quant_mib == round(planned.mib, 2)
    written = read_table(out)
    assert {t.name: t.type for t in written.tensors} == {t.name: t.type for t in planned.tensors}
    assert {t.name: t.nbytes for t in written.tensors} == {t.name: t.nbytes for t in planned.tensors}
    size = out.stat().st_size
    assert size == planned.file_bytes(written.data_offset)
    # Without the output's header, the input's header is a close estimate (the engine adds a
    # few KVs, general.quantization_version and file_type).
    estimate = planned.file_bytes(read_table(model).data_offset)
    assert abs(size - estimate) < 256, (size, estimate)


@e2e
def test_imatrix_errors_agree_with_engine(tiny_models, bin_dir, tmp_path):
    """Missing data for an iq1 tensor, missing data the engine finds a substitute for, and a raw
    (un-remapped) imatrix: the planner raises exactly when llama-quantize refuses."""
    r = R.load_recipe(RECIPES / "tiny-mix-iq1.yaml")
    model = tiny_models["split"]
    table = read_table(model)
    full, _ = imx.remap(imx.read_any(FIXTURES / "tiny-mla.dat"), table)

    def without(name):
        im = imx.Imatrix({k: v for k, v in full.entries.items() if k != name}, full.chunks, full.dataset)
        path = tmp_path / "cut.dat"
        imx.write_dat(im, path)
        return im, path

    im, path = without("blk.2.ffn_down_exps.weight")
    with pytest.raises(ImatrixError, match=r"blk\.2\.ffn_down_exps\.weight \(iq1_m_r4\): imatrix entry -: no imatrix data"):
        plan(table, r, im)
    with pytest.raises(StepError, match=r"Missing importance matrix for tensor blk\.2\.ffn_down_exps\.weight"):
        _dry_run(bin_dir, model, r, imatrix=path, check_imatrix=True)

    im, path = without("blk.2.ffn_gate_exps.weight")  # the engine falls back to ffn_up_exps' data
    dry = _dry_run(bin_dir, model, r, imatrix=path, check_imatrix=True)
    assert dry.quant_mib == round(plan(table, r, im).mib, 2)

    with pytest.raises(ImatrixError, match=r"blk\.0\.attn_kv_b\.weight \(\w+\): imatrix entry blk\.0\.attn_v_b\.weight: "
                                          r"2048 values, tensor needs 512"):
        plan(table, r, FIXTURES / "tiny-mla.dat")
    with pytest.raises(StepError, match=r"imatrix size 2048 is different from tensor size 512"):
        _dry_run(bin_dir, model, r, imatrix=FIXTURES / "tiny-mla.dat", check_imatrix=True)


# --------------------------------------------------------------------------------------
# imatrix checks without the engine
# --------------------------------------------------------------------------------------


def test_missing_imatrix_entry_names_the_tensor(tiny_models):
    table = read_table(tiny_models["kv_b"])
    full, _ = imx.remap(imx.read_any(FIXTURES / "tiny-mla.dat"), table)
    r = R.load_recipe(RECIPES / "tiny-mix-iq1.yaml")
    assert plan(table, r, full).has_imatrix
    cut = imx.Imatrix({k: v for k, v in full.entries.items() if k != "blk.3.ffn_up_exps.weight"})
    # ffn_up_exps has no fallback entry (gate_exps falls back to up, not the reverse)
    with pytest.raises(ImatrixError) as e:
        plan(table, r, cut)
    msg = str(e.value)
    assert "blk.3.ffn_up_exps.weight" in msg and "iq1_s_r4" in msg and "\n" not in msg
    assert isinstance(e.value, QuantsweepError)
    # without an imatrix at all: a plan, with the engine's refusal as warnings
    p = plan(table, r)
    assert any("refuses ftype IQ1_S_R4 without --imatrix" in w for w in p.warnings)
    assert any("need an imatrix" in w or "needs an imatrix" in w for w in p.warnings)


# --------------------------------------------------------------------------------------
# DeepSeek-V3: the table and the published recipes
# --------------------------------------------------------------------------------------


def test_v3_table_is_the_published_bf16_model():
    """1147 tensors, 'model size = 1282038.27 MB' and 672.05 B parameters, as ik's logs of the
    BF16 V3/R1 GGUFs print them (issue #296, PR #185)."""
    t = deepseek2.deepseek_v3_table()
    assert len(t.tensors) == 1147
    assert round(t.total_bytes / 2**20, 2) == 1282038.27
    assert round(t.n_elements / 1e9, 2) == 672.05
    assert [x.name for x in t.tensors[:4]] == ["token_embd.weight", "blk.0.attn_norm.weight",
                                                "blk.0.ffn_down.weight", "blk.0.ffn_gate.weight"]
    assert t.tensors[1140].name == "output.weight" and t.tensors[-1].name == "output_norm.weight"
    by = t.by_name()
    assert by["blk.3.ffn_down_exps.weight"].shape == (2048, 7168, 256)
    assert by["blk.0.attn_k_b.weight"].shape == (128, 65536)
    assert by["blk.0.attn_v_b.weight"].shape == (512, 16384)
    assert by["blk.60.ffn_gate_inp.weight"].type == "f32"
    assert len(deepseek2.deepseek_v3_table("kv_b").tensors) == 1025
    assert len(deepseek2.deepseek_v3_table("mainline").tensors) == 1086
    assert S.HParams.from_table(t).n_expert == 256


# name -> check on the plan; the numbers are the published ones (see each recipe's comment).
PUBLISHED = {
    # recipes posted with their logs: exact to the printed precision
    "deepseek-v3-iq4_k_r4": lambda p: (round(p.mib, 2), round(p.gib, 3), round(p.bpw, 3)) == (
        395450.97, 386.183, 4.936),
    "deepseek-v3-iq3_k_r4": lambda p: (round(p.gib, 3), round(p.bpw, 3)) == (324.011, 4.141) and {
        k: v["tensors"] for k, v in p.by_type().items()} == {
        "f32": 361, "iq6_k": 1, "q6_0_r4": 61, "iq3_k_r4": 82, "iq4_k_r4": 75, "iq5_k_r4": 567},
    "deepseek-v3-iq4_ks_r4": lambda p: (round(p.gib, 3), round(p.bpw, 3)) == (338.456, 4.326),
    "deepseek-v3-iq2_xxs": lambda p: (round(p.gib, 3), round(p.bpw, 3)) == (169.590, 2.168),
    # a file size (header included): the tensor data is a few MiB (vocabulary KVs) less
    "deepseek-v3-iq1_s_r4": lambda p: 0 < 132998282944 - p.total_bytes < 8 * 2**20,
    # reconstructed recipes: the published bpw to three decimals, sizes as rounded in the posts
    "deepseek-v3-iq2_k_r4": lambda p: (round(p.gib, 1), round(p.bpw, 3)) == (226.0, 2.889),
    "deepseek-r1-0528-iq1_s_r4": lambda p: round(p.bpw, 3) == 1.664 and 130 < p.gib <= 131,
    "deepseek-r1-0528-iq2_k_r4": lambda p: round(p.bpw, 3) == 2.799 and 218 < p.gib < 220,
    "deepseek-r1-0528-iq3_k_r4": lambda p: round(p.bpw, 3) == 3.847 and round(p.gib) == 301,
    "deepseek-r1-0528-iq4_ks_r4": lambda p: round(p.bpw, 3) == 4.701,
}


@pytest.mark.parametrize("recipe", V3_RECIPES, ids=lambda p: p.stem)
def test_v3_recipes_reproduce_published_sizes(recipe):
    r = R.load_recipe(recipe)
    p = plan(deepseek2.deepseek_v3_table(), r, has_imatrix=True)
    assert PUBLISHED[r.name](p), p.summary()
    # every rule takes effect; the only override the engine changes is the original CPU-IQ4_K_R4's
    # q8_0_r8 token_embd (it writes q8_0: token embeddings are never row-interleaved)
    expected = ["token_embd: q8_0_r8 asked, the engine writes q8_0"] if r.name == "deepseek-v3-iq4_k_r4" else []
    assert [w[:len(e)] for w, e in zip(p.warnings, expected)] == expected and len(p.warnings) == len(expected)
    assert r.published.get("source") and ("bpw" in r.published or "size_gib" in r.published)
    if "bpw" in r.published:
        assert round(p.bpw, 3) == r.published["bpw"]
    assert {t.type for t in p.tensors if "attn_k_b" in t.name} <= {"q4_0", "q5_0", "q6_0", "q6_0_r4", "q8_0",
                                                                    "q8_0_r8"}
    assert not any(t.fallback for t in p.tensors)


def test_published_recipes_need_the_right_imatrix_data():
    """iq1_s_r4/iq2_xxs routed experts need imatrix data; a V3 imatrix lacking one expert
    tensor is refused before hours of quantizing, others need none."""
    t = deepseek2.deepseek_v3_table()
    entries = {x.name: imx.Entry(1, nval=x.shape[0] * (x.shape[2] if len(x.shape) > 2 else 1),
                                 load=lambda: None)
               for x in t.tensors if len(x.shape) >= 2 and x.name != "output.weight"}
    full = imx.Imatrix(entries)
    for name in ("deepseek-v3-iq1_s_r4", "deepseek-r1-0528-iq1_s_r4", "deepseek-v3-iq2_xxs"):
        r = R.load_recipe(RECIPES / f"{name}.yaml")
        assert plan(t, r, full).has_imatrix
        cut = imx.Imatrix({k: v for k, v in entries.items() if k != "blk.42.ffn_down_exps.weight"})
        if name.endswith("iq1_s_r4"):
            with pytest.raises(ImatrixError, match=r"blk\.42\.ffn_down_exps\.weight \(iq1_[sm]_r4\): imatrix entry -: no imatrix data"):
                plan(t, r, cut)
        else:  # ffn_down_exps is iq2_ks there, which does not need an imatrix
            plan(t, r, cut)
    assert types.FTYPES[R.load_recipe(RECIPES / "deepseek-v3-iq1_s_r4.yaml").base].needs_imatrix
    assert not types.FTYPES[R.load_recipe(RECIPES / "deepseek-v3-iq4_k_r4.yaml").base].needs_imatrix


# --------------------------------------------------------------------------------------
# engine behaviour the planner reproduces (documented in ik_llama.md §2.3)
# --------------------------------------------------------------------------------------


def test_deepseek_heuristics_on_v3():
    t = deepseek2.deepseek_v3_table()
    types = plan(t, "Q4_K_M").types()
    # "attn_k" is a substring test: kv_a_mqa, kv_b and k_b all become q8_0 with >= 4 experts
    assert {types[f"blk.5.{n}.weight"] for n in ("attn_kv_a_mqa", "attn_kv_b", "attn_k_b")} == {"q8_0"}
    assert types["blk.5.attn_v_b.weight"] == "q4_K"  # no rule matches attn_v_b
    assert types["blk.5.ffn_gate_inp.weight"] is None  # never quantized without --ffn-gate-inp-type
    # IQ2_KS: the first n_layer/8 = 7 tensors containing "ffn_down" (file order, counter-based)
    p = plan(t, "IQ2_KS")
    downs = [x for x in p.tensors if "ffn_down" in x.name]
    assert [x.type for x in downs[:8]] == ["q2_K"] * 7 + ["iq2_ks"]
    assert [x.name for x in downs[5:7]] == ["blk.4.ffn_down_shexp.weight", "blk.4.ffn_down_exps.weight"]


def test_row_size_fallback_and_interleave_rules():
    t = deepseek2.deepseek_v3_table()
    opts = S.EngineOptions("IQ4_KS", custom=(("attn_k_b", "q4_K"), ("attn_v_b", "iq4_ks_r4")), token_embd="q6_k_r4")
    p = plan(t, opts)
    k_b = p.tensors[[x.name for x in p.tensors].index("blk.0.attn_k_b.weight")]
    assert (k_b.type, k_b.fallback, k_b.rule) == ("q5_0", True, 0)  # 128 columns: q4_K -> q5_0
    assert p.n_fallback == 61
    assert p.types()["token_embd.weight"] == "q6_K"  # token embeddings are never row-interleaved
    assert p.types()["blk.0.attn_v_b.weight"] == "iq4_ks_r4"
    assert any("fall back to q4_K" in w or "fall back" in w for w in p.warnings)
    # 16384 rows are a multiple of 4; 354 are not a multiple of 8
    assert S.interleaved("q8_0_r8") == ("q8_0", 8) and S.interleaved("q8_k_r8") == ("q8_0", 8)
    assert S.change_type_if_necessary("iq6_k", 128) == "q8_0"
    assert S.change_type_if_necessary("iq5_ks", 128) == "q5_0"
    with pytest.raises(PlanError, match="no fallback"):
        S.change_type_if_necessary("iq2_bn", 96, "x.weight")


def test_plan_totals_and_json():
    t = deepseek2.deepseek_v3_table()
    p = plan(t, "Q8_0")
    assert p.total_bytes == sum(x.nbytes for x in p.tensors)
    assert p.bpw == pytest.approx(8 * p.total_bytes / t.n_elements)
    d = json.loads(p.to_json())
    assert d["total_bytes"] == p.total_bytes and len(d["tensors"]) == 1147
    assert d["tensors"][0] == {**d["tensors"][0], "name": "token_embd.weight", "shape": [7168, 129280],
                               "src_type": "bf16"}
    assert set(d["tensors"][0]) >= {"name", "type", "nbytes", "fallback", "quantized"}
    assert sum(v["bytes"] for v in d["by_type"].values()) == p.total_bytes
    assert "Q8_0" in p.summary()
    # ik's per-row metadata counts: iq4_ks is 4 bytes per row more than 4.25 bpw
    p2 = plan(t, S.EngineOptions("IQ4_KS", custom=((r"ffn_down_exps", "iq4_ks"),)))
    x = next(x for x in p2.tensors if x.name == "blk.3.ffn_down_exps.weight")
    assert x.nbytes == (2048 // 256 * 136 + 4) * 7168 * 256


def test_every_ftype_name_is_known():
    for name in ftype_names():
        assert types.FTYPES[types.canonical_ftype(name)].default in BY_NAME
        assert types.canonical_ftype(name.lower()) == types.canonical_ftype(name)
    assert types.canonical_ftype("q4_k") == "Q4_K_M"
    with pytest.raises(PlanError, match="unknown ftype 'IQ4_KX'"):
        types.canonical_ftype("IQ4_KX")


def test_requantizing_is_flagged():
    t = deepseek2.deepseek_v3_table(source_type="q8_0")
    p = plan(t, "IQ4_KS")
    assert any("--allow-requantize" in w for w in p.warnings)
    assert p.types()["blk.5.attn_kv_b.weight"] is None  # q8_0 -> q8_0 is a copy
    assert not any("--allow-requantize" in w for w in plan(deepseek2.deepseek_v3_table(), "IQ4_KS").warnings)


def test_copy_and_unquantized_ftypes():
    t = deepseek2.deepseek_v3_table()
    assert all(v is None for v in plan(t, "COPY").types().values())
    assert plan(t, "BF16").total_bytes == t.total_bytes
    f32 = plan(t, "F32")
    assert f32.types()["blk.0.attn_q_a.weight"] == "f32" and f32.types()["blk.0.attn_norm.weight"] is None


# --------------------------------------------------------------------------------------
# recipes: loading, engine arguments, one-line errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_files_load_and_give_engine_args(recipe):
    r = R.load_recipe(recipe)
    args = R.engine_args(r)
    assert args[-1] == r.base and r.base in types.FTYPES
    if r.rules:
        custom = args[args.index("--custom-q") + 1]
        assert custom == ",".join(f"{x.match}={x.type}" for x in r.rules)
        assert custom.count(",") == len(r.rules) - 1 and custom.count("=") == len(r.rules)
    for flag, v in (("--token-embedding-type", r.token_embd), ("--output-tensor-type", r.output),
                    ("--ffn-gate-inp-type", r.ffn_gate_inp)):
        assert (flag in args) == (v is not None)
        if v is not None:
            assert args[args.index(flag) + 1] == v
    assert ("--pure" in args) == r.pure
    assert r.model in ("tiny", "deepseek-v3")


def test_engine_args_of_a_fixture():
    r = R.load_recipe(PF / "ok-tiny.yaml")
    assert r.base == "IQ4_KS"
    assert R.engine_args(r) == ["--token-embedding-type", "q8_0", "--custom-q",
                                "attn_k_b=q5_0,ffn_(gate|up)_exps=iq3_ks", "IQ4_KS"]
    assert r.options().argv() == R.engine_args(r)[:-1]


ERRORS = {
    "bad-case.yaml": r"bad-case\.yaml: rules\[1\]\.type: type names are case-sensitive in llama-quantize: "
                     r"'q4_k' is spelled 'q4_K'",
    "unknown-type.yaml": r"unknown-type\.yaml: output: unknown ggml type 'iq5_kss' \(did you mean 'iq5_ks'",
    "bad-regex.yaml": r"bad-regex\.yaml: rules\[0\]\.match: invalid regex",
    "comma-regex.yaml": r"comma-regex\.yaml: rules\[0\]\.match: .* contains ','",
    "unknown-key.yaml": r"unknown-key\.yaml: rules\[0\]: Additional properties are not allowed \('tpye'",
    "bad-yaml.yaml": r"bad-yaml\.yaml: line \d+, column \d+: not valid YAML: ",
    "unknown-base.yaml": r"unknown-base\.yaml: base: unknown llama-quantize ftype 'IQ4_KXS'",
    "pure-with-rules.yaml": r"pure-with-rules\.yaml: rules: --pure makes llama-quantize skip --custom-q",
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_recipe_errors_are_one_line_and_name_file_and_key(name):
    with pytest.raises(RecipeError, match=ERRORS[name]) as e:
        R.load_recipe(PF / name)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, QuantsweepError)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.yaml: cannot be read \(No such file"):
        R.load_recipe(tmp_path / "nope.yaml")
    assert R.recipe_or_ftype("iq4_ks") == "IQ4_KS" and R.recipe_or_ftype("Q4_K") == "Q4_K_M"
    assert R.recipe_or_ftype(PF / "ok-tiny.yaml").name == "ok-tiny"
    with pytest.raises(RecipeError, match="neither a recipe file nor a llama-quantize ftype"):
        R.recipe_or_ftype("IQ9_Z")


@pytest.mark.parametrize("pattern,why", [
    (r"(?<=blk\.1)\.ffn", "'='"), (r"(?<!x)ffn", "lookbehind"), (r"(?i)FFN", "inline flags"),
    (r"ffn_down\Z", "anchors"), (r"ffn_(?P<x>down)", "named groups"), (r"[[:digit:]]+", "POSIX"),
    (r"blk\.[0-9]++\.x", "possessive"), ("ffn down", "whitespace"),
])
def test_regexes_the_engine_reads_differently_are_refused(pattern, why):
    with pytest.raises(RecipeError, match=rf"rules\[0\]\.match: .*{why}"):
        R.recipe_from_dict({"name": "x", "base": "Q8_0", "rules": [{"match": pattern, "type": "q8_0"}]}, "x.yaml")


def test_type_names_the_engine_accepts():
    assert R.check_type("q4_K", "k") == "q4_K" and R.check_type("iq4_ks", "k") == "iq4_ks"
    assert R.check_type("q8_KV_r8", "k") == "q8_KV_r8"
    for bad, hint in (("Q4_K", "'q4_K'"), ("IQ4_KS", "'iq4_ks'"), ("q8_kv", "'q8_KV'"), ("q8_K", "storage")):
        with pytest.raises(RecipeError, match=hint):
            R.check_type(bad, "rules[0].type")
    with pytest.raises(RecipeError, match="base BF16 the engine never applies --custom-q"):
        R.recipe_from_dict({"name": "x", "base": "bf16", "rules": [{"match": "a", "type": "q8_0"}]})


def test_rule_matching_no_tensor_is_an_error():
    t = deepseek2.deepseek_v3_table()
    r = R.load_recipe(PF / "unmatched-rule.yaml")
    with pytest.raises(RecipeError, match=r"unmatched-rule\.yaml: rules\[1\]\.match 'blk\\\\\.70\\\\\.ffn_up_exps' "
                                            r"matches no tensor of DeepSeek-V3-ik-bf16") as e:
        plan(t, r)
    assert "\n" not in str(e.value)
    loose = plan(t, r, strict=False)
    assert loose.types()["blk.7.ffn_up_exps.weight"] == "iq4_ks"
    assert loose.warnings == [r"rules[1] blk\.70\.ffn_up_exps=q8_0 matches no tensor"]
    ok = R.recipe_from_dict({"name": "x", "base": "IQ4_KS",
                             "rules": [{"match": r"blk\.70\.", "type": "q8_0", "optional": True}]})
    plan(t, ok)  # optional rules may match nothing (layout-dependent tensors)


def test_rules_without_effect_are_warnings():
    t = deepseek2.deepseek_v3_table()
    r = R.recipe_from_dict({"name": "x", "base": "IQ4_KS", "rules": [
        {"match": "ffn_down_exps", "type": "iq4_k"},
        {"match": r"blk\.5\.ffn_down_exps", "type": "q8_0"},  # shadowed by rule 0
        {"match": r"ffn_norm", "type": "q8_0"},  # norms are never quantized
    ]})
    p = plan(t, r)
    assert sum("never applies" in w for w in p.warnings) == 2
    assert p.types()["blk.5.ffn_down_exps.weight"] == "iq4_k"
