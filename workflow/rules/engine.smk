rule engine_build:
    output:
        imatrix="resources/engine/bin/llama-imatrix",
        quantize="resources/engine/bin/llama-quantize",
        perplexity="resources/engine/bin/llama-perplexity",
        meta="resources/engine/engine.json",
    log:
        "logs/engine_build.log",
    conda:
        get_engine_env()
    threads: threads_engine
    params:
        spec=get_engine_spec,
        cache_dir=config["engine"]["cache_dir"],
        outdir=get_engine_outdir,
    shell:
        "quantsweep engine build --spec {params.spec:q} --cache-dir={params.cache_dir:q}"
        " --out {params.outdir:q} --log {log:q}"
