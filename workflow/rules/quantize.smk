rule quantize:
    input:
        unpack(get_quantize_input),
    output:
        gguf="results/quants/{model}/{model}-{quant}.gguf",
        record="results/quants/{model}/{model}-{quant}.json",
    log:
        "logs/quantize/{model}-{quant}.log",
    conda:
        get_engine_env()
    threads: workflow.cores
    resources:
        mem_mb=mem_mb_quantize,
        runtime=runtime_engine,
    params:
        bin_dir=get_bin_dir,
        type_args=get_type_args,
        imatrix=get_imatrix_arg,
    shell:
        "quantsweep quantize --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " {params.type_args:q} {params.imatrix:q} -o {output.gguf:q}"
        " --record {output.record:q} --log {log:q} --threads {threads}"
