"""The report: gate, Pareto fronts, plots that agree with the table, the HTML page, and the
reference-quant / gate config wiring (dry runs)."""

from __future__ import annotations

import base64
import csv
import itertools
import json
import math
import random
import re

import pytest

from conftest import make_workdir, smk
from quantsweep import cli
from quantsweep.errors import ReportError
from quantsweep.report import (ModelInfo, Record, Row, annotate, gate_verdict, load_rows, make_rows, pareto_front,
                               plot_metric, plotted_fronts, plotted_points, png_points, read_rows,
                               smallest_passing, to_csv, write_report)
from quantsweep.settings import Gate

EVAL = {"ctx": 512, "chunks": 16, "mla": 1, "fa": "off", "threads": 2, "batch": 0}
# (name, size in bytes, bpw, ln PPL ratio, mean KLD): IQ2_KS-noimatrix is 256 bytes smaller than
# IQ2_KS and much worse (as in the demo), Q8_0 beats its reference (negative ln ratio).
QUANTS = [
    ("Q8_0", 18975968, 8.515, -0.0004, 0.000736),
    ("IQ6_K", 15573280, 6.987, 0.002948, 0.004282),
    ("Q6_K", 15900000, 7.1, 0.0035, 0.0039),
    ("IQ4_KS", 11616000, 5.21, 0.00472, 0.008974),
    ("IQ3_K", 10105696, 4.532, 0.035312, 0.029431),
    ("IQ2_KS", 6829952, 3.061, 0.263029, 0.269045),
    ("IQ2_KS-noimatrix", 6829696, 3.061, 0.657642, 0.711194),
    ("IQ2_XS", 6964096, 3.121, 0.256233, 0.271363),
]
BASE_PPL = 12.0743


def _record(size, bpw, ln, kld, model_file="", cmd=None) -> dict:
    ppl = BASE_PPL * math.exp(ln)
    return {"size_bytes": size, "bpw": bpw, "ppl": ppl, "ppl_err": 0.01 * ppl, "ln_ratio": ln, "ln_ratio_err": 0.002,
            "kld_mean": kld, "kld_err": kld / 50, "kld_percentiles": {"99.0": 4 * kld}, "same_top_p": 100 - 90 * kld,
            "eval": EVAL, "cmd": cmd or ["llama-perplexity", "-m", model_file], "model_file": model_file}


def make_entries(tmp_path, models=("tiny",), reference: str | None = None, quants=QUANTS) -> list[dict]:
    """Evaluation records as the workflow writes them, and the entries the report rule passes."""
    entries = []
    for mi, model in enumerate(models):
        d = tmp_path / "eval" / model
        d.mkdir(parents=True)
        scale = 1 + mi  # a second model: other sizes, same shape
        if reference is None:
            base = {"size_bytes": 35658560 * scale, "bpw": 16.007, "ppl": BASE_PPL, "ppl_err": 0.2553,
                    "eval": EVAL, "model_file": f"resources/models/{model}.gguf",
                    "cmd": ["llama-perplexity", "-m", f"resources/models/{model}.gguf", "-f", "eval.txt"]}
        else:
            size, bpw = next((s, b) for n, s, b, _, _ in quants if n == reference)
            base = {"size_bytes": size * scale, "bpw": bpw, "ppl": BASE_PPL, "ppl_err": 0.2553, "eval": EVAL,
                    "model_file": f"results/quants/{model}/{model}-{reference}.gguf",
                    "cmd": ["llama-perplexity", "-m", "x.gguf", "-f", "eval.txt"]}
        (d / "baseline.json").write_text(json.dumps(base))
        qs = []
        for name, size, bpw, ln, kld in quants:
            if name == reference:
                continue
            (d / f"{name}.json").write_text(json.dumps(_record(size * scale, bpw, ln, kld)))
            qs.append({"name": name, "ftype": name.split("-")[0], "imatrix": "no" if "noimatrix" in name else "yes",
                       "result": str(d / f"{name}.json")})
        ref = "base" if reference is None else {"name": reference, "ftype": reference, "imatrix": "yes"}
        entries.append({"model": model, "reference": ref, "base": str(d / "baseline.json"), "quants": qs})
    return entries


# TG tokens/s at the headline depth (PP is 10x): the speed front (no other quant both as fast and
# as good) is Q8_0, Q6_K, IQ6_K, IQ4_KS, IQ2_KS, IQ2_KS-noimatrix; IQ3_K is slower and worse than
# IQ4_KS, IQ2_XS slower and worse than IQ2_KS.
TG = {"baseline": 20.0, "Q8_0": 40.0, "Q6_K": 47.0, "IQ6_K": 48.0, "IQ4_KS": 60.0, "IQ3_K": 55.0, "IQ2_KS": 70.0,
      "IQ2_KS-noimatrix": 72.0, "IQ2_XS": 65.0}
SPEED_FRONT = {"Q8_0", "Q6_K", "IQ6_K", "IQ4_KS", "IQ2_KS", "IQ2_KS-noimatrix"}
HOST = {"hostname": "box1", "cpu": "AMD EPYC 7763 64-Core Processor", "cpus": 2, "gpus": []}
CPU_RUN = {"gpu_layers": 0, "override_tensors": [], "batch": 0, "ubatch": 0, "mmap": True, "threads": 2,
           "threads_batch": 0, "extra_args": []}


def _spread(median: float) -> dict:
    runs = [median, median * 0.97, median * 1.02]  # median, min, max in this order
    return {"median": median, "min": min(runs), "max": max(runs), "runs": runs}


def bench_record(tg: float, size: int, depths=(0, 512), host=HOST, run=CPU_RUN, cuda=False) -> dict:
    """A bench record as the bench rule writes it; deeper depths are slower."""
    return {"model_file": "m.gguf", "size_bytes": size,
            "bench": {"depths": list(depths), "pp": 512, "tg": 32, "ctx": 1024, "repeats": 3, "mla": 3, "fa": "on"},
            "run": run, "host": host, "engine": {"key": "3db1dd22848cc7d0be4f", "cuda": cuda},
            "speed": [{"depth": d, "pp_tps": _spread(10 * tg / (1 + i)), "tg_tps": _spread(tg / (1 + i))}
                      for i, d in enumerate(depths)],
            "ran": {"mla_attn": 3, "flash_attn": 1}, "cmd": ["llama-sweep-bench", "-m", "m.gguf"], "wall_s": 4.2}


def add_bench(tmp_path, entries: list[dict], skip=(), **kw) -> list[dict]:
    """Bench records for every row of the entries (the reference's too, sized like its evaluation
    record) but the quants in `skip`, and their keys in the entries; kw: bench_record's."""
    for e in entries:
        d = tmp_path / "bench" / e["model"]
        d.mkdir(parents=True)
        ref = "baseline" if e["reference"] == "base" else e["reference"]["name"]
        rows = [(ref, e["base"], e if ref == "baseline" else e["reference"], "base_bench" if ref == "baseline"
                 else "bench")] + [(q["name"], q["result"], q, "bench") for q in e["quants"]]
        for name, result, where, key in rows:
            if name in skip:
                continue
            size = json.loads(open(result).read())["size_bytes"]
            (d / f"{name}.json").write_text(json.dumps(bench_record(TG[name], size, **kw)))
            where[key] = str(d / f"{name}.json")
    return entries


def report_paths(tmp_path) -> dict:
    out = tmp_path / "report"
    return {"csv": out / "summary.csv", "md": out / "summary.md", "html": out / "summary.html",
            "plots": {"lnppl": out / "size_vs_lnppl.png", "kld": out / "size_vs_kld.png"}}


_REPORTS: dict = {}  # (gate, kw) -> the paths of its report


def run_report(tmp_path, gate=Gate(5.0, 0.05), **kw) -> dict:
    """The report of make_entries(**kw) under `gate`, written once per session for each set of
    arguments (rendering the plots is most of a report's time): the tests that take it only read
    its files; one that changes an input writes its own report."""
    key = (gate, tuple(sorted(kw.items())))
    if key not in _REPORTS:
        p = report_paths(tmp_path)
        write_report(make_entries(tmp_path, **kw), gate, p["csv"], p["md"], p["html"], p["plots"])
        _REPORTS[key] = p
    return _REPORTS[key]


def csv_dicts(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


Y_COLUMN = {"lnppl": "ln_ppl_ratio", "kld": "kld_mean", "speed": "kld_mean"}
X_COLUMNS = {"lnppl": ("size_gib", "bpw"), "kld": ("size_gib", "bpw"), "speed": ("tg_tps",)}


def points_vs_table(points: list[dict], table: list[dict], metric: str) -> list[str]:
    """Every disagreement between plotted points and the CSV rows (strings as written): each
    quant row with values is drawn once per x axis at exactly (x column, metric column), the
    reference rows and nothing else are left out (metric "speed": x = tg_tps, y = mean KLD)."""
    problems = []
    drawn = {(p["model"], p["quant"], p["x_col"]): (p["x"], p["y"]) for p in points}
    if len(drawn) != len(points):
        problems.append("a point is drawn twice")
    expected = set()
    for r in table:
        if r["quant"] in ("baseline", r["reference"]) or r[Y_COLUMN[metric]] == "":
            continue
        for xcol in X_COLUMNS[metric]:
            if r[xcol] == "":
                continue
            key = (r["model"], r["quant"], xcol)
            expected.add(key)
            want = (float(r[xcol]), float(r[Y_COLUMN[metric]]))
            if drawn.get(key) != want:
                problems.append(f"{key}: drawn {drawn.get(key)}, table {want}")
    problems += [f"{k}: drawn but not a quant row of the table" for k in sorted(set(drawn) - expected)]
    return problems


# ----------------------------------------------------------------------------------------------
# gate and Pareto front


def _dominated_brute(points, i) -> bool:
    xi, yi = points[i]
    return any((xj, yj) != (xi, yi) and xj <= xi and yj <= yi for j, (xj, yj) in enumerate(points))


def test_pareto_front_small_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1, 1)]) == [0]
    # (3, 3) is dominated by (2, 2); (2, 5) by (2, 2) (same x, worse y); duplicates both stay
    pts = [(3, 3), (1, 5), (2, 2), (2, 5), (4, 0.5), (4, 0.5), (5, 0.5)]
    assert pareto_front(pts) == [1, 2, 4, 5]


def test_pareto_front_matches_definition_on_random_sets():
    rnd = random.Random(7)
    for _ in range(300):
        n = rnd.randint(1, 12)
        pts = [(rnd.choice([1, 2, 3, 4, 5]), rnd.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(n)]
        want = sorted((i for i in range(n) if not _dominated_brute(pts, i)), key=lambda i: (pts[i], i))
        assert sorted(pareto_front(pts)) == sorted(want), pts
        xs = [pts[i][0] for i in pareto_front(pts)]
        assert xs == sorted(xs)


def _row(quant="Q", dppl=1.0, kld=0.01, reference="base") -> Row:
    return Row("m", quant, "Q4_0", "yes", reference, 100, 100 / 2**30, 4.5, 10.0, 0.1, dppl, math.log1p(dppl / 100),
               0.001, kld, 0.001, 0.1, 95.0)


def test_gate_verdict_limits_are_inclusive_and_optional():
    g = Gate(max_dppl_pct=5.0, max_kld=0.05)
    assert gate_verdict(_row(dppl=5.0, kld=0.05), g) == "pass"
    assert gate_verdict(_row(dppl=5.0000001, kld=0.01), g) == "fail"
    assert gate_verdict(_row(dppl=1.0, kld=0.0500001), g) == "fail"
    assert gate_verdict(_row(kld=None), g) == "fail"  # a KLD limit needs a KLD
    assert gate_verdict(_row(dppl=50.0, kld=0.01), Gate(max_kld=0.05)) == "pass"
    assert gate_verdict(_row(dppl=1.0, kld=9.0), Gate(max_dppl_pct=5.0)) == "pass"
    assert gate_verdict(_row(), Gate()) == ""
    assert gate_verdict(_row(quant="baseline", dppl=0.0, kld=None), g) == ""
    assert gate_verdict(_row(quant="Q8_0", reference="Q8_0"), g) == ""
    assert Gate.from_dict({"max_dppl_pct": None, "max_kld": 0.1}) == Gate(None, 0.1)
    assert Gate(5.0).max_ln_ppl_ratio == pytest.approx(math.log(1.05), rel=1e-15)


def test_annotate_fronts_gate_and_smallest_passing(tmp_path):
    rows, _ = load_rows(make_entries(tmp_path / "a", models=("a", "b")))
    annotate(rows, Gate(5.0, 0.05))
    for model in ("a", "b"):
        mine = {r.quant: r for r in rows if r.model == model}
        assert mine["baseline"].gate == "" and mine["baseline"].pareto == ""
        assert {q for q, r in mine.items() if r.gate == "pass"} == {"Q8_0", "IQ6_K", "Q6_K", "IQ4_KS", "IQ3_K"}
        # Q6_K is bigger than IQ6_K with a worse ln ratio but a lower KLD; IQ2_XS is bigger than
        # IQ2_KS with a lower ln ratio but a higher KLD; the no-imatrix file is the smallest
        assert {q for q, r in mine.items() if "ppl" in r.pareto.split("+")} == {
            "Q8_0", "IQ6_K", "IQ4_KS", "IQ3_K", "IQ2_XS", "IQ2_KS", "IQ2_KS-noimatrix"}
        assert {q for q, r in mine.items() if "kld" in r.pareto.split("+")} == {
            "Q8_0", "Q6_K", "IQ6_K", "IQ4_KS", "IQ3_K", "IQ2_KS", "IQ2_KS-noimatrix"}
        assert mine["Q6_K"].pareto == "kld" and mine["IQ2_XS"].pareto == "ppl"
        assert mine["IQ3_K"].pareto == "ppl+kld"
        assert smallest_passing(rows, model).quant == "IQ3_K"
    annotate(rows, Gate(0.1, None))
    assert smallest_passing(rows, "a").quant == "Q8_0"
    annotate(rows, Gate(None, 1e-9))
    assert smallest_passing(rows, "a") is None


# ----------------------------------------------------------------------------------------------
# rows and the CSV


def test_make_rows_values_and_reference_quant():
    base = Record("base.json", {"size_bytes": 100, "bpw": 8.5, "ppl": 10.0, "ppl_err": 0.1, "eval": EVAL})
    rec = _record(50, 4.25, 0.1, 0.02)
    rows = make_rows("m", base, [("IQ4_KS", "IQ4_KS", "yes", Record("q.json", rec))], ("Q8_0", "Q8_0", "yes"))
    ref, q = rows
    assert (ref.quant, ref.ftype, ref.reference, ref.is_reference) == ("Q8_0", "Q8_0", "Q8_0", True)
    assert ref.gate == "" and ref.kld_mean is None and ref.size_gib == 100 / 2**30
    assert (q.reference, q.is_reference) == ("Q8_0", False)
    assert q.dppl_pct == 100 * (rec["ppl"] / 10.0 - 1)
    assert q.ln_ppl_ratio == 0.1  # the engine's value, not recomputed
    assert (q.kld_mean, q.kld_p99, q.size_gib) == (0.02, 0.08, 50 / 2**30)
    assert make_rows("m", base, [])[0].quant == "baseline"


def test_make_rows_refuses_other_eval_settings():
    base = Record("e/baseline.json", {"size_bytes": 100, "bpw": 8.5, "ppl": 10.0, "ppl_err": 0.1, "eval": EVAL})
    rec = Record("e/IQ4_KS.json", {**_record(50, 4.25, 0.1, 0.02), "eval": {**EVAL, "ctx": 1024}})
    with pytest.raises(ReportError, match=r"^evaluation record e/IQ4_KS.json \(m/IQ4_KS\) .* reference "
                                          r"e/baseline.json: eval.ctx 1024 vs 512$"):
        make_rows("m", base, [("IQ4_KS", "IQ4_KS", "yes", rec)])
    ok = Record("ok.json", {**_record(50, 4.25, 0.1, 0.02), "eval": {**EVAL, "threads": 64}})  # threads do not matter
    make_rows("m", base, [("IQ4_KS", "IQ4_KS", "yes", ok)])


def test_make_rows_refuses_other_batch_sizes_and_the_eval_line_names_the_run_settings():
    """PPL depends on -b/-ub (run settings, `eval.run`): the reference and its quants must share
    them; GPU layers and tensor overrides may differ (the same graph, placed elsewhere)."""
    run = {"gpu_layers": 99, "override_tensors": ["exps=CPU"], "batch": 0, "ubatch": 1024, "mmap": False,
           "threads": 0, "threads_batch": 0, "extra_args": ["--n-cpu-moe", "3"]}
    base = Record("e/baseline.json", {"size_bytes": 100, "bpw": 8.5, "ppl": 10.0, "ppl_err": 0.1,
                                      "eval": {**EVAL, "run": run}})
    rec = Record("e/IQ4_KS.json", {**_record(50, 4.25, 0.1, 0.02), "eval": {**EVAL, "run": {**run, "ubatch": 512}}})
    with pytest.raises(ReportError, match=r"reference e/baseline.json: eval.run.ubatch 512 vs 1024$"):
        make_rows("m", base, [("IQ4_KS", "IQ4_KS", "yes", rec)])
    moved = Record("e/IQ4_KS.json", {**_record(50, 4.25, 0.1, 0.02),
                                     "eval": {**EVAL, "run": {**run, "gpu_layers": 0, "override_tensors": []}}})
    make_rows("m", base, [("IQ4_KS", "IQ4_KS", "yes", moved)])
    info = ModelInfo("m", "base", "m.gguf", base.eval, [])
    assert info.describe_eval().endswith(", run: -ngl 99 -ot exps=CPU -ub 1024 --no-mmap --n-cpu-moe 3")
    plain = ModelInfo("m", "base", "m.gguf", {**EVAL, "run": {**run, "gpu_layers": 0, "override_tensors": [],
                                                              "ubatch": 0, "mmap": True, "extra_args": []}}, [])
    assert plain.describe_eval().endswith(", run: engine defaults (no -ngl, -ot, -b, -ub)")


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.pop("ppl"), "key 'ppl' is missing"),
    (lambda r: r.update(ppl_err=None), "key 'ppl_err' is null"),
    (lambda r: r.update(kld_mean="0.1"), "key 'kld_mean' is '0.1', not a number"),
    (lambda r: r.update(size_bytes=1.5), "key 'size_bytes' is 1.5, not a byte count"),
    (lambda r: r.update(eval=[]), "key 'eval' is [], not an object"),
])
def test_bad_record_names_the_file_and_key(tmp_path, edit, expected):
    entries = make_entries(tmp_path)
    path = entries[0]["quants"][3]["result"]
    rec = json.loads(open(path).read())
    edit(rec)
    open(path, "w").write(json.dumps(rec))
    with pytest.raises(ReportError) as e:
        load_rows(entries)
    assert str(e.value) == f"evaluation record {path}: {expected}"


def test_unreadable_record_names_the_file(tmp_path):
    entries = make_entries(tmp_path)
    bad = entries[0]["quants"][0]["result"]
    open(bad, "w").write('{"ppl": ')
    with pytest.raises(ReportError, match=rf"^evaluation record {re.escape(bad)}: not valid JSON \(.*line 1\)$"):
        load_rows(entries)
    missing = str(tmp_path / "nowhere.json")
    entries[0]["base"] = missing
    with pytest.raises(ReportError, match=rf"^evaluation record {re.escape(missing)}: cannot be read"):
        load_rows(entries)


@pytest.mark.parametrize("bench", [False, True])
def test_csv_round_trip_is_exact(tmp_path, bench):
    entries = make_entries(tmp_path)
    rows, _ = load_rows(add_bench(tmp_path, entries, skip={"IQ3_K"}) if bench else entries)
    annotate(rows, Gate(5.0, 0.05))
    path = tmp_path / "s.csv"
    path.write_text(to_csv(rows))
    assert read_rows(path) == rows
    d = csv_dicts(path)
    assert [r["gate"] for r in d] == ["", "pass", "pass", "pass", "pass", "pass", "fail", "fail", "fail"]
    assert d[4]["ln_ppl_ratio"] == "0.00472" and d[1]["size_gib"] == repr(18975968 / 2**30)
    # the headline speeds always have a column; every depth's only with bench records, in their order
    speed = ["pp_tps", "pp_tps_spread", "pp_tps_min", "pp_tps_max", "tg_tps", "tg_tps_spread", "tg_tps_min",
             "tg_tps_max"] + (["pp_tps@0", "tg_tps@0", "pp_tps@512", "tg_tps@512"] if bench else [])
    at = list(d[0]).index("same_top_p") + 1
    assert list(d[0])[at:at + len(speed) + 1] == speed + ["gate"]
    if bench:
        assert rows[0].speeds == {"pp_tps@0": 200.0, "tg_tps@0": 20.0, "pp_tps@512": 100.0, "tg_tps@512": 10.0}
        assert (d[4]["tg_tps"], d[4]["tg_tps_min"], d[4]["tg_tps@512"]) == ("60.0", repr(60.0 * 0.97), "30.0")
        assert d[4]["tg_tps_spread"] == repr(60.0 * 1.02 - 60.0 * 0.97)
        assert {k for k, v in d[5].items() if "tps" in k and v} == set() and rows[5].speeds == {}  # IQ3_K
    else:
        assert all(r[c] == "" for r in d for c in speed)


# ----------------------------------------------------------------------------------------------
# plots agree with the table


@pytest.mark.parametrize("metric", ["lnppl", "kld"])
@pytest.mark.parametrize("models, reference", [(("tiny",), None), (("a", "b"), "Q8_0")])
def test_plotted_points_equal_table(tmp_path, metric, models, reference):
    """What the PNG on disk says it shows, and what the figure's artists hold, is the CSV."""
    p = run_report(tmp_path, models=models, reference=reference)
    table = csv_dicts(p["csv"])
    from_png = png_points(p["plots"][metric])
    assert from_png and points_vs_table(from_png, table, metric) == []
    fig = plot_metric(read_rows(p["csv"]), metric, Gate(5.0, 0.05))
    assert points_vs_table(plotted_points(fig), table, metric) == []
    n_quants = len(QUANTS) - (reference is not None)
    assert len(from_png) == 2 * n_quants * len(models)


@pytest.mark.parametrize("metric", ["lnppl", "kld"])
def test_point_check_catches_a_wrong_point(tmp_path, metric):
    """The comparison above fails when one drawn point or one table value is off."""
    p = run_report(tmp_path)
    table = csv_dicts(p["csv"])
    fig = plot_metric(read_rows(p["csv"]), metric, Gate(5.0, 0.05))
    coll = next(c for c in fig.axes[0].collections if c.get_gid() == "point|tiny|IQ3_K|size_gib")
    x, y = coll.get_offsets()[0]
    coll.set_offsets([[x, y * 1.001]])
    assert points_vs_table(plotted_points(fig), table, metric) == [
        f"('tiny', 'IQ3_K', 'size_gib'): drawn {(float(x), float(y) * 1.001)}, table {(float(x), float(y))}"]
    table[5]["bpw"] = "3.0"
    bad = points_vs_table(png_points(p["plots"][metric]), table, metric)
    assert len(bad) == 1 and "IQ3_K', 'bpw'" in bad[0]
    table.pop(5)
    assert any("drawn but not a quant row" in b for b in points_vs_table(png_points(p["plots"][metric]), table,
                                                                           metric))


@pytest.mark.parametrize("metric", ["lnppl", "kld"])
def test_plotted_front_is_the_tables_front(tmp_path, metric):
    p = run_report(tmp_path)
    table = csv_dicts(p["csv"])
    fig = plot_metric(read_rows(p["csv"]), metric, Gate(5.0, 0.05))
    tag = {"lnppl": "ppl", "kld": "kld"}[metric]
    front = sorted((r for r in table if tag in r["pareto"].split("+")), key=lambda r: int(r["size_bytes"]))
    for xcol in ("size_gib", "bpw"):
        assert plotted_fronts(fig)[("tiny", xcol)] == [(float(r[xcol]), float(r[Y_COLUMN[metric]])) for r in front]
    # front labels are bold, others not
    bold = {t.get_text() for ax in fig.axes for t in ax.texts if t.get_fontweight() == "bold"}
    assert bold == {r["quant"] for r in front}


def test_every_quant_is_labelled_once_per_panel(tmp_path):
    p = run_report(tmp_path)
    fig = plot_metric(read_rows(p["csv"]), "kld", Gate(5.0, 0.05))
    names = [q for q, *_ in QUANTS]
    for ax in fig.axes:
        labels = sorted(t.get_text() for t in ax.texts if not t.get_text().startswith("gate"))
        assert labels == sorted(names)


def test_log_and_symlog_axes(tmp_path):
    p = run_report(tmp_path)
    rows = read_rows(p["csv"])
    assert plot_metric(rows, "kld", Gate()).axes[0].get_yscale() == "log"
    assert plot_metric(rows, "lnppl", Gate()).axes[0].get_yscale() == "symlog"  # Q8_0 beats the reference


def test_no_gate_marks_nothing(tmp_path):
    p = run_report(tmp_path, gate=Gate())
    table = csv_dicts(p["csv"])
    assert {r["gate"] for r in table} == {""}
    assert "no quality gate configured" in p["md"].read_text()
    assert points_vs_table(png_points(p["plots"]["kld"]), table, "kld") == []


# ----------------------------------------------------------------------------------------------
# markdown and HTML


def test_markdown_names_reference_settings_and_smallest_passing(tmp_path):
    md = run_report(tmp_path, reference="Q8_0")["md"].read_text()
    assert "reference: reference quant Q8_0 (results/quants/tiny/tiny-Q8_0.gguf)" in md
    assert "the unquantized model was not evaluated" in md
    assert "evaluation: ctx 512, 16 chunks, -mla 1 -fa off, 2 threads, text eval.txt" in md
    assert "Quality gate: ΔPPL ≤ 5 % and mean KLD ≤ 0.05" in md
    assert "smallest passing quant: **IQ3_K**" in md
    assert md.count("\n| tiny |") == len(QUANTS)
    assert "| tiny | Q8_0 (reference) |" in md


def test_html_is_self_contained_with_the_plots(tmp_path):
    p = run_report(tmp_path)
    page = p["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page), "external reference in the page"
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(b) for b in imgs] == [p["plots"][k].read_bytes() for k in ("lnppl", "kld")]
    assert "smallest passing quant: <b>IQ3_K</b>" in page
    assert "unquantized model (resources/models/tiny.gguf)" in page
    assert '<tr class="best">' in page and page.count('<td class="pass">') == 5
    # the exact-value table carries every CSV cell
    for r in csv_dicts(p["csv"]):
        assert f"<td>{r['ln_ppl_ratio']}</td>" in page and f"<td>{r['size_bytes']}</td>" in page


def test_cli_report(tmp_path, capsys):
    entries = tmp_path / "entries.json"
    entries.write_text(json.dumps(make_entries(tmp_path)))
    out = tmp_path / "r"
    rc = cli.main(["report", "--entries", str(entries), "--gate", '{"max_dppl_pct": 1.0, "max_kld": null}',
                   "--csv", str(out / "s.csv"), "--md", str(out / "s.md"), "--html", str(out / "s.html"),
                   "--plot-lnppl", str(out / "a.png"), "--plot-kld", str(out / "b.png")])
    assert rc == 0
    assert "tiny: smallest passing quant: IQ4_KS" in capsys.readouterr().out
    assert {r["quant"] for r in csv_dicts(out / "s.csv") if r["gate"] == "pass"} == {"Q8_0", "IQ6_K", "Q6_K",
                                                                                      "IQ4_KS"}
    for name in ("s.csv", "s.md", "s.html", "a.png", "b.png"):
        assert (out / name).stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# config wiring (dry runs)


def _jobs(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.M)}


def test_reference_quant_dry_run(tmp_path):
    wd = make_workdir(tmp_path / "wd", {"eval": {"reference": "Q8_0"}, "quants": ["Q8_0", "IQ4_KS", "IQ2_KS"]})
    r = smk(wd, "-n")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    jobs = _jobs(out)
    assert jobs.get("eval_reference") == 1 and "eval_baseline" not in jobs
    assert jobs["eval_quant"] == 2 and jobs["quantize"] == 3 and jobs["report"] == 1
    assert "results/quants/tiny/tiny-Q8_0.gguf" in out.split("rule eval_reference:")[1].split("rule ")[0]


def test_default_reference_dry_run(workdir):
    r = smk(workdir, "-n")
    jobs = _jobs(r.stdout + r.stderr)
    assert r.returncode == 0
    assert jobs.get("eval_baseline") == 1 and "eval_reference" not in jobs and jobs["report"] == 1
    for name in ("summary.csv", "summary.md", "summary.html", "size_vs_lnppl.png", "size_vs_kld.png"):
        assert f"results/report/{name}" in r.stdout


def test_per_model_reference_overrides_eval_reference(tmp_path):
    wd = make_workdir(tmp_path / "wd", {"models": {"tiny": {"reference": "IQ4_KS"}}, "eval": {"reference": "Q8_0"}})
    r = smk(wd, "-n")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "results/quants/tiny/tiny-IQ4_KS.gguf" in out.split("rule eval_reference:")[1].split("rule ")[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"eval": {"reference": "Q5_K"}}, "config eval.reference: 'Q5_K' is neither 'base' nor a quant name"),
        ({"models": {"tiny": {"reference": "IQ9"}}}, "config models.tiny.reference: 'IQ9'"),
        ({"gate": {"max_kld": -1}}, "max_kld"),
        ({"gate": {"max_ppl": 3}}, "max_ppl"),
    ],
)
def test_bad_reference_or_gate_names_the_key(tmp_path, overrides, expected):
    wd = make_workdir(tmp_path / "wd", overrides)
    r = smk(wd, "-n")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert expected in out, out[-2000:]


def test_gate_may_be_left_out(tmp_path):
    """Without a gate section the schema fills in null limits and the workflow still plans."""
    wd = make_workdir(tmp_path / "wd")
    cfg = (wd / "config" / "config.yaml").read_text()
    cfg = re.sub(r"(?ms)^gate:\n(  .*\n)+", "", cfg)
    assert "gate" not in cfg
    (wd / "config" / "config.yaml").write_text(cfg)
    r = smk(wd, "-n")
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]


def test_entries_keep_sweep_order(tmp_path):
    rows, _ = load_rows(make_entries(tmp_path, reference="IQ4_KS"))
    assert [r.quant for r in rows] == ["IQ4_KS"] + [q for q, *_ in QUANTS if q != "IQ4_KS"]
    assert list(itertools.chain.from_iterable([r.reference] for r in rows)) == ["IQ4_KS"] * len(QUANTS)


def test_sweep_notes_on_both_pages_and_none_without(tmp_path):
    """What the settings decided (a budget skipped, the imatrix's model) is listed on both pages;
    a sweep without notes renders as before."""
    p = report_paths(tmp_path)
    note = "imatrix: computed on Q8_0-noimatrix (imatrix.model), not the unquantized model"
    write_report(make_entries(tmp_path), Gate(5.0, 0.05), p["csv"], p["md"], p["html"], p["plots"], [note, "a < b"])
    md, html = p["md"].read_text(), p["html"].read_text()
    assert f"Sweep notes:\n\n- {note}\n- a < b\n" in md
    assert f"<h2>Sweep notes</h2><ul><li>{note}</li><li>a &lt; b</li></ul>" in html
    plain = run_report(tmp_path / "plain")
    assert "Sweep notes" not in plain["md"].read_text() and "Sweep notes" not in plain["html"].read_text()
