"""Speed in the report: bench records checked, speed columns, the gate's speed limits, the
`speed` Pareto front, the KLD-vs-speed plot agreeing with the table, and the host notes; a
sweep without bench records reads exactly as before."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re

import pytest
from matplotlib.collections import LineCollection

from quantsweep.errors import ConfigError, ReportError
from quantsweep.report import (Row, annotate, gate_verdict, load_rows, plot_speed, plotted_fronts,
                               plotted_points, png_points, read_rows, speed_front, write_report)
from quantsweep.settings import Gate
from test_report import (CPU_RUN, QUANTS, SPEED_FRONT, TG, add_bench, csv_dicts, make_entries, points_vs_table,
                         report_paths)



def speed_report_paths(tmp_path) -> dict:
    """report_paths with the speed plot."""
    p = report_paths(tmp_path)
    p["plots"]["speed"] = p["csv"].parent / "kld_vs_speed.png"
    return p


_REPORTS: dict = {}  # the arguments -> the paths of their report


def run_bench_report(tmp_path, gate=Gate(5.0, 0.05), skip=(), models=("tiny",), reference=None, **kw) -> dict:
    """As test_report.run_report: written once per session for each set of arguments, only read."""
    key = (gate, frozenset(skip), models, reference, tuple(sorted(kw.items())))
    if key not in _REPORTS:
        p = speed_report_paths(tmp_path)
        entries = add_bench(tmp_path, make_entries(tmp_path, models=models, reference=reference), skip=skip, **kw)
        write_report(entries, gate, p["csv"], p["md"], p["html"], p["plots"])
        _REPORTS[key] = p
    return _REPORTS[key]


# ----------------------------------------------------------------------------------------------
# bench records


def _edit_record(entries: list[dict], quant: int, edit) -> str:
    path = entries[0]["quants"][quant]["bench"]
    rec = json.loads(open(path).read())
    edit(rec)
    open(path, "w").write(json.dumps(rec))
    return path


def _tg(rec: dict, i: int = 0) -> dict:
    return rec["speed"][i]["tg_tps"]


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.pop("speed"), "key 'speed' is missing"),
    (lambda r: r.update(speed=[]), "key 'speed' is [], not a non-empty list"),
    (lambda r: r["speed"][1].pop("depth"), "key 'speed[1].depth' is missing"),
    (lambda r: r["speed"][1].update(depth=0), "key 'speed[1].depth' is 0, a depth listed twice"),
    (lambda r: r["speed"][0].pop("tg_tps"), "key 'speed[0].tg_tps' is missing"),
    (lambda r: _tg(r, 1).update(median=-3), "key 'speed[1].tg_tps.median' is -3, not a positive finite number"),
    (lambda r: _tg(r).update(max=float("nan")), "key 'speed[0].tg_tps.max' is nan, not a positive finite number"),
    (lambda r: _tg(r).update(median="95"), "key 'speed[0].tg_tps.median' is '95', not a positive finite number"),
    (lambda r: _tg(r).update(min=61.0), "key 'speed[0].tg_tps' has min 61.0, median 60.0, max 61.2: "
                                          "not min ≤ median ≤ max"),
    (lambda r: _tg(r).update(runs=[60.0, 58.0, 61.2]), "key 'speed[0].tg_tps.runs' is [60.0, 58.0, 61.2]: its "
                                                         "median, min and max are not 60.0, 58.199999999999996, 61.2"),
    (lambda r: r["bench"].update(repeats=5), "key 'speed[0].pp_tps.runs' has 3 values, but bench.repeats is 5"),
    (lambda r: r["bench"].update(depths=[0]), "key 'bench.depths' is [0], but key 'speed' lists depths [0, 512]"),
    (lambda r: r["bench"].pop("tg"), "key 'bench.tg' is missing"),
    (lambda r: r["host"].pop("cpu"), "key 'host.cpu' is missing"),
    (lambda r: r["host"].update(gpus=[{"name": "NVIDIA H200"}]), "key 'host.gpus[0].driver' is missing"),
    (lambda r: r["run"].update(gpu_layers=-1), "run.gpu_layers: -1 is not a whole number >= 0"),
    (lambda r: r["run"].update(ngl=99), "run: unknown key 'ngl' (known: batch, extra_args, gpu_layers, mmap, "
                                        "override_tensors, threads, threads_batch, ubatch)"),
    (lambda r: r["engine"].update(cuda="yes"), "key 'engine.cuda' is 'yes', not true or false"),
    (lambda r: r.update(size_bytes=123), "key 'size_bytes' is 123, but tiny/IQ4_KS was evaluated at 11616000 bytes "
                                         "(not the same file)"),
])
def test_bad_bench_record_names_the_file_and_key(tmp_path, edit, expected):
    entries = add_bench(tmp_path, make_entries(tmp_path))
    path = _edit_record(entries, 3, edit)
    with pytest.raises(ReportError) as e:
        load_rows(entries)
    assert str(e.value) == f"bench record {path}: {expected}"


def test_unreadable_bench_record_names_the_file(tmp_path):
    entries = add_bench(tmp_path, make_entries(tmp_path))
    bad = entries[0]["quants"][0]["bench"]
    open(bad, "w").write('{"speed": [')
    with pytest.raises(ReportError, match=rf"^bench record {re.escape(bad)}: not valid JSON \(.*line 1\)$"):
        load_rows(entries)
    entries[0]["base_bench"] = str(tmp_path / "nowhere.json")
    with pytest.raises(ReportError, match=r"^bench record .*nowhere.json: cannot be read"):
        load_rows(entries)


def test_unknown_record_keys_are_left_alone(tmp_path):
    """The bench step may record more (each run's times, start and end): the report reads what it needs."""
    entries = add_bench(tmp_path, make_entries(tmp_path))
    _edit_record(entries, 0, lambda r: r.update(runs=[{"wall_s": 1.2}], started_at="2025-01-01T00:00:00"))
    rows, _ = load_rows(entries)
    assert rows[1].tg_tps == TG["Q8_0"]


def test_other_bench_settings_are_refused(tmp_path):
    entries = add_bench(tmp_path, make_entries(tmp_path, models=("a", "b")))
    path = entries[1]["quants"][2]["bench"]
    rec = json.loads(open(path).read())
    rec["bench"]["tg"] = 128
    open(path, "w").write(json.dumps(rec))
    with pytest.raises(ReportError) as e:
        load_rows(entries)
    assert str(e.value) == (f"bench record {path} (b/Q6_K) was benchmarked with other settings than "
                            f"{entries[0]['base_bench']}: bench.tg 128 vs 32")


# ----------------------------------------------------------------------------------------------
# rows, gate and the speed front


def test_rows_take_the_headline_depth_and_reference_speeds(tmp_path):
    rows, infos = load_rows(add_bench(tmp_path, make_entries(tmp_path, reference="Q8_0"), depths=(512, 0)))
    ref, q = rows[0], next(r for r in rows if r.quant == "IQ4_KS")
    assert (ref.quant, ref.tg_tps, ref.pp_tps) == ("Q8_0", TG["Q8_0"], 10 * TG["Q8_0"])  # the reference quant's own
    # the first configured depth is the headline, whatever its number
    assert (q.tg_tps, q.tg_tps_min, q.tg_tps_max) == (60.0, 60.0 * 0.97, 60.0 * 1.02)
    assert q.tg_tps_spread == 60.0 * 1.02 - 60.0 * 0.97
    assert list(q.speeds) == ["pp_tps@512", "tg_tps@512", "pp_tps@0", "tg_tps@0"]
    assert q.speeds["tg_tps@0"] == 30.0
    assert [b.quant for b in infos[0].benches] == [r.quant for r in rows]


def _srow(quant: str, kld: float | None, tg: float | None, pp: float | None = None) -> Row:
    return Row("m", quant, "Q4_0", "yes", "base", 100, 100 / 2**30, 4.5, 10.0, 0.1, 1.0, 0.01, 0.001, kld, 0.001,
               0.1, 95.0, pp_tps=pp, tg_tps=tg)


def test_gate_speed_limits_are_inclusive_and_need_a_bench():
    g = Gate(min_tg_tps=50.0)
    assert gate_verdict(_srow("A", 0.01, 50.0), g) == "pass"
    assert gate_verdict(_srow("A", 0.01, 49.999), g) == "fail"
    assert gate_verdict(_srow("A", 0.01, None), g) == "fail"  # no bench record: it cannot show it is fast enough
    assert gate_verdict(_srow("A", 0.01, 10.0, pp=500.0), Gate(min_pp_tps=500.0)) == "pass"
    assert gate_verdict(_srow("A", 0.01, 99.0, pp=499.0), Gate(min_pp_tps=500.0)) == "fail"
    assert gate_verdict(_srow("A", 0.01, 99.0), Gate(min_pp_tps=500.0)) == "fail"
    assert gate_verdict(_srow("A", 0.06, 99.0), Gate(max_kld=0.05, min_tg_tps=50.0)) == "fail"
    assert gate_verdict(_srow("baseline", None, 1.0), g) == ""
    assert Gate.from_dict({"max_kld": 0.05, "min_tg_tps": 10, "min_pp_tps": None}) == Gate(None, 0.05, 10, None)
    assert Gate(min_tg_tps=10, min_pp_tps=200.5).describe() == "TG ≥ 10 t/s and PP ≥ 200.5 t/s"
    assert Gate(5.0, 0.05, 10).describe("tg") == "TG ≥ 10 t/s"
    assert Gate(min_pp_tps=1).active and not Gate().active


@pytest.mark.parametrize("d, expected", [
    ({"min_tg_tps": "fast"}, "gate.min_tg_tps: 'fast' is not a positive number"),
    ({"min_pp_tps": True}, "gate.min_pp_tps: True is not a positive number"),
    ({"max_kld": -0.1}, "gate.max_kld: -0.1 is not a positive number"),
    ({"min_tps": 1}, "gate: unknown key 'min_tps' (known: max_dppl_pct, max_kld, min_pp_tps, min_tg_tps)"),
])
def test_gate_refuses_bad_speed_limits(d, expected):
    with pytest.raises(ConfigError) as e:
        Gate.from_dict(d)
    assert str(e.value) == expected


def test_gate_with_min_tg_passes_the_right_quants(tmp_path):
    p = run_bench_report(tmp_path, gate=Gate(5.0, 0.05, min_tg_tps=50.0), skip={"IQ6_K"})
    table = {r["quant"]: r for r in csv_dicts(p["csv"])}
    # ΔPPL and KLD pass: Q8_0, IQ6_K, Q6_K, IQ4_KS, IQ3_K; of those TG ≥ 50: IQ4_KS (60), IQ3_K (55);
    # IQ6_K has no bench record
    assert {q for q, r in table.items() if r["gate"] == "pass"} == {"IQ4_KS", "IQ3_K"}
    assert table["IQ6_K"]["gate"] == "fail" and table["IQ6_K"]["tg_tps"] == ""
    md = p["md"].read_text()
    assert "Quality gate: ΔPPL ≤ 5 % and mean KLD ≤ 0.05 and TG ≥ 50 t/s" in md
    assert "smallest passing quant: **IQ3_K** (0.009412 GiB, 4.532 bpw, ΔPPL 3.594 %, mean KLD 0.029431, TG 55.0 ±1.4 t/s)" \
        in md


def _dominated_mixed(points, i) -> bool:
    """Brute force: another point at least as fast (x, higher is better) and at least as good (y,
    lower is better), and not the same."""
    xi, yi = points[i]
    return any((xj, yj) != (xi, yi) and xj >= xi and yj <= yi for xj, yj in points)


def test_speed_front_matches_definition_on_random_sets():
    rnd = random.Random(11)
    for _ in range(300):
        n = rnd.randint(1, 12)
        pts = [(rnd.choice([10.0, 20.0, 30.0, 40.0]), rnd.choice([0.1, 0.2, 0.3, 0.4])) for _ in range(n)]
        rows = [_srow(f"q{i}", y, x) for i, (x, y) in enumerate(pts)]
        front = speed_front(rows)
        assert {r.quant for r in front} == {f"q{i}" for i in range(n) if not _dominated_mixed(pts, i)}, pts
        assert [r.tg_tps for r in front] == sorted(r.tg_tps for r in front)
    assert speed_front([_srow("a", None, 10.0), _srow("b", 0.1, None)]) == []


def test_annotate_tags_the_speed_front_only_with_speeds(tmp_path):
    rows, _ = load_rows(add_bench(tmp_path, make_entries(tmp_path)))
    annotate(rows, Gate())
    assert {r.quant for r in rows if "speed" in r.pareto.split("+")} == SPEED_FRONT
    assert next(r for r in rows if r.quant == "Q6_K").pareto == "kld+speed"
    rows, _ = load_rows(make_entries(tmp_path / "nobench"))
    annotate(rows, Gate())
    assert not any("speed" in r.pareto for r in rows)


# ----------------------------------------------------------------------------------------------
# the speed plot agrees with the table


def speed_points_vs_table(points: list[dict], table: list[dict]) -> list[str]:
    """Each quant row with a TG speed and a mean KLD is drawn once at exactly (tg_tps, kld_mean)."""
    return points_vs_table(points, table, "speed")


@pytest.mark.parametrize("models, reference", [(("tiny",), None), (("a", "b"), "Q8_0")])
def test_speed_plot_points_and_front_equal_table(tmp_path, models, reference):
    p = run_bench_report(tmp_path, models=models, reference=reference, skip={"IQ2_XS"})
    table = csv_dicts(p["csv"])
    from_png = png_points(p["plots"]["speed"])
    assert len(from_png) == (len(QUANTS) - 1 - (reference is not None)) * len(models)
    assert speed_points_vs_table(from_png, table) == []
    fig = plot_speed(read_rows(p["csv"]), Gate(5.0, 0.05))
    assert speed_points_vs_table(plotted_points(fig), table) == []
    for model in models:
        front = sorted((r for r in table if r["model"] == model and "speed" in r["pareto"].split("+")),
                       key=lambda r: float(r["tg_tps"]))
        assert {r["quant"] for r in front} == SPEED_FRONT - {reference}
        assert plotted_fronts(fig)[(model, "tg_tps")] == [(float(r["tg_tps"]), float(r["kld_mean"])) for r in front]
    # faster is better: the staircase rises at each front point, then runs flat to the next
    assert {ln.get_drawstyle() for ax in fig.axes for ln in ax.lines if (ln.get_gid() or "").startswith("front|")} == {
        "steps-pre"}
    bold = {t.get_text() for ax in fig.axes for t in ax.texts if t.get_fontweight() == "bold"}
    assert bold == SPEED_FRONT - {reference}


def test_speed_point_check_catches_a_wrong_point(tmp_path):
    p = run_bench_report(tmp_path)
    table = csv_dicts(p["csv"])
    fig = plot_speed(read_rows(p["csv"]), Gate())
    coll = next(c for c in fig.axes[0].collections if c.get_gid() == "point|tiny|IQ3_K|tg_tps")
    x, y = coll.get_offsets()[0]
    coll.set_offsets([[x * 1.001, y]])
    assert speed_points_vs_table(plotted_points(fig), table) == [
        f"('tiny', 'IQ3_K', 'tg_tps'): drawn {(float(x) * 1.001, float(y))}, table {(float(x), float(y))}"]
    table[5]["tg_tps"] = ""  # IQ3_K without a speed must not be drawn
    assert speed_points_vs_table(png_points(p["plots"]["speed"]), table) == [
        "('tiny', 'IQ3_K', 'tg_tps'): drawn but not a quant row of the table"]


def test_speed_plot_bars_gate_and_reference(tmp_path):
    p = run_bench_report(tmp_path, gate=Gate(5.0, 0.05, min_tg_tps=50.0))
    rows = read_rows(p["csv"])
    _, infos = load_rows(add_bench(tmp_path / "i", make_entries(tmp_path / "i")))
    fig = plot_speed(rows, Gate(5.0, 0.05, min_tg_tps=50.0), infos)
    ax = fig.axes[0]
    bars = sorted(tuple(seg[:, 0]) for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments())
    assert bars == sorted((r.tg_tps_min, r.tg_tps_max) for r in rows if not r.is_reference)  # min..max of the runs
    lines = {ln.get_gid(): ln for ln in ax.lines if ln.get_gid()}
    assert list(lines["gate"].get_ydata()) == [0.05, 0.05] and list(lines["gate|x"].get_xdata()) == [50.0, 50.0]
    assert list(lines["reference|tiny|tg_tps"].get_xdata()) == [TG["baseline"]] * 2
    assert ax.get_yscale() == "log" and "depth 0" in ax.get_xlabel()
    assert "box1: AMD EPYC 7763 64-Core Processor" in fig.get_suptitle() and "depth 0" in fig.get_suptitle()


def test_speed_plot_without_speeds_says_so(tmp_path):
    p = speed_report_paths(tmp_path)
    write_report(make_entries(tmp_path), Gate(5.0, 0.05), p["csv"], p["md"], p["html"], p["plots"])
    assert png_points(p["plots"]["speed"]) == []
    fig = plot_speed(read_rows(p["csv"]), Gate())
    assert any("No speed data" in t.get_text() for t in fig.texts)
    # the page looks as without the speed plot: it is not embedded
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', p["html"].read_text())
    assert [base64.b64decode(b) for b in imgs] == [p["plots"][k].read_bytes() for k in ("lnppl", "kld")]


def test_html_embeds_the_speed_plot_and_shows_speeds(tmp_path):
    p = run_bench_report(tmp_path)
    page = p["html"].read_text()
    imgs = re.findall(r'<h3>([^<]+)</h3><img alt="[^"]+" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [t for t, _ in imgs] == ["Size vs ln(PPL(Q)/PPL(ref))", "Size vs mean KLD", "KLD vs generation speed"]
    assert base64.b64decode(imgs[2][1]) == p["plots"]["speed"].read_bytes()
    assert "<th>PP t/s</th><th>TG t/s</th><th>gate</th>" in page and "<td>60.0 ±1.5</td>" in page
    assert "host: box1: AMD EPYC 7763 64-Core Processor, 2 CPUs, no GPU; engine CUDA off" in page
    for r in csv_dicts(p["csv"]):
        assert f"<td>{r['tg_tps@512']}</td>" in page


# ----------------------------------------------------------------------------------------------
# markdown: speed columns and notes; without bench exactly as before


def test_markdown_shows_speeds_and_how_they_were_measured(tmp_path):
    md = run_bench_report(tmp_path)["md"].read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| model |"))
    assert head.endswith("| same top p % | PP t/s | TG t/s | gate | Pareto |")
    row = next(ln for ln in md.splitlines() if ln.startswith("| tiny | IQ4_KS |")).split(" | ")
    assert row[-4:-2] == ["600 ±15", "60.0 ±1.5"]  # runs 0.97x..1.02x: half the range is 2.5 %
    assert "| tiny | baseline (reference) |" in md and "| 200 ±5 | 20.0 ±0.5 |" in md
    assert ("Speed: llama-sweep-bench at depth 0 (PP 512 tokens, TG 32 tokens, -mla 3 -fa on), median of 3 runs ± "
            "half their range; other depths in summary.csv.") in md
    assert "- host: box1: AMD EPYC 7763 64-Core Processor, 2 CPUs, no GPU; engine CUDA off\n" in md
    assert "- run: CPU only, 2 threads\n" in md
    assert "not comparable" not in md


def test_two_hosts_are_listed_and_not_comparable(tmp_path):
    entries = add_bench(tmp_path, make_entries(tmp_path, models=("a", "b")))
    gpu = {"hostname": "gpu7", "cpu": "Intel Xeon Platinum 8480+", "cpus": 8,
           "gpus": [{"name": "NVIDIA H200", "driver": "570.86.15", "memory_mib": 143771}] * 2}
    offload = {**CPU_RUN, "gpu_layers": 99, "override_tensors": ["exps=CPU"], "ubatch": 2048, "threads": 8}
    for q in entries[1]["quants"][:2]:
        rec = json.loads(open(q["bench"]).read())
        rec.update(host=gpu, run=offload, engine={"key": "k", "cuda": True})
        open(q["bench"], "w").write(json.dumps(rec))
    p = report_paths(tmp_path)
    write_report(entries, Gate(), p["csv"], p["md"], p["html"], p["plots"])
    md = p["md"].read_text()
    others = "IQ4_KS, IQ3_K, IQ2_KS, IQ2_KS-noimatrix, IQ2_XS"
    assert ("- 2 different hosts: speeds are not comparable across them\n"
            f"  - box1: AMD EPYC 7763 64-Core Processor, 2 CPUs, no GPU; engine CUDA off (a: baseline, Q8_0, IQ6_K, "
            f"Q6_K, {others}; b: baseline, Q6_K, {others})\n"
            "  - gpu7: Intel Xeon Platinum 8480+, 8 CPUs, 2× NVIDIA H200 (driver 570.86.15); engine CUDA on "
            "(b: Q8_0, IQ6_K)\n") in md
    assert ("- 2 different run settings: speeds are not comparable across them\n  - CPU only, 2 threads (a: "
            in md)
    assert "  - -ngl 99 -ot exps=CPU -ub 2048, 8 threads (b: Q8_0, IQ6_K)\n" in md
    page = p["html"].read_text()
    assert "2 different hosts: speeds are not comparable across them<ul><li>box1:" in page
    assert "gpu7: Intel Xeon Platinum 8480+, 8 CPUs, 2× NVIDIA H200 (driver 570.86.15); engine CUDA on" in page


# summary.md of make_entries(...) with Gate(5.0, 0.05), as the report wrote it before speeds existed
# (commit 8208947): one model with the unquantized reference; two models with reference quant Q8_0.
OLD_MD_SHA256 = {
    (("tiny",), None): "62b4f0e6531d1735ad75efe6dd30bff0e534d59f3ebe3d4cf76d02fba5b42bb0",
    (("a", "b"), "Q8_0"): "23c9fea55ac01d1efe2251dd2666b08bc5547c6653ac5ebce75a113075ac8eba",
}


@pytest.mark.parametrize("models, reference", list(OLD_MD_SHA256))
def test_without_bench_summary_md_is_byte_identical_to_before(tmp_path, models, reference):
    p = speed_report_paths(tmp_path)
    entries = make_entries(tmp_path, models=models, reference=reference)
    write_report(entries, Gate(5.0, 0.05), p["csv"], p["md"], p["html"], p["plots"])
    md = p["md"].read_bytes()
    assert hashlib.sha256(md).hexdigest() == OLD_MD_SHA256[(models, reference)], md.decode()
    # the same records with bench records differ exactly by the speed columns and notes
    with_bench = run_bench_report(tmp_path / "b", models=models, reference=reference)["md"].read_text()
    assert "PP t/s" not in md.decode() and "PP t/s" in with_bench
    assert "Speed:" not in md.decode() and "host:" not in md.decode()
    page = p["html"].read_text()
    assert "PP t/s" not in page and "speed" not in page.split("<h2>Plots</h2>")[0].lower()


def test_speed_cell_rounding():
    from quantsweep.report.table import speed_cell

    assert [speed_cell(m, s) for m, s in [(812.1, 29.8), (95.3, 3.1), (812.1, 0.8), (0.87, 0.01), (812.1, 0.0)]] == [
        "812 ±15", "95.3 ±1.6", "812.1 ±0.4", "0.870 ±0.005", "812"]
    assert math.isclose(float(speed_cell(12345.6, 300).split()[0]), 12346)
