"""End to end: the default workflow (tiny DeepSeek model, bundled texts) on the real engine.

The engine is built once into the user cache (~/.cache/quantsweep or $QUANTSWEEP_CACHE) and
reused by later runs; the sweep itself runs once per session in a scratch work dir.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, make_workdir, smk
from quantsweep.engine import logparse
from quantsweep.config import parse_quants, resolve_recipe_paths
from quantsweep.gguf.reader import read_table
from quantsweep.report import read_csv

import yaml

pytestmark = pytest.mark.e2e

QUANTS = parse_quants(resolve_recipe_paths(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["quants"],
                                           str(ROOT)))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("demo"))
    r = smk(wd, "--cores", "all")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return wd


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
    assert md.count("\n| tiny |") == len(QUANTS) + 1


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
        if q.imatrix:
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

REPORT_FILES = ("summary.csv", "summary.md", "summary.html", "size_vs_lnppl.png", "size_vs_kld.png")
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
    assert html.count("data:image/png;base64,") == 2


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
            (cmd,) = m["engine_commands"]
            assert cmd.startswith("resources/engine/bin/llama-")
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
        assert rec["ran"] == {"flash_attn": 0, "mla_attn": mla, "fused_moe": 0, "fused_up_gate": 0}
    for rec_path in sorted((demo / "results" / "eval" / "tiny").glob("*.json")):
        if rec_path.name.endswith(".manifest.json"):
            continue
        ran = json.loads(rec_path.read_text())["ran"]
        assert ran["mla_attn"] == 1 and ran["flash_attn"] == 0, rec_path.name
