"""The README's example configs (config/examples/) planned by the workflow itself, `snakemake -n`,
on header-only (sparse) inputs of the real shapes: the DAG plans, every engine job asks for
exactly the capacity plan's figures (which follow the file it reads, not the source), and a
machine too small stops the workflow in one line before any job starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_workdir, smk
from quantsweep import capacity, config
from quantsweep.gguf.writer import write_shape_gguf
from quantsweep.hf.checkpoint import Checkpoint
from quantsweep.hf.sparse import SHAPES, V3_CONFIG, write_sparse_checkpoint

EXAMPLES = ROOT / "config" / "examples"
ENGINE_RULES = {"imatrix_collect", "pool", "quantize", "eval_baseline", "eval_reference", "eval_quant", "bench_quant",
                "bench_base", "sensitivity_run", "sensitivity_top", "convert"}
_JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n(.*?)(?=\n\n|\Z)", re.S | re.M)


def dry_run_jobs(out: str) -> list[dict]:
    """Each job `snakemake -n` prints: its rule, wildcards and resources."""
    jobs = []
    for m in _JOB.finditer(out):
        body = m.group(2)
        wc = re.search(r"^\s+wildcards: (.*)$", body, re.M)
        res = re.search(r"^\s+resources: (.*)$", body, re.M)
        jobs.append({"rule": m.group(1),
                     "wildcards": dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {},
                     "resources": dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}})
    return jobs


def _item(rule: str, wc: dict) -> str:
    if "ptype" in wc:
        return f"{wc['pool_imatrix']}/{wc['ptype']}"
    return wc.get("quant") or wc.get("imatrix_pass") or ""


def example_files(tmp_path: Path, name: str, model_path: Path) -> Path:
    cfg = yaml.safe_load((EXAMPLES / name).read_text())
    (model,) = [m for m, v in cfg["models"].items() if v]
    cfg["models"][model]["path"] = str(model_path)
    for kind in ("calibration", "evaluation"):
        (tmp_path / f"{kind}.txt").write_text(f"{kind} text\n")
        cfg["texts"][kind] = str(tmp_path / f"{kind}.txt")
    out = tmp_path / name
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def v3_fp8(tmp_path_factory) -> Path:
    """deepseek-ai's V3 FP8 release, headers only (about 20 MB of disk for 688 GB)."""
    return write_sparse_checkpoint(tmp_path_factory.mktemp("hf") / "DeepSeek-V3-0324", V3_CONFIG)


def assert_requests_are_the_plans(out: str, wd: Path, cf: Path) -> list[dict]:
    """Every engine job of a dry run asks for the capacity plan's figures; returns them."""
    jobs = [j for j in dry_run_jobs(out) if j["rule"] in ENGINE_RULES]
    sweep = config.check_files([str(wd / "config" / "config.yaml"), str(cf)])
    written = {m: None for m in sweep.models}
    conv = wd / "resources" / "models" / "dsv3" / "dsv3.gguf"
    if conv.exists():
        written["dsv3"] = conv
    plan = capacity.plan_sweep(sweep, written)
    rates = sweep.machine.throughput
    for j in jobs:
        want = plan.job(j["rule"], j["wildcards"]["model"], _item(j["rule"], j["wildcards"]))
        res = j["resources"]
        assert int(res["mem_mb"]) == capacity.mem_mb(want), j
        assert int(res["runtime"]) == capacity.runtime_min(want, rates), j
        if "disk_mb" in res and j["rule"] != "bench_quant":
            assert int(res["disk_mb"]) == capacity.disk_mb(want), j
    return jobs


@pytest.mark.parametrize("example", ["v3-workstation.yaml", "v3-slurm.yaml"])
def test_v3_fp8_examples_plan_from_the_download_and_after_its_conversion(tmp_path, v3_fp8, example):
    """Before the conversion (a checkpoint rule) every job plans from the GGUF the checkpoint's
    headers predict (`snakemake -n` on source: hf used to die in a resource function); once it
    has written its GGUF (a sparse one here), from that file's header: each job asks for what
    the plan says of the file it reads."""
    wd = make_workdir(tmp_path / "wd")
    cf = example_files(tmp_path, example, v3_fp8)
    profile = ["--workflow-profile", str(ROOT / "profiles" / "slurm")] if "slurm" in example else ["--cores", "16"]
    r = smk(wd, "-n", *profile, "--configfile", str(cf))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    before = assert_requests_are_the_plans(out, wd, cf)
    assert {"convert", "imatrix_collect", "quantize", "eval_quant"} <= {j["rule"] for j in before}
    (conv,) = [j for j in before if j["rule"] == "convert"]
    ck = Checkpoint.read(v3_fp8)
    assert int(conv["resources"]["disk_mb"]) > ck.output_bytes("bf16") / 2**20
    # the converter's output, as it leaves it (header only)
    models = wd / "resources" / "models"
    write_shape_gguf(ck.predicted_table("bf16"), models / "dsv3" / "dsv3.gguf")
    (models / "dsv3.convert.json").write_text("{}")
    r = smk(wd, "-n", *profile, "--configfile", str(cf))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    jobs = assert_requests_are_the_plans(out, wd, cf)
    rules = {j["rule"] for j in jobs}
    assert {"imatrix_collect", "pool", "quantize", "eval_reference", "eval_quant", "bench_quant"} <= rules
    imx = yaml.safe_load(cf.read_text())["imatrix"]["model"]
    assert f"results/quants/dsv3/dsv3-{imx}.gguf" in next(
        ln for ln in out.splitlines() if ln.strip().startswith("input:") and "calibration" in ln)
    ev = {j["wildcards"]["quant"]: int(j["resources"]["mem_mb"]) for j in jobs if j["rule"] == "eval_quant"}
    assert ev["IQ2_KS"] < 200_000  # MB: its own ~180 GiB file, not the 1.34 TB bf16 source
    if "slurm" in example:  # the GPU partition, named once in the config
        gpu = [j for j in jobs if j["rule"] in ("eval_quant", "imatrix_collect", "bench_quant")]
        assert gpu and all(j["resources"].get("slurm_partition") == "gpu" for j in gpu)
        assert all("slurm_partition" not in j["resources"] for j in jobs if j["rule"] == "quantize")


@pytest.mark.parametrize("shape,ram_gib", [("v2-lite", 512), ("kimi-k2", 768)])
def test_other_family_downloads_plan_from_their_own_headers(tmp_path, shape, ram_gib):
    """Nothing assumes V3's counts: V2-Lite's bf16 download (27 layers, 64 experts, 16 heads, no
    q_lora) and Kimi-K2's FP8 one (384 experts, 64 heads, 163840 tokens) through the README's
    workstation config; every engine job asks for the plan's figure of the file it reads."""
    ck_dir = write_sparse_checkpoint(tmp_path / shape, SHAPES[shape])
    wd = make_workdir(tmp_path / "wd")
    cf = example_files(tmp_path, "v3-workstation.yaml", ck_dir)
    cfg = yaml.safe_load(cf.read_text())
    cfg["machine"]["ram_gib"] = ram_gib  # Kimi-K2's IQ5_KS (629 GiB) needs more than 512 GiB
    cf.write_text(yaml.safe_dump(cfg))
    if shape == "kimi-k2":  # the disk, too: refused in one line that names a fix which, applied, fits
        r = smk(wd, "-n", "--cores", "16", "--configfile", str(cf))
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("machine: ")]
        assert r.returncode != 0 and len(lines) == 1, (r.stdout + r.stderr)[-3000:]
        m = re.fullmatch(r"machine: the sweep needs [\d,]+ GiB disk, the machine has 6,000 GiB \(short [\d,]+ GiB\); "
                         r"would fit with (.+) dropped from quants", lines[0])
        assert m, lines[0]
        dropped = m.group(1).split(" and ")
        cfg["quants"] = [q for q in cfg["quants"] if (q if isinstance(q, str) else q["name"]) not in dropped]
        cf.write_text(yaml.safe_dump(cfg))
    r = smk(wd, "-n", "--cores", "16", "--configfile", str(cf))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    jobs = assert_requests_are_the_plans(out, wd, cf)
    ck = Checkpoint.read(ck_dir)
    table = ck.predicted_table("bf16")
    n_expert = SHAPES[shape]["n_routed_experts"]
    assert table.arch_kv("expert_count") == n_expert
    src = ck.output_bytes("bf16")
    (conv,) = [j for j in jobs if j["rule"] == "convert"]
    assert int(conv["resources"]["disk_mb"]) > src / 2**20
    ev = {j["wildcards"]["quant"]: int(j["resources"]["mem_mb"]) for j in jobs if j["rule"] == "eval_quant"}
    # IQ2_KS (~2.2 bpw of 16) resident, with its KV cache and a few GiB of buffers: not the source
    assert 0.1 * src / 2**20 < ev["IQ2_KS"] < 0.2 * src / 2**20 + 6 * 1024


def test_own_gguf_example_plans_and_every_job_asks_the_plans_figures(tmp_path, v3_gguf):
    wd = make_workdir(tmp_path / "wd")
    cf = example_files(tmp_path, "own-gguf.yaml", v3_gguf)
    r = smk(wd, "-n", "-p", "--cores", "16", "--configfile", str(cf))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    jobs = assert_requests_are_the_plans(out, wd, cf)
    rules = {j["rule"] for j in jobs}
    assert rules == {"imatrix_collect", "pool", "quantize", "eval_reference", "eval_quant", "bench_quant",
                     "sensitivity_top"}, rules  # the runs are known once the groups checkpoint ran
    assert not [j for j in dry_run_jobs(out) if j["wildcards"].get("model") == "tiny"]  # tiny: null dropped it
    # the skipped optional budget is said in the log, and in the report (its Sweep notes)
    assert "quantsweep: allocate.budgets[1] (auto-tiny-mix-iq2) skipped" in out
    assert "--note 'allocate.budgets[1] (auto-tiny-mix-iq2) skipped" in out
    ev = {j["wildcards"]["quant"]: int(j["resources"]["mem_mb"]) for j in jobs if j["rule"] == "eval_quant"}
    src_mb = v3_gguf.stat().st_size / 2**20
    # before: every eval asked for the bf16 source resident (~1.35 TB); now each its own file
    assert ev["IQ2_KS"] < 0.16 * src_mb and ev["IQ4_KS"] < 0.3 * src_mb


def test_a_machine_too_small_is_refused_in_one_line(tmp_path, v3_gguf):
    wd = make_workdir(tmp_path / "wd", {"machine": {"ram_gib": 256}})
    cf = example_files(tmp_path, "own-gguf.yaml", v3_gguf)
    r = smk(wd, "-n", "--cores", "16", "--configfile", str(cf))
    assert r.returncode != 0
    out = r.stdout + r.stderr  # Snakemake prints a WorkflowError on stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("machine: ")]
    assert len(lines) == 1, out[-3000:]
    assert re.match(r"machine: imatrix_collect dsv3/mla needs [\d,]+ GiB RAM, the machine has 256 GiB "
                    r"\(short [\d,]+ GiB\)", lines[0])
    assert len(out.splitlines()) < 10  # no schema dump, no traceback


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_the_readme_shows_each_example_file_as_it_is(name):
    """README's example configs are these files, so what the tests plan is what users copy."""
    readme = (ROOT / "README.md").read_text()
    assert f"```yaml\n{(EXAMPLES / name).read_text()}```" in readme
