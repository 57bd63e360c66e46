# Inputs and params of the rules in imatrix.smk.


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
