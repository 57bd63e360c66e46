# Speed (bench.enabled): llama-sweep-bench on every quant and on the reference model. A bench job
# holds every core (threads_whole_machine), so no other job shares the machine while it measures.
rule bench_quant:
    input:
        model=rules.quantize.output.gguf,
        quantize=rules.engine_build.output.quantize,
        sweep_bench=rules.engine_build.output.sweep_bench,
        run_settings=ancient(rules.run_settings.output[0]),
    output:
        result="results/bench/{model}/{quant}.json",
        manifest="results/bench/{model}/{quant}.manifest.json",
    log:
        "logs/bench/{model}/{quant}.log",
    conda:
        get_engine_env()
    threads: threads_whole_machine
    resources:
        mem_mb=mem_mb_planned("bench_quant"),
        runtime=runtime_planned("bench_quant"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
    params:
        bin_dir=get_bin_dir,
        threads=threads_engine,
        settings=SWEEP.bench.to_json(only=SWEEP.bench.MEASURE),
    shell:
        "quantsweep bench --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " --result {output.result:q} --log {log:q} --threads {params.threads}"
        " --manifest {output.manifest:q} --settings {params.settings:q}"
        " --timeout-min {resources.runtime}"


# The unquantized reference (eval.reference: base); a reference quant is measured by bench_quant.
use rule bench_quant as bench_base with:
    input:
        model=get_model,
        model_files=get_model_files,
        quantize=rules.engine_build.output.quantize,
        sweep_bench=rules.engine_build.output.sweep_bench,
        run_settings=ancient(rules.run_settings.output[0]),
    output:
        result="results/bench/{model}/baseline.json",
        manifest="results/bench/{model}/baseline.manifest.json",
    log:
        "logs/bench/{model}/baseline.log",
    resources:
        mem_mb=mem_mb_planned("bench_base"),
        runtime=runtime_planned("bench_base"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
