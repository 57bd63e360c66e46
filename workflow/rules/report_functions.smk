# Inputs, outputs and params of the rule in report.smk.
from quantsweep.report import measured_so_far, record_paths, sweep_entries, to_json_data
from quantsweep.report.entries import PARTIAL_DIR


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
    if ALLOC.active:
        paths["allocation"] = rules.allocate.output.json
    references = {m: SWEEP.reference_of(m) for m in MODELS}
    return sweep_entries(MODELS, references, list(QUANTS.values()), paths)


def get_summary_input(wildcards):
    return record_paths(get_summary_entries(wildcards))


def get_summary_entries_json(wildcards):
    return json.dumps(to_json_data(get_summary_entries(wildcards)), sort_keys=True)


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


def get_layers_plot_output():
    """The auto recipes' heat map of types by layer and class, when the sweep allocates."""
    if not ALLOC.active:
        return {}
    return {
        "layers": report(
            "results/report/allocation_layers.png",
            caption="../report/allocation_layers.rst",
            category="Plots",
            labels={"plot": "allocated types by layer and tensor class"},
        )
    }


def get_layers_plot_arg(wildcards, output):
    return ["--plot-layers", output.layers] if ALLOC.active else []


def report_notes():
    """The lines the report shows under "Sweep notes": what the settings decided that no record
    says (an optional budget skipped, the quant the imatrix was computed on)."""
    notes = list(SWEEP.notes)
    if SWEEP.imatrix.enabled and SWEEP.imatrix.model != SOURCE:
        notes.append(
            f"imatrix: computed on {SWEEP.imatrix.model} (imatrix.model), not the unquantized model"
        )
    return notes


def get_report_notes():
    """--note per line of report_notes()."""
    return [a for n in report_notes() for a in ("--note", n)]


def report_request():
    """What the report reads, written when the sweep starts (quantsweep.report.entries.REQUEST):
    `quantsweep report --partial` makes the report of what is measured so far from it.
    """
    doc = {
        "entries": to_json_data(get_summary_entries(None)),
        "settings": json.loads(SWEEP.gate.to_json()),
        "notes": report_notes(),
        "bench": BENCH,
        "allocate": ALLOC.active,
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def get_partial_report_input(wildcards):
    """Only the records that exist: the partial report never makes the sweep run."""
    entries, _ = measured_so_far(get_summary_entries(wildcards))
    return record_paths(entries)


def get_partial_report_output():
    """The final report's files (its manifest aside), under PARTIAL_DIR."""
    final = [f for f in get_final_output() if not f.endswith(".manifest.json")]
    return [str(PARTIAL_DIR / os.path.basename(f)) for f in final]
