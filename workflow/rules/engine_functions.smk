# Inputs and params of the rules in engine.smk.


def get_engine_tool_outputs():
    """The engine tools the sweep runs (settings.tools: those every sweep needs and each
    running step's; llama-sweep-bench only with bench.enabled, so a prebuilt engine.source:
    bin_dir without it still works for a sweep without speed)."""
    return {t.output: f"resources/engine/bin/{t.name}" for t in SWEEP.tools()}


def get_engine_outdir(wildcards, output):
    return os.path.dirname(output.meta)


def get_step_runs_json():
    """The run settings of each engine step the sweep runs: what the run_settings rule checks."""
    runs = {step: r.changed() for step, r in SWEEP.step_runs().items()}
    return json.dumps(runs, sort_keys=True)
