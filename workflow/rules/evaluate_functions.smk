# Inputs and wildcard sets of the rules in evaluate.smk.
from quantsweep.settings import BASE_REFERENCE

# Models whose reference is a quant (rule eval_reference).
REFERENCE_QUANT_MODELS = one_of(
    m for m in MODELS if SWEEP.reference_of(m) != BASE_REFERENCE
)


def get_reference_quant(wildcards):
    """The quantized GGUF whose PPL run writes the KLD base logits (eval.reference)."""
    return path_of(
        rules.quantize.output.gguf,
        model=wildcards.model,
        quant=SWEEP.reference_of(wildcards.model),
    )
