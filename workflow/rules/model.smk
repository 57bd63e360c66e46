rule tiny_model:
    output:
        "resources/models/{model}.gguf",
    log:
        "logs/tiny_model/{model}.log",
    conda:
        "../../envs/quantsweep.yaml"
    params:
        args=get_tiny_model_args,
    shell:
        "quantsweep tiny-model -o {output:q} {params.args:q} 2> {log:q}"


rule bundled_text:
    output:
        "resources/text/{kind}.txt",
    log:
        "logs/bundled_text/{kind}.log",
    conda:
        "../../envs/quantsweep.yaml"
    shell:
        "quantsweep text {wildcards.kind:q} -o {output:q} 2> {log:q}"


# A Hugging Face checkpoint (models.<name>.source: hf) -> GGUF, the first step of its sweep. A
# checkpoint rule: how many shards the converter writes (split_max_size) is known once it ran.
checkpoint convert:
    input:
        checkpoint=get_checkpoint_files,
    output:
        model=directory("resources/models/{model}"),
        manifest="resources/models/{model}.convert.json",
    log:
        "logs/convert/{model}.log",
    wildcard_constraints:
        model=HF_MODELS,
    conda:
        "../../envs/convert.yaml"
    threads: threads_convert
    resources:
        mem_mb=mem_mb_convert,
        disk_mb=disk_mb_convert,
        runtime=runtime_convert,
    params:
        convert=get_convert_args,
        spec=get_converter_spec,
        cache_dir=config["engine"]["cache_dir"],
    shell:
        "quantsweep convert {params.convert:q} --out-dir {output.model:q} --name {wildcards.model:q}"
        " --spec {params.spec:q} --cache-dir={params.cache_dir:q} --threads {threads}"
        " --log {log:q} --manifest {output.manifest:q}"
