include: "evaluate_functions.smk"


rule eval_baseline:
    input:
        model=get_model,
        model_files=get_model_files,
        quantize=rules.engine_build.output.quantize,
        perplexity=rules.engine_build.output.perplexity,
        run_settings=ancient(rules.run_settings.output[0]),
        text=get_text("evaluation"),
    output:
        kld_base="results/eval/{model}/baseline.kld",
        result="results/eval/{model}/baseline.json",
        manifest="results/eval/{model}/baseline.manifest.json",
    log:
        "logs/eval/{model}/baseline.log",
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_planned("eval_baseline"),
        disk_mb=disk_mb_planned("eval_baseline"),
        runtime=runtime_planned("eval_baseline"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
    params:
        bin_dir=get_bin_dir,
        settings=EVAL_SETTINGS,
    shell:
        "quantsweep eval base --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " --text {input.text:q} --kld-base {output.kld_base:q} --result {output.result:q}"
        " --log {log:q} --threads {threads} --manifest {output.manifest:q}"
        " --settings {params.settings:q} --timeout-min {resources.runtime}"


# eval.reference = <quant>: that quant's PPL run writes the KLD base logits (and baseline.json)
# instead of the unquantized model's; eval_quant then compares every other quant with it.
use rule eval_baseline as eval_reference with:
    input:
        model=get_reference_quant,
        model_files=get_reference_quant,
        quantize=rules.engine_build.output.quantize,
        perplexity=rules.engine_build.output.perplexity,
        run_settings=ancient(rules.run_settings.output[0]),
        text=get_text("evaluation"),
    log:
        "logs/eval_reference/{model}.log",
    wildcard_constraints:
        model=REFERENCE_QUANT_MODELS,
    resources:
        mem_mb=mem_mb_planned("eval_reference"),
        disk_mb=disk_mb_planned("eval_reference"),
        runtime=runtime_planned("eval_reference"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,


ruleorder: eval_reference > eval_baseline


rule eval_quant:
    input:
        model=rules.quantize.output.gguf,
        kld_base=rules.eval_baseline.output.kld_base,
        quantize=rules.engine_build.output.quantize,
        perplexity=rules.engine_build.output.perplexity,
        run_settings=ancient(rules.run_settings.output[0]),
    output:
        result="results/eval/{model}/{quant}.json",
        manifest="results/eval/{model}/{quant}.manifest.json",
    log:
        "logs/eval/{model}/{quant}.log",
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_planned("eval_quant"),
        disk_mb=disk_mb_planned("eval_quant"),
        runtime=runtime_planned("eval_quant"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
    params:
        bin_dir=get_bin_dir,
        settings=EVAL_SETTINGS,
    shell:
        "quantsweep eval kld --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " --kld-base {input.kld_base:q} --result {output.result:q}"
        " --log {log:q} --threads {threads} --manifest {output.manifest:q}"
        " --settings {params.settings:q} --timeout-min {resources.runtime}"
