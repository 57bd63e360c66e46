"""The capacity plan at the scale users run, without the hardware: header-only (sparse) GGUFs of
DeepSeek-V3, of DeepSeek-V2-Lite (another shape: 27 layers, 64 experts, 16 heads, no q_lora) and
of Kimi-K2 (1T: 384 experts, 64 heads, one dense layer, 163840 tokens) planned from their own
headers; the README's example configs (files under config/examples/, read here so they cannot
drift) planned and refused on machines too small, each job's figures checked against what it
reads rather than the source's size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from quantsweep import capacity, config
from quantsweep.capacity.files import Placement, kv_bytes_per_token, of_table
from quantsweep.errors import ConfigError
from quantsweep.gguf.deepseek2 import KIMI_K2, deepseek2_table, deepseek_v3_table
from quantsweep.gguf.writer import write_shape_gguf
from quantsweep.settings import MachineSettings, RunSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "config" / "examples"
GiB = 2**30
V2_LITE = dict(n_layer=27, n_dense=1, n_expert=64, n_expert_used=6, n_embd=2048, n_head=16, q_lora=0,
               kv_lora=512, qk_nope=128, qk_rope=64, v_head=128, n_ff=10944, n_ff_exp=1408, n_vocab=102400)


def _texts(d: Path) -> dict:
    (d / "cal.txt").write_text("calibration text\n")
    (d / "eval.txt").write_text("evaluation text\n")
    return {"calibration": str(d / "cal.txt"), "evaluation": str(d / "eval.txt")}


def example(name: str, tmp_path: Path, path: Path) -> dict:
    """A README example config with its model path and texts pointed at files made here."""
    cfg = yaml.safe_load((EXAMPLES / name).read_text())
    (model,) = [m for m, v in cfg["models"].items() if v]
    cfg["models"][model]["path"] = str(path)
    cfg["texts"] = _texts(tmp_path)
    return cfg


def default_config() -> dict:
    return config.load_yaml(ROOT / "config" / "config.yaml")


@pytest.fixture(scope="module")
def v2_lite_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v2lite") / "DeepSeek-V2-Lite-BF16.gguf"
    write_shape_gguf(deepseek2_table(**V2_LITE), out)
    return out


@pytest.fixture(scope="module")
def kimi_k2_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("k2") / "Kimi-K2-Instruct-BF16.gguf"
    write_shape_gguf(deepseek2_table(layout="mainline", **KIMI_K2), out)
    return out


def plan_of(cfg: dict, machine: MachineSettings | None = None):
    sweep = config.load(config.merged(default_config(), cfg), ROOT)
    return sweep, capacity.plan_sweep(sweep, machine=machine)


def job(p, rule: str, item: str = ""):
    return next(j for j in p.jobs if j.rule == rule and j.item == item)


def test_v3_jobs_are_sized_from_the_file_each_reads(tmp_path, v3_gguf):
    sweep, p = plan_of(example("own-gguf.yaml", tmp_path, v3_gguf))
    src = v3_gguf.stat().st_size
    iq2 = job(p, "quantize", "IQ2_KS")
    assert 0.10 < iq2.written_bytes / src < 0.16  # ~2.2 bpw of 16
    ev = job(p, "eval_quant", "IQ2_KS")
    kv = kv_bytes_per_token(of_table(p.tables["dsv3"]).dims, sweep.eval.mla) * 2048
    # its own file (+ KV cache, logits and a few GiB), not the 1.34 TB source
    assert iq2.written_bytes < ev.ram_bytes < iq2.written_bytes * 1.05 + kv + 4 * GiB
    assert ev.read_bytes == iq2.written_bytes + job(p, "eval_reference").written_bytes
    # the reference is Q8_0 (eval.reference): its run holds Q8_0's file, not the source
    q8 = job(p, "quantize", "Q8_0").written_bytes
    assert q8 < job(p, "eval_reference").ram_bytes < q8 * 1.05 + 4 * GiB
    # the imatrix runs on the source (imatrix.model: source)
    assert job(p, "imatrix_collect", "mla").ram_bytes > src
    # quantize streams its source: the largest tensor (256 x 2048 x 7168) as f32 a few times
    assert 40 * GiB < iq2.ram_bytes < 60 * GiB
    # the shipped optional budgets: tiny-mix-iq2 is not in these quants, so skipped with a note
    assert [q.name for q in sweep.quants if q.auto] == ["auto-IQ2_KS", "auto-IQ3_K", "auto-IQ4_KS"]
    assert sweep.notes == ("allocate.budgets[1] (auto-tiny-mix-iq2) skipped: it is the size of tiny-mix-iq2, which "
                           "is not in quants (an optional budget of the shipped config)",)


def test_kld_base_logits_and_bench_depth(tmp_path, v3_gguf):
    """(n_ctx-1-n_ctx/2) records of (n_vocab+4) uint16 per chunk: ~38 GB for V3 on wiki.test.raw's
    580 chunks at ctx 512; a bench at depth 8192 is hours, not the 107 h the source's size gave."""
    cfg = {**example("own-gguf.yaml", tmp_path, v3_gguf), "eval": {"reference": "Q8_0", "chunks": 580},
           "bench": {"depths": [0, 8192]}}
    sweep, p = plan_of(cfg)
    kld = job(p, "eval_reference").written_bytes
    assert kld == 580 * (512 - 1 - 256) * (129280 + 4) * 2
    assert 38.0e9 < kld < 38.5e9
    b = job(p, "bench_quant", "IQ2_KS")
    assert b.seconds < 2 * 3600
    assert capacity.runtime_min(b, sweep.machine.throughput) < 5 * 60


def test_v2_lite_plans_from_its_own_header(tmp_path, v2_lite_gguf):
    """Nothing assumes V3: V2-Lite's 64 experts (6 used), 16 heads, 27 layers and no q_lora."""
    sweep, p = plan_of(example("own-gguf.yaml", tmp_path, v2_lite_gguf))
    d = of_table(p.tables["dsv3"]).dims
    assert (d["n_layer"], d["n_expert"], d["n_expert_used"], d["n_head"], d["n_vocab"]) == (27, 64, 6, 16, 102400)
    assert not any("attn_q_a" in t.name for t in p.tables["dsv3"].tensors)
    src = v2_lite_gguf.stat().st_size
    assert 30e9 < src < 33e9  # 15.7B parameters at bf16
    iq4 = job(p, "quantize", "IQ4_KS").written_bytes
    assert iq4 < job(p, "eval_quant", "IQ4_KS").ram_bytes < iq4 + 4 * GiB
    # quantize's largest tensor: 64 x 1408 x 2048 experts (or the embeddings) as f32, x3
    assert job(p, "quantize", "IQ4_KS").ram_bytes < 8 * GiB
    # MLA's KV cache: (512 + 64) f16 per layer per token; mla 0 caches every head
    assert kv_bytes_per_token(d, 1) == 2 * 576 * 27
    assert kv_bytes_per_token(d, 0) == 2 * 16 * (128 + 64 + 128) * 27


def test_kimi_k2_plans_from_its_own_header_and_its_fixes_apply(tmp_path, kimi_k2_gguf):
    """A 1T model of V3's class with other counts: every figure follows its header (384 experts,
    64 heads, 163840 tokens), and on the 512 GiB workstation the fixes the plan names are ones that,
    applied, clear the job."""
    cfg = example("v3-workstation.yaml", tmp_path, kimi_k2_gguf)
    cfg["models"]["dsv3"] = {"source": "gguf", "path": str(kimi_k2_gguf)}
    cfg["eval"] = {**cfg["eval"], "chunks": 580}
    sweep, p = plan_of(cfg)
    names = {t.name for t in p.tables["dsv3"].tensors}
    d = of_table(p.tables["dsv3"]).dims
    assert (d["n_layer"], d["n_expert"], d["n_head"], d["n_vocab"]) == (61, 384, 64, 163840)
    # one dense layer
    assert "blk.0.ffn_gate_inp.weight" not in names and "blk.1.ffn_gate_inp.weight" in names
    src = kimi_k2_gguf.stat().st_size
    assert 2.0e12 < src < 2.1e12  # 1.03T parameters at bf16
    # the KLD base from Kimi's own vocabulary
    assert job(p, "eval_reference").written_bytes == 580 * (512 - 1 - 256) * (163840 + 4) * 2
    # MLA's cache per token, from the header: (512 + 64) f16 per layer
    assert kv_bytes_per_token(d, sweep.eval.mla) == 2 * 576 * 61
    iq2 = job(p, "quantize", "IQ2_KS").written_bytes
    assert 0.10 < iq2 / src < 0.16
    ev = job(p, "eval_quant", "IQ2_KS")
    assert iq2 < ev.ram_bytes + ev.vram_bytes < iq2 * 1.05 + 8 * GiB
    # 629 GiB of IQ5_KS does not fit 512 GiB: one line, and each named fix, applied, fits its job
    line = capacity.refusal(p, sweep)
    assert line.startswith("machine: imatrix_collect dsv3/mla needs ") and "\n" not in line
    by = {(s.job.rule, s.job.item): s for s in capacity.shortfalls(p, sweep) if s.job}
    im, ref = by[("imatrix_collect", "mla")], by[("eval_reference", "")]
    name = im.fix.split()[1]
    assert im.fix.startswith("imatrix.model: ") and name.endswith("-noimatrix")
    assert ref.fix.startswith("eval.reference: ")
    fixed = {**cfg, "quants": [{"name": name, "ftype": name.removesuffix("-noimatrix"), "imatrix": False},
                               *cfg["quants"]],
             "imatrix": {"model": name}, "eval": {**cfg["eval"], "reference": ref.fix.split()[1]}}
    sweep2, p2 = plan_of(fixed)
    left = {s.job.rule for s in capacity.shortfalls(p2, sweep2, fixes=False) if s.job is not None}
    assert not left & {"imatrix_collect", "eval_reference"}, left


def test_placement_follows_ngl_and_override_tensors():
    f = of_table(deepseek_v3_table())
    everything = Placement(RunSettings(gpu_layers=99), 61).split(f)
    assert everything["cpu_bytes"] == next(t.nbytes for t in f.tensors if t.name == "token_embd.weight")
    experts = Placement(RunSettings(gpu_layers=99, override_tensors=("exps=CPU",)), 61).split(f)
    exps = sum(t.nbytes for t in f.tensors if "_exps." in t.name)
    assert experts["cpu_bytes"] - everything["cpu_bytes"] == exps
    assert 20 * GiB < experts["gpu_bytes"] < 40 * GiB  # V3's attention, shared experts, dense layers at bf16
    # -ngl 10: the last 10 layers, not the output (that takes more layers than the model has)
    part = Placement(RunSettings(gpu_layers=10), 61)
    assert part.on_gpu("blk.60.attn_q_a.weight") and part.on_gpu("blk.51.ffn_up_exps.weight")
    assert not part.on_gpu("blk.50.ffn_up_exps.weight") and not part.on_gpu("output.weight")
    # active weights per token: 8 of 256 experts
    assert experts["cpu_active"] == pytest.approx(
        sum(t.n_elements for t in f.tensors if "_exps." in t.name) * 8 / 256)


def test_workstation_example_fits_and_a_256_gib_machine_is_refused_in_one_line(tmp_path, v3_gguf):
    cfg = example("v3-workstation.yaml", tmp_path, v3_gguf)
    cfg["models"]["dsv3"] = {"source": "gguf", "path": str(v3_gguf)}  # its GGUF (the hf form: test_scale_workflow)
    sweep, p = plan_of(cfg)
    assert capacity.refusal(p, sweep) is None, capacity.text(p, sweep)
    ev = job(p, "eval_quant", "IQ2_KS")
    assert 0 < ev.vram_bytes < 24 * GiB and ev.gpus == 1
    small = sweep.machine.updated({"ram_gib": 256})
    line = capacity.refusal(capacity.plan_sweep(sweep, machine=small), sweep)
    assert "\n" not in line
    assert line.startswith("machine: imatrix_collect dsv3/mla needs ")
    assert "the machine has 256 GiB" in line


def test_suggested_fix_makes_it_fit(tmp_path, v3_gguf):
    """The fix the refusal names is one that was planned and fits: applying it clears the job."""
    cfg = example("own-gguf.yaml", tmp_path, v3_gguf)
    cfg["machine"] = {"ram_gib": 512, "gpus": 1, "vram_gib": 24}
    sweep, p = plan_of(cfg)
    by = {(s.job.rule, s.job.item): s for s in capacity.shortfalls(p, sweep) if s.job}
    im = by[("imatrix_collect", "mla")]
    assert im.fix.startswith("imatrix.model: ")
    name = im.fix.split()[1]
    ftype = name.removesuffix("-noimatrix")
    fixed = {**cfg, "quants": [{"name": name, "ftype": ftype, "imatrix": False}, *cfg["quants"]],
             "imatrix": {"model": name}}
    sweep2, p2 = plan_of(fixed)
    assert not [s for s in capacity.shortfalls(p2, sweep2, fixes=False)
                if s.job is not None and s.job.rule == "imatrix_collect"]
    assert job(p2, "imatrix_collect", "mla").reads == name


def test_budgets_follow_quants_but_a_written_one_must_name_a_quant(tmp_path):
    base = default_config()
    sweep = config.load(config.merged(base, {"quants": ["Q8_0", "IQ4_KS"]}), ROOT)
    assert [q.name for q in sweep.quants if q.auto] == ["auto-IQ4_KS"]
    assert len(sweep.notes) == 3 and all("skipped" in n for n in sweep.notes)
    with pytest.raises(ConfigError, match=r"^config allocate.budgets\[0\].size_of: 'IQ2_KS' is not a quant"):
        config.load(config.merged(base, {"quants": ["Q8_0"], "allocate": {"budgets": [{"size_of": "IQ2_KS"}]}}),
                    ROOT)


def test_imatrix_model_must_be_an_imatrix_free_quant():
    base = default_config()
    with pytest.raises(ConfigError, match=r"^config imatrix.model: 'Q4_0' is neither 'source' nor a quant"):
        config.load(config.merged(base, {"imatrix": {"model": "Q4_0"}}), ROOT)
    with pytest.raises(ConfigError, match=r"^config imatrix.model: Q8_0 is made with an imatrix"):
        config.load(config.merged(base, {"imatrix": {"model": "Q8_0"}}), ROOT)
    s = config.load(config.merged(base, {"imatrix": {"model": "IQ2_KS-noimatrix"}}), ROOT)
    p = capacity.plan_sweep(s)
    assert {j.reads for j in p.jobs if j.rule == "imatrix_collect"} == {"IQ2_KS-noimatrix"}


def test_machine_detect_and_dropped_model():
    m = capacity.detected(MachineSettings(detect=True), ".")
    assert m.ram_gib > 1 and m.disk_gib > 0 and not m.detect
    s = config.load(config.merged(default_config(), {"machine": "detect"}), ROOT)
    assert s.machine.detect
    with pytest.raises(ConfigError, match="^config machine: 'big'"):
        config.load(config.merged(default_config(), {"machine": "big"}), ROOT)
    with pytest.raises(ConfigError, match="^config models: name at least one model"):
        config.load(config.merged(default_config(), {"models": {"tiny": None}}), ROOT)


def test_plan_cli_table_json_and_refusal(tmp_path, v3_gguf):
    from quantsweep.cli import main

    cfg = example("own-gguf.yaml", tmp_path, v3_gguf)
    f = tmp_path / "own.yaml"
    f.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "plan.json"
    assert main(["plan", str(ROOT / "config" / "config.yaml"), str(f), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["fits"] and doc["totals"]["peak_disk_bytes"] > 2e12 and doc["totals"]["engine_hours"] > 10
    assert main(["plan", str(ROOT / "config" / "config.yaml"), str(f), "--machine", "ram_gib=256"]) == 1


def test_demo_plan_is_small_and_fits_this_machine():
    sweep = config.load(default_config(), ROOT)
    p = capacity.plan_sweep(sweep, machine=MachineSettings(detect=True))
    assert capacity.refusal(p, sweep) is None
    assert p.peak_disk_bytes < 5 * GiB
    assert {j.rule for j in p.jobs} >= {"imatrix_collect", "pool", "quantize", "eval_baseline", "eval_quant",
                                         "bench_quant", "bench_base", "sensitivity_run", "sensitivity_top"}


def test_the_demo_is_planned_as_its_writer_writes_it(tiny_gguf):
    """The plan a sweep starts with (the demo not generated yet) is the plan of the file it then
    reads, so the rerun after a crash finds results/plan/ unchanged (test_resume)."""
    from quantsweep.capacity.files import tiny_table
    from quantsweep.gguf.reader import read_table
    from quantsweep.settings.tiny import TinySpec

    made = read_table(tiny_gguf())
    planned = tiny_table(TinySpec())
    assert sorted((t.name, t.shape, t.type) for t in planned.tensors) == \
        sorted((t.name, t.shape, t.type) for t in made.tensors)
    sweep = config.load(default_config(), ROOT)
    before = capacity.plan_sweep(sweep, {"tiny": tiny_gguf().parent / "not-yet.gguf"})
    after = capacity.plan_sweep(sweep, {"tiny": tiny_gguf()})
    assert capacity.to_json(before, sweep) == capacity.to_json(after, sweep)


def test_retries_grow_every_request(tmp_path, v3_gguf):
    sweep, p = plan_of(example("own-gguf.yaml", tmp_path, v3_gguf))
    rates = sweep.machine.throughput
    for j in (job(p, "eval_quant", "IQ2_KS"), job(p, "quantize", "IQ2_KS"), job(p, "imatrix_collect", "mla")):
        for f in (capacity.mem_mb, capacity.disk_mb, lambda job, attempt: capacity.runtime_min(job, rates, attempt)):
            one, two, three = f(j, attempt=1), f(j, attempt=2), f(j, attempt=3)
            assert abs(two - 1.5 * one) <= 1 and abs(three - 2 * one) <= 1


def test_init_sizes_a_work_dir_for_the_model_and_the_machine(tmp_path, v3_gguf, capsys):
    from quantsweep.cli import main

    wd = tmp_path / "wd"
    node = ["--ram-gib", "512", "--gpus", "1", "--vram-gib", "24", "--disk-gib", "8000"]
    assert main(["init", str(wd), "--model", str(v3_gguf), "--machine", "slurm", *node]) == 0
    assert "fits the machine" in capsys.readouterr().out
    cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    assert cfg["models"] == {"DeepSeek-V3-BF16": {"source": "gguf", "path": str(v3_gguf)}}
    names = [q["name"] if isinstance(q, dict) else q for q in cfg["quants"]]
    # Q8_0 (665 GiB) and IQ6_K do not fit 512 GiB; the imatrix runs on a 5-bit quant without one
    assert "Q8_0" not in names and "IQ6_K" not in names and "IQ2_KS" in names
    # the reference: the largest quant that fits (made with the imatrix)
    assert cfg["imatrix"]["model"] == "IQ5_KS-noimatrix" and cfg["eval"]["reference"] == "IQ5_KS"
    assert cfg["run"]["defaults"] == {"gpu_layers": 99, "override_tensors": ["exps=CPU"]}
    assert cfg["engine"]["cuda"] is True
    assert cfg["allocate"]["ladder"][-1] == "iq5_ks" and len(cfg["allocate"]["budgets"]) == 3
    sweep = config.load(cfg, ROOT)
    p = capacity.plan_sweep(sweep)
    assert capacity.refusal(p, sweep) is None
    assert p.peak_disk_bytes <= 8000 * GiB and sweep.machine.jobs >= 1
    # a work dir's config is the user's: never written over
    assert main(["init", str(wd), "--model", str(v3_gguf), "--machine", "slurm", *node]) == 1
    assert "exists" in capsys.readouterr().err
    # a machine that holds fewer than two quants: one line
    assert main(["init", str(tmp_path / "small"), "--model", str(v3_gguf), "--machine", "slurm", "--ram-gib",
                 "128"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantsweep: error: init: the machine (128 GiB RAM") and "\n" not in err
    assert not (tmp_path / "small").exists()


def test_init_a_small_model_keeps_the_unquantized_reference(tmp_path, v2_lite_gguf):
    from quantsweep.capacity.init import init_config

    cfg = init_config(default_config(), {"source": "gguf", "path": str(v2_lite_gguf)},
                      MachineSettings(ram_gib=128, disk_gib=2000), "workstation", str(ROOT))
    assert cfg["eval"]["reference"] == "base" and cfg["imatrix"]["model"] == "source"
    assert cfg["run"]["defaults"] == {} and cfg["engine"]["cuda"] is False
    assert cfg["quants"][0] == {"name": "Q8_0", "ftype": "Q8_0", "imatrix": False}
