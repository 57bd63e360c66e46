# Inputs and params of the rules in model.smk.
from quantsweep.settings import ConvertSettings

HF_MODELS = one_of(m for m in MODELS if SWEEP.models[m].source == "hf")


def get_tiny_settings(wildcards):
    """The tiny model's knobs (models.<name>: seed, layout, dead_channels) that differ from the
    defaults: an unchanged model keeps unchanged params (no rerun)."""
    return SWEEP.models[wildcards.model].tiny.to_json()


def get_checkpoint_files(wildcards):
    """Every file of the checkpoint the conversion reads: a changed one converts again."""
    return [str(p) for p in get_checkpoint(wildcards).files_to_hash()]


def get_checkpoint_dir(wildcards):
    return SWEEP.models[wildcards.model].path


def get_convert_settings(wildcards):
    """The model's outtype and split size, and which converter runs (not the engine's build
    flags: changing those must not convert a 1.3 TB checkpoint again)."""
    return ConvertSettings.of(SWEEP.models[wildcards.model], SWEEP.engine).to_json()
