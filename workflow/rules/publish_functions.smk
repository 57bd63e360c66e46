# Inputs and params of the rules in publish.smk.
from quantsweep.gguf.reader import read_model
from quantsweep.publish import hub_token
from quantsweep.publish.model_keys import license_of

PUBLISH = SWEEP.publish


def get_publish_quant_names(wildcards):
    """The quants publish may read: those named, or every quant when the report's marks
    (pareto, gate) choose them."""
    return list(QUANTS) if PUBLISH.selectors() else PUBLISH.names()


def get_publish_quants(wildcards):
    return [
        path_of(rules.quantize.output.gguf, model=wildcards.model, quant=q)
        for q in get_publish_quant_names(wildcards)
    ]


def get_publish_input(wildcards):
    """What publish reads; a publish that cannot end in a publishable folder is refused here,
    when the DAG is built (before any job starts), not after the sweep."""
    if problem := publish_problem():
        raise WorkflowError(problem)
    inputs = {
        "summary": rules.report.output.csv,
        "quants": get_publish_quants(wildcards),
        "source": get_model(wildcards),
        "source_files": get_model_files(wildcards),
        "text": get_text("evaluation"),
        "perplexity": rules.engine_build.output.perplexity,
        "plots": [
            rules.report.output.kld,
            rules.report.output.lnppl,
            *([rules.report.output.speed] if BENCH else []),
            *([rules.report.output.layers] if ALLOC.active else []),
        ],
    }
    if SWEEP.imatrix.any:
        inputs["imatrix"] = path_of(
            rules.imatrix_remap.output.dat, model=wildcards.model
        )
        inputs["calibration"] = get_text("calibration")
    return inputs


def get_publish_folder(wildcards, output):
    """The folder publish writes whole (its fixed files are the rule's outputs)."""
    return os.path.dirname(output.sums)


def get_publish_args(wildcards, input):
    """The options naming the files and what the card calls them."""
    args = ["--plot=" + p for p in input.plots]
    if "imatrix" in input.keys():
        args += ["--imatrix", input.imatrix, "--calibration", input.calibration]
        args += ["--calibration-name", SWEEP.texts.name_of("calibration")]
    license = model_license(wildcards.model)
    return args + (["--model-license", license] if license else [])


def model_license(model):
    """What the sweep knows of a model's license beside its GGUF: the demo's is the project's (mit)."""
    return "mit" if SWEEP.models[model].source == "tiny" else ""


def publish_problem():
    """Why `snakemake publish` cannot end in a publishable folder, found when it starts (None:
    nothing known): no license for a model whose GGUF names none, upload without a token, an
    engine without llama-gguf-split."""
    if PUBLISH.upload and not hub_token():
        return "publish.upload: true needs a Hub token (HF_TOKEN, or `hf auth login` first)"
    if SWEEP.engine.source == "bin_dir" and not os.path.isfile(
        os.path.join(SWEEP.engine.bin_dir, "llama-gguf-split")
    ):
        return f"engine.bin_dir: {SWEEP.engine.bin_dir} has no llama-gguf-split (publish splits with it)"
    for model in MODELS:
        m = SWEEP.models[model]
        if (
            m.source == "gguf"
        ):  # a converted or generated model: checked when publish runs
            try:
                license_of(read_model(m.path).kv, PUBLISH, model_license(model), m.path)
            except QuantsweepError as e:
                return str(e)
    return None
