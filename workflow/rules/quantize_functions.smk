# Inputs of the rule in quantize.smk.


def get_quantize_input(wildcards):
    """What a quantize job reads besides the model (a named input of its own: a Hugging Face
    model's file is known once it is converted, and until then Snakemake puts the convert
    checkpoint in the place of that input only, so `snakemake -n` still formats the job).
    """
    inputs = {
        "quantize": rules.engine_build.output.quantize,
        # no engine job starts before the run settings are checked (rule run_settings)
        "run_settings": ancient(rules.run_settings.output[0]),
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
