include: "imatrix_functions.smk"


rule imatrix_collect:
    input:
        model=get_imatrix_model,
        model_files=get_imatrix_model_files,
        quantize=rules.engine_build.output.quantize,
        imatrix_tool=rules.engine_build.output.imatrix,
        run_settings=ancient(rules.run_settings.output[0]),
        text=get_text("calibration"),
    output:
        dat="results/imatrix/{model}/{imatrix_pass}.dat",
        record="results/imatrix/{model}/{imatrix_pass}.json",
        manifest="results/imatrix/{model}/{imatrix_pass}.manifest.json",
    log:
        "logs/imatrix_collect/{model}.{imatrix_pass}.log",
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_planned("imatrix_collect"),
        disk_mb=disk_mb_planned("imatrix_collect"),
        runtime=runtime_planned("imatrix_collect"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
    params:
        bin_dir=get_bin_dir,
        settings=SWEEP.imatrix.to_json(only=SWEEP.imatrix.COLLECT),
    shell:
        "quantsweep imatrix collect --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " --text {input.text:q} -o {output.dat:q} --record {output.record:q} --log {log:q}"
        " --mode {wildcards.imatrix_pass} --threads {threads} --settings {params.settings:q}"
        " --manifest {output.manifest:q} --timeout-min {resources.runtime}"


rule imatrix_remap:
    input:
        model=get_model,
        model_files=get_model_files,
        imatrices=get_imatrix_inputs,
    output:
        dat="results/imatrix/{model}/imatrix.dat",
        manifest="results/imatrix/{model}/imatrix.manifest.json",
    log:
        "logs/imatrix_remap/{model}.log",
    conda:
        "../../envs/quantsweep.yaml"
    resources:
        disk_mb=disk_mb_header_only,
    shell:
        "quantsweep imatrix remap --model {input.model:q} -o {output.dat:q}"
        " --manifest {output.manifest:q} {input.imatrices:q} > {log:q} 2>&1"


rule imatrix_check:
    input:
        unpack(get_check_input),
        model=get_model,
        model_files=get_model_files,
        imatrix=rules.imatrix_remap.output.dat,
        quantize=rules.engine_build.output.quantize,
        run_settings=ancient(rules.run_settings.output[0]),
    output:
        report="results/imatrix/{model}/check/{quant}.txt",
    log:
        check="logs/imatrix_check/{model}-{quant}.log",
        engine="logs/imatrix_check/{model}-{quant}.dry-run.log",
    conda:
        get_engine_env()
    resources:
        disk_mb=disk_mb_header_only,
    params:
        bin_dir=get_bin_dir,
        type_args=get_type_args,
    shell:
        "quantsweep imatrix check --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " {params.type_args:q} --log {log.engine:q} -o {output.report:q}"
        " {input.imatrix:q} > {log.check:q} 2>&1"
