"""What the allocation stage costs: the sensitivity stage's wall time on a finished sweep, the
engine's quantize time for the sweep's recipe quants with and without the per-type pool (measured
afresh on this machine, in a temp dir; the assembled files are checked against llama-quantize's),
and DeepSeek-V3 on paper: groups, sensitivity runs, pool files, engine-hours and what the SLURM
profile asks per job.

    python benchmarks/allocation_cost.py [--workdir .] [--model tiny] [--threads N]
        [--v3-groups classes|layers] [--v3-kld-run-min 60] [--v3-quantize-min 90] [--v3-assemble-gbps 1.0]

WORKDIR is a work dir where `snakemake --cores all` finished with `allocate:` enabled (e.g. the
demo); it is only read. The V3 hours are per-run assumptions (the options) times counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quantsweep import capacity, config  # noqa: E402
from quantsweep.gguf.assemble import tensor_data_diff  # noqa: E402
from quantsweep.gguf.deepseek2 import deepseek_v3_table  # noqa: E402
from quantsweep.allocator.groups import Settings, make_groups, runs, sensitivity_recipe  # noqa: E402
from quantsweep.planner.plan import plan  # noqa: E402
from quantsweep.planner.pool import pool_recipe  # noqa: E402

GiB = 2**30


def table(header: list[str], rows: list[list]) -> None:
    """A plain text table, columns as wide as their widest cell."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            print("  ".join("-" * x for x in w))
    print()


def load(p: Path) -> dict:
    return json.loads(p.read_text())


def quantsweep_cli() -> list[str]:
    """The `quantsweep` command (this checkout's package when it is not on PATH)."""
    exe = shutil.which("quantsweep")
    return [exe] if exe else [sys.executable, "-c", "import sys; from quantsweep.cli import main; sys.exit(main())"]


def engine(argv: list[str], rec: Path, cwd: Path) -> dict:
    subprocess.run(quantsweep_cli() + argv, check=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return load(rec)


def sensitivity_stage(sens: Path) -> tuple[int, float]:
    recs = [load(p) for p in sorted((sens / "runs").glob("*.json")) if not p.name.endswith(".manifest.json")]
    recs.append(load(sens / "top.json"))
    print(f"== 1. Sensitivity stage of this sweep ({sens})\n")
    table(["quantity", "value"], [
        ["runs (+ the top run)", f"{len(recs) - 1} + 1"],
        ["sum of run wall_s (llama-perplexity)", f"{sum(r['wall_s'] for r in recs):.2f} s"],
        ["sum of assemble_s", f"{sum(r['assemble_s'] for r in recs):.3f} s"],
        ["elapsed, first start .. last end (incl. Snakemake)",
         f"{max(r['ended_at'] for r in recs) - min(r['started_at'] for r in recs):.2f} s"],
    ])
    return len(recs), sum(r["assemble_s"] for r in recs)


def pool_vs_engine(wd: Path, model: str, threads: int, n_sens: int, sens_asm: float) -> None:
    bin_dir, src = wd / "resources" / "engine" / "bin", wd / "resources" / "models" / f"{model}.gguf"
    qdir = wd / "results" / "quants" / model
    qrecs = {p.stem.removeprefix(f"{model}-"): load(p) for p in sorted(qdir.glob("*.json"))
             if not p.name.endswith(".manifest.json")}
    recipes = {q: r for q, r in qrecs.items() if r.get("built") == "pool"}
    if not recipes:
        print("== 2. no quant of this sweep was assembled from the pool (built == pool): nothing to measure\n")
        return
    types = sorted({t for r in recipes.values() for t in r["pools"]})
    imx = next((wd / r["imatrix"] for r in recipes.values() if r.get("imatrix")), None)
    imx_arg = ["--imatrix", str(imx)] if imx else []
    common = ["--bin-dir", str(bin_dir), "--model", str(src), *imx_arg, "--threads", str(threads)]
    print(f"== 2. Quantize time of the {len(recipes)} recipe quants, with and without the pool "
          f"(measured now, {threads} threads, imatrix {'yes' if imx else 'no'})\n")
    with tempfile.TemporaryDirectory(prefix="allocation_cost.") as tmp:
        d = Path(tmp)
        pool_s, pools = {}, {}
        for t in types:
            pools[t] = d / f"pool-{t}.gguf"
            rec = engine(["pool", *common, "--type", t, "-o", str(pools[t]), "--log", str(d / f"pool-{t}.log"),
                          "--record", str(d / f"pool-{t}.json")], d / f"pool-{t}.json", d)
            pool_s[t] = rec["wall_s"]
        rows, sum_a, sum_b = [], 0.0, 0.0
        for q, r in recipes.items():
            recipe = ["--recipe", str(wd / r["recipe"])]
            a_out, b_out = d / f"{q}.quantize.gguf", d / f"{q}.pool.gguf"
            a = engine(["quantize", *common, *recipe, "-o", str(a_out), "--log", str(d / f"{q}.a.log"),
                        "--record", str(d / f"{q}.a.json")], d / f"{q}.a.json", d)
            pool_args = [x for t in r["pools"] for x in ("--pool", f"{t}={pools[t]}")]
            b = engine(["quantize", *common, *recipe, *pool_args, "-o", str(b_out), "--log", str(d / f"{q}.b.log"),
                        "--record", str(d / f"{q}.b.json")], d / f"{q}.b.json", d)
            diff = tensor_data_diff(b_out, a_out)
            same = "yes" if not diff else f"NO ({len(diff)}: {diff[0]})"
            sum_a, sum_b = sum_a + a["wall_s"], sum_b + b["wall_s"]
            rows.append([q, a.get("built"), f"{a['wall_s']:.3f}", b.get("built"), f"{b['wall_s']:.3f}",
                         f"{a['wall_s'] / max(b['wall_s'], 1e-3):.0f}x", same])
        table(["recipe quant", "(a) built", "(a) llama-quantize s", "(b) built", "(b) assembly s", "(a)/(b)",
               "tensor data == llama-quantize"], rows)
    table(["pool type", "pool build s (llama-quantize, every tensor at the type)"],
          [[t, f"{s:.3f}"] for t, s in pool_s.items()] + [["sum", f"{sum(pool_s.values()):.3f}"]])
    mean_a = sum_a / len(recipes)
    table(["total", "seconds"], [
        ["(a) without pool: llama-quantize per recipe", f"{sum_a:.3f}"],
        ["(b) with pool: pool build + assembly", f"{sum(pool_s.values()):.3f} + {sum_b:.3f} = "
                                                 f"{sum(pool_s.values()) + sum_b:.3f}"],
        [f"sensitivity without the pool (estimate): {n_sens} runs x {mean_a:.3f} s (mean (a))",
         f"{n_sens * mean_a:.3f}"],
        ["sensitivity with the pool (the same pool files): assembly only (1.)", f"{sens_asm:.3f}"],
    ])
    print("The pool files are built once and serve both the sensitivity runs and the recipe quants.\n")


def v3_on_paper(a, wd: Path, ladder: list[str]) -> None:
    t = deepseek_v3_table()
    s = Settings.from_config({"ladder": ladder, "groups": a.v3_groups})
    groups = make_groups(t, s)
    rs = runs(groups, s)
    top = plan(t, sensitivity_recipe(groups, s, None, None), has_imatrix=True, strict=False).total_bytes
    by = {g.name: g for g in groups}
    run_bytes = [top] + [top + by[g].bytes[ty] - by[g].bytes[s.top] for g, ty in rs]  # the top run first
    pool_bytes = {ty: plan(t, pool_recipe(ty), has_imatrix=True, strict=False).total_bytes for ty in s.types()}
    n = len(rs) + 1
    kld_h, pool_h = n * a.v3_kld_run_min / 60, len(pool_bytes) * a.v3_quantize_min / 60
    asm_h = sum(run_bytes) / (a.v3_assemble_gbps * 1e9) / 3600
    print(f"== 3. DeepSeek-V3 on paper ({t.path.name}, {t.total_bytes / 1e9:.0f} GB, {len(t.tensors)} tensors), "
          f"ladder {', '.join(ladder)}, groups {a.v3_groups}\n")
    table(["assumption (option)", "value"], [
        ["--v3-kld-run-min: one llama-perplexity KLD run, one GPU node, experts in RAM", f"{a.v3_kld_run_min} min"],
        ["--v3-quantize-min: one full llama-quantize of V3 to one type", f"{a.v3_quantize_min} min"],
        ["--v3-assemble-gbps: assembly copy rate", f"{a.v3_assemble_gbps} GB/s"],
    ])
    table(["quantity", "value"], [
        ["groups", len(groups)],
        ["sensitivity runs (each: one assemble + one KLD run)", f"{len(rs)} + 1 top = {n}"],
        ["pool files (= ladder types)", len(pool_bytes)],
        *[[f"  pool {ty} planned size", f"{b / GiB:.1f} GiB"] for ty, b in pool_bytes.items()],
        ["  pool, all files", f"{sum(pool_bytes.values()) / GiB:.1f} GiB"],
        ["top run's assembled model", f"{top / GiB:.1f} GiB"],
    ])
    table(["engine-hours", "with the pool", "without the pool (estimate)"], [
        ["quantize: pool files / one llama-quantize per run", f"{pool_h:.1f}", f"{n * a.v3_quantize_min / 60:.1f}"],
        ["assembly of every run", f"{asm_h:.1f}", "-"],
        ["KLD runs", f"{kld_h:.1f}", f"{kld_h:.1f}"],
        ["sensitivity stage", f"{pool_h + asm_h + kld_h:.1f}", f"{n * a.v3_quantize_min / 60 + kld_h:.1f}"],
        ["one recipe quant afterwards (<= top's size)", f"{top / (a.v3_assemble_gbps * 1e9) / 3600:.2f}",
         f"{a.v3_quantize_min / 60:.2f}"],
    ])
    slurm(wd, t)


def slurm(wd: Path, t) -> None:
    """What the workflow asks per job (the capacity plan of the work dir's sweep, its model
    replaced by V3's table), and what the SLURM profile puts over it."""
    prof_path = ROOT / "profiles" / "slurm" / "profile.yaml"
    prof = yaml.safe_load(prof_path.read_text()) if prof_path.exists() else {}
    sweep = config.load(yaml.safe_load((wd / "config" / "config.yaml").read_text()), ROOT)
    p = capacity.capacity_plan(sweep, {m: t for m in sweep.models})
    model = sorted(sweep.models)[0]
    rates = sweep.machine.throughput
    print(f"What {prof_path.relative_to(ROOT)} asks per job for V3 (first attempt; each retry x1.5, x2 ...; "
          f"quantsweep.capacity's plan of this sweep on V3's table, eval ctx x chunks = "
          f"{sweep.eval.ctx * sweep.eval.chunks})\n")
    rows = []
    pools = [j for j in p.jobs if j.rule == "pool"]
    for j in (p.job("sensitivity_run", model), max(pools, key=lambda j: j.written_bytes)):
        over = (prof.get("set-resources") or {}).get(j.rule) or {}
        rows.append([f"{j.rule} {j.item}".strip(), (prof.get("set-threads") or {}).get(j.rule, "the rule's"),
                     over.get("mem_mb", capacity.mem_mb(j)), over.get("disk_mb", capacity.disk_mb(j)),
                     over.get("runtime", capacity.runtime_min(j, rates)), j.gpus, json.dumps(over) if over else "-"])
    table(["job", "set-threads", "mem_mb", "disk_mb", "runtime min", "gpu", "profile set-resources"], rows)
    print("mem_mb: the file the job holds (its CPU-side tensors) + KV cache + buffers; disk_mb: what it writes; "
          "runtime: the plan's estimate x machine.throughput.slack + 30 min (config/README.md \"Capacity plan\").")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="engine threads (default: every CPU)")
    ap.add_argument("--v3-groups", choices=("classes", "layers"), default="classes")
    ap.add_argument("--v3-kld-run-min", type=float, default=60.0)
    ap.add_argument("--v3-quantize-min", type=float, default=90.0)
    ap.add_argument("--v3-assemble-gbps", type=float, default=1.0)
    a = ap.parse_args()
    wd = Path(a.workdir).resolve()
    sens = wd / "results" / "sensitivity" / a.model
    ladder = load(sens / "groups.json")["settings"]["ladder"]
    n_sens, sens_asm = sensitivity_stage(sens)
    pool_vs_engine(wd, a.model, a.threads, n_sens, sens_asm)
    v3_on_paper(a, wd, ladder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
