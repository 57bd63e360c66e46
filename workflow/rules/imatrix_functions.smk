# Inputs and params of the rules in imatrix.smk.


def get_imatrix_model(wildcards):
    """What the passes run on: the model (imatrix.model: source), or that quant of the sweep,
    made first without an imatrix (a Q8_0 half the source's size, for a source too big for RAM).
    """
    if SWEEP.imatrix.model == SOURCE:
        return get_model(wildcards)
    return path_of(
        rules.quantize.output.gguf, model=wildcards.model, quant=SWEEP.imatrix.model
    )


def get_imatrix_model_files(wildcards):
    if SWEEP.imatrix.model == SOURCE:
        return get_model_files(wildcards)
    return [get_imatrix_model(wildcards)]


def get_imatrix_inputs(wildcards):
    """Collected passes plus any external imatrix files, merged by the remap rule."""
    passes = expand(
        rules.imatrix_collect.output.dat,
        model=wildcards.model,
        imatrix_pass=SWEEP.imatrix.passes,
    )
    return passes + list(SWEEP.imatrix.external)


def get_check_input(wildcards):
    q = QUANTS[wildcards.quant]
    if q.auto:
        return {"recipe": get_auto_recipe(wildcards)}
    return {"recipe": q.recipe} if q.recipe else {}
