include: "model_functions.smk"


rule tiny_model:
    output:
        "resources/models/{model}.gguf",
    log:
        "logs/tiny_model/{model}.log",
    conda:
        "../../envs/quantsweep.yaml"
    params:
        settings=get_tiny_settings,
    shell:
        "quantsweep tiny-model -o {output:q} --settings {params.settings:q} 2> {log:q}"


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
    threads: threads_converter
    resources:
        mem_mb=mem_mb_planned("convert"),
        disk_mb=disk_mb_planned("convert"),
        runtime=runtime_planned("convert"),
        slurm_partition=partition_cpu_job,
    params:
        checkpoint=get_checkpoint_dir,
        settings=get_convert_settings,
        cache_dir=SWEEP.engine.cache_dir,
    shell:
        "quantsweep convert --checkpoint {params.checkpoint:q} --out-dir {output.model:q}"
        " --name {wildcards.model:q} --settings {params.settings:q} --cache-dir={params.cache_dir:q}"
        " --threads {threads} --log {log:q} --manifest {output.manifest:q}"
