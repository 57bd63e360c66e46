include: "quantize_functions.smk"


rule quantize:
    input:
        unpack(get_quantize_input),
        model=get_model,
        model_files=get_model_files,
    output:
        gguf="results/quants/{model}/{model}-{quant}.gguf",
        record="results/quants/{model}/{model}-{quant}.json",
        manifest="results/quants/{model}/{model}-{quant}.manifest.json",
    log:
        "logs/quantize/{model}-{quant}.log",
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_planned("quantize"),
        disk_mb=disk_mb_planned("quantize"),
        runtime=runtime_planned("quantize"),
        slurm_partition=partition_cpu_job,
    params:
        bin_dir=get_bin_dir,
        type_args=get_type_args,
        imatrix=get_imatrix_arg,
        pools=get_pool_args,
    shell:
        "quantsweep quantize --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " {params.type_args:q} {params.imatrix:q} {params.pools:q} -o {output.gguf:q}"
        " --record {output.record:q} --log {log:q} --threads {threads}"
        " --manifest {output.manifest:q} --timeout-min {resources.runtime}"
