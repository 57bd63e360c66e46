import json
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from quantsweep import config as qconfig

validate(config, schema="../schemas/config.schema.yaml")
config["quants"] = qconfig.resolve_recipe_paths(config["quants"], workflow.basedir)
try:
    qconfig.check(config)
except qconfig.ConfigError as e:
    raise WorkflowError(str(e))

MODELS = sorted(config["models"])
QUANTS = {q.name: q for q in qconfig.parse_quants(config["quants"])}
# What each model's KLD base logits come from: "base" (the unquantized model) or a quant name.
REFERENCES = {m: qconfig.reference_of(config, m) for m in MODELS}
# Models whose reference is a quant (rule eval_reference); a regex that matches nothing if none.
REFERENCE_QUANT_MODELS = (
    "|".join(m for m in MODELS if REFERENCES[m] != "base") or "(?!)"
)


wildcard_constraints:
    model="|".join(MODELS),
    quant="|".join(QUANTS),
    imatrix_pass="mla|std",
    kind="calibration|evaluation",


def get_final_output():
    return [
        "results/report/summary.csv",
        "results/report/summary.md",
        "results/report/summary.html",
        "results/report/size_vs_lnppl.png",
        "results/report/size_vs_kld.png",
    ]


def get_engine_spec(wildcards):
    """The engine section as JSON for `quantsweep engine build` (cache_dir travels apart)."""
    spec = {k: v for k, v in config["engine"].items() if k != "cache_dir"}
    return json.dumps(spec, sort_keys=True)


def get_engine_env():
    cuda = config["engine"].get("cuda", False)
    return "../../envs/engine-cuda.yaml" if cuda else "../../envs/engine-cpu.yaml"


def get_bin_dir(wildcards, input):
    return os.path.dirname(input.quantize)


def get_model(wildcards):
    m = config["models"][wildcards.model]
    if m.get("source", "tiny") == "gguf":
        return m["path"]
    return f"resources/models/{wildcards.model}.gguf"


def get_text(kind):
    path = config["texts"][kind]
    return f"resources/text/{kind}.txt" if path == "builtin" else path


def get_imatrix_inputs(wildcards):
    """Collected passes plus any external imatrix files, merged by the remap rule."""
    passes = expand(
        "results/imatrix/{model}/{imatrix_pass}.dat",
        model=wildcards.model,
        imatrix_pass=config["imatrix"]["passes"],
    )
    return passes + list(config["imatrix"]["external"])


def get_quantize_input(wildcards):
    inputs = {
        "quantize": rules.engine_build.output.quantize,
        "model": get_model(wildcards),
    }
    if QUANTS[wildcards.quant].imatrix:
        inputs["imatrix"] = f"results/imatrix/{wildcards.model}/imatrix.dat"
        inputs["check"] = (
            f"results/imatrix/{wildcards.model}/check/{wildcards.quant}.txt"
        )
    return inputs


def get_imatrix_arg(wildcards, input):
    return ["--imatrix", input.imatrix] if "imatrix" in input.keys() else []


def get_type_args(wildcards):
    """`--recipe FILE` for a recipe quant, else `--ftype FTYPE` (quantize; check uses --type)."""
    q = QUANTS[wildcards.quant]
    return ["--recipe", q.recipe] if q.recipe else ["--ftype", q.ftype]


def get_check_input(wildcards):
    q = QUANTS[wildcards.quant]
    return {"recipe": q.recipe} if q.recipe else {}


def get_check_type_args(wildcards):
    q = QUANTS[wildcards.quant]
    return ["--recipe", q.recipe] if q.recipe else ["--type", q.ftype]


def _quant_entry(model, q):
    return {
        "name": q.name,
        "ftype": q.ftype,
        "imatrix": "yes" if q.imatrix else "no",
        "result": f"results/eval/{model}/{q.name}.json",
    }


def get_summary_entries(wildcards):
    """Per model: its reference ("base" or the reference quant, whose PPL run wrote the base
    logits and the baseline.json record) and every other quant's evaluation record."""
    entries = []
    for model in MODELS:
        ref = REFERENCES[model]
        entries.append(
            {
                "model": model,
                "reference": (
                    "base" if ref == "base" else _quant_entry(model, QUANTS[ref])
                ),
                "base": f"results/eval/{model}/baseline.json",
                "quants": [
                    _quant_entry(model, q) for q in QUANTS.values() if q.name != ref
                ],
            }
        )
    return entries


def get_reference_quant(wildcards):
    """The quantized GGUF whose PPL run writes the KLD base logits (eval.reference)."""
    ref = REFERENCES[wildcards.model]
    return f"results/quants/{wildcards.model}/{wildcards.model}-{ref}.gguf"


def get_gate_json(wildcards):
    return json.dumps(config["gate"], sort_keys=True)


def get_summary_input(wildcards):
    return [
        path
        for e in get_summary_entries(wildcards)
        for path in [e["base"], *(q["result"] for q in e["quants"])]
    ]


def mem_mb_model(wildcards, attempt):
    """Engine jobs hold the model in RAM: its size plus headroom, more on each retry."""
    path = get_model(wildcards)
    size_mb = os.path.getsize(path) // 2**20 if os.path.exists(path) else 1024
    return int((size_mb * 1.2 + 1024) * attempt)


def mem_mb_quantize(wildcards, attempt):
    """Quantize reads the source and holds one tensor's buffers: model size bounds it."""
    return mem_mb_model(wildcards, attempt)


def runtime_engine(wildcards, attempt):
    """Minutes: generous for the tiny demo, scaled by the model size (~1 min per GB)."""
    path = get_model(wildcards)
    size_gb = os.path.getsize(path) / 1e9 if os.path.exists(path) else 1.0
    return int((30 + size_gb) * attempt)


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
    ]


def get_tiny_model_args(wildcards):
    m = config["models"][wildcards.model]
    return ["--seed", str(m["seed"])] + (["--split-kv-b"] if m["split_kv_b"] else [])


def get_engine_outdir(wildcards, output):
    return os.path.dirname(output.meta)


def get_summary_entries_json(wildcards):
    return json.dumps(get_summary_entries(wildcards), sort_keys=True)
