"""The pipeline's steps, one function each, as the workflow's rules run them (through the CLI)
and as a user can call them by hand: each composes the engine, the model's tensor table, the
imatrix tools and the planner, and returns what the step produced. Writing records and
manifests is the CLI's business, so a step here never decides where its record goes.

Data flows one way: engine -> model -> imatrix passes -> remap -> check -> quantize (or the
per-type pool, then assembly) -> evaluate (the report reads only the evaluation records); the
sensitivity runs and the allocator sit between the pool and quantize for auto recipes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import imatrix as imx
from .allocator import sensitivity as sens
from .allocator import solver as alloc
from .allocator import proxy
from .allocator.groups import layer_map, quantized_tensors, sensitivity_recipe
from .engine import run
from .engine.bench import sweep_bench
from .engine.build import installed_flags
from .errors import ImatrixError, PlanError, StepError
from .gguf.assemble import assemble, pieces
from .fileio import refuse_overwrite
from .gguf.reader import first_shard, read_model, read_table, shards, verify_complete
from .gguf.types import FTYPES
from .hf import converter
from .hf.checkpoint import Checkpoint
from .planner.plan import as_options, plan
from .planner.pool import assembly, check_pool, pool_recipe
from .planner.recipes import Recipe, Rule, load_recipe, recipe_or_ftype
from .settings import (AllocateSettings, BenchSettings, Budget, EngineSpec, EvalSettings, ImatrixSettings,
                       ModelSettings, RunSettings, check_steps)


def convert(checkpoint: Path, model: ModelSettings, spec: EngineSpec, cache: Path, out_dir: Path, name: str,
            python: str, log: Path | None) -> dict:
    """A Hugging Face checkpoint to out_dir/<name>.gguf (or its shards), at the model's outtype
    and split size: the checkpoint and the converter checked first, the converter's output read
    back before it is kept. Returns the record the manifest extends: the checkpoint's config and
    files, the converter, its Python."""
    ck = Checkpoint.read(checkpoint)
    outtype, split_max_size = model.outtype, model.split_max_size
    conv = converter.fetch(converter.ConverterSource.of(spec), cache, log)
    converter.check(ck, conv)
    py, versions = converter.find_python(python)
    run.note(log, f"converter {conv.source.kind} ({conv.script.name}) with {py}: {json.dumps(versions)}")
    files, cmds = converter.convert(ck, conv, out_dir, name, outtype, split_max_size, py, log)
    return {
        "model": str(files[0]),
        "files": [str(f) for f in files],
        "inputs": {"checkpoint": [str(p) for p in ck.files_to_hash()]},
        "outputs": [str(f) for f in files],
        "cmds": cmds,
        "provenance": {
            "checkpoint": {"path": str(ck.path), "architecture": ck.architecture, "quant_method": ck.quant_method,
                           "n_params": ck.n_params(), "bytes": ck.total_bytes(), "config": ck.config},
            "converter": conv.identity(),
            "converter_python": {"python": py, **versions},
            "outtype": outtype,
            "split_max_size": split_max_size,
        },
    }


def quant_spec(recipe: str | None, ftype: str | None) -> Recipe | str:
    """What a quant is made with: its recipe (loaded once), else its ftype."""
    return load_recipe(recipe) if recipe else str(ftype)


def quant_args(spec: Recipe | str) -> tuple[str, list[str]]:
    """(positional ftype, option flags) llama-quantize is given for a recipe or an ftype."""
    opts, _ = as_options(spec)
    return opts.ftype, opts.argv()


def matrices_per_entry(model: str | Path | None) -> dict[str, int]:
    """Matrices per imatrix entry (experts / heads of 3-D tensors) from a model's header."""
    if not model:
        return {}
    return {t.name: t.shape[2] for t in read_model(model).tensors if len(t.shape) > 2}


def check_run(bin_dir: Path, step: str, s: RunSettings) -> None:
    """A step's run settings against the flags the installed engine's tool lists in its --help
    (the workflow checks every step once, before any runs; this is for a step run by hand)."""
    if s.extra_args or s.gpu_layers:  # else nothing the engine's --help has a say on
        check_steps({step: s}, installed_flags(bin_dir))


def collect_imatrix(bin_dir: Path, model: Path, text: Path, output: Path, log: Path, mode: str,
                    s: ImatrixSettings, threads: int, timeout_s: float | None = None) -> dict:
    """One imatrix pass of the engine; returns its record."""
    check_run(bin_dir, "imatrix", s.run)
    return run.collect_imatrix(bin_dir, first_shard(model), text, output, log, mode, s, threads, timeout_s)


def remap_imatrix(inputs: list[str], model: str | Path, output: str | Path) -> tuple[imx.Imatrix, list[str]]:
    """Merge imatrix files (passes, external ones) and fit them to the model; returns the fitted
    imatrix (written to `output`) and one line per action taken."""
    refuse_overwrite(output, {"input": list(inputs), "--model": shards(model)})
    merged = imx.merge([imx.read_any(p) for p in inputs], [str(p) for p in inputs])
    fitted, actions = imx.remap(merged, read_model(model))
    imx.write_any(fitted, output, matrices_per_entry(model))
    return fitted, actions


@dataclass
class CheckReport:
    imatrix: str
    model: str
    ftype: str
    recipe: str | None
    tensors_quantized: int
    problems: list[imx.Problem]

    def text(self) -> str:
        verdict = "FAIL" if self.problems else "OK"
        lines = [f"{p.tensor:40s} {p.type:10s} {p.entry:40s} {p.problem}" for p in self.problems]
        return "\n".join([f"{verdict}: {self.imatrix} for {self.model} at {self.recipe or self.ftype}: "
                          f"{self.tensors_quantized} tensors quantized, {len(self.problems)} problem(s)",
                          *lines]) + "\n"

    def json(self) -> str:
        return json.dumps({"ftype": self.ftype, "recipe": self.recipe, "tensors_quantized": self.tensors_quantized,
                           "problems": [asdict(p) for p in self.problems]}, indent=1) + "\n"


def check_imatrix(bin_dir: Path, model: Path, imatrix: Path, ftype: str | None, recipe: str | None,
                  log: Path | None = None) -> CheckReport:
    """Pre-flight: the engine's --dry-run gives each tensor's type; the imatrix must have finite
    data of the right size for every tensor whose type needs it."""
    spec = quant_spec(recipe, ftype)
    ft, extra = quant_args(spec)
    table = read_model(model)
    im = imx.read_any(imatrix)
    plan(table, spec, has_imatrix=True)  # a recipe rule that matches no tensor is refused here
    types = run.dry_run(bin_dir, first_shard(model), ft, extra, log=log).types
    problems = imx.check(im, table, types, ft)
    return CheckReport(str(imatrix), str(model), ft, recipe or None, sum(1 for v in types.values() if v), problems)


def quantize(bin_dir: Path, model: Path, output: Path, log: Path, ftype: str | None, recipe: str | None,
             threads: int, imatrix: Path | None = None, timeout_s: float | None = None,
             pools: dict[str, Path] | None = None) -> dict:
    """llama-quantize, with the size the planner predicted kept beside what the engine reports
    and what the written file's header says. With pool files, a recipe is assembled from them
    instead when every tensor can come from one (else llama-quantize, and the record says why)."""
    refuse_overwrite(output, {"--model": shards(model), "--imatrix": imatrix, "--recipe": recipe,
                              "--pool": list((pools or {}).values())})
    spec = quant_spec(recipe, ftype)
    ft, extra = quant_args(spec)
    predicted = plan(read_model(model), spec, has_imatrix=bool(imatrix))  # refuses a rule matching nothing
    refused = None
    if pools and isinstance(spec, Recipe):
        try:
            return assemble_recipe(model, spec, pools, output, log, imatrix, Path(recipe))
        except PlanError as e:
            refused = str(e)
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"quantsweep: not assembled from the pool ({refused}); running llama-quantize\n")
    rec = run.quantize(bin_dir, first_shard(model), output, log, ft, threads, imatrix, extra, timeout_s)
    rec.update(predicted_bytes=predicted.total_bytes, tensor_bytes=read_table(output).total_bytes,
               file_bytes=output.stat().st_size, recipe=recipe or None, ftype=ft, built="llama-quantize")
    if refused:
        rec["pool_refused"] = refused
    return rec


def pool_quantize(bin_dir: Path, model: Path, typ: str, output: Path, log: Path, threads: int,
                  imatrix: Path | None = None, timeout_s: float | None = None) -> dict:
    """One pool file: the model with every tensor asked for `typ` (llama-quantize). The engine's
    logged types must equal the plan's, since assembly picks tensors by the plan."""
    refuse_overwrite(output, {"--model": shards(model), "--imatrix": imatrix})
    spec = pool_recipe(typ)
    ft, extra = quant_args(spec)
    predicted = plan(read_model(model), spec, has_imatrix=bool(imatrix), strict=False)
    rec = run.quantize(bin_dir, first_shard(model), output, log, ft, threads, imatrix, extra, timeout_s,
                       check_types=lambda types: check_pool(predicted, types))
    rec.update(type=typ, predicted_bytes=predicted.total_bytes, tensor_bytes=read_table(output).total_bytes,
               file_bytes=output.stat().st_size, by_type=predicted.by_type())
    return rec


def assemble_recipe(model: Path, recipe: Recipe, pools: dict[str, Path], output: Path, log: Path | None,
                    imatrix: Path | None, recipe_file: Path | None = None) -> dict:
    """A recipe's GGUF copied tensor by tensor out of pool files (planner.pool.assembly says which),
    the pools' metadata with the recipe's ftype and what made it: recipe, its hash, the pools."""
    t0 = time.monotonic()
    table = read_model(model)
    a = assembly(table, recipe, sorted(pools), has_imatrix=bool(imatrix))
    tables = {t: read_table(pools[t]) for t in a.pools_used()}
    for t, tab in tables.items():
        got, want = {x.name: x.type for x in tab.tensors}, a.pool_files[t]
        if got != want:
            bad = next(n for n in want if got.get(n) != want[n])
            raise StepError(f"pool file {pools[t]} does not hold what pool {t} plans ({bad}: {got.get(bad)} "
                            f"instead of {want[bad]}); rebuild it")
    by_pool = {t: pieces(tab) for t, tab in tables.items()}
    own = pieces(table) if None in a.sources.values() else {}
    sources = {n: (by_pool[t][n] if t is not None else own[n]) for n, t in a.sources.items()}
    template = tables[a.pools_used()[0]] if tables else table
    digest = hashlib.sha256(recipe_file.read_bytes()).hexdigest() if recipe_file else ""
    set_kv = {"general.file_type": FTYPES[recipe.base].id, "quantsweep.recipe": recipe.name,
              "quantsweep.recipe_sha256": digest, "quantsweep.pools": a.pools_used()}
    drop = [] if imatrix else [k for k in template.kv if k.startswith("quantize.imatrix.")]
    assemble(template, sources, output, set_kv, drop)
    out = verify_complete(output)
    planned = {p.name: p.type for p in a.plan.tensors}
    wrong = [x.name for x in out.tensors if x.type != planned[x.name]]
    if wrong:
        output.unlink()
        raise StepError(f"assembled {output} holds {wrong[0]} at a type its plan does not give")
    rec = {"built": "pool", "recipe": str(recipe_file) if recipe_file else recipe.name, "ftype": recipe.base,
           "pools": {t: str(pools[t]) for t in a.pools_used()}, "predicted_bytes": a.plan.total_bytes,
           "tensor_bytes": out.total_bytes, "file_bytes": output.stat().st_size,
           "imatrix": str(imatrix) if imatrix else None, "wall_s": round(time.monotonic() - t0, 3)}
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"quantsweep: assembled {output} from pools {', '.join(a.pools_used())} "
                    f"({out.total_bytes} tensor bytes, planned {a.plan.total_bytes})\n")
    return rec


def sensitivity_groups(model: Path, s: AllocateSettings, has_imatrix: bool) -> dict:
    """groups.json: the groups the sensitivity stage measures, each with its bytes per type."""
    return sens.groups_doc(read_model(model), s, has_imatrix)


def sensitivity_run(bin_dir: Path, model: Path, groups: Path, group: str | None, typ: str | None,
                    pools: dict[str, Path], kld_base: Path, log: Path, ev: EvalSettings, threads: int,
                    imatrix: Path | None, work: Path, timeout_s: float | None = None) -> dict:
    """One sensitivity run: the model with only `group` at `typ` (pins at theirs, the rest at the
    ladder's top; group None: the top run), assembled from the pool into `work`, its KLD against
    the reference's logits measured, and the assembled file removed (only the numbers are kept:
    for DeepSeek-V3 each such file is hundreds of GB)."""
    doc, s, _ = sens.load_groups(groups)
    recipe = sensitivity_recipe(sens.run_groups(doc), s, group, typ)
    return {**_measure(bin_dir, model, recipe, pools, kld_base, log, ev, threads, imatrix, work, timeout_s),
            "group": group, "type": typ, "top": s.top}


def _measure(bin_dir: Path, model: Path, recipe: Recipe, pools: dict[str, Path], kld_base: Path, log: Path,
             ev: EvalSettings, threads: int, imatrix: Path | None, work: Path, timeout_s: float | None) -> dict:
    """A recipe assembled into `work`, its KLD measured, the file removed; the eval record."""
    try:
        built = assemble_recipe(model, recipe, pools, work, log, imatrix)
        rec = evaluate_quant(bin_dir, work, kld_base, log, ev, threads, timeout_s)
    finally:
        work.unlink(missing_ok=True)
    return {**rec, "tensor_bytes": built["tensor_bytes"], "assemble_s": built["wall_s"],
            "rules": [[r.match, r.type] for r in recipe.rules]}


def context_run(bin_dir: Path, model: Path, sensitivity: Path, allocation: Path, group: str,
                pools: dict[str, Path], kld_base: Path, log: Path, ev: EvalSettings, threads: int,
                imatrix: Path | None, work: Path, timeout_s: float | None = None) -> dict:
    """The refinement's measurement: the allocated recipe with `group` one rung up (nothing to
    measure for a group at the top or pinned: the record says so)."""
    from .fileio import read_json_object

    table = read_json_object(sensitivity, "sensitivity table")
    choice = read_json_object(allocation, "allocation")["choice"]
    groups = {g.name: g for g in sens.options(table)}
    if group not in groups:
        raise PlanError(f"{sensitivity}: no group {group!r}")
    up = alloc.next_up(groups[group], choice[group])
    out = {"group": group, "type": choice[group], "raised": up.type if up else None, "allocation": str(allocation)}
    if up is None:
        return {**out, "kld_mean": None, "skipped": "at the top of its ladder (or pinned): nothing to raise"}
    s = sens.settings_from(table["settings"], f"{sensitivity}: settings")
    rules = tuple(Rule(g.match, up.type if name == group else choice[name]) for name, g in groups.items())
    recipe = Recipe(name=f"context-{group}", base=s.base, rules=rules)
    return {**_measure(bin_dir, model, recipe, pools, kld_base, log, ev, threads, imatrix, work, timeout_s), **out}


def size_of(model: Path, quant: str, imatrix: bool) -> int:
    """The planned tensor bytes of a quant (an ftype name or a recipe file): a size_of budget."""
    return plan(read_model(model), recipe_or_ftype(quant), has_imatrix=imatrix).total_bytes


def allocate(sensitivity: Path, budget: Budget, size_of_bytes: int | None, resolution: int,
             refine: tuple[Path, Path, list[Path]] | None = None) -> tuple[str, dict]:
    """One budget's recipe (YAML text, with a header saying the budget, the prediction and the
    sensitivity data it came from) and the prediction as the report reads it.

    refine: (the allocation JSON of the recipe being refined, its measured evaluation record, the
    context runs): the sensitivities are corrected by the measured in-recipe steps first
    (allocator.solver.refined_groups) and the prediction is anchored at the measured KLD."""
    from .fileio import read_json_object

    table = read_json_object(sensitivity, "sensitivity table")
    groups = sens.options(table)
    s = sens.settings_from(table["settings"], f"{sensitivity}: settings")
    if refine is not None:
        groups, anchor, note = _refined(groups, *refine)
    a, info = alloc.allocate_budget(table, budget, groups, size_of_bytes, resolution)
    p = info["predicted"]
    if refine is not None:
        p["kld_mean"] = anchor["measured"] + a.kld - anchor["sum_increase"]
        info["refined_from"] = {**anchor, "shifts": note[1]}
        p["sum_increase"] = a.kld
    how = (f"top run {p['top_kld']:.6g} + {p['sum_increase']:.6g} from the groups, additive model" if refine is None
           else f"measured {anchor['measured']:.6g} of {refine[0]} {a.kld - anchor['sum_increase']:+.6g} from the "
                f"groups it changes, {note[0]}")
    header = [f"auto recipe for budget {budget.name}: {budget.describe()} = {info['budget']['bytes']} tensor bytes",
              f"predicted: {p['tensor_bytes']} tensor bytes, mean KLD {p['kld_mean']:.6g} ({how})",
              f"from the sensitivity table {sensitivity} (ladder {', '.join(s.ladder)}; "
              f"{len(groups)} groups)", "written by quantsweep allocate; edits are overwritten when it reruns"]
    text = a.to_yaml(groups, budget.name, s.base, header)
    info.update(quant=budget.name, sensitivity=str(sensitivity), source=table.get("sensitivity", "measured"),
                layers=layer_map(table["groups"], info["choice"], s.types()))
    return text, info


def _refined(groups: list[alloc.Group], allocation: Path, measured: Path,
             runs: list[Path]) -> tuple[list[alloc.Group], dict, list]:
    """Groups corrected by the context runs of `allocation`, and the anchor of the prediction:
    the measured KLD of the recipe being refined and its corrected sum of increases."""
    from .fileio import read_json_object

    prev = read_json_object(allocation, "allocation")
    kld = read_json_object(measured, "evaluation").get("kld_mean")
    if not isinstance(kld, (int, float)):
        raise PlanError(f"{measured}: kld_mean is {kld!r}: the recipe being refined has no measured KLD")
    context = {}
    for path in runs:
        rec = read_json_object(path, "context run")
        if rec.get("allocation") and Path(rec["allocation"]) != Path(allocation):
            raise PlanError(f"{path}: measured for {rec['allocation']}, not {allocation}")
        if rec.get("raised") is not None:
            context[rec["group"]] = float(rec["kld_mean"])
    fixed, shifts = alloc.refined_groups(groups, prev["choice"], float(kld), context)
    by = {g.name: g for g in fixed}
    anchor_sum = sum(next(o.kld for o in by[n].options if o.type == t) for n, t in prev["choice"].items())
    return fixed, {"allocation": str(allocation), "measured": float(kld), "sum_increase": anchor_sum,
                   "context_runs": len(context)}, [f"refined by {len(context)} in-recipe runs", shifts]


def evaluate_base(bin_dir: Path, model: Path, text: Path, kld_base: Path, log: Path, ev: EvalSettings,
                  threads: int, timeout_s: float | None = None) -> dict:
    """PPL of the reference, writing the KLD base logits; returns the evaluation record."""
    check_run(bin_dir, "eval", ev.run)
    return run.perplexity_base(bin_dir, first_shard(model), text, kld_base, log, ev, threads, timeout_s)


def evaluate_quant(bin_dir: Path, model: Path, kld_base: Path, log: Path, ev: EvalSettings, threads: int,
                   timeout_s: float | None = None) -> dict:
    """PPL + KLD of a quant against the base logits; returns the evaluation record."""
    check_run(bin_dir, "eval", ev.run)
    return run.perplexity_kld(bin_dir, first_shard(model), kld_base, log, ev, threads, timeout_s)


def bench(bin_dir: Path, model: Path, log: Path, b: BenchSettings, threads: int,
          timeout_s: float | None = None) -> dict:
    """Speed of a model (a quant or the reference): llama-sweep-bench, repeated; its record."""
    check_run(bin_dir, "bench", b.run)
    return sweep_bench(bin_dir, first_shard(model), log, b, threads, timeout_s)


def require_clean(report: CheckReport) -> None:
    """ImatrixError when the pre-flight check found problems (the table is in the report)."""
    if report.problems:
        raise ImatrixError(f"imatrix check of {report.imatrix} failed: {len(report.problems)} problem(s) for "
                           f"{report.recipe or report.ftype}; first: {imx.describe(report.problems)}")


def quant_errors(bin_dir: Path, model: Path, pools: dict[str, Path], imatrix: Path | None, top: str, rows: int,
                 log: Path | None = None) -> dict:
    """The within-class proxy (allocator.proxy): every quantized tensor's imatrix-weighted
    quantization error at each pool file's type, from sampled rows the engine dequantizes."""
    table = read_model(model)
    names, by_name = quantized_tensors(table, top), table.by_name()
    shapes = [proxy.TensorShape(n, *(list(by_name[n].shape) + [1, 1])[:3]) for n in names]
    means = {}
    if imatrix is not None:
        im = imx.read_any(imatrix)
        means = {n: im.entries[n].means for n in names if n in im.entries}
    files = {"source": model, **pools}
    errors = proxy.tensor_errors(shapes, list(pools), lambda key, wanted: run.dequant_rows(bin_dir, files[key], wanted,
                                                                                           log), means, rows)
    return {"version": 1, "model": str(model), "rows": rows, "types": list(pools),
            "imatrix": str(imatrix or ""), "tensors": errors}
