"""The report's entries: what the workflow hands the report, built by sweep_entries."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from quantsweep.errors import ReportError
from quantsweep.report import (ModelEntry, QuantEntry, bench_paths, evaluation_paths, parse_entries, record_paths,
                               sweep_entries)

PATHS = {
    "eval": "results/eval/{model}/{quant}.json",
    "eval_manifest": "results/eval/{model}/{quant}.manifest.json",
    "quant_manifest": "results/quants/{model}/{model}-{quant}.manifest.json",
    "base": "results/eval/{model}/baseline.json",
    "base_manifest": "results/eval/{model}/baseline.manifest.json",
}


@dataclass
class Q:
    name: str
    ftype: str
    imatrix: bool


QUANTS = [Q("Q8_0", "Q8_0", True), Q("IQ4_KS", "IQ4_KS", True), Q("IQ2_KS-noimatrix", "IQ2_KS", False)]


def _quant_dict(model: str, name: str, ftype: str, imatrix: str) -> dict:
    """One quant as workflow/rules/common.smk wrote it by hand before sweep_entries."""
    return {"name": name, "ftype": ftype, "imatrix": imatrix, "result": f"results/eval/{model}/{name}.json",
            "manifests": {"quantize": f"results/quants/{model}/{model}-{name}.manifest.json",
                          "eval": f"results/eval/{model}/{name}.manifest.json"}}


def test_sweep_entries_two_models_one_with_a_reference_quant():
    entries = sweep_entries(["a", "b"], {"a": "base", "b": "IQ4_KS"}, QUANTS, PATHS)
    a, b = entries
    assert (a.model, a.reference, a.reference_name) == ("a", None, "base")
    assert [q.name for q in a.quants] == ["Q8_0", "IQ4_KS", "IQ2_KS-noimatrix"]
    assert b.reference == QuantEntry("IQ4_KS", "IQ4_KS", "yes", "results/eval/b/IQ4_KS.json",
                                     "results/quants/b/b-IQ4_KS.manifest.json", "results/eval/b/IQ4_KS.manifest.json")
    assert [q.name for q in b.quants] == ["Q8_0", "IQ2_KS-noimatrix"]  # the reference left out, order kept
    assert b.quants[1].imatrix == "no" and b.quants[1].ftype == "IQ2_KS"
    # the JSON is what common.smk built by hand
    assert [e.to_dict() for e in entries] == [
        {"model": "a", "reference": "base", "base": "results/eval/a/baseline.json",
         "base_manifest": "results/eval/a/baseline.manifest.json",
         "quants": [_quant_dict("a", "Q8_0", "Q8_0", "yes"), _quant_dict("a", "IQ4_KS", "IQ4_KS", "yes"),
                    _quant_dict("a", "IQ2_KS-noimatrix", "IQ2_KS", "no")]},
        {"model": "b", "reference": _quant_dict("b", "IQ4_KS", "IQ4_KS", "yes"),
         "base": "results/eval/b/baseline.json", "base_manifest": "results/eval/b/baseline.manifest.json",
         "quants": [_quant_dict("b", "Q8_0", "Q8_0", "yes"), _quant_dict("b", "IQ2_KS-noimatrix", "IQ2_KS", "no")]},
    ]
    assert record_paths(entries) == [
        "results/eval/a/baseline.json", "results/eval/a/Q8_0.json", "results/eval/a/IQ4_KS.json",
        "results/eval/a/IQ2_KS-noimatrix.json", "results/eval/b/baseline.json", "results/eval/b/Q8_0.json",
        "results/eval/b/IQ2_KS-noimatrix.json"]
    assert record_paths([e.to_dict() for e in entries]) == record_paths(entries)


def test_round_trip_through_json():
    entries = sweep_entries(["a", "b"], {"a": "base", "b": "Q8_0"}, QUANTS, PATHS)
    data = json.loads(json.dumps([e.to_dict() for e in entries], sort_keys=True))
    back = [ModelEntry.from_dict(d) for d in data]
    assert back == entries
    assert [e.to_dict() for e in back] == data
    # the minimal shape (no manifests, no reference result) loads and writes back unchanged
    minimal = {"model": "m", "reference": {"name": "Q8_0", "ftype": "Q8_0", "imatrix": "yes"}, "base": "b.json",
               "quants": [{"name": "IQ4_KS", "ftype": "IQ4_KS", "imatrix": "no", "result": "q.json"}]}
    assert ModelEntry.from_dict(minimal).to_dict() == minimal
    assert ModelEntry.from_dict({"model": "m", "base": "b.json", "quants": []}).reference is None


def _entry() -> dict:
    return sweep_entries(["tiny"], {"tiny": "Q8_0"}, QUANTS, PATHS)[0].to_dict()


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.pop("base"), "model 'tiny': missing key 'base'"),
    (lambda d: d.pop("quants"), "model 'tiny': missing key 'quants'"),
    (lambda d: d.pop("model"), "an entry: missing key 'model'"),
    (lambda d: d["quants"][1].pop("result"), "model 'tiny' quants[1] 'IQ2_KS-noimatrix': missing key 'result'"),
    (lambda d: d["quants"][0].pop("name"), "model 'tiny' quants[0]: missing key 'name'"),
    (lambda d: d["reference"].pop("ftype"), "model 'tiny' reference 'Q8_0': missing key 'ftype'"),
    (lambda d: d["quants"][0].update(imatrix=True),
     "model 'tiny' quants[0] 'IQ4_KS': key 'imatrix' is True, not a non-empty string"),
    (lambda d: d["quants"][0]["manifests"].update(make="x"), "model 'tiny' quants[0] 'IQ4_KS' manifests: unknown "
                                                             "key 'make'"),
    (lambda d: d.update(reference="Q8_0"), "model 'tiny': reference 'Q8_0' is neither 'base' nor an object"),
    (lambda d: d["quants"].append(dict(d["quants"][0])), "model 'tiny': quant 'IQ4_KS' is listed twice"),
])
def test_from_dict_names_the_model_quant_and_key(edit, expected):
    d = _entry()
    edit(d)
    with pytest.raises(ReportError) as e:
        ModelEntry.from_dict(d)
    assert str(e.value) == f"report entries: {expected}"
    assert "\n" not in str(e.value)


def test_parse_entries_refuses_a_model_twice_and_a_non_list():
    with pytest.raises(ReportError, match="model 'tiny' is listed twice"):
        parse_entries([_entry(), _entry()])
    with pytest.raises(ReportError, match="expected a list of models"):
        parse_entries(_entry())


def test_sweep_entries_refuses_unknown_reference_and_missing_pattern():
    with pytest.raises(ReportError, match="model 'a': reference 'Q5_K' is neither 'base' nor a quant"):
        sweep_entries(["a"], {"a": "Q5_K"}, QUANTS, PATHS)
    with pytest.raises(ReportError, match="model 'a': no reference given"):
        sweep_entries(["a"], {}, QUANTS, PATHS)
    with pytest.raises(ReportError, match="no path pattern for 'base_manifest'"):
        sweep_entries(["a"], {"a": "base"}, QUANTS, {k: v for k, v in PATHS.items() if k != "base_manifest"})


BENCH_PATHS = {**PATHS, "bench": "results/bench/{model}/{quant}.json", "base_bench": "results/bench/{model}/base.json"}


def test_sweep_entries_with_bench_records():
    """With the bench patterns every quant has a bench record; the unquantized model's only where
    it is the reference, a reference quant's is its own."""
    a, b = sweep_entries(["a", "b"], {"a": "base", "b": "IQ4_KS"}, QUANTS, BENCH_PATHS)
    assert a.base_bench == a.reference_bench == "results/bench/a/base.json"
    assert [q.bench for q in a.quants] == [f"results/bench/a/{q.name}.json" for q in QUANTS]
    assert b.base_bench == "" and b.reference_bench == b.reference.bench == "results/bench/b/IQ4_KS.json"
    assert a.to_dict()["base_bench"] == "results/bench/a/base.json" and "base_bench" not in b.to_dict()
    assert b.to_dict()["quants"][0] == {**_quant_dict("b", "Q8_0", "Q8_0", "yes"), "bench": "results/bench/b/Q8_0.json"}
    back = parse_entries(json.loads(json.dumps([a.to_dict(), b.to_dict()])))
    assert back == [a, b]
    assert bench_paths([a, b]) == [
        "results/bench/a/base.json", "results/bench/a/Q8_0.json", "results/bench/a/IQ4_KS.json",
        "results/bench/a/IQ2_KS-noimatrix.json", "results/bench/b/IQ4_KS.json", "results/bench/b/Q8_0.json",
        "results/bench/b/IQ2_KS-noimatrix.json"]
    # record_paths: every record the report reads (the report rule's inputs), evaluations first
    assert record_paths([a, b]) == evaluation_paths([a, b]) + bench_paths([a, b])
    assert evaluation_paths([a, b]) == record_paths(sweep_entries(["a", "b"], {"a": "base", "b": "IQ4_KS"}, QUANTS,
                                                                  PATHS))


def test_without_bench_patterns_no_bench_records():
    entries = sweep_entries(["a", "b"], {"a": "base", "b": "IQ4_KS"}, QUANTS, PATHS)
    assert bench_paths(entries) == [] and record_paths(entries) == evaluation_paths(entries)
    assert not any("bench" in json.dumps(e.to_dict()) for e in entries)
    only_quants = sweep_entries(["a"], {"a": "base"}, QUANTS, {**PATHS, "bench": BENCH_PATHS["bench"]})
    assert only_quants[0].base_bench == "" and len(bench_paths(only_quants)) == len(QUANTS)


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["quants"][0].update(bench=3), "model 'tiny' quants[0] 'IQ4_KS': key 'bench' is 3, not a non-empty "
                                               "string"),
    (lambda d: d.update(base_bench="b.json"), "model 'tiny': key 'base_bench' is for reference 'base'; reference "
                                              "quant 'Q8_0' has its own 'bench'"),
    (lambda d: d.update(bench="b.json"), "model 'tiny': unknown key 'bench'"),
    (lambda d: d["quants"][0].update(speed="b.json"), "model 'tiny' quants[0] 'IQ4_KS': unknown key 'speed'"),
])
def test_bench_keys_are_checked(edit, expected):
    d = sweep_entries(["tiny"], {"tiny": "Q8_0"}, QUANTS, BENCH_PATHS)[0].to_dict()
    edit(d)
    with pytest.raises(ReportError) as e:
        ModelEntry.from_dict(d)
    assert str(e.value) == f"report entries: {expected}"
