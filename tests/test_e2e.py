"""End to end: the default workflow (tiny DeepSeek model, bundled texts) on the real engine.

The engine is built once into the user cache (~/.cache/quantsweep or $QUANTSWEEP_CACHE) and
reused by later runs; the sweep itself runs once per session in a scratch work dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import DEFAULT_RULES, ROOT, make_workdir, smk
from quantsweep.engine import logparse
from quantsweep.config import load
from quantsweep.gguf.assemble import tensor_data_diff
from quantsweep.gguf.reader import read_table
from quantsweep.report import read_csv
from quantsweep.status import read_plan, sweep_status, text

import yaml

pytestmark = pytest.mark.e2e

# the default quants, then one auto recipe per allocate budget
QUANTS = load(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), ROOT).quants


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("demo"))
    r = smk(wd, "--cores", "all")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    (wd / "snakemake.out").write_text(r.stdout + r.stderr)
    return wd


def test_default_sweep_runs_the_rules_the_slurm_test_covers(demo):
    """test_slurm runs a small sweep with every rule of this one (conftest.DEFAULT_RULES)."""
    ran = set(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", (demo / "snakemake.out").read_text(), re.M))
    assert ran == DEFAULT_RULES


@pytest.fixture(scope="session")
def rows(demo) -> dict[str, dict]:
    return {r["quant"]: r for r in read_csv(demo / "results" / "report" / "summary.csv")}


def test_summary_has_one_row_per_quant_plus_baseline(demo, rows):
    table = read_csv(demo / "results" / "report" / "summary.csv")
    assert [r["quant"] for r in table] == ["baseline"] + [q.name for q in QUANTS]
    assert {r["model"] for r in table} == {"tiny"}
    for col in ("model", "quant", "size_bytes", "bpw", "ppl", "ppl_err", "dppl_pct", "kld_mean", "same_top_p"):
        assert col in table[0]
    md = (demo / "results" / "report" / "summary.md").read_text()
    main, allocated = md.split("## Allocated recipes: predicted vs measured KLD")
    assert main.count("\n| tiny |") == len(QUANTS) + 1
    assert allocated.count("\n| tiny |") == len(AUTO)


def _log_number(text: str, pattern: str) -> float:
    m = re.search(pattern, text, re.M)
    assert m, pattern
    return float(m.group(1))


def test_summary_numbers_equal_engine_logs(demo, rows):
    """Each value in the table is the one the engine printed (checked with the test's own regexes)."""
    base_log = (demo / "logs" / "eval" / "tiny" / "baseline.log").read_text()
    assert float(rows["baseline"]["ppl"]) == _log_number(base_log, r"Final estimate: PPL over \d+ chunks for n_ctx=\d+ = (\S+)")
    for q in QUANTS:
        log = (demo / "logs" / "eval" / "tiny" / f"{q.name}.log").read_text()
        row = rows[q.name]
        assert float(row["kld_mean"]) == _log_number(log, r"^Mean\s+KLD:\s+(\S+)")
        assert float(row["ppl"]) == _log_number(log, r"^Mean PPL\(Q\)\s*:\s+(\S+)")
        assert float(row["same_top_p"]) == _log_number(log, r"^Same top p:\s+(\S+)")
        assert float(row["bpw"]) == _log_number(log, r"model size\s*=\s*\S+ \w+ \((\S+) BPW\)")
        gguf = demo / "results" / "quants" / "tiny" / f"tiny-{q.name}.gguf"
        assert int(row["size_bytes"]) == gguf.stat().st_size
        expect = 100 * (float(row["ppl"]) / float(rows["baseline"]["ppl"]) - 1)
        assert float(row["dppl_pct"]) == pytest.approx(expect, rel=1e-12)


def test_demo_model_behaves_like_an_llm(rows):
    """What the demo exists to show: low baseline PPL, quality falling with bits, imatrix helping."""
    vocab = 354
    assert float(rows["baseline"]["ppl"]) < vocab / 10
    ladder = [q.name for q in QUANTS if q.name in ("Q8_0", "IQ6_K", "IQ4_KS", "IQ3_K", "IQ2_KS")]
    kld = [float(rows[n]["kld_mean"]) for n in ladder]
    ppl = [float(rows[n]["ppl"]) for n in ladder]
    assert kld == sorted(kld), dict(zip(ladder, kld))
    assert ppl == sorted(ppl), dict(zip(ladder, ppl))
    assert float(rows["IQ2_KS-noimatrix"]["kld_mean"]) > 1.5 * float(rows["IQ2_KS"]["kld_mean"])
    assert float(rows["IQ2_XS"]["kld_mean"]) < 1.0


def test_engine_metadata(demo):
    meta = json.loads((demo / "resources" / "engine" / "engine.json").read_text())
    assert meta["source"] == "pypi" and meta["version"] == "0.1.5"
    assert len(meta["sdist_sha256"]) == 64
    assert "-DBUILD_SHARED_LIBS=OFF" in meta["cmake_flags"]
    assert meta["toolchain"]["cc"] and meta["build_time_s"] > 0
    for tool in ("llama-imatrix", "llama-quantize", "llama-perplexity"):
        assert len(meta["tools"][tool]) == 64


def test_second_run_has_nothing_to_do(demo):
    r = smk(demo, "-n")
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


def test_quantize_logs_show_imatrix_use(demo):
    """Quants made with the fitted imatrix find data for every attention and FFN tensor."""
    for q in QUANTS:
        rec = json.loads((demo / "results" / "quants" / "tiny" / f"tiny-{q.name}.json").read_text())
        if rec["built"] == "pool":  # assembled: the pool files' engine runs used the imatrix
            for pool in rec["pools"].values():
                assert ("/imatrix/" in pool) == q.imatrix
                prec = json.loads((demo / pool).with_suffix(".json").read_text())
                assert prec["imatrix_entries"] > 0
                assert not [n for n in prec["not_found"] if n.startswith("blk.")], prec["not_found"]
        elif q.imatrix:
            assert rec["imatrix_entries"] > 0
            assert not [n for n in rec["not_found"] if n.startswith("blk.")], rec["not_found"]
        else:
            assert rec["imatrix_entries"] is None


def test_tensor_table_reads_ik_types_and_matches_files(demo):
    """Our GGUF reader (ik type ids included) accounts for every byte of each quantized file."""
    for q in QUANTS:
        path = demo / "results" / "quants" / "tiny" / f"tiny-{q.name}.gguf"
        t = read_table(path)
        align = int(t.kv.get("general.alignment", 32))
        end = max(x.offset + x.nbytes for x in t.tensors)
        assert path.stat().st_size == t.data_offset + end
        for x in t.tensors:
            assert x.offset % align == 0
        log = (demo / "logs" / "eval" / "tiny" / f"{q.name}.log").read_text()
        engine = logparse.parse_perplexity(log, expect_kld=True)
        assert t.bpw == pytest.approx(engine.bpw, abs=0.0015)


def test_no_partial_outputs_or_stray_engine_logs_left(demo):
    assert not list(demo.rglob("*.partial*"))
    assert not list(demo.rglob("llama.log"))  # the engine's own log file is switched off


# ---- report (results/report/) ------------------------------------------------------------------

REPORT_FILES = ("summary.csv", "summary.md", "summary.html", "size_vs_lnppl.png", "size_vs_kld.png",
                "kld_vs_speed.png")
CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_report_plots_show_the_tables_numbers(demo):
    """Each PNG's points (stored in it when drawn, read back from the figure's artists) are the
    CSV's values: x = size_gib / bpw, y = ln_ppl_ratio / kld_mean; every quant once, no baseline."""
    from quantsweep.report import png_points

    out = demo / "results" / "report"
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    table = read_csv(out / "summary.csv")
    for png, ycol in (("size_vs_lnppl.png", "ln_ppl_ratio"), ("size_vs_kld.png", "kld_mean")):
        drawn = {(p["quant"], p["x_col"]): (p["x"], p["y"]) for p in png_points(out / png)}
        want = {(r["quant"], xcol): (float(r[xcol]), float(r[ycol]))
                for r in table if r["quant"] != "baseline" for xcol in ("size_gib", "bpw")}
        assert drawn == want, png
        assert len(drawn) == 2 * len(QUANTS)


def test_report_gate_and_values_match_records(demo):
    """The gate column is what the configured limits say (recomputed here), the new columns are
    the evaluation records' values, and the report names the smallest passing quant."""
    gate = CONFIG["gate"]
    table = read_csv(demo / "results" / "report" / "summary.csv")
    assert {r["reference"] for r in table} == {"base"}
    passing = []
    for r in table[1:]:
        rec = json.loads((demo / "results" / "eval" / "tiny" / f"{r['quant']}.json").read_text())
        assert float(r["ln_ppl_ratio"]) == rec["ln_ratio"]
        assert float(r["kld_p99"]) == rec["kld_percentiles"]["99.0"]
        assert float(r["size_gib"]) == int(r["size_bytes"]) / 2**30
        ok = float(r["dppl_pct"]) <= gate["max_dppl_pct"] and float(r["kld_mean"]) <= gate["max_kld"]
        assert r["gate"] == ("pass" if ok else "fail"), r
        if ok:
            passing.append((int(r["size_bytes"]), r["quant"]))
    assert table[0]["gate"] == ""
    best = min(passing)[1]
    md = (demo / "results" / "report" / "summary.md").read_text()
    html = (demo / "results" / "report" / "summary.html").read_text()
    assert f"smallest passing quant: **{best}**" in md
    assert f"smallest passing quant: <b>{best}</b>" in html
    assert "reference: unquantized model (resources/models/tiny.gguf)" in md
    ev = CONFIG["eval"]
    assert f"ctx {ev['ctx']}, {ev['chunks']} chunks, -mla {ev['mla']} -fa {ev['fa']}" in md
    # size vs ln PPL ratio, size vs KLD, KLD vs speed, the auto recipes' types by layer
    assert html.count("data:image/png;base64,") == 4


def test_snakemake_report_bundles_table_and_plots(demo, tmp_path):
    out = tmp_path / "report.html"
    r = smk(demo, "--cores", "1", "--report", str(out))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    page = out.read_text()
    for name in ("summary.csv", "summary.html", "size_vs_lnppl.png", "size_vs_kld.png"):
        assert f'"results/report/{name}"' in page, name
    assert "Pareto front" in page and "Quality gate" in page  # captions and workflow description


@pytest.fixture(scope="session")
def ref_demo(tmp_path_factory) -> Path:
    """A small sweep whose reference is the Q8_0 quant instead of the unquantized model."""
    wd = make_workdir(tmp_path_factory.mktemp("refdemo"),
                      {"eval": {"reference": "Q8_0"}, "quants": ["Q8_0", "IQ4_KS", "IQ2_KS"]})
    r = smk(wd, "--cores", "all")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return wd


def test_reference_quant_writes_the_base_logits(ref_demo):
    log = (ref_demo / "logs" / "eval_reference" / "tiny.log").read_text()
    first = next(ln for ln in log.splitlines() if ln.startswith("+ "))
    assert "-m results/quants/tiny/tiny-Q8_0.gguf" in first and "--kl-divergence-base" in first
    assert not (ref_demo / "logs" / "eval" / "tiny" / "baseline.log").exists()  # base model not evaluated
    assert not (ref_demo / "results" / "eval" / "tiny" / "Q8_0.json").exists()
    ref_ppl = logparse.parse_perplexity(log).ppl
    table = read_csv(ref_demo / "results" / "report" / "summary.csv")
    assert [r["quant"] for r in table] == ["Q8_0", "IQ4_KS", "IQ2_KS"]
    assert {r["reference"] for r in table} == {"Q8_0"}
    assert float(table[0]["ppl"]) == ref_ppl and table[0]["gate"] == "" and table[0]["kld_mean"] == ""
    for r in table[1:]:
        rec = json.loads((ref_demo / "results" / "eval" / "tiny" / f"{r['quant']}.json").read_text())
        assert "results/eval/tiny/baseline.kld" in rec["cmd"] and "--kl-divergence" in rec["cmd"]
        assert rec["ppl_base"] == pytest.approx(ref_ppl, abs=1e-4)  # the engine compared with Q8_0's logits
        assert float(r["kld_mean"]) == rec["kld_mean"] > 0
    md = (ref_demo / "results" / "report" / "summary.md").read_text()
    assert "reference: reference quant Q8_0 (results/quants/tiny/tiny-Q8_0.gguf)" in md
    assert "| tiny | Q8_0 (reference) |" in md


def test_predicted_sizes_match_engine_and_files(demo):
    """For every quant (recipes included): our plan's bytes equal the tensor data the engine
    wrote, and the engine's own 'quant size' agrees within its print rounding."""
    assert any(q.recipe for q in QUANTS)
    for q in QUANTS:
        rec = json.loads((demo / "results" / "quants" / "tiny" / f"tiny-{q.name}.json").read_text())
        assert rec["predicted_bytes"] == rec["tensor_bytes"], q.name
        assert rec["file_bytes"] == (demo / "results" / "quants" / "tiny" / f"tiny-{q.name}.gguf").stat().st_size
        assert rec["built"] == ("pool" if q.recipe or q.auto else "llama-quantize"), q.name
        if rec["built"] == "pool":  # no engine run: the pool files' runs were checked against their plans
            continue
        assert abs(rec["quant_mib"] * 2**20 - rec["predicted_bytes"]) <= 0.005 * 2**20 + 1, q.name
        assert abs(rec["file_bytes"] - rec["predicted_bytes"]) / rec["file_bytes"] < 0.005, q.name


def test_every_artifact_has_a_manifest_that_matches_it(demo):
    """Provenance: each imatrix, quantized GGUF, evaluation and the report has a manifest whose
    input/output hashes are those of the files, with the engine identity and exact commands."""
    import hashlib

    def manifest_path(artifact: Path) -> Path:  # results/quants/m/m-Q.gguf -> m-Q.manifest.json
        return artifact.with_name(artifact.stem + ".manifest.json")

    engine = json.loads((demo / "resources" / "engine" / "engine.json").read_text())
    arts = [demo / "results" / "imatrix" / "tiny" / f"{p}.dat" for p in ("mla", "std", "imatrix")]
    arts += [demo / "results" / "quants" / "tiny" / f"tiny-{q.name}.gguf" for q in QUANTS]
    arts += [demo / "results" / "eval" / "tiny" / f"{q}.json" for q in ["baseline", *(q.name for q in QUANTS)]]
    arts += [demo / "results" / "bench" / "tiny" / f"{q}.json" for q in ["baseline", *(q.name for q in QUANTS)]]
    arts += [demo / "results" / "report" / "summary.csv"]
    for art in arts:
        m = json.loads(manifest_path(art).read_text())
        files = {f["path"]: f for f in m["outputs"]}
        files.update({f["path"]: f for fs in m["inputs"].values() for f in fs})
        rel = str(art.relative_to(demo))
        assert rel in files, (art, sorted(files))
        for path, f in files.items():
            assert hashlib.sha256((demo / path).read_bytes()).hexdigest() == f["sha256"], (art, path)
        assert m["command"].startswith("quantsweep ") and m["wall_s"] >= 0 and m["host"]["hostname"]
        assert m["tools"]["quantsweep"] and m["tools"]["numpy"]
        runs_engine = art.suffix in (".gguf", ".json") or art.name in ("mla.dat", "std.dat")
        if runs_engine:
            assert m["engine"]["sdist_sha256"] == engine["sdist_sha256"]
            assert m["engine"]["cmake_flags"] == engine["cmake_flags"]
            assert m["engine"]["tools"] == engine["tools"]
            if "pool" in m["inputs"]:  # assembled from pool files: no engine command of its own
                assert m["engine_commands"] == [] and all("results/pool/" in f["path"] for f in m["inputs"]["pool"])
                continue
            (cmd,) = m["engine_commands"]
            assert cmd.startswith("resources/engine/bin/llama-")
            if "quants" not in art.parts:  # imatrix, eval and bench: the run settings and what ran
                rec = json.loads(art.with_suffix(".json").read_text())
                assert m["run_settings"] == (rec["eval"]["run"] if "eval" in rec else rec["run"])
                assert m["ran"] == rec["ran"] and m["ran"]["mla_attn"] in (0, 1, 3)
        else:  # remap and the report are Python steps
            assert m["engine"] is None and m["engine_commands"] == []
    q = json.loads(manifest_path(demo / "results" / "quants" / "tiny" / "tiny-IQ2_KS.gguf").read_text())
    assert set(q["inputs"]) == {"model", "imatrix"} and "--imatrix" in q["engine_commands"][0]
    rep = json.loads((demo / "results" / "report" / "summary.manifest.json").read_text())
    assert len(rep["inputs"]["evaluations"]) == len(QUANTS) + 1


def test_report_links_each_row_to_its_manifests(demo):
    report = demo / "results" / "report"
    html_links = re.findall(r'<a href="([^"]+)">(quantize|eval)</a>', (report / "summary.html").read_text())
    md_links = re.findall(r"\[(quantize|eval)\]\(([^)]+)\)", (report / "summary.md").read_text())
    # every quant: quantize + eval manifests; the unquantized baseline: eval only
    assert len(html_links) == len(md_links) == 2 * len(QUANTS) + 1
    for href, _ in html_links:
        assert (report / href).resolve().is_file(), href
        assert json.loads((report / href).read_text())["manifest_version"] == 1
    rows = read_csv(report / "summary.csv")
    assert all(r["eval_manifest"] for r in rows)
    assert sum(1 for r in rows if r["quant_manifest"]) == len(QUANTS)


def test_records_say_which_attention_mode_really_ran(demo):
    """Every imatrix and perplexity run of the real engine reports its context; the step
    asserted it equals what was asked and the record keeps it."""
    for mode, mla in (("mla", 1), ("std", 0)):
        rec = json.loads((demo / "results" / "imatrix" / "tiny" / f"{mode}.json").read_text())
        assert rec["ran"] == {"flash_attn": 0, "mla_attn": mla, "fused_moe": 0, "fused_up_gate": 0, "n_ctx": 512,
                              "n_batch": 512, "n_ubatch": 512}
        assert rec["run"] == {"gpu_layers": 0, "override_tensors": [], "batch": 0, "ubatch": 0, "mmap": True,
                              "threads": 0, "threads_batch": 0, "extra_args": []}
    for rec_path in sorted((demo / "results" / "eval" / "tiny").glob("*.json")):
        if rec_path.name.endswith(".manifest.json"):
            continue
        ran = json.loads(rec_path.read_text())["ran"]
        assert ran["mla_attn"] == 1 and ran["flash_attn"] == 0, rec_path.name


# ---- speed (results/bench/) and run settings ---------------------------------------------------


def _records(d: Path, kind: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((d / "results" / kind).glob("*/*.json"))
            if not p.name.endswith(".manifest.json")}


def test_bench_records_are_the_reports_speed_columns(demo, rows):
    """Every quant and the unquantized reference were measured at each configured depth, `repeats`
    times; the summary's pp_tps/tg_tps are the medians at the first depth, per-depth columns the
    rest; the engine ran the benchmark in the mode asked (-mla 3 -fa on)."""
    import statistics

    bench = CONFIG["bench"]
    recs = _records(demo, "bench")
    assert set(recs) == {"baseline", *(q.name for q in QUANTS)}
    for name, rec in recs.items():
        assert [s["depth"] for s in rec["speed"]] == bench["depths"]
        assert rec["ran"]["mla_attn"] == bench["mla"] and rec["ran"]["flash_attn"] == 1
        assert rec["ran"]["n_ctx"] == max(bench["depths"]) + 512 and rec["ran"]["n_ubatch"] == 512
        assert len(rec["runs"]) == bench["repeats"] and rec["host"]["cpu"] and rec["host"]["gpus"] == []
        for s in rec["speed"]:
            for key in ("pp_tps", "tg_tps"):
                runs = s[key]["runs"]
                assert len(runs) == bench["repeats"] and min(runs) > 0
                assert s[key]["median"] == statistics.median(runs)
                assert (s[key]["min"], s[key]["max"]) == (min(runs), max(runs))
                assert float(rows[name][f"{key}@{s['depth']}"]) == s[key]["median"]
        head = rec["speed"][0]
        assert float(rows[name]["pp_tps"]) == head["pp_tps"]["median"]
        assert float(rows[name]["tg_tps"]) == head["tg_tps"]["median"]
        log = (demo / "logs" / "bench" / "tiny" / f"{name}.log").read_text()
        assert log.count('"n_kv": 0,') == bench["repeats"]  # each run's rows are in the log


def test_speed_plot_and_report_text(demo):
    """The third plot draws every quant at (TG t/s, mean KLD) of the table; the report says which
    host the speeds come from."""
    from quantsweep.report import png_points

    out = demo / "results" / "report"
    table = {r["quant"]: r for r in read_csv(out / "summary.csv")}
    drawn = {p["quant"]: (p["x"], p["y"]) for p in png_points(out / "kld_vs_speed.png")}
    assert drawn == {q.name: (float(table[q.name]["tg_tps"]), float(table[q.name]["kld_mean"])) for q in QUANTS}
    host = _records(demo, "bench")["baseline"]["host"]
    for page in ("summary.md", "summary.html"):
        text = (out / page).read_text()
        assert host["cpu"] in text and "no GPU" in text, page


@pytest.fixture(scope="session")
def tuned(tmp_path_factory) -> Path:
    """The demo sweep (two quants) with run settings for every step (experts in RAM, small
    batches, no mmap) and 1 thread per engine job on 2 cores: engine jobs may run two at a time,
    a benchmark must still run alone."""
    run = {"defaults": {"override_tensors": ["exps=CPU"], "mmap": False, "extra_args": ["--no-warmup"]},
           "eval": {"batch": 256, "ubatch": 128}, "bench": {"ubatch": 256}}
    wd = make_workdir(tmp_path_factory.mktemp("tuned"), {
        "quants": ["Q8_0", "IQ2_KS"], "run": run, "resources": {"threads": 1},
        "bench": {"depths": [0, 256], "repeats": 3}})
    r = smk(wd, "--cores", "2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return wd


def test_cpu_engine_runs_every_step_with_the_run_settings(tuned):
    """The settings reached every engine command, the engine reports it ran with them (batches,
    tensors moved to the CPU buffer), records keep them and the report's evaluation line says so."""
    for kind in ("imatrix", "eval", "bench"):
        for name, rec in _records(tuned, kind).items():
            cmd = rec["cmd"]
            assert cmd[cmd.index("-ot") + 1] == "exps=CPU" and "--no-mmap" in cmd and "--no-warmup" in cmd, name
            assert rec["ran"]["tensors_overridden"] == 9, (kind, name)  # 3 MoE layers x 3 expert tensors
            run = rec["eval"]["run"] if kind == "eval" else rec["run"]
            assert run["override_tensors"] == ["exps=CPU"] and run["mmap"] is False
    for name, rec in _records(tuned, "eval").items():
        assert (rec["ran"]["n_batch"], rec["ran"]["n_ubatch"]) == (256, 128), name
        assert rec["eval"]["run"]["batch"] == 256
    for name, rec in _records(tuned, "bench").items():
        assert rec["ran"]["n_ubatch"] == 256 and [s["depth"] for s in rec["speed"]] == [0, 256]
    md = (tuned / "results" / "report" / "summary.md").read_text()
    assert "-ot exps=CPU" in md and "-ub 128" in md, md[:2000]


def test_benchmarks_ran_alone(tuned):
    """No engine job ran while a benchmark did (it holds every core), though other engine jobs
    did run side by side (1 thread each on 2 cores): the isolation is the scheduler's doing."""
    jobs = [(kind, name, r["started_at"], r["ended_at"]) for kind in ("imatrix", "quants", "eval", "bench")
            for name, r in _records(tuned, kind).items()]
    assert len(jobs) == 2 + 2 + 3 + 3
    overlaps = [(a[:2], b[:2]) for i, a in enumerate(jobs) for b in jobs[i + 1:] if a[2] < b[3] and b[2] < a[3]]
    assert not [o for o in overlaps if "bench" in (o[0][0], o[1][0])], overlaps
    assert overlaps, "no two engine jobs overlapped: the check above proves nothing"


def test_gpu_check_script_passes_on_the_cpu_sweeps(demo, tuned):
    """tests/gpu/check.py (what tests/gpu/run.sh runs on a GPU machine) on the CPU sweeps: its
    checks of the records hold, and it fails on a record whose mode differs from the one asked."""
    import subprocess
    import sys

    check = ROOT / "tests" / "gpu" / "check.py"
    r = subprocess.run([sys.executable, str(check), "--full", str(demo), "--exps-cpu", str(tuned), "--cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GPU check: passed" in r.stdout and "host: " in r.stdout
    r = subprocess.run([sys.executable, str(check), "--full", str(demo)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "layers, not all" in r.stdout  # a CPU sweep is no GPU sweep


def test_an_unknown_engine_flag_stops_the_sweep_before_any_engine_step(tmp_path):
    wd = make_workdir(tmp_path / "wd", {"run": {"eval": {"extra_args": ["--no-such-flag"]}}})
    r = smk(wd, "--cores", "2")
    assert r.returncode != 0
    log = (wd / "logs" / "run_settings.log").read_text()
    assert "run.eval.extra_args: llama-perplexity does not know --no-such-flag (not in its --help)" in log
    # no imatrix, pool, quantize or eval job started (the planner's groups of the model may have;
    # the capacity plan and what the report will read are written when the sweep starts)
    made = [p.relative_to(wd / "results") for p in (wd / "results").rglob("*") if p.is_file()]
    assert all((p.parts[0] == "sensitivity" and p.name == "groups.json") or p.parts[0] == "plan" for p in made), made
    assert {p.name for p in made if p.parts[0] == "plan"} == {"plan.txt", "plan.json", "report.json"}


AUTO = [q for q in QUANTS if q.auto]


def test_auto_recipes_beat_the_quants_whose_size_they_take(demo, rows):
    """Issue 13's must-show: each size_of budget's auto recipe is no larger than that quant and
    has a lower measured mean KLD; the report marks it and shows predicted vs measured."""
    assert [q.budget.size_of for q in AUTO] == ["IQ2_KS", "tiny-mix-iq2", "IQ3_K", "IQ4_KS"]
    for q in AUTO:
        auto, ref = rows[q.name], rows[q.budget.size_of]
        assert int(auto["size_bytes"]) <= int(ref["size_bytes"]), q.name
        assert float(auto["kld_mean"]) < float(ref["kld_mean"]), (q.name, auto["kld_mean"], ref["kld_mean"])
        info = json.loads((demo / "results" / "allocate" / "tiny" / f"{q.name}.json").read_text())
        assert float(auto["predicted_kld"]) == pytest.approx(info["predicted"]["kld_mean"])
        assert auto["auto"] == "yes" and rows[q.budget.size_of]["auto"] == ""
        ratio = float(auto["kld_mean"]) / info["predicted"]["kld_mean"]
        assert 0.5 < ratio < 2, (q.name, ratio)  # the additive model holds within a factor 2 here
    md = (demo / "results" / "report" / "summary.md").read_text()
    section = md.split("## Allocated recipes: predicted vs measured KLD", 1)[1]
    for q in AUTO:
        line = next(x for x in section.splitlines() if f"| {q.name} |" in x)
        assert f"the size of {q.budget.size_of}" in line and "| yes |" in line


def test_recipes_assembled_from_the_pool_equal_llama_quantize(demo, rows, tmp_path):
    """The pool's promise: an assembled recipe has the tensor bytes llama-quantize writes for the
    same recipe, and evaluates to the same PPL and KLD."""
    # as the workflow runs them (relative paths: the imatrix path is kept in the metadata)
    bin_dir, model, imatrix = "resources/engine/bin", "resources/models/tiny.gguf", "results/imatrix/tiny/imatrix.dat"
    for name, recipe in (("tiny-mix-iq2", ROOT / "config" / "recipes" / "tiny-mix-iq2.yaml"),
                         ("auto-IQ2_KS", demo / "results" / "allocate" / "tiny" / "auto-IQ2_KS.yaml")):
        assembled = demo / "results" / "quants" / "tiny" / f"tiny-{name}.gguf"
        rec = json.loads(assembled.with_suffix(".json").read_text())
        assert rec["built"] == "pool" and len(rec["pools"]) >= 2
        direct = tmp_path / f"{name}.gguf"
        r = subprocess.run(["quantsweep", "quantize", "--bin-dir", bin_dir, "--model", model, "--recipe",
                            str(recipe), "--imatrix", imatrix, "-o", str(direct), "--log", str(tmp_path / "q.log"),
                            "--record", str(tmp_path / "q.json")], capture_output=True, text=True, cwd=demo)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "q.json").read_text())["built"] == "llama-quantize"
        assert tensor_data_diff(assembled, direct) == []
        kv = read_table(assembled).kv
        assert kv["quantsweep.recipe"] == name and kv["quantize.imatrix.file"] == read_table(direct).kv[
            "quantize.imatrix.file"]
        assert kv["general.file_type"] == read_table(direct).kv["general.file_type"]
        r = subprocess.run(["quantsweep", "eval", "kld", "--bin-dir", bin_dir, "--model", str(direct),
                            "--kld-base", "results/eval/tiny/baseline.kld", "--result", str(tmp_path / "e.json"),
                            "--log", str(tmp_path / "e.log"), "--threads", "2"], capture_output=True, text=True,
                           cwd=demo)
        assert r.returncode == 0, r.stderr
        ev = json.loads((tmp_path / "e.json").read_text())
        assert ev["ppl"] == float(rows[name]["ppl"]) and ev["kld_mean"] == float(rows[name]["kld_mean"])


def test_sensitivity_runs_feed_the_table_and_the_prediction(demo):
    sdir = demo / "results" / "sensitivity" / "tiny"
    groups = json.loads((sdir / "groups.json").read_text())
    table = json.loads((demo / "results" / "sensitivity" / "tiny.json").read_text())
    ladder = groups["settings"]["ladder"]
    assert len(groups["runs"]) == len(groups["groups"]) * (len(ladder) - 1)
    top = json.loads((sdir / "top.json").read_text())
    assert table["top_kld"] == top["kld_mean"] == float(read_csv_rows(demo)["Q8_0"]["kld_mean"])  # all q8_0
    for g in table["groups"]:
        for t in ladder[:-1]:
            run = json.loads((sdir / "runs" / f"{g['name']}@{t}.json").read_text())
            assert run["group"] == g["name"] and run["type"] == t and [g["match"], t] in run["rules"]
            assert g["increase"][t] == pytest.approx(run["kld_mean"] - top["kld_mean"])
        assert not list((sdir / "runs").glob("*.gguf")) and not list((sdir / "runs").glob(".*.gguf"))
    for q in AUTO:
        info = json.loads((demo / "results" / "allocate" / "tiny" / f"{q.name}.json").read_text())
        by = {g["name"]: g for g in table["groups"]}
        chosen = sum(by[n]["increase"][t] for n, t in info["choice"].items())
        assert info["predicted"]["kld_mean"] == pytest.approx(table["top_kld"] + chosen)
        text = (demo / "results" / "allocate" / "tiny" / f"{q.name}.yaml").read_text()
        assert text.startswith(f"# auto recipe for budget {q.name}: the size of {q.budget.size_of}")


def read_csv_rows(demo):
    return {r["quant"]: r for r in read_csv(demo / "results" / "report" / "summary.csv")}


def test_a_wrong_pool_file_is_refused_and_nothing_is_written(demo, tmp_path):
    """Assembly trusts a pool file's plan only after its header agrees: a file of another type
    given as a pool (a stale or mislabelled file) stops the step with one line, no output."""
    pools = [a for t in ("iq2_ks", "iq3_ks", "iq4_ks", "iq5_ks", "q8_0")
             for a in ("--pool", f"{t}=results/pool/tiny/imatrix/{'iq2_ks' if t == 'q8_0' else t}.gguf")]
    out = tmp_path / "x.gguf"
    r = subprocess.run(["quantsweep", "quantize", "--bin-dir", "resources/engine/bin", "--model",
                        "resources/models/tiny.gguf", "--recipe", "results/allocate/tiny/auto-IQ2_KS.yaml",
                        "--imatrix", "results/imatrix/tiny/imatrix.dat", "-o", str(out), "--log",
                        str(tmp_path / "q.log"), *pools], capture_output=True, text=True, cwd=demo)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not hold what pool q8_0 plans" in r.stderr and "rebuild it" in r.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


@pytest.fixture(scope="session")
def refined(tmp_path_factory) -> Path:
    """A small sweep with allocate.refine: one budget, a three-rung ladder, no bench."""
    wd = make_workdir(tmp_path_factory.mktemp("refine"), {
        "quants": ["IQ2_KS"], "bench": {"enabled": False}, "eval": {"chunks": 8},
        "allocate": {"enabled": True, "ladder": ["iq2_ks", "iq4_ks", "q8_0"], "budgets": [{"size_of": "IQ2_KS"}],
                     "refine": True}})
    r = smk(wd, "--cores", "all")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return wd


def test_refinement_measures_the_recipe_in_context_and_allocates_again(refined):
    rows = {r["quant"]: r for r in read_csv(refined / "results" / "report" / "summary.csv")}
    assert list(rows) == ["baseline", "IQ2_KS", "auto-IQ2_KS", "auto-IQ2_KS-refined"]
    assert rows["auto-IQ2_KS-refined"]["auto"] == "yes"
    assert int(rows["auto-IQ2_KS-refined"]["size_bytes"]) <= int(rows["IQ2_KS"]["size_bytes"])
    groups = json.loads((refined / "results" / "sensitivity" / "tiny" / "groups.json").read_text())["groups"]
    base = json.loads((refined / "results" / "allocate" / "tiny" / "auto-IQ2_KS.json").read_text())
    for g in groups:  # one context run per group: the recipe with it one rung up (none at the top)
        run = json.loads((refined / "results" / "refine" / "tiny" / "auto-IQ2_KS" / f"{g['name']}.json").read_text())
        ladder = ["iq2_ks", "iq4_ks", "q8_0"]
        chosen = base["choice"][g["name"]]
        assert run["raised"] == (None if chosen == "q8_0" else ladder[ladder.index(chosen) + 1])
        assert (run["kld_mean"] is None) == (run["raised"] is None)
    info = json.loads((refined / "results" / "allocate" / "tiny" / "auto-IQ2_KS-refined.json").read_text())
    assert info["refined_from"]["measured"] == float(rows["auto-IQ2_KS"]["kld_mean"])
    assert float(rows["auto-IQ2_KS-refined"]["predicted_kld"]) == pytest.approx(info["predicted"]["kld_mean"])


def test_imatrix_on_a_quant(tmp_path):
    """imatrix.model: the passes run on a Q8_0 made first without an imatrix (what a source too
    big for RAM needs); the imatrix then serves an IQ2_KS of the source, the records name the
    file the passes ran on and the report says where the imatrix came from."""
    wd = make_workdir(tmp_path, {
        "quants": [{"name": "Q8_0", "ftype": "Q8_0", "imatrix": False}, "IQ2_KS"],
        "imatrix": {"model": "Q8_0", "chunks": 8}, "eval": {"chunks": 4}, "bench": {"enabled": False}})
    r = smk(wd, "--cores", "2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    for p in ("mla", "std"):
        rec = json.loads((wd / "results" / "imatrix" / "tiny" / f"{p}.json").read_text())
        assert rec["model"] == "results/quants/tiny/tiny-Q8_0.gguf"
        assert rec["cmd"][rec["cmd"].index("-m") + 1] == "results/quants/tiny/tiny-Q8_0.gguf"
    q = json.loads((wd / "results" / "quants" / "tiny" / "tiny-IQ2_KS.json").read_text())
    assert "--imatrix" in q["cmd"] and q["cmd"][q["cmd"].index("--imatrix") + 1].endswith("imatrix.dat")
    md = (wd / "results" / "report" / "summary.md").read_text()
    assert "- imatrix: computed on Q8_0 (imatrix.model), not the unquantized model" in md
    plan = json.loads((wd / "results" / "plan" / "plan.json").read_text())
    assert {j["reads"] for j in plan["jobs"] if j["rule"] == "imatrix_collect"} == {"Q8_0"}


# ---- watching a sweep: status and the partial report ----------------------------------------------

def test_status_of_the_finished_demo(demo):
    """Every job of the plan the sweep started with is found done in Snakemake's records, each
    engine job with its first estimate and its measured time; nothing is left."""
    plan, parallel = read_plan(demo)
    st = sweep_status(demo)
    assert not st.snakemake_running and not st.running and not st.failed
    assert (st.done, st.left) == (sum(j.count for j in plan), 0)
    engine = {j.rule for j in plan if j.engine}
    assert {f.rule for f in st.finished if f.engine} == engine
    assert {f.rule for f in st.finished} == {j.rule for j in plan}
    assert all(f.measured_s > 0 and f.planned_s > 0 for f in st.finished)
    assert engine <= set(st.factors) and st.eta_s == 0
    assert f"jobs: {st.done} done, 0 running, 0 failed, 0 left" in text(st)


def test_partial_report_with_two_quants_missing(demo, tmp_path):
    """The Snakemake target and `quantsweep report --partial` on a sweep two of whose quants
    have no evaluation yet: the report of the rest, the two listed as pending, the final
    report untouched."""
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, symlinks=True)
    missing = ["IQ3_K", "auto-IQ4_KS"]
    for q in missing:
        (wd / "results" / "eval" / "tiny" / f"{q}.json").unlink()
    final = {f.name: f.read_bytes() for f in (wd / "results" / "report").glob("summary.*")}
    r = smk(wd, "--nolock", "--cores", "1", "partial_report")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = wd / "results" / "report" / "partial"
    rows = {row["quant"]: row for row in read_csv(out / "summary.csv")}
    assert set(rows) == {"baseline", *(q.name for q in QUANTS)} - set(missing)
    for q, row in rows.items():  # the measured rows are the final report's, gate and Pareto included
        full = next(x for x in read_csv(demo / "results" / "report" / "summary.csv") if x["quant"] == q)
        for col in ("size_bytes", "ppl", "kld_mean", "gate"):
            assert row[col] == full[col], (q, col)
    md = (out / "summary.md").read_text()
    for q in missing:
        assert f"- pending: tiny {q} (not running)" in md
        assert f"pending: tiny {q}" in (out / "summary.html").read_text()
    assert all((out / f).stat().st_size > 0 for f in ("size_vs_kld.png", "size_vs_lnppl.png", "kld_vs_speed.png"))
    assert final == {f.name: f.read_bytes() for f in (wd / "results" / "report").glob("summary.*")}
    assert "2 pending" in (wd / "logs" / "partial_report.log").read_text()


# ---- publish: the ready-to-upload repository of the demo's chosen quants ------------------------

PUBLISH = {"split_max_size": "3M", "quantized_by": "quantsweep-ci", "base_model": "example-org/tiny-deepseek",
           "include": ["imatrix", "imatrix_gguf", "recipes", "records", "plots"], "tags": ["demo"]}
PUBLISHED_NAME = "quantsweep-tiny-deepseek"  # the demo GGUF's general.name


@pytest.fixture(scope="session")
def published(demo) -> Path:
    """`snakemake publish` on the finished demo with a split size that gives every quant >= 2 shards."""
    cf = demo / "publish.yaml"
    cf.write_text(yaml.safe_dump({"publish": PUBLISH}))
    r = smk(demo, "publish", "--cores", "all", "--configfile", str(cf))
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return demo / "results" / "publish" / "tiny"


def _gate_choice(rows: dict[str, dict]) -> list[str]:
    return [q for q, r in rows.items() if q != "baseline" and r["pareto"] and r["gate"] != "fail"]


def test_publish_splits_each_chosen_quant_and_checks_it_with_the_engine(demo, rows, published):
    from quantsweep.gguf.reader import read_model

    chosen = _gate_choice(rows)
    assert len(chosen) >= 3 and sorted(p.name for p in published.iterdir() if p.is_dir() and p.name != "images") \
        == sorted(chosen)
    log = (demo / "logs" / "publish" / "tiny.log").read_text()
    for q in chosen:
        files = sorted((published / q).glob("*.gguf"))
        n = len(files)
        assert n >= 2 and [f.name for f in files] == [f"{PUBLISHED_NAME}-{q}-{i:05d}-of-{n:05d}.gguf"
                                                      for i in range(1, n + 1)]
        assert all(f.stat().st_size <= 3_000_000 for f in files)
        unsplit = demo / "results" / "quants" / "tiny" / f"tiny-{q}.gguf"
        assert tensor_data_diff(files[0], unsplit) == []  # our reader joins the shards: the same tensors
        assert f"{files[0].name}: {n} shards" in log and f"joined = tiny-{q}.gguf's" in log
        kv = read_model(files[0]).kv
        assert (kv["general.name"], kv["general.quantized_by"], kv["general.license"]) == (
            PUBLISHED_NAME, "quantsweep-ci", "mit")
        # gguf-py's label: 8 experts x (the shared parameters + one expert's share), as convert_hf_to_gguf writes it
        assert kv["general.size_label"] == "8x10M" and kv["split.count"] == n
        assert kv["general.base_model.0.repo_url"] == "https://huggingface.co/example-org/tiny-deepseek"
        assert kv["quantize.imatrix.file"] == f"{PUBLISHED_NAME}-imatrix.dat"
        assert kv["quantize.imatrix.dataset"] == "quantsweep's bundled calibration text"
    # the load check: shard 1 and the unsplit file each scored 4 chunks, to the same numbers
    finals = re.findall(r"Final estimate: PPL over 4 chunks for n_ctx=512 = ([\d.]+ \+/- [\d.]+)", log)
    assert len(finals) == 2 * len(chosen) and finals[0::2] == finals[1::2]
    r = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=published, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    again = smk(demo, "publish", "--cores", "all", "--configfile", str(demo / "publish.yaml"))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_published_card_is_the_summarys_numbers_and_reads_as_the_hub_reads_it(demo, rows, published):
    from huggingface_hub import ModelCard

    from quantsweep.imatrix.formats import read_dat, read_gguf
    from quantsweep.publish.card import check_numbers, table_numbers
    from quantsweep.report.table import read_rows

    text = (published / "README.md").read_text()
    card = ModelCard(text)
    front = yaml.safe_load(text.split("---\n")[1])
    assert card.data.to_dict() == front and ModelCard(str(card)).data.to_dict() == front
    assert front["base_model"] == "example-org/tiny-deepseek" and front["base_model_relation"] == "quantized"
    assert front["quantized_by"] == "quantsweep-ci" and front["license"] == "mit"
    assert {"gguf", "imatrix", "ik_llama.cpp", "demo"} <= set(front["tags"])
    chosen = _gate_choice(rows)
    summary = {r.quant: r for r in read_rows(demo / "results" / "report" / "summary.csv") if r.quant in chosen}
    assert check_numbers(text, summary) == []
    ppl = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert ppl == {f"PPL ({q})": round(float(rows[q]["ppl"]), 4) for q in chosen}
    for q in chosen:
        n = table_numbers(text)[q]["files"]
        assert n == len(list((published / q).glob("*.gguf")))
        assert (f"hf download quantsweep-ci/{PUBLISHED_NAME}-GGUF --include '{q}/*' "
                f"--local-dir {PUBLISHED_NAME}-GGUF") in text
        assert f"llama-server -m {PUBLISHED_NAME}-GGUF/{q}/{PUBLISHED_NAME}-{q}-00001-of-{n:05d}.gguf -mla 3 -fa on" \
            in text
        if q.startswith("auto-"):
            assert (published / q / "recipe.yaml").read_text() == \
                (demo / "results" / "allocate" / "tiny" / f"{q}.yaml").read_text()
            assert "--custom-q" in (published / q / "custom-q.txt").read_text()
        for rec in ("quantize.json", "quantize.manifest.json", "eval.json", "eval.manifest.json"):
            assert (published / q / "records" / rec).is_file()
    assert [p.name for p in sorted((published / "images").iterdir())] == ["allocation_layers.png", "kld_vs_speed.png",
                                                                          "size_vs_kld.png", "size_vs_lnppl.png"]
    assert "![allocation layers](images/allocation_layers.png)" in text  # the auto recipes' heat map
    dat, gg = published / f"{PUBLISHED_NAME}-imatrix.dat", published / f"{PUBLISHED_NAME}-imatrix.gguf"
    im, orig = read_dat(dat), read_dat(demo / "results" / "imatrix" / "tiny" / "imatrix.dat")
    assert im.dataset == "quantsweep's bundled calibration text" and sorted(im.entries) == sorted(orig.entries)
    assert all((im.entries[k].values == orig.entries[k].values).all() for k in orig.entries)
    assert sorted(read_gguf(gg).entries) == sorted(orig.entries)
    prov = json.loads((published / "provenance.json").read_text())
    qm = json.loads((demo / "results" / "quants" / "tiny" / f"tiny-{chosen[0]}.manifest.json").read_text())
    assert prov["source"]["sha256"] == [qm["inputs"]["model"][0]["sha256"]] and prov["engine"] == qm["engine"]
    assert prov["imatrix"]["sha256"] == hashlib.sha256(dat.read_bytes()).hexdigest()
    for q in chosen:
        p = prov["quants"][q]
        assert p["sweep_commands"][0].startswith("quantsweep quantize ") and p["check"]["chunks"] == 4
        assert p["unsplit"]["sha256"] == [hashlib.sha256((demo / "results" / "quants" / "tiny" /
                                                          f"tiny-{q}.gguf").read_bytes()).hexdigest()]
    assert "hf upload-large-folder quantsweep-ci/quantsweep-tiny-deepseek-GGUF . --repo-type model" in text
    assert "upload it with: hf upload-large-folder quantsweep-ci/quantsweep-tiny-deepseek-GGUF results/publish/tiny" \
        in (demo / "logs" / "publish" / "tiny.log").read_text()


def test_published_folder_names_no_machine_path_and_passes_its_check(demo, published):
    from quantsweep.gguf.reader import read_model
    from quantsweep.publish import check_folder

    for p in published.rglob("*"):
        if p.suffix in (".md", ".json", ".yaml", ".txt", ".sh", ".csv") or p.name == "SHA256SUMS":
            text = p.read_text()
            assert str(demo) not in text and str(Path.home()) + "/" not in text, p
        if "-00001-of-" in p.name:
            kv = read_model(p).kv
            assert not [v for v in kv.values() if isinstance(v, str) and v.startswith("/")], p
    assert check_folder(published, max_bytes=3_000_000) == []
    r = subprocess.run(["quantsweep", "publish", "--check", str(published), "--split-max-size", "3M",
                        "--summary", str(demo / "results" / "report" / "summary.csv")], capture_output=True, text=True)
    assert r.returncode == 0 and "publishable" in r.stdout, r.stderr


def test_publish_refuses_a_shard_cut_short_and_leaves_nothing(demo, published, tmp_path, monkeypatch, capsys):
    from quantsweep import cli
    from quantsweep.publish import folder

    # a copy with its last shard cut short fails the folder check, naming the shard
    copy = tmp_path / "copy"
    shutil.copytree(published, copy)
    last = sorted((copy / "Q8_0").glob("*.gguf"))[-1]
    os.truncate(last, last.stat().st_size - 4096)
    r = subprocess.run(["quantsweep", "publish", "--check", str(copy)], capture_output=True, text=True)
    assert r.returncode == 1 and f"Q8_0/{last.name}: sha256 differs from SHA256SUMS (changed or cut short)" in r.stderr
    # a publish whose split leaves a shard cut short is refused, and nothing is at the output path
    real = folder.split

    def cut(*args, **kw):
        files = real(*args, **kw)
        os.truncate(files[-1], files[-1].stat().st_size - 4096)
        return files

    monkeypatch.setattr(folder, "split", cut)
    monkeypatch.chdir(demo)
    out = tmp_path / "out" / "tiny"
    argv = ["publish", "--model", "tiny", "--summary", "results/report/summary.csv", "--settings",
            json.dumps(PUBLISH), "--bin-dir", "resources/engine/bin", "--source", "resources/models/tiny.gguf",
            "--text", "resources/text/evaluation.txt", "--imatrix", "results/imatrix/tiny/imatrix.dat",
            "--calibration", "resources/text/calibration.txt", "--model-license", "mit",
            "--log", str(tmp_path / "publish.log"), "-o", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "Q8_0-000" in err, err
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temp folder left either


# ---- per-layer sensitivity: the engine's own dequantizer and the proxy on the demo's pool -------


def test_dequant_tool_gives_the_rows_the_engine_stored(demo):
    """quantsweep-dequant (built with the engine) against gguf-py's dequantizer where it knows the
    type (q8_0, bf16), and the ik-only types' rows close to the source in proportion to their bits."""
    from gguf.quants import dequantize

    from quantsweep.engine import run
    from quantsweep.gguf.reader import read_table

    bin_dir = demo / "resources" / "engine" / "bin"
    src, pool = demo / "resources" / "models" / "tiny.gguf", demo / "results" / "pool" / "tiny" / "imatrix"
    name, spans = "blk.1.ffn_down_exps.weight", [(0, 3), (700, 5)]  # 512 rows per expert: experts 0 and 1
    got = run.dequant_rows(bin_dir, pool / "q8_0.gguf", [(name, spans)])[name]
    t = read_table(pool / "q8_0.gguf").by_name()[name]
    raw = (pool / "q8_0.gguf").read_bytes()[read_table(pool / "q8_0.gguf").data_offset + t.offset:][:t.nbytes]
    rows = dequantize(np.frombuffer(raw, np.uint8).reshape(-1, t.nbytes // (t.shape[1] * t.shape[2])), 8)
    assert np.array_equal(got, np.concatenate([rows[f:f + n] for f, n in spans]))
    x = run.dequant_rows(bin_dir, src, [(name, spans)])[name]
    errs = []
    for typ in ("iq2_ks", "iq3_ks", "iq4_ks", "iq5_ks", "q8_0"):
        q = run.dequant_rows(bin_dir, pool / f"{typ}.gguf", [(name, spans)])[name]
        errs.append(float(np.sum((x - q) ** 2) / np.sum(x**2)))
    assert errs == sorted(errs, reverse=True) and 0.01 < errs[0] < 0.5 and errs[-1] < 1e-4, errs
    r = subprocess.run([str(bin_dir / "quantsweep-dequant"), str(src)], input=f"{name} 4090 20\n", text=True,
                       capture_output=True)
    assert r.returncode == 1 and f"{name} has 4096 rows, asked for rows 4090..4110" in r.stderr


def test_layer_table_predicted_from_the_class_runs_and_the_proxy(demo, tmp_path):
    """quantsweep sensitivity proxy on the demo's pool, then predict: every layer group of a class
    gets a share of what its class run measured (the class total kept), and the allocator fits a
    budget with it."""
    wd = demo
    ladder = ["iq2_ks", "iq3_ks", "iq4_ks", "iq5_ks", "q8_0"]
    pool = [f"--pool={t}=results/pool/tiny/imatrix/{t}.gguf" for t in ladder]
    errors, groups, pred = tmp_path / "errors.json", tmp_path / "groups.json", tmp_path / "pred.json"

    def qs(*args):
        r = subprocess.run(["quantsweep", *args], cwd=wd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    qs("sensitivity", "proxy", "--bin-dir", "resources/engine/bin", "--model", "resources/models/tiny.gguf",
       "--imatrix", "results/imatrix/tiny/imatrix.dat", *pool, "--settings", json.dumps({"ladder": ladder}),
       "-o", str(errors))
    e = json.loads(errors.read_text())["tensors"]
    classes = json.loads((wd / "results" / "sensitivity" / "tiny.json").read_text())
    assert sorted(e) == sorted(t for g in classes["groups"] if not g.get("pinned") for t in g["tensors"])
    for t in e.values():  # fewer bits, more error: the engine's own dequantization of each pool file
        rel = [t[x]["rel"] for x in ladder]
        assert rel == sorted(rel, reverse=True) and rel[0] > 0.01 and rel[-1] < 1e-3, rel
    qs("sensitivity", "groups", "--model", "resources/models/tiny.gguf", "--settings",
       json.dumps({"groups": "layers", "ladder": ladder}), "-o", str(groups))
    qs("sensitivity", "predict", "--class-table", "results/sensitivity/tiny.json", "--groups", str(groups),
       "--errors", str(errors), "-o", str(pred))
    p = json.loads(pred.read_text())
    assert len(p["groups"]) > len(classes["groups"])
    for cg in classes["groups"]:
        parts = [g for g in p["groups"] if g["class_group"] == cg["name"]]
        for t, inc in cg["increase"].items():
            assert sum(g["increase"][t] for g in parts) == pytest.approx(inc, abs=1e-12)
    out = qs("allocate", "--sensitivity", str(pred), "--bpw", "3.5", "--name", "perlayer", "-o",
             str(tmp_path / "perlayer.yaml"))
    assert "predicted mean KLD" in out
    rules = yaml.safe_load((tmp_path / "perlayer.yaml").read_text())["rules"]
    assert any(r["match"].startswith(r"^blk\.1\.") for r in rules)  # per layer, not per class
