# Inputs, outputs and params of the rule in report.smk.
from quantsweep.report import record_paths, sweep_entries, to_json_data


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


def get_report_notes():
    """--note per line the report shows under "Sweep notes": what the settings decided that no
    record says (an optional budget skipped, the quant the imatrix was computed on)."""
    notes = list(SWEEP.notes)
    if SWEEP.imatrix.enabled and SWEEP.imatrix.model != SOURCE:
        notes.append(
            f"imatrix: computed on {SWEEP.imatrix.model} (imatrix.model), not the unquantized model"
        )
    return [a for n in notes for a in ("--note", n)]
