# The config, validated and built once into the sweep's settings (quantsweep.settings.Sweep);
# what several rule files share. A rule passes its step the settings it reads as one JSON
# (settings objects' to_json: only what differs from the defaults), files as options.
import json
import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from quantsweep import capacity as qcapacity
from quantsweep import config as qconfig
from quantsweep.allocator import sensitivity as qsensitivity
from quantsweep.errors import QuantsweepError
from quantsweep.fileio import write_text
from quantsweep.gguf.reader import shards
from quantsweep.hf import converter as qconverter
from quantsweep.hf.checkpoint import Checkpoint
from quantsweep.report.entries import REQUEST as REPORT_REQUEST
from quantsweep.settings.measure import PASSES, SOURCE

try:
    qconfig.check_structure(config)
    # `tiny: null` in a merged config drops the demo model
    qconfig.drop_null_models(config)
    # one line naming the key (snakemake's validate prints the whole schema), then its defaults
    qconfig.check_schema(config, qconfig.schema_path(workflow.basedir))
    validate(config, schema="../schemas/config.schema.yaml")
    SWEEP = qconfig.load(config, workflow.basedir)
except qconfig.ConfigError as e:
    raise WorkflowError(str(e))

MODELS = sorted(SWEEP.models)
# Every quant: `quants`, then one auto recipe per allocate budget (rules in allocate.smk).
QUANTS = {q.name: q for q in SWEEP.quants}
ALLOC = SWEEP.allocate
BENCH = SWEEP.bench.enabled
# What every perplexity/KLD run reads (the evaluations and the sensitivity runs alike).
EVAL_SETTINGS = SWEEP.eval.to_json(only=SWEEP.eval.MEASURE)


def one_of(names):
    """A wildcard regex matching exactly these names (escaped: `v3+r1` is a valid model name);
    one that matches nothing when there are none."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def pool_types_of(q):
    """The pool files a quant is assembled from (none: llama-quantize makes it)."""
    return qcapacity.pool_types(SWEEP, q)


POOL_TYPES = qcapacity.all_pool_types(SWEEP)


def written_model(model):
    """The GGUF the workflow writes for a model (converted or generated; None: a gguf source)."""
    m = SWEEP.models[model]
    if m.source == "hf":
        out = f"resources/models/{model}"
        return str(qconverter.model_file(out)) if os.path.isdir(out) else None
    return f"resources/models/{model}.gguf" if m.source == "tiny" else None


# The capacity plan (quantsweep.capacity): what every job reads, holds, writes and takes, from
# the models' headers (a checkpoint: its predicted conversion). Every job's resources come from
# it; a sweep that cannot fit `machine` stops here, in one line, before any job starts.
try:
    PLAN = qcapacity.plan_sweep(SWEEP, {m: written_model(m) for m in MODELS})
except QuantsweepError as e:
    raise WorkflowError(f"capacity plan: {e}")
if workflow.is_main_process:
    for note in SWEEP.notes:
        print(f"quantsweep: {note}", file=sys.stderr)
    if refused := qcapacity.refusal(PLAN, SWEEP):
        raise WorkflowError(refused)


onstart:
    # the plan the sweep started with, for people (plan.txt) and tools (plan.json)
    txt, js = qcapacity.jobs.plan_paths(".")
    # unchanged plan, untouched files: a rerun after a crash recomputes nothing that had finished
    write_text(txt, qcapacity.text(PLAN, SWEEP), keep_same=True)
    write_text(js, qcapacity.to_json(PLAN, SWEEP), keep_same=True)
    # what the report reads, for `quantsweep report --partial` while the sweep runs
    write_text(REPORT_REQUEST, report_request(), keep_same=True)


wildcard_constraints:
    model=one_of(MODELS),
    quant=one_of(QUANTS),
    imatrix_pass=one_of(PASSES),
    kind="calibration|evaluation",
    pool_imatrix="imatrix|noimatrix",
    ptype=one_of(POOL_TYPES),
    stype=one_of(ALLOC.ladder if ALLOC.active else []),
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


def get_engine_env():
    cuda = SWEEP.engine.cuda
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
    m = SWEEP.models[wildcards.model]
    if m.source == "gguf":
        return m.path
    if m.source == "hf":
        out = checkpoints.convert.get(model=wildcards.model).output.model
        return str(qconverter.model_file(out))
    return f"resources/models/{wildcards.model}.gguf"


def get_model_files(wildcards):
    """Every file of the model (all shards of a split one), so a changed shard reruns its jobs."""
    return [str(f) for f in shards(get_model(wildcards))]


_CHECKPOINTS = {}


def get_checkpoint(wildcards):
    """A model's Hugging Face checkpoint as its headers describe it, read once per workflow run
    (V3 has 163 safetensors headers; the convert rule's input and resources all ask)."""
    path = SWEEP.models[wildcards.model].path
    if path not in _CHECKPOINTS:
        _CHECKPOINTS[path] = Checkpoint.read(path)
    return _CHECKPOINTS[path]


def get_text(kind):
    path = getattr(SWEEP.texts, kind)
    return f"resources/text/{kind}.txt" if path == SWEEP.texts.BUILTIN else path


def get_auto_recipe(wildcards):
    return path_of(
        rules.allocate.output.recipe, model=wildcards.model, quant=wildcards.quant
    )


def get_type_args(wildcards):
    """`--recipe FILE` for a recipe quant, else `--ftype FTYPE` (check and quantize alike)."""
    q = QUANTS[wildcards.quant]
    if q.auto:
        return ["--recipe", get_auto_recipe(wildcards)]
    return ["--recipe", q.recipe] if q.recipe else ["--ftype", q.ftype]


def get_imatrix_arg(wildcards, input):
    return ["--imatrix", input.imatrix] if "imatrix" in input.keys() else []


def get_pool_paths(model, types, imatrix):
    """{type: pool file} of a model, made with the imatrix or without."""
    kind = "imatrix" if imatrix else "noimatrix"
    return {
        t: path_of(rules.pool.output.gguf, model=model, pool_imatrix=kind, ptype=t)
        for t in types
    }


def get_job_pools(wildcards):
    """The pool files a quantize job assembles its recipe from, or a sensitivity job its runs."""
    q = QUANTS.get(getattr(wildcards, "quant", ""))
    if hasattr(wildcards, "group") or q is None:
        return get_pool_paths(wildcards.model, ALLOC.types(), SWEEP.imatrix.any)
    return get_pool_paths(wildcards.model, pool_types_of(q), q.imatrix)


def get_pool_args(wildcards):
    """--pool TYPE=FILE for each pool file a quantize or sensitivity job reads."""
    return [
        a for t, f in get_job_pools(wildcards).items() for a in ("--pool", f"{t}={f}")
    ]
