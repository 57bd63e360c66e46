"""What the report reads: per model, its reference and the evaluation record of every quant.

This is the one contract between the workflow and the report. The workflow builds it with
`sweep_entries` and passes it as JSON (`ModelEntry.to_dict`, one dict per model):

    {"model": "tiny",
     "reference": "base" | {"name", "ftype", "imatrix", "result", "manifests", "bench"},
     "base": "results/eval/tiny/baseline.json",             # the reference's evaluation record
     "base_manifest": "results/eval/tiny/baseline.manifest.json",
     "base_bench": "results/bench/tiny/baseline.json",      # the unquantized model's bench record
     "quants": [{"name", "ftype", "imatrix": "yes" | "no", "result": record path,
                 "manifests": {"quantize": path, "eval": path},
                 "bench": bench record path,
                 "allocation": allocation record path}, ...]}  # sweep order; "allocation": auto recipes only

`base_manifest`, `manifests`, the reference quant's `result`, every bench record (a sweep
without the bench step has none) and `allocation` (what the size-budget allocator wrote next to
an auto recipe: its budget and predicted mean KLD; only auto recipes have one) may be left
out; `base_bench` is only for reference "base" (a reference quant's bench record is its own
`bench`). `from_dict` refuses anything else with a
`ReportError` naming the model, the quant and the key; `record_paths` lists every record the
report reads (the CLI's manifest inputs, the report rule's inputs), `evaluation_paths`,
`bench_paths` and `allocation_paths` each kind, and `load_rows` reads them into summary rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ReportError
from .speed import BenchRecord, check_same_bench, load_record
from ..settings import BASE_REFERENCE, Budget
from .table import KLD_TOLERANCE, ModelInfo, Record, Row, make_rows

MANIFEST_KINDS = ("quantize", "eval")
# What a sweep's report reads, written when the sweep starts, so `quantsweep report --partial`
# can make the report of what is measured so far (into PARTIAL_DIR, beside the final one).
REQUEST = Path("results/plan/report.json")
PARTIAL_DIR = Path("results/report/partial")
# Required path patterns of sweep_entries; "bench" and "base_bench" are optional (bench step off: none),
# "allocation" is needed only when a quant is an auto recipe.
PATH_KEYS = ("eval", "eval_manifest", "quant_manifest", "base", "base_manifest")
ALLOCATION_KEY = "allocation"


def _str(d: Mapping, key: str, where: str, required: bool = True) -> str:
    if key not in d:
        if required:
            raise ReportError(f"report entries: {where}: missing key {key!r}")
        return ""
    v = d[key]
    if not isinstance(v, str) or (required and not v):
        raise ReportError(f"report entries: {where}: key {key!r} is {v!r}, not a non-empty string")
    return v


def _no_other_keys(d: Mapping, allowed: Iterable[str], where: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise ReportError(f"report entries: {where}: unknown key {extra[0]!r}")


def _object(d, where: str) -> Mapping:
    if not isinstance(d, Mapping):
        raise ReportError(f"report entries: {where}: {d!r} is not an object")
    return d


@dataclass
class QuantEntry:
    """One quant of a model: what it is, its evaluation record and the manifests to link."""

    name: str
    ftype: str
    imatrix: str  # "yes" / "no", as shown in the table
    result: str = ""  # evaluation record (not read for a reference quant: its record is the model's `base`)
    quant_manifest: str = ""
    eval_manifest: str = ""
    bench: str = ""  # bench record ("": not benchmarked)
    allocation: str = ""  # the allocator's record of an auto recipe ("": not an auto recipe)

    def to_dict(self) -> dict:
        d = {"name": self.name, "ftype": self.ftype, "imatrix": self.imatrix}
        if self.result:
            d["result"] = self.result
        manifests = {k: v for k, v in zip(MANIFEST_KINDS, (self.quant_manifest, self.eval_manifest)) if v}
        if manifests:
            d["manifests"] = manifests
        if self.bench:
            d["bench"] = self.bench
        if self.allocation:
            d["allocation"] = self.allocation
        return d

    @classmethod
    def from_dict(cls, d, where: str, need_result: bool = True) -> "QuantEntry":
        """where: e.g. "model 'tiny' quant 'IQ4_KS'" (the quant's name is added when it has one)."""
        d = _object(d, where)
        if isinstance(d.get("name"), str) and d["name"]:
            where = f"{where} {d['name']!r}"
        _no_other_keys(d, ("name", "ftype", "imatrix", "result", "manifests", "bench", "allocation"), where)
        manifests = _object(d.get("manifests", {}), f"{where} manifests")
        _no_other_keys(manifests, MANIFEST_KINDS, f"{where} manifests")
        return cls(_str(d, "name", where), _str(d, "ftype", where), _str(d, "imatrix", where),
                   _str(d, "result", where, need_result),
                   _str(manifests, "quantize", f"{where} manifests", False),
                   _str(manifests, "eval", f"{where} manifests", False), _str(d, "bench", where, False),
                   _str(d, "allocation", where, False))


@dataclass
class ModelEntry:
    """One model of the sweep: its reference (None = the unquantized model) and its quants."""

    model: str
    reference: QuantEntry | None  # None: the unquantized model
    base: str  # the reference's evaluation record (baseline.json)
    quants: list[QuantEntry]  # sweep order, without the reference quant
    base_manifest: str = ""
    base_bench: str = ""  # the unquantized model's bench record (reference "base" only)

    @property
    def reference_name(self) -> str:
        return BASE_REFERENCE if self.reference is None else self.reference.name

    @property
    def reference_bench(self) -> str:
        """The reference row's bench record ("": none)."""
        return self.base_bench if self.reference is None else self.reference.bench

    def to_dict(self) -> dict:
        d = {"model": self.model,
             "reference": BASE_REFERENCE if self.reference is None else self.reference.to_dict(),
             "base": self.base}
        if self.base_manifest:
            d["base_manifest"] = self.base_manifest
        if self.base_bench:
            d["base_bench"] = self.base_bench
        d["quants"] = [q.to_dict() for q in self.quants]
        return d

    @classmethod
    def from_dict(cls, d) -> "ModelEntry":
        d = _object(d, "an entry")
        where = f"model {d['model']!r}" if isinstance(d.get("model"), str) else "an entry"
        _no_other_keys(d, ("model", "reference", "base", "base_manifest", "base_bench", "quants"), where)
        model = _str(d, "model", where)
        ref = d.get("reference", BASE_REFERENCE)
        if isinstance(ref, str) and ref != BASE_REFERENCE:
            raise ReportError(f"report entries: {where}: reference {ref!r} is neither {BASE_REFERENCE!r} nor an object")
        reference = None if ref == BASE_REFERENCE else QuantEntry.from_dict(ref, f"{where} reference", False)
        if "quants" not in d:
            raise ReportError(f"report entries: {where}: missing key 'quants'")
        if not isinstance(d["quants"], list):
            raise ReportError(f"report entries: {where}: key 'quants' is not a list")
        quants = [QuantEntry.from_dict(q, f"{where} quants[{i}]") for i, q in enumerate(d["quants"])]
        entry = cls(model, reference, _str(d, "base", where), quants, _str(d, "base_manifest", where, False),
                    _str(d, "base_bench", where, False))
        if reference is not None and entry.base_bench:
            raise ReportError(f"report entries: {where}: key 'base_bench' is for reference {BASE_REFERENCE!r}; "
                              f"reference quant {reference.name!r} has its own 'bench'")
        names = [entry.reference_name] + [q.name for q in quants]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise ReportError(f"report entries: {where}: quant {dup!r} is listed twice")
        return entry


def parse_entries(data) -> list[ModelEntry]:
    """The entries from their JSON form (a list of dicts); ModelEntry objects pass through."""
    if not isinstance(data, list):
        raise ReportError(f"report entries: expected a list of models, got {type(data).__name__}")
    entries = [e if isinstance(e, ModelEntry) else ModelEntry.from_dict(e) for e in data]
    seen = set()
    for e in entries:
        if e.model in seen:
            raise ReportError(f"report entries: model {e.model!r} is listed twice")
        seen.add(e.model)
    return entries


def measured_so_far(entries: Sequence[ModelEntry]) -> tuple[list[ModelEntry], list[tuple[str, str]]]:
    """The entries of what has been measured: a quant whose evaluation record is missing, a
    model whose reference has not been evaluated, is left out (the bench record, missing, only
    leaves its speed out); and (model, quant) of each left out."""

    def have(path: str) -> bool:
        return bool(path) and Path(path).is_file()

    kept, pending = [], []
    for e in entries:
        if not have(e.base):
            pending += [(e.model, e.reference_name)] + [(e.model, q.name) for q in e.quants]
            continue
        quants = []
        for q in e.quants:
            if not have(q.result) or (q.allocation and not have(q.allocation)):
                pending.append((e.model, q.name))
            else:
                quants.append(replace(q, bench=q.bench if have(q.bench) else ""))
        ref = e.reference and replace(e.reference, bench=e.reference.bench if have(e.reference.bench) else "")
        kept.append(replace(e, reference=ref, quants=quants, base_bench=e.base_bench if have(e.base_bench) else ""))
    return kept, pending


def to_json_data(entries: Sequence[ModelEntry]) -> list[dict]:
    """The JSON form of the entries (what `parse_entries` reads back)."""
    return [e.to_dict() for e in entries]


def evaluation_paths(entries) -> list[str]:
    """Every evaluation record the report reads, per model its reference's then its quants'."""
    return [p for e in parse_entries(entries) for p in [e.base, *(q.result for q in e.quants)]]


def bench_paths(entries) -> list[str]:
    """Every bench record the report reads, per model its reference's then its quants' ([]: no bench)."""
    return [p for e in parse_entries(entries) for p in [e.reference_bench, *(q.bench for q in e.quants)] if p]


def allocation_paths(entries) -> list[str]:
    """Every allocation record the report reads (auto recipes only; []: none), in row order."""
    return [q.allocation for e in parse_entries(entries) for q in [e.reference, *e.quants] if q and q.allocation]


def record_paths(entries) -> list[str]:
    """Every record the report reads: the evaluation records, the bench records, then the
    allocation records (a missing one must stop the report rule, so it is an input too)."""
    return evaluation_paths(entries) + bench_paths(entries) + allocation_paths(entries)


def _fill(paths: Mapping[str, str], key: str, **fields: str) -> str:
    try:
        return paths[key].format(**fields)
    except KeyError as e:
        raise ReportError(f"report entries: path pattern {key!r} ({paths[key]!r}) has an unknown field {e}") from None


def sweep_entries(models: Sequence[str], references: Mapping[str, str], quants: Sequence,
                  paths: Mapping[str, str]) -> list[ModelEntry]:
    """The entries of a sweep. models: model names in report order; references: {model: "base" |
    quant name}; quants: in sweep order, objects with .name, .ftype and .imatrix (bool); paths:
    format strings with {model} / {quant} fields for each key of PATH_KEYS, and optionally
    "bench" ({model}, {quant}) and "base_bench" ({model}): left out, no bench records are read.
    A quant whose `auto` attribute is true (an allocated recipe; objects without it are not)
    gets its allocation record from the pattern "allocation" ({model}, {quant}), which is then
    required. A model's reference quant is its `reference`, not one of its `quants`."""
    missing = [k for k in PATH_KEYS if k not in paths]
    if missing:
        raise ReportError(f"report entries: no path pattern for {missing[0]!r}")
    auto = next((q.name for q in quants if getattr(q, "auto", False)), None)
    if auto is not None and ALLOCATION_KEY not in paths:
        raise ReportError(f"report entries: quant {auto!r} is an auto recipe but there is no path pattern for "
                          f"{ALLOCATION_KEY!r}")
    by_name = {q.name: q for q in quants}

    def entry(model: str, q) -> QuantEntry:
        f = {"model": model, "quant": q.name}
        return QuantEntry(q.name, q.ftype, "yes" if q.imatrix else "no", _fill(paths, "eval", **f),
                          _fill(paths, "quant_manifest", **f), _fill(paths, "eval_manifest", **f),
                          _fill(paths, "bench", **f) if "bench" in paths else "",
                          _fill(paths, ALLOCATION_KEY, **f) if getattr(q, "auto", False) else "")

    out = []
    for model in models:
        if model not in references:
            raise ReportError(f"report entries: model {model!r}: no reference given")
        ref = references[model]
        if ref != BASE_REFERENCE and ref not in by_name:
            raise ReportError(f"report entries: model {model!r}: reference {ref!r} is neither "
                              f"{BASE_REFERENCE!r} nor a quant of the sweep")
        base_bench = _fill(paths, "base_bench", model=model) if ref == BASE_REFERENCE and "base_bench" in paths else ""
        out.append(ModelEntry(model, None if ref == BASE_REFERENCE else entry(model, by_name[ref]),
                              _fill(paths, "base", model=model), [entry(model, q) for q in quants if q.name != ref],
                              _fill(paths, "base_manifest", model=model), base_bench))
    return out


BUDGET_KINDS = ("size_of", "gib", "bpw", "bytes", "split")


@dataclass(frozen=True)
class AllocationRecord:
    """What the size-budget allocator wrote next to an auto recipe, as far as the report uses it:
    the budget and the predicted mean KLD (to set against the measured one)."""

    source: str  # the record file, for messages
    kind: str  # one of BUDGET_KINDS
    value: object  # quant name (size_of), GiB, bpw, bytes, or {"gpu_gib", "ram_gib"} (split)
    budget: str  # in words: "the size of IQ2_KS", "12.5 GiB", ...
    budget_bytes: int  # the tensor bytes the allocator filled (header and padding already taken off)
    predicted_kld: float

    @classmethod
    def load(cls, path: str, model: str, quant: str) -> "AllocationRecord":
        """Read and check the record of `model`/`quant`; ReportError naming the file and key."""
        d = load_record(path, "allocation record")

        def bad(key: str, what: str) -> str:
            return f"allocation record {path}: key {key!r} {what}"

        def get(obj: dict, key: str, prefix: str = ""):
            if obj.get(key) is None:
                raise ReportError(bad(prefix + key, "is missing" if key not in obj else "is null"))
            return obj[key]

        for key, want in (("quant", quant), ("model", model)):
            if (key == "quant" or key in d) and get(d, key) != want:  # the allocator's own record names no model
                raise ReportError(bad(key, f"is {d[key]!r}, not {want!r} (the {key} it is read for)"))
        budget, predicted = get(d, "budget"), get(d, "predicted")
        for key, v in (("budget", budget), ("predicted", predicted)):
            if not isinstance(v, dict):
                raise ReportError(bad(key, f"is {v!r}, not an object"))
        kind, value, nbytes = (get(budget, k, "budget.") for k in ("kind", "value", "bytes"))
        if kind not in BUDGET_KINDS:
            raise ReportError(bad("budget.kind", f"is {kind!r}, not one of {', '.join(BUDGET_KINDS)}"))
        if kind == "size_of" and not (isinstance(value, str) and value):
            raise ReportError(bad("budget.value", f"is {value!r}, not a quant name"))
        if kind == "split" and not (isinstance(value, dict) and all(_is_positive(value.get(k))
                                                                   for k in ("gpu_gib", "ram_gib"))):
            raise ReportError(bad("budget.value", f"is {value!r}, not an object of positive gpu_gib and ram_gib"))
        if kind not in ("size_of", "split") and not _is_positive(value):
            raise ReportError(bad("budget.value", f"is {value!r}, not a positive number"))
        if not _is_count(nbytes) or nbytes == 0:
            raise ReportError(bad("budget.bytes", f"is {nbytes!r}, not a positive byte count"))
        split = budget.get("split")
        if split is not None and not (isinstance(split, dict) and split and all(
                isinstance(k, str) and _is_count(v) for k, v in split.items())):
            raise ReportError(bad("budget.split", f"is {split!r}, not null or an object of byte counts"))
        words = budget.get("describe")
        if words is not None and not (isinstance(words, str) and words):
            raise ReportError(bad("budget.describe", f"is {words!r}, not a non-empty string"))
        kld = get(predicted, "kld_mean", "predicted.")
        if not (_is_number(kld) and kld >= -KLD_TOLERANCE):
            raise ReportError(bad("predicted.kld_mean", f"is {kld!r}, not a non-negative number"))
        return cls(path, kind, value, words or describe_budget(kind, value, split), nbytes, float(kld))

    def size_limit(self, sizes: Mapping[str, int]) -> int:
        """The file size the budget allows, for the fit verdict: the GiB given (split: both parts),
        the named quant's file (sizes: the model's rows, quant -> file bytes), else the tensor
        bytes (a bpw or bytes budget counts tensors; the file's header must fit too: stricter)."""
        if self.kind == "gib":
            return int(self.value * 2**30)
        if self.kind == "split":
            return int((self.value["gpu_gib"] + self.value["ram_gib"]) * 2**30)
        if self.kind == "size_of" and self.value in sizes:
            return sizes[self.value]
        return self.budget_bytes


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive(v) -> bool:
    return _is_number(v) and v > 0


def describe_budget(kind: str, value, split: Mapping[str, int] | None = None) -> str:
    """The budget in words when the record does not say: what the allocator says of it
    (settings.Budget.describe: "the size of IQ2_KS", "12.5 GiB", ...; a `bytes` budget, which
    only records name: its bytes), with the split's bytes when the record gives them."""
    text = f"{value} bytes" if kind == "bytes" else Budget.of_kind(kind, value).describe()
    if split:
        text += " (split: " + ", ".join(f"{k} {v} bytes" for k, v in split.items()) + ")"
    return text


def _add_allocations(e: ModelEntry, rows: list[Row]) -> None:
    """Mark the model's auto recipes and read their allocation records into their rows."""
    sizes = {r.quant: r.size_bytes for r in rows}
    for row, q in zip(rows, [e.reference, *e.quants]):
        if q is not None and q.allocation:
            a = AllocationRecord.load(q.allocation, e.model, q.name)
            row.auto, row.budget, row.budget_bytes, row.predicted_kld = "yes", a.budget, a.budget_bytes, a.predicted_kld
            row.size_limit = a.size_limit(sizes)


def _add_benches(e: ModelEntry, rows: list[Row]) -> list[BenchRecord]:
    """Read the model's bench records into its rows (reference row first); returns them."""
    out = []
    for row, path in zip(rows, [e.reference_bench, *(q.bench for q in e.quants)]):
        if path:
            b = BenchRecord.load(path, row.model, row.quant)
            row.add_bench(b)
            out.append(b)
    return out


def load_rows(entries) -> tuple[list[Row], list[ModelInfo]]:
    """Read every model's records into summary rows (reference row first, then the quants in
    entry order, with their manifests and speeds) and what each model was measured against and
    benchmarked with (every bench record of the sweep must use the same bench settings)."""
    rows: list[Row] = []
    infos: list[ModelInfo] = []
    for e in parse_entries(entries):
        base = Record.load(e.base)
        ref = None if e.reference is None else (e.reference.name, e.reference.ftype, e.reference.imatrix)
        model_rows = make_rows(e.model, base, [(q.name, q.ftype, q.imatrix, Record.load(q.result))
                                               for q in e.quants], ref)
        # the reference row was measured by the baseline run; a reference quant was also made by quantize
        model_rows[0].eval_manifest = e.base_manifest
        if e.reference is not None:
            model_rows[0].quant_manifest = e.reference.quant_manifest
        for row, q in zip(model_rows[1:], e.quants):
            row.quant_manifest, row.eval_manifest = q.quant_manifest, q.eval_manifest
        _add_allocations(e, model_rows)
        rows += model_rows
        infos.append(ModelInfo.from_record(e.model, e.reference_name, base, _add_benches(e, model_rows)))
    check_same_bench([b for i in infos for b in i.benches])
    return rows, infos
