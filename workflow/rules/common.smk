import json
import os
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from quantsweep import config as qconfig
from quantsweep import resources as qresources
from quantsweep.convert import converter as qconverter
from quantsweep.convert.checkpoint import Checkpoint
from quantsweep.gguf.reader import shards
from quantsweep.planner.pool import named_types
from quantsweep.planner.recipes import load_recipe
from quantsweep.report import record_paths, sweep_entries, to_json_data

try:
    qconfig.check_structure(config)
    validate(config, schema="../schemas/config.schema.yaml")
    config["quants"] = qconfig.resolve_recipe_paths(config["quants"], workflow.basedir)
    qconfig.check(config)
except qconfig.ConfigError as e:
    raise WorkflowError(str(e))

MODELS = sorted(config["models"])
# Every quant: `quants`, then one auto recipe per allocate budget (rules in allocate.smk).
QUANTS = {q.name: q for q in qconfig.sweep_quants(config)}
ALLOC, BUDGETS = qconfig.allocation(config)
ALLOCATE = bool(BUDGETS)
# Recipe quants are assembled from the per-type pool (allocate.pool); its types are what the
# recipes name, plus the ladder and pins when allocating.
POOL = config.get("allocate", {}).get("pool", True)
# What each model's KLD base logits come from: "base" (the unquantized model) or a quant name.
REFERENCES = {m: qconfig.reference_of(config, m) for m in MODELS}


def one_of(names):
    """A wildcard regex matching exactly these names (escaped: `v3+r1` is a valid model name);
    one that matches nothing when there are none."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


# Each engine step's run settings (run.<step> over run.defaults) and the steps the sweep runs.
RUN = qconfig.run_settings(config)
BENCH = qconfig.bench_enabled(config)
ENGINE_STEPS = qconfig.engine_steps(config)


# The auto quants the allocate rule writes, and their refined forms (rule refine, allocate.refine).
AUTO_QUANTS = one_of(q.name for q in QUANTS.values() if q.auto and not q.refines)
REFINED_QUANTS = one_of(q.name for q in QUANTS.values() if q.refines)


# Models whose reference is a quant (rule eval_reference).
REFERENCE_QUANT_MODELS = one_of(m for m in MODELS if REFERENCES[m] != "base")


def _pool_types_of(q):
    """The pool files a quant is assembled from (none: llama-quantize makes it)."""
    if not POOL:
        return []
    if q.auto:
        return ALLOC.types()
    return named_types(load_recipe(q.recipe)) if q.recipe else []


POOL_TYPES = sorted(
    {t for q in QUANTS.values() for t in _pool_types_of(q)}
    | set(ALLOC.types() if ALLOCATE else [])
)


wildcard_constraints:
    model=one_of(MODELS),
    quant=one_of(QUANTS),
    imatrix_pass="mla|std",
    kind="calibration|evaluation",
    pool_imatrix="imatrix|noimatrix",
    ptype=one_of(POOL_TYPES),
    stype=one_of(ALLOC.ladder if ALLOCATE else []),
    group="[A-Za-z0-9_.+-]+",


def path_of(pattern, **wildcards):
    """The one path a rule's output pattern gives for these wildcard values."""
    (path,) = expand(pattern, **wildcards)
    return path


def get_final_output():
    return [
        "results/report/summary.csv",
        "results/report/summary.md",
        "results/report/summary.html",
        "results/report/size_vs_lnppl.png",
        "results/report/size_vs_kld.png",
        "results/report/summary.manifest.json",
    ] + (["results/report/kld_vs_speed.png"] if BENCH else [])


def get_engine_tool_outputs():
    """The engine tools the sweep runs (llama-sweep-bench only with bench.enabled, so a prebuilt
    engine.source: bin_dir without it still works for a sweep without speed)."""
    tools = {
        "imatrix": "llama-imatrix",
        "quantize": "llama-quantize",
        "perplexity": "llama-perplexity",
    }
    if BENCH:
        tools["sweep_bench"] = "llama-sweep-bench"
    return {k: f"resources/engine/bin/{t}" for k, t in tools.items()}


def get_run_section_json(wildcards):
    return json.dumps(config.get("run") or {}, sort_keys=True)


def get_run_json(step):
    """A step's --run: only the settings that differ from the defaults ({} without a `run:`
    section); a change reruns that step and what depends on it, not the other steps."""

    def run_json(wildcards):
        return json.dumps(RUN[step].changed(), sort_keys=True)

    return run_json


def get_engine_spec(wildcards):
    """The engine section as JSON for `quantsweep engine build` (cache_dir travels apart; the
    converter keys are the convert rule's)."""
    spec = {
        k: v
        for k, v in config["engine"].items()
        if k != "cache_dir" and not k.startswith("converter")
    }
    return json.dumps(spec, sort_keys=True)


def get_engine_env():
    cuda = config["engine"].get("cuda", False)
    return "../../envs/engine-cuda.yaml" if cuda else "../../envs/engine-cpu.yaml"


def get_bin_dir(wildcards):
    """Where engine_build puts the tools (each engine rule has one of them as input). Not read
    from `input`: a job waiting for the convert checkpoint has its params evaluated with an
    input that is only the checkpoint's output."""
    return os.path.dirname(rules.engine_build.output.quantize)


def get_model(wildcards):
    """The model file the engine is given (shard 1 of a split model). A Hugging Face
    checkpoint's is known once it is converted (checkpoint convert: how many shards the
    converter writes is its own decision)."""
    m = config["models"][wildcards.model]
    if m.get("source", "tiny") == "gguf":
        return m["path"]
    if m.get("source", "tiny") == "hf":
        out = checkpoints.convert.get(model=wildcards.model).output.model
        return str(qconverter.model_file(out))
    return f"resources/models/{wildcards.model}.gguf"


HF_MODELS = one_of(m for m in MODELS if config["models"][m].get("source") == "hf")


_CHECKPOINTS = {}


def _checkpoint(wildcards):
    """A model's checkpoint as its headers describe it, read once per workflow run (V3 has 163
    safetensors headers; the input and resource functions all ask)."""
    path = config["models"][wildcards.model]["path"]
    if path not in _CHECKPOINTS:
        _CHECKPOINTS[path] = Checkpoint.read(path)
    return _CHECKPOINTS[path]


def get_checkpoint_files(wildcards):
    """Every file of the checkpoint the conversion reads: a changed one converts again."""
    return [str(p) for p in _checkpoint(wildcards).files_to_hash()]


def get_convert_args(wildcards):
    """The checkpoint and what to make of it (models.<name>: path, outtype, split_max_size)."""
    m = config["models"][wildcards.model]
    split = f"--split-max-size={m['split_max_size']}"
    return ["--checkpoint", m["path"], "--outtype", m["outtype"], split]


def get_converter_spec(wildcards):
    """The engine keys that say which converter runs (not the build flags: changing those must
    not convert a 1.3 TB checkpoint again)."""
    keep = ("converter", "converter_pypi_package", "converter_pypi_version")
    keep += ("converter_pypi_sha256", "source", "path")
    if config["engine"]["converter"] == "ik":
        keep += ("pypi_package", "pypi_version", "pypi_sha256")
    return json.dumps({k: config["engine"][k] for k in keep}, sort_keys=True)


def get_model_files(wildcards):
    """Every file of the model (all shards of a split one), so a changed shard reruns its jobs."""
    return [str(f) for f in shards(get_model(wildcards))]


def get_text(kind):
    path = config["texts"][kind]
    return f"resources/text/{kind}.txt" if path == "builtin" else path


def get_imatrix_inputs(wildcards):
    """Collected passes plus any external imatrix files, merged by the remap rule."""
    passes = expand(
        rules.imatrix_collect.output.dat,
        model=wildcards.model,
        imatrix_pass=config["imatrix"]["passes"],
    )
    return passes + list(config["imatrix"]["external"])


def get_auto_recipe(wildcards):
    return path_of(
        rules.allocate.output.recipe, model=wildcards.model, quant=wildcards.quant
    )


def _pool_paths(model, types, imatrix):
    """{type: pool file} of a model, made with the imatrix or without."""
    kind = "imatrix" if imatrix else "noimatrix"
    return {
        t: path_of(rules.pool.output.gguf, model=model, pool_imatrix=kind, ptype=t)
        for t in types
    }


def get_quant_pools(wildcards):
    q = QUANTS[wildcards.quant]
    return _pool_paths(wildcards.model, _pool_types_of(q), q.imatrix)


def get_sensitivity_pool_paths(wildcards):
    return _pool_paths(wildcards.model, ALLOC.types(), qconfig.has_imatrix(config))


def get_pool_args(wildcards):
    """--pool TYPE=FILE for each pool file a quantize or sensitivity job reads."""
    pools = (
        get_quant_pools(wildcards)
        if hasattr(wildcards, "quant")
        else get_sensitivity_pool_paths(wildcards)
    )
    return [a for t, f in pools.items() for a in ("--pool", f"{t}={f}")]


def get_pool_input(wildcards):
    if wildcards.pool_imatrix == "imatrix":
        return {
            "imatrix": path_of(rules.imatrix_remap.output.dat, model=wildcards.model)
        }
    return {}


def get_quantize_input(wildcards):
    inputs = {
        "quantize": rules.engine_build.output.quantize,
        # no engine job starts before the run settings are checked (rule run_settings)
        "run_settings": ancient(rules.run_settings.output[0]),
        "model": get_model(wildcards),
        "model_files": get_model_files(wildcards),
    }
    q = QUANTS[wildcards.quant]
    if q.imatrix:
        inputs["imatrix"] = path_of(
            rules.imatrix_remap.output.dat, model=wildcards.model
        )
        inputs["check"] = path_of(
            rules.imatrix_check.output.report,
            model=wildcards.model,
            quant=wildcards.quant,
        )
    if q.recipe or q.auto:
        inputs["recipe"] = get_auto_recipe(wildcards) if q.auto else q.recipe
    inputs["pools"] = list(get_quant_pools(wildcards).values())
    return inputs


def get_imatrix_arg(wildcards, input):
    return ["--imatrix", input.imatrix] if "imatrix" in input.keys() else []


def get_type_args(wildcards):
    """`--recipe FILE` for a recipe quant, else `--ftype FTYPE` (check and quantize alike)."""
    q = QUANTS[wildcards.quant]
    if q.auto:
        return ["--recipe", get_auto_recipe(wildcards)]
    return ["--recipe", q.recipe] if q.recipe else ["--ftype", q.ftype]


def get_check_input(wildcards):
    q = QUANTS[wildcards.quant]
    if q.auto:
        return {"recipe": get_auto_recipe(wildcards)}
    return {"recipe": q.recipe} if q.recipe else {}


def get_allocate_settings_json(wildcards):
    """The allocate section's sensitivity settings (not the budgets: a new budget reruns no run)."""
    keys = ("ladder", "groups", "pin", "experts")
    sec = config["allocate"]
    return json.dumps({k: sec[k] for k in keys if k in sec}, sort_keys=True)


def get_sensitivity_group_flags(wildcards):
    return [] if qconfig.has_imatrix(config) else ["--no-imatrix"]


def get_sensitivity_pools(wildcards):
    inputs = {"pools": list(get_sensitivity_pool_paths(wildcards).values())}
    if qconfig.has_imatrix(config):
        inputs["imatrix"] = path_of(
            rules.imatrix_remap.output.dat, model=wildcards.model
        )
    return inputs


def get_sensitivity_run_args(wildcards, input):
    """--group/--type of a run (none: the all-top run) and the pools' imatrix."""
    args = ["--imatrix", input.imatrix] if "imatrix" in input.keys() else []
    if hasattr(wildcards, "group"):
        args += ["--group", wildcards.group, "--type", wildcards.stype]
    return args


def _groups_doc(model):
    """A model's groups.json (known once the groups step ran: a checkpoint)."""
    groups = checkpoints.sensitivity_groups.get(model=model).output[0]
    with open(groups, encoding="utf-8") as f:
        return json.load(f)


def get_sensitivity_runs(wildcards):
    """Every run groups.json lists."""
    runs = _groups_doc(wildcards.model)["runs"]
    return [
        path_of(
            rules.sensitivity_run.output.result, model=wildcards.model, group=g, stype=t
        )
        for g, t in runs
    ]


def get_allocate_input(wildcards):
    """A size_of budget naming a recipe quant reads that recipe."""
    b = QUANTS[wildcards.quant].budget
    ref = QUANTS.get(b.size_of) if b.size_of else None
    return {"size_of": ref.recipe} if ref is not None and ref.recipe else {}


def get_refined_allocation(wildcards):
    """The allocation a refined quant corrects (its unrefined auto quant's)."""
    base = QUANTS[wildcards.quant].refines
    return path_of(rules.allocate.output.json, model=wildcards.model, quant=base)


def get_refined_measurement(wildcards):
    base = QUANTS[wildcards.quant].refines
    return path_of(rules.eval_quant.output.result, model=wildcards.model, quant=base)


def get_context_runs(wildcards):
    """One context run per group of the model."""
    names = [g["name"] for g in _groups_doc(wildcards.model)["groups"]]
    base = QUANTS[wildcards.quant].refines
    return [
        path_of(
            rules.sensitivity_context.output.result,
            model=wildcards.model,
            quant=base,
            group=g,
        )
        for g in names
    ]


def get_refine_args(wildcards, input):
    """A refined quant's allocate flags: the allocation it corrects and its measurements."""
    if not QUANTS[wildcards.quant].refines:
        return []
    flags = ["--refine", input.allocation, "--measured", input.measured]
    return flags + ["--context"] + list(input.context)


def get_budget_args(wildcards):
    b = QUANTS[wildcards.quant].budget
    if b.split:
        return ["--gpu-gib", str(b.gpu_gib), "--ram-gib", str(b.ram_gib)]
    if b.size_of:
        ref = QUANTS[b.size_of]
        flags = [] if ref.imatrix else ["--size-of-no-imatrix"]
        return [
            "--size-of",
            ref.recipe or ref.ftype,
            "--size-of-name",
            ref.name,
        ] + flags
    return ["--gib", str(b.gib)] if b.gib is not None else ["--bpw", str(b.bpw)]


def get_summary_entries(wildcards):
    """What the report reads (quantsweep.report.entries): per model, its reference ("base" or
    the reference quant, whose PPL run wrote the base logits and baseline.json) and every
    other quant's evaluation record; paths from the rules that write them."""
    paths = {
        "eval": rules.eval_quant.output.result,
        "eval_manifest": rules.eval_quant.output.manifest,
        "quant_manifest": rules.quantize.output.manifest,
        "base": rules.eval_baseline.output.result,
        "base_manifest": rules.eval_baseline.output.manifest,
    }
    if BENCH:
        paths["bench"] = rules.bench_quant.output.result
        paths["base_bench"] = rules.bench_base.output.result
    if ALLOCATE:
        paths["allocation"] = rules.allocate.output.json
    return sweep_entries(MODELS, REFERENCES, list(QUANTS.values()), paths)


def get_reference_quant(wildcards):
    """The quantized GGUF whose PPL run writes the KLD base logits (eval.reference)."""
    return path_of(
        rules.quantize.output.gguf,
        model=wildcards.model,
        quant=REFERENCES[wildcards.model],
    )


def get_gate_json(wildcards):
    return json.dumps(config["gate"], sort_keys=True)


def get_summary_input(wildcards):
    return record_paths(get_summary_entries(wildcards))


def get_speed_plot_output():
    """The KLD-vs-speed plot, with bench.enabled only."""
    if not BENCH:
        return {}
    return {
        "speed": report(
            "results/report/kld_vs_speed.png",
            caption="../report/kld_vs_speed.rst",
            category="Plots",
            labels={"plot": "mean KLD vs generation speed"},
        )
    }


def get_speed_plot_arg(wildcards, output):
    return ["--plot-speed", output.speed] if BENCH else []


# ---- resources: named functions; sizes come from the model's GGUF header (quantsweep.resources)


def _model_size(wildcards):
    return qresources.model_size(get_model(wildcards))


def _given_cores():
    """Every core Snakemake was given (--cores); a cluster run has none: 8 then, which
    profiles/slurm's set-threads overrides per rule."""
    try:
        return workflow.cores
    except WorkflowError:
        return 8


def threads_bench(wildcards):
    """A benchmark job holds every core, so no other job runs beside it on this machine (its
    engine still runs threads_engine threads); on SLURM it asks for the node (--exclusive).
    """
    return _given_cores()


def threads_engine(wildcards):
    """resources.threads, else every core Snakemake was given."""
    n = config["resources"]["threads"]
    return n if n > 0 else _given_cores()


def gpu_engine(wildcards):
    """GPUs an imatrix/perplexity job asks for (gpu=N): resources.gpus, else 1 for a CUDA engine."""
    n = config["resources"]["gpus"]
    return n if n is not None else (1 if config["engine"]["cuda"] else 0)


def threads_convert(wildcards):
    """The converter is one Python process; torch's FP8 dequantization uses a few threads."""
    n = config["resources"]["threads"]
    return min(n if n > 0 else _given_cores(), 8)


def mem_mb_convert(wildcards, attempt):
    """One merged expert stack in float32 plus its converted copy (checkpoint's config)."""
    return qresources.mem_mb_convert(_checkpoint(wildcards), attempt)


def disk_mb_convert(wildcards, attempt):
    m = config["models"][wildcards.model]
    return qresources.disk_mb_convert(_checkpoint(wildcards), m["outtype"], attempt)


def runtime_convert(wildcards, attempt):
    m = config["models"][wildcards.model]
    return qresources.runtime_min_convert(_checkpoint(wildcards), m["outtype"], attempt)


def mem_mb_engine(wildcards, attempt):
    """imatrix / perplexity hold the whole model: its size plus buffers, more on each retry."""
    return qresources.mem_mb_resident(_model_size(wildcards), attempt)


def mem_mb_quantize(wildcards, attempt):
    """quantize streams the model: the largest tensor as f32 a few times over."""
    return qresources.mem_mb_quantize(_model_size(wildcards), attempt)


def disk_mb_quantize(wildcards, attempt):
    """An auto recipe is not written yet: its top ftype's size bounds it."""
    q = QUANTS[wildcards.quant]
    size = qresources.predicted_bytes(
        get_model(wildcards), q.recipe or q.ftype, q.imatrix
    )
    return qresources.disk_mb_quantize(size, attempt)


def disk_mb_pool(wildcards, attempt):
    size = qresources.predicted_pool_bytes(get_model(wildcards), wildcards.ptype)
    return qresources.disk_mb_quantize(size, attempt)


def mem_mb_sensitivity(wildcards, attempt):
    """A run holds its assembled model, at most the ladder's top everywhere (not the source)."""
    m = _model_size(wildcards)
    top = qresources.predicted_pool_bytes(get_model(wildcards), ALLOC.top)
    return qresources.mem_mb_resident(
        qresources.ModelSize(top, m.largest_elements, m.imatrix_values, m.n_vocab),
        attempt,
    )


def disk_mb_sensitivity(wildcards, attempt):
    """The run's assembled model (removed after it is measured): at most the top's size."""
    size = qresources.predicted_pool_bytes(get_model(wildcards), ALLOC.top)
    return qresources.disk_mb_quantize(size, attempt)


def disk_mb_imatrix(wildcards, attempt):
    return qresources.disk_mb_imatrix(_model_size(wildcards), attempt)


def disk_mb_eval(wildcards, attempt):
    """The KLD base logits (written by the baseline, read by every quant's run)."""
    ev = config["eval"]
    return qresources.disk_mb_kld_base(
        _model_size(wildcards), ev["ctx"], ev["chunks"], attempt
    )


def runtime_imatrix(wildcards, attempt):
    tokens = config["imatrix"]["ctx"] * config["imatrix"]["chunks"]
    return qresources.runtime_min(_model_size(wildcards), tokens, attempt)


def runtime_eval(wildcards, attempt):
    tokens = config["eval"]["ctx"] * config["eval"]["chunks"]
    return qresources.runtime_min(_model_size(wildcards), tokens, attempt)


def runtime_bench(wildcards, attempt):
    """Each run fills the context twice over (PP windows, then TG at each depth), `repeats` times."""
    b = qconfig.bench_settings(config, RUN["bench"], threads=1)
    return qresources.runtime_min(
        _model_size(wildcards), b.ctx * 2 * b.repeats, attempt
    )


def runtime_quantize(wildcards, attempt):
    return qresources.runtime_min(_model_size(wildcards), 0, attempt)


def get_eval_args(wildcards):
    ev = config["eval"]
    return [
        "--ctx",
        str(ev["ctx"]),
        "--chunks",
        str(ev["chunks"]),
        "--mla",
        str(ev["mla"]),
        "--fa",
        ev["fa"],
        "--run",
        get_run_json("eval")(wildcards),
    ]


def get_bench_args(wildcards):
    b = config["bench"]
    return [
        "--depths",
        ",".join(str(d) for d in b["depths"]),
        "--tg",
        str(b["tg"]),
        "--repeats",
        str(b["repeats"]),
        "--mla",
        str(b["mla"]),
        "--fa",
        b["fa"],
        "--run",
        get_run_json("bench")(wildcards),
    ]


def get_tiny_model_args(wildcards):
    """quantsweep tiny-model options of a source: tiny model (split_kv_b: the older
    spelling of layout ik). Only options that differ from the defaults, so an unchanged
    model keeps unchanged params (no rerun)."""
    m = config["models"][wildcards.model]
    layout = "ik" if m.get("split_kv_b") else m.get("layout", "kv_b")
    args = ["--seed", str(m["seed"])]
    if layout == "ik":
        args.append("--split-kv-b")
    elif layout != "kv_b":
        args += ["--layout", layout]
    if m.get("dead_channels"):
        args += ["--dead-channels", str(m["dead_channels"])]
    return args


def get_engine_outdir(wildcards, output):
    return os.path.dirname(output.meta)


def get_summary_entries_json(wildcards):
    return json.dumps(to_json_data(get_summary_entries(wildcards)), sort_keys=True)
