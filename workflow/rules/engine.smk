include: "engine_functions.smk"


rule engine_build:
    output:
        **get_engine_tool_outputs(),
        meta="resources/engine/engine.json",
    log:
        "logs/engine_build.log",
    conda:
        get_engine_env()
    threads: threads_engine
    params:
        settings=SWEEP.engine.build_json(),
        cache_dir=SWEEP.engine.cache_dir,
        outdir=get_engine_outdir,
    shell:
        "quantsweep engine build --settings {params.settings:q} --cache-dir={params.cache_dir:q}"
        " --out {params.outdir:q} --log {log:q}"


# Every engine step's run settings against the flags the installed engine lists in its --help,
# once, before any engine job starts (every engine rule takes this file as input). As ancient():
# changing one step's settings reruns this check and that step (its own params), not every step.
rule run_settings:
    input:
        meta=rules.engine_build.output.meta,
    output:
        "resources/engine/run_settings.json",
    log:
        "logs/run_settings.log",
    localrule: True
    conda:
        "../../envs/quantsweep.yaml"
    params:
        settings=get_step_runs_json(),
    shell:
        "quantsweep engine check-run --engine {input.meta:q} --settings {params.settings:q}"
        " -o {output:q} > {log:q} 2>&1"
