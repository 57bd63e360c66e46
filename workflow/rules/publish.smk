include: "publish_functions.smk"


# The ready-to-upload repository of each model's chosen quants (publish.quants), written whole
# or not at all once every check passed (quantsweep publish):
#   snakemake --cores all publish
rule publish_model:
    input:
        unpack(get_publish_input),
    output:
        # the folder's fixed files (a directory() output would get Snakemake's
        # .snakemake_timestamp inside, which would be uploaded)
        card="results/publish/{model}/README.md",
        sums="results/publish/{model}/SHA256SUMS",
        provenance="results/publish/{model}/provenance.json",
        manifest="results/publish/{model}.manifest.json",
    log:
        "logs/publish/{model}.log",
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_publish,
        disk_mb=disk_mb_publish,
        runtime=runtime_publish,
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
    params:
        bin_dir=get_bin_dir,
        folder=get_publish_folder,
        files=get_publish_args,
        settings=PUBLISH.to_json(),
        eval=EVAL_SETTINGS,
        bench=SWEEP.bench.to_json(),
        imatrix=SWEEP.imatrix.to_json(),
        evaluation=SWEEP.texts.name_of("evaluation"),
    shell:
        "quantsweep publish --model {wildcards.model:q} --summary {input.summary:q}"
        " --source {input.source:q} --text {input.text:q} --bin-dir {params.bin_dir:q}"
        " --settings {params.settings:q} --eval-settings {params.eval:q}"
        " --bench-settings {params.bench:q} --imatrix-settings {params.imatrix:q}"
        " --evaluation-name {params.evaluation:q} {params.files:q} --threads {threads}"
        " --log {log:q} --manifest {output.manifest:q} -o {params.folder:q} >> {log:q} 2>&1"


rule publish:
    input:
        expand(rules.publish_model.output.sums, model=MODELS),
    localrule: True
