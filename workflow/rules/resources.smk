# What each job asks the scheduler for: one function per thing sized, named after it. Sizes come
# from the model's GGUF header or the checkpoint's headers (quantsweep.sizing) and grow on each
# retry (`attempt`); a site profile may override any of them per rule.
from snakemake.exceptions import WorkflowError

from quantsweep import sizing as qsizing


def _model_size(wildcards):
    return qsizing.model_size(get_model(wildcards))


def _given_cores():
    """Every core Snakemake was given (--cores); a cluster run has none: 8 then, which
    profiles/slurm's set-threads overrides per rule."""
    try:
        return workflow.cores
    except WorkflowError:
        return 8


def threads_engine(wildcards):
    """An engine job's threads: resources.threads, else every core Snakemake was given."""
    n = SWEEP.resources.threads
    return n if n > 0 else _given_cores()


def threads_whole_machine(wildcards):
    """A benchmark holds every core, so no other job runs beside it on this machine (its engine
    still runs threads_engine threads); on SLURM it asks for the node (--exclusive)."""
    return _given_cores()


def threads_converter(wildcards):
    """The converter is one Python process; torch's FP8 dequantization uses a few threads."""
    return min(threads_engine(wildcards), 8)


def gpus_engine(wildcards):
    """GPUs an engine job asks for (gpu=N): resources.gpus, else 1 for a CUDA engine."""
    return SWEEP.resources.gpus_per_job(SWEEP.engine.cuda)


def mem_mb_converter(wildcards, attempt):
    """One merged expert stack in float32 plus its converted copy (checkpoint's config)."""
    return qsizing.mem_mb_convert(get_checkpoint(wildcards), attempt)


def disk_mb_converted_model(wildcards, attempt):
    outtype = SWEEP.models[wildcards.model].outtype
    return qsizing.disk_mb_convert(get_checkpoint(wildcards), outtype, attempt)


def runtime_conversion(wildcards, attempt):
    outtype = SWEEP.models[wildcards.model].outtype
    return qsizing.runtime_min_convert(get_checkpoint(wildcards), outtype, attempt)


def mem_mb_resident_model(wildcards, attempt):
    """imatrix / perplexity / sweep-bench hold the whole model: its size plus buffers."""
    return qsizing.mem_mb_resident(_model_size(wildcards), attempt)


def mem_mb_streamed_model(wildcards, attempt):
    """quantize streams the model: the largest tensor as f32 a few times over."""
    return qsizing.mem_mb_quantize(_model_size(wildcards), attempt)


def disk_mb_quant_file(wildcards, attempt):
    """A quant's file; an auto recipe is not written yet: its top ftype's size bounds it."""
    q = QUANTS[wildcards.quant]
    size = qsizing.predicted_bytes(get_model(wildcards), q.spec, q.imatrix)
    return qsizing.disk_mb_quantize(size, attempt)


def disk_mb_pool_file(wildcards, attempt):
    size = qsizing.predicted_pool_bytes(get_model(wildcards), wildcards.ptype)
    return qsizing.disk_mb_quantize(size, attempt)


def mem_mb_assembled_model(wildcards, attempt):
    """A sensitivity run holds its assembled model: at most the ladder's top everywhere."""
    m = _model_size(wildcards)
    top = qsizing.predicted_pool_bytes(get_model(wildcards), ALLOC.top)
    return qsizing.mem_mb_resident(
        qsizing.ModelSize(top, m.largest_elements, m.imatrix_values, m.n_vocab), attempt
    )


def disk_mb_assembled_model(wildcards, attempt):
    """A sensitivity run's assembled model (removed after it is measured): at most the top's size."""
    size = qsizing.predicted_pool_bytes(get_model(wildcards), ALLOC.top)
    return qsizing.disk_mb_quantize(size, attempt)


def disk_mb_imatrix_file(wildcards, attempt):
    return qsizing.disk_mb_imatrix(_model_size(wildcards), attempt)


def disk_mb_kld_base(wildcards, attempt):
    """The KLD base logits (written by the reference's run, read by every quant's)."""
    ev = SWEEP.eval
    return qsizing.disk_mb_kld_base(_model_size(wildcards), ev.ctx, ev.chunks, attempt)


def runtime_calibration(wildcards, attempt):
    """An imatrix pass: its calibration tokens through the model."""
    tokens = SWEEP.imatrix.ctx * SWEEP.imatrix.chunks
    return qsizing.runtime_min(_model_size(wildcards), tokens, attempt)


def runtime_evaluation(wildcards, attempt):
    """A perplexity/KLD run: its evaluation tokens through the model."""
    tokens = SWEEP.eval.ctx * SWEEP.eval.chunks
    return qsizing.runtime_min(_model_size(wildcards), tokens, attempt)


def runtime_benchmark(wildcards, attempt):
    """Each run fills the context twice over (PP windows, then TG at each depth), `repeats` times."""
    b = SWEEP.bench
    return qsizing.runtime_min(_model_size(wildcards), b.ctx * 2 * b.repeats, attempt)


def runtime_quantization(wildcards, attempt):
    return qsizing.runtime_min(_model_size(wildcards), 0, attempt)
