"""Auto recipes in the report: the allocation record's budget and predicted KLD next to the
measured KLD (entries, rows, summary.csv / .md / .html, plots), and nothing new without them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from test_report import QUANTS, csv_dicts, make_entries, points_vs_table, report_paths
from test_report_entries import PATHS
from test_report_entries import QUANTS as ENTRY_QUANTS
from quantsweep.errors import ReportError
from quantsweep.report import (AllocationRecord, ModelEntry, allocation_paths, bench_paths, evaluation_paths,
                               load_rows, parse_entries, plot_metric, plotted_points, read_rows, record_paths,
                               sweep_entries, to_json_data, write_report)
from quantsweep.settings import Gate
from quantsweep.report.entries import describe_budget
from quantsweep.report.layers import LayerMap, png_layers
from quantsweep.report.table import ALLOCATION_TITLE, Row

GATE = Gate(5.0, 0.05)
ALLOC_PATHS = {**PATHS, "allocation": "results/allocate/{model}/{quant}.json"}

# Three auto recipes (name, size in bytes, bpw, ln PPL ratio, mean KLD): the first fits its budget
# (the file size of IQ2_KS: 6829952 bytes), the second is 100 bytes over its 4 bpw budget (tensor
# bytes), the third fits its split budget (0.004 + 0.004 GiB of file).
AUTO = [("auto-IQ2_KS", 6829000, 3.06, 0.2, 0.2), ("auto-4bpw", 9000100, 4.0, 0.05, 0.02),
        ("auto-split", 8000000, 3.6, 0.1, 0.05)]
# per auto recipe: (budget kind, value, budget tensor bytes, split, predicted mean KLD)
BUDGETS = {"auto-IQ2_KS": ("size_of", "IQ2_KS", 6820000, None, 0.16),
           "auto-4bpw": ("bpw", 4.0, 9000000, {"gpu": 4000000, "ram": 5000000}, 0.025),
           "auto-split": ("split", {"gpu_gib": 0.004, "ram_gib": 0.004}, 8580000, None, 0.04)}
SPLIT_WORDS = "0.004 GiB GPU (non-expert tensors) + 0.004 GiB RAM (routed experts)"


@dataclass
class AutoQ:
    name: str
    ftype: str
    imatrix: bool
    auto: bool = False


def allocation_record(model: str, quant: str) -> dict:
    """What the allocator writes next to an auto recipe (results/allocate/{model}/{quant}.json):
    as the report's brief describes it (model, budget.split), or for a split budget as
    allocator.solver.allocate_budget writes it (no model; budget.describe and group_bytes)."""
    kind, value, nbytes, split, kld = BUDGETS[quant]
    rec = {"quant": quant, "model": model,
           "budget": {"name": quant, "kind": kind, "value": value, "bytes": nbytes, "split": split},
           "predicted": {"kld_mean": kld, "tensor_bytes": nbytes - 500, "bytes_by_budget": {"total": nbytes - 500},
                         "top_kld": kld / 20, "sum_increase": kld * 0.9},
           "sensitivity": f"results/sensitivity/{model}.json", "recipe": f"results/allocate/{model}/{quant}.yaml",
           "choice": {"attn_q_b": "iq4_ks", "ffn_down_exps": "iq2_ks"}}
    if kind == "split":
        del rec["model"], rec["budget"]["split"]
        rec["budget"].update(describe=SPLIT_WORDS, group_bytes={"gpu": 4000000, "ram": 4580000})
    return rec


def auto_entries(tmp_path, models=("tiny",), with_allocation: bool = True) -> list[dict]:
    """The report's entries for QUANTS plus the auto recipes, with their allocation records
    (with_allocation False: the same sweep with the auto recipes as ordinary quants)."""
    entries = make_entries(tmp_path, models=models, quants=QUANTS + AUTO)
    if with_allocation:
        for e in entries:
            d = tmp_path / "allocate" / e["model"]
            d.mkdir(parents=True)
            for q in e["quants"]:
                if q["name"] in BUDGETS:
                    (d / f"{q['name']}.json").write_text(json.dumps(allocation_record(e["model"], q["name"])))
                    q["allocation"] = str(d / f"{q['name']}.json")
    return entries


_AUTO: dict = {}


def auto_report(tmp_path) -> dict:
    """write(auto_entries()), written once per session: the tests that take it only read it."""
    if not _AUTO:
        _AUTO.update(write(tmp_path, auto_entries(tmp_path)))
    return _AUTO


def write(tmp_path, entries) -> dict:
    p = report_paths(tmp_path)
    write_report(entries, GATE, p["csv"], p["md"], p["html"], p["plots"])
    return p


# ----------------------------------------------------------------------------------------------
# entries


def test_sweep_entries_give_auto_quants_their_allocation_record():
    """Only quants with a true `auto` get an allocation record; objects without the attribute are
    ordinary quants; the path travels through the JSON form and is an input of the report rule."""
    quants = [*ENTRY_QUANTS, AutoQ("auto-IQ2_KS", "IQ2_KS", True, auto=True), AutoQ("Q4_0", "Q4_0", True)]
    entries = sweep_entries(["a", "b"], {"a": "base", "b": "auto-IQ2_KS"}, quants, ALLOC_PATHS)
    a, b = entries
    assert [q.allocation for q in a.quants] == ["", "", "", "results/allocate/a/auto-IQ2_KS.json", ""]
    assert b.reference.allocation == "results/allocate/b/auto-IQ2_KS.json"
    assert all(q.allocation == "" for q in b.quants)
    assert a.to_dict()["quants"][3]["allocation"] == "results/allocate/a/auto-IQ2_KS.json"
    assert ["allocation" in q for q in a.to_dict()["quants"]] == [False, False, False, True, False]
    back = parse_entries(json.loads(json.dumps(to_json_data(entries))))
    assert back == entries
    assert allocation_paths(entries) == ["results/allocate/a/auto-IQ2_KS.json", "results/allocate/b/auto-IQ2_KS.json"]
    assert record_paths(entries) == evaluation_paths(entries) + bench_paths(entries) + allocation_paths(entries)
    assert record_paths(to_json_data(entries))[-2:] == allocation_paths(entries)


def test_sweep_entries_without_auto_quants_have_no_allocation():
    entries = sweep_entries(["a"], {"a": "base"}, ENTRY_QUANTS, ALLOC_PATHS)
    assert allocation_paths(entries) == [] and "allocation" not in json.dumps(to_json_data(entries))
    assert entries == sweep_entries(["a"], {"a": "base"}, ENTRY_QUANTS, PATHS)


def test_auto_quant_needs_the_allocation_pattern_and_a_string():
    quants = [*ENTRY_QUANTS, AutoQ("auto-IQ2_KS", "IQ2_KS", True, auto=True)]
    with pytest.raises(ReportError) as e:
        sweep_entries(["a"], {"a": "base"}, quants, PATHS)
    assert str(e.value) == ("report entries: quant 'auto-IQ2_KS' is an auto recipe but there is no path pattern for "
                            "'allocation'")
    d = sweep_entries(["a"], {"a": "base"}, quants, ALLOC_PATHS)[0].to_dict()
    d["quants"][3]["allocation"] = 7
    with pytest.raises(ReportError, match=r"quants\[3\] 'auto-IQ2_KS': key 'allocation' is 7, not a non-empty"):
        ModelEntry.from_dict(d)


# ----------------------------------------------------------------------------------------------
# rows and summary.csv


def test_rows_carry_the_allocation_records_values(tmp_path):
    rows, _ = load_rows(auto_entries(tmp_path))
    by = {r.quant: r for r in rows}
    a, b, c = by["auto-IQ2_KS"], by["auto-4bpw"], by["auto-split"]
    # the size-of budget's file limit is the named quant's measured file
    assert (a.auto, a.budget, a.budget_bytes, a.size_limit, a.predicted_kld) == (
        "yes", "the size of IQ2_KS", 6820000, by["IQ2_KS"].size_bytes, 0.16)
    assert (b.auto, b.budget, b.budget_bytes, b.size_limit, b.predicted_kld) == (
        "yes", "4 bpw (split: gpu 4000000 bytes, ram 5000000 bytes)", 9000000, 9000000, 0.025)
    assert (c.auto, c.budget, c.budget_bytes, c.size_limit, c.predicted_kld) == (
        "yes", SPLIT_WORDS, 8580000, int(0.008 * 2**30), 0.04)
    assert (a.kld_mean, a.size_bytes) == (0.2, 6829000)  # measured: the evaluation record's
    for r in rows:
        if r.quant not in BUDGETS:
            assert (r.auto, r.budget, r.budget_bytes, r.size_limit, r.predicted_kld) == ("", "", None, None, None)


def test_csv_has_the_new_columns_before_the_provenance_and_round_trips(tmp_path):
    p = auto_report(tmp_path)
    d = csv_dicts(p["csv"])
    cols = list(d[0])
    at = cols.index("pareto") + 1
    assert cols[at:at + 7] == ["auto", "budget", "budget_bytes", "size_limit", "predicted_kld", "quant_manifest",
                               "eval_manifest"]
    auto = next(r for r in d if r["quant"] == "auto-4bpw")
    assert (auto["auto"], auto["budget_bytes"], auto["predicted_kld"]) == ("yes", "9000000", "0.025")
    assert {r["auto"] for r in d if r["quant"] not in BUDGETS} == {""}
    rows, _ = load_rows(auto_entries(tmp_path / "again"))
    table = read_rows(p["csv"])
    fields = ("quant", "auto", "budget", "budget_bytes", "size_limit", "predicted_kld")
    assert [[getattr(r, f) for f in fields] for r in table] == [[getattr(r, f) for f in fields] for r in rows]
    assert isinstance(table[-1].budget_bytes, int) and isinstance(table[-1].size_limit, int)


# ----------------------------------------------------------------------------------------------
# summary.md and summary.html


def _section(md: str) -> list[str]:
    lines = md.split("\n")
    at = lines.index(f"## {ALLOCATION_TITLE}")
    return [ln for ln in lines[at:] if ln.startswith("| ")]


def test_markdown_marks_auto_recipes_and_sets_prediction_against_measurement(tmp_path):
    md = auto_report(tmp_path)["md"].read_text()
    assert "| tiny | auto-IQ2_KS (auto) | auto |" in md and "| tiny | auto-4bpw (auto) |" in md
    assert "| tiny | IQ2_KS |" in md  # a fixed quant is not marked
    head, *cells = _section(md)
    assert head == ("| model | quant | budget | tensor bytes | file limit bytes | file limit GiB | file bytes | "
                    "file GiB | fits | predicted mean KLD | measured mean KLD | measured / predicted |")
    split = int(0.008 * 2**30)
    assert cells == [
        f"| tiny | auto-IQ2_KS | the size of IQ2_KS | 6820000 | 6829952 | {6829952 / 2**30:.4g} | 6829000 | "
        f"{6829000 / 2**30:.4g} | yes | 0.160000 | 0.200000 | 1.250 |",
        "| tiny | auto-4bpw | 4 bpw (split: gpu 4000000 bytes, ram 5000000 bytes) | 9000000 | 9000000 | "
        f"{9000000 / 2**30:.4g} | 9000100 | {9000100 / 2**30:.4g} | no (+100 bytes) | 0.025000 | 0.020000 | 0.800 |",
        f"| tiny | auto-split | {SPLIT_WORDS} | 8580000 | {split} | 0.008 | 8000000 | {8000000 / 2**30:.4g} | yes | "
        "0.040000 | 0.050000 | 1.250 |",
    ]


def test_html_has_the_section_and_the_marker(tmp_path):
    page = auto_report(tmp_path)["html"].read_text()
    assert f"<h2>{ALLOCATION_TITLE}</h2>" in page
    assert '<td class="t">auto-IQ2_KS (auto)</td>' in page
    row = re.search(r"<tr><td class=\"t\">tiny</td><td class=\"t\">auto-4bpw</td>(.*?)</tr>", page).group(1)
    assert '<td class="t fail">no (+100 bytes)</td>' in row and "<td>0.800</td>" in row
    assert '<td class="t pass">yes</td><td>0.160000</td><td>0.200000</td><td>1.250</td>' in page
    # the section comes before the plots
    assert page.index(ALLOCATION_TITLE) < page.index("<h2>Plots</h2>")


def test_without_auto_recipes_no_section_and_no_marker(tmp_path):
    """The same sweep with the auto recipes as ordinary quants: no section, no marker, and its
    summary.md is the auto sweep's with those two taken out."""
    plain = write(tmp_path / "plain", auto_entries(tmp_path / "plain", with_allocation=False))
    auto = auto_report(tmp_path / "auto")
    md, page = plain["md"].read_text(), plain["html"].read_text()
    assert ALLOCATION_TITLE not in md and ALLOCATION_TITLE not in page
    assert "(auto)" not in md and "(auto)" not in page
    assert {r["auto"] for r in csv_dicts(plain["csv"])} == {""}
    auto_md = auto["md"].read_text()
    stripped = auto_md[:auto_md.index(f"\n## {ALLOCATION_TITLE}")].replace(" (auto)", "")
    assert stripped == md.replace(str(tmp_path / "plain"), str(tmp_path / "auto"))


def test_reference_auto_recipe_is_marked_but_not_compared(tmp_path):
    """An auto recipe as the reference: marked, but its KLD is zero by definition, so no section."""
    entries = make_entries(tmp_path, quants=QUANTS + AUTO[:1], reference="auto-IQ2_KS")
    (tmp_path / "a.json").write_text(json.dumps(allocation_record("tiny", "auto-IQ2_KS")))
    entries[0]["reference"]["allocation"] = str(tmp_path / "a.json")
    md = write(tmp_path, entries)["md"].read_text()
    assert "| tiny | auto-IQ2_KS (reference, auto) |" in md and ALLOCATION_TITLE not in md


# ----------------------------------------------------------------------------------------------
# bad allocation records


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["predicted"].update(kld_mean="0.1"), "key 'predicted.kld_mean' is '0.1', not a non-negative number"),
    (lambda r: r["predicted"].pop("kld_mean"), "key 'predicted.kld_mean' is missing"),
    (lambda r: r["budget"].update(bytes=None), "key 'budget.bytes' is null"),
    (lambda r: r["budget"].update(bytes=1.5), "key 'budget.bytes' is 1.5, not a positive byte count"),
    (lambda r: r["budget"].update(kind="mib"), "key 'budget.kind' is 'mib', not one of size_of, gib, bpw, bytes, "
                                               "split"),
    (lambda r: r["budget"].update(kind="split"), "key 'budget.value' is 4.0, not an object of positive gpu_gib and "
                                                 "ram_gib"),
    (lambda r: r["budget"].update(describe=""), "key 'budget.describe' is '', not a non-empty string"),
    (lambda r: r["budget"].update(value=-2), "key 'budget.value' is -2, not a positive number"),
    (lambda r: r["budget"].update(split=[1]), "key 'budget.split' is [1], not null or an object of byte counts"),
    (lambda r: r.update(budget=12), "key 'budget' is 12, not an object"),
    (lambda r: r.update(quant="auto-IQ3_K"), "key 'quant' is 'auto-IQ3_K', not 'auto-4bpw' (the quant it is read "
                                              "for)"),
    (lambda r: r.update(model="big"), "key 'model' is 'big', not 'tiny' (the model it is read for)"),
    (lambda r: r.pop("quant"), "key 'quant' is missing"),
])
def test_bad_allocation_record_names_the_file_and_key(tmp_path, edit, expected):
    entries = auto_entries(tmp_path)
    path = entries[0]["quants"][-2]["allocation"]
    rec = json.loads(open(path).read())
    edit(rec)
    open(path, "w").write(json.dumps(rec))
    with pytest.raises(ReportError) as e:
        load_rows(entries)
    assert str(e.value) == f"allocation record {path}: {expected}"


def test_unreadable_or_missing_allocation_record_names_the_file(tmp_path):
    entries = auto_entries(tmp_path)
    path = entries[0]["quants"][-2]["allocation"]
    open(path, "w").write('{"quant": ')
    with pytest.raises(ReportError, match=rf"^allocation record {re.escape(path)}: not valid JSON \(.*line 1\)$"):
        load_rows(entries)
    missing = str(tmp_path / "nowhere.json")
    entries[0]["quants"][-2]["allocation"] = missing
    with pytest.raises(ReportError, match=rf"^allocation record {re.escape(missing)}: cannot be read"):
        load_rows(entries)


def test_budget_in_words_and_its_file_limit(tmp_path):
    assert describe_budget("size_of", "IQ2_KS") == "the size of IQ2_KS"
    assert describe_budget("gib", 12.5) == "12.5 GiB"
    assert describe_budget("bpw", 4) == "4 bpw"
    assert describe_budget("split", {"gpu_gib": 10, "ram_gib": 200}) == (
        "10 GiB GPU (non-expert tensors) + 200 GiB RAM (routed experts)")  # what the allocator says
    assert describe_budget("bytes", 1234567, {"gpu": 1000, "ram": 2000}) == (
        "1234567 bytes (split: gpu 1000 bytes, ram 2000 bytes)")
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"quant": "auto-12G", "budget": {"kind": "gib", "value": 12.5, "bytes": 13000000000},
                                "predicted": {"kld_mean": 0.01}}))
    a = AllocationRecord.load(str(path), "big", "auto-12G")
    assert (a.budget, a.size_limit({})) == ("12.5 GiB", int(12.5 * 2**30))
    path.write_text(json.dumps({"quant": "auto-Q4", "budget": {"kind": "size_of", "value": "Q4_0", "bytes": 1000},
                                "predicted": {"kld_mean": 0.01}}))
    a = AllocationRecord.load(str(path), "big", "auto-Q4")
    assert (a.size_limit({"Q4_0": 1200}), a.size_limit({})) == (1200, 1000)  # not in the sweep: the tensor bytes


# ----------------------------------------------------------------------------------------------
# plots


def _marker_of(coll, marker: str) -> bool:
    from matplotlib.markers import MarkerStyle

    ms = MarkerStyle(marker)
    want = ms.get_path().transformed(ms.get_transform()).vertices
    got = coll.get_paths()[0].vertices
    return got.shape == want.shape and np.allclose(got, want)


def test_plot_draws_auto_recipes_as_diamonds(tmp_path):
    p = auto_report(tmp_path)
    table = csv_dicts(p["csv"])
    fig = plot_metric(read_rows(p["csv"]), "kld", GATE)
    assert points_vs_table(plotted_points(fig), table, "kld") == []  # a diamond is still the table's point
    points = [c for ax in fig.axes for c in ax.collections if (c.get_gid() or "").startswith("point|")]
    auto = {c.get_gid() for c in points if _marker_of(c, "D")}
    assert auto == {f"point|tiny|{q}|{x}" for q in BUDGETS for x in ("size_gib", "bpw")}
    assert all(_marker_of(c, "o") for c in points if c.get_gid() not in auto)
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "auto recipe (allocated for a budget)" in legend
    plain = write(tmp_path / "plain", make_entries(tmp_path / "plain"))
    fig = plot_metric(read_rows(plain["csv"]), "kld", GATE)
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert not any("auto" in t for t in legend)


def test_row_defaults_keep_positional_construction():
    """Rows built positionally (as older code does) are ordinary quants."""
    r = Row("m", "Q", "Q4_0", "yes", "base", 100, 100 / 2**30, 4.5, 10.0, 0.1, 1.0, 0.01, 0.001, 0.01, 0.001, 0.1, 95.0)
    assert (r.auto, r.budget, r.budget_bytes, r.predicted_kld) == ("", "", None, None)


# ----------------------------------------------------------------------------------------------
# the layer heat map


def _layers(n_layer: int, ladder: list[str]) -> dict:
    """A layer map as allocator.groups.layer_map writes it: attention per layer, experts from layer 1."""
    return {"n_layer": n_layer, "classes": ["attn_output", "ffn_down_exps"], "ladder": ladder,
            "types": {"attn_output": [ladder[i % len(ladder)] for i in range(n_layer)],
                      "ffn_down_exps": [None] + [ladder[0]] * (n_layer - 1)},
            "other": {"token_embd": ladder[-1]}}


def test_layer_heat_map_draws_each_auto_recipes_cells(tmp_path):
    """Each auto recipe's layer map, drawn cell for cell (read back from the PNG), embedded in the
    page; a record without a map (written before it existed) is left out of the figure."""
    entries = auto_entries(tmp_path)
    paths = {q["name"]: q["allocation"] for q in entries[0]["quants"] if q.get("allocation")}
    maps = {"auto-IQ2_KS": _layers(4, ["iq2_ks", "iq4_ks", "q8_0"]), "auto-4bpw": _layers(61, ["iq3_ks", "q8_0"])}
    for name, m in maps.items():
        rec = json.loads(open(paths[name]).read())
        rec.update(layers=m, source="proxy")
        open(paths[name], "w").write(json.dumps(rec))
    p = report_paths(tmp_path)
    p["plots"]["layers"] = tmp_path / "allocation_layers.png"
    write_report(entries, GATE, p["csv"], p["md"], p["html"], p["plots"])
    cells = png_layers(p["plots"]["layers"])
    want = [{"model": "tiny", "quant": q, "class": c, "layer": i, "type": t}
            for q in ("auto-IQ2_KS", "auto-4bpw") for c in maps[q]["classes"]
            for i, t in enumerate(maps[q]["types"][c]) if t is not None]
    assert cells == want and len(cells) == 4 + 3 + 61 + 60
    assert "Allocated types by layer and tensor class" in open(p["html"]).read()
    # without any map: the figure says so and the page leaves it out
    entries = auto_entries(tmp_path / "plain")
    p = report_paths(tmp_path / "plain")
    p["plots"]["layers"] = tmp_path / "plain" / "allocation_layers.png"
    write_report(entries, GATE, p["csv"], p["md"], p["html"], p["plots"])
    assert png_layers(p["plots"]["layers"]) == []
    assert "Allocated types by layer" not in open(p["html"]).read()


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(types={"attn_output": ["iq2_ks"]}), "types['attn_output'] is not 4 ladder types"),
    (lambda m: m["types"]["attn_output"].__setitem__(0, "q4_0"), "types['attn_output'] is not 4 ladder types"),
    (lambda m: m.pop("ladder"), "lacks n_layer, classes, types or ladder"),
])
def test_bad_layer_map_names_the_file_and_key(tmp_path, edit, expected):
    m = _layers(4, ["iq2_ks", "iq4_ks", "q8_0"])
    edit(m)
    with pytest.raises(ReportError, match=re.escape(f"allocation record x.json: key 'layers' {expected}")):
        LayerMap.from_record({"layers": m}, "x.json", "tiny", "auto", "3 bpw")
    assert LayerMap.from_record({}, "x.json", "tiny", "auto", "3 bpw") is None
