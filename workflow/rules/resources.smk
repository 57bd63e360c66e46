# What each job asks the scheduler for: one function per thing sized, named after it. Every
# figure is the capacity plan's (quantsweep.capacity, built once in common.smk: from the file
# each job reads, with its run settings, KV cache and the throughput model) and grows on each
# retry (`attempt`); a site profile may still override any of them per rule.
from snakemake.exceptions import WorkflowError

from quantsweep import capacity as qcapacity


def _job(rule, wildcards):
    """The plan's job behind a rule's wildcards (one per model, quant, pass or pool file)."""
    return PLAN.job(rule, wildcards.model, qcapacity.item_of(dict(wildcards.items())))


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


def partition_gpu_job(wildcards):
    """slurm_partition of a GPU job: resources.gpu_partition (named once, for every GPU rule)."""
    return SWEEP.resources.partition(gpus_engine(wildcards) > 0) or None


def partition_cpu_job(wildcards):
    return SWEEP.resources.partition(False) or None


def disk_mb_header_only(wildcards):
    """A job that reads only the model's header (and small files) writes next to nothing; not
    Snakemake's default of twice its inputs (2.7 TB for DeepSeek-V3 at bf16)."""
    return 1024


def mem_mb_planned(rule):
    """mem_mb of a rule's jobs: the plan's RAM for the file each one reads."""
    return lambda wildcards, attempt: qcapacity.mem_mb(_job(rule, wildcards), attempt)


def disk_mb_planned(rule):
    """disk_mb: what the job writes (a quant's predicted size, the KLD base logits, ...)."""
    return lambda wildcards, attempt: qcapacity.disk_mb(_job(rule, wildcards), attempt)


def runtime_planned(rule):
    """runtime (minutes): the plan's estimate x machine.throughput.slack + 30 min."""
    rates = SWEEP.machine.throughput
    return lambda wildcards, attempt: qcapacity.runtime_min(
        _job(rule, wildcards), rates, attempt
    )


def _eval_job(model, quant):
    """A quant's evaluation job in the plan (the reference quant's is eval_reference)."""
    if SWEEP.reference_of(model) == quant:
        return PLAN.job("eval_reference", model)
    return PLAN.job("eval_quant", model, quant)


def _publish_jobs(wildcards):
    """The plan's quantize and eval jobs of the quants a publish may read."""
    quants = get_publish_quant_names(wildcards)
    return [PLAN.job("quantize", wildcards.model, q) for q in quants], [
        _eval_job(wildcards.model, q) for q in quants
    ]


def mem_mb_publish(wildcards, attempt):
    """The load check runs the engine on the largest quant: its evaluation's RAM."""
    _, evals = _publish_jobs(wildcards)
    return max(qcapacity.mem_mb(j, attempt) for j in evals)


def disk_mb_publish(wildcards, attempt):
    """Every quant it may publish, split, plus one joined copy for the merge check."""
    quants, _ = _publish_jobs(wildcards)
    sizes = [j.kept_bytes for j in quants]
    return (
        int((sum(sizes) + max(sizes)) * 1.05 / 2**20 * qcapacity.growth(attempt)) + 1024
    )


def runtime_publish(wildcards, attempt):
    """Splitting, joining and hashing each quant a few times, and two short PPL runs each."""
    quants, evals = _publish_jobs(wildcards)
    rates = SWEEP.machine.throughput
    seconds = sum(4 * j.kept_bytes / (rates.disk_mb_s * 1e6) for j in quants)
    seconds += sum(
        2 * j.seconds * PUBLISH.check_chunks / SWEEP.eval.chunks for j in evals
    )
    return int((30 + seconds * rates.slack / 60) * qcapacity.growth(attempt))
