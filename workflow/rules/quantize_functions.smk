# Inputs of the rule in quantize.smk.


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
    inputs["pools"] = list(get_job_pools(wildcards).values())
    return inputs
