# The per-type pool, the sensitivity stage and the allocator (config allocate:).
#   results/pool/{model}/{pool_imatrix}/{ptype}.gguf  the model with every tensor at one type
#   results/sensitivity/{model}/groups.json        the groups and their bytes per ladder type
#   results/sensitivity/{model}/runs/{group}@{stype}.json  one group lowered, its KLD
#   results/sensitivity/{model}/errors.json        sensitivity: proxy: each tensor's quantization error
#   results/sensitivity/{model}.json               the table the allocator reads
#   results/allocate/{model}/{quant}.yaml (+ .json) one auto recipe per budget
#   results/refine/{model}/{quant}/{group}.json    allocate.refine: the recipe with one group up


include: "allocate_functions.smk"


rule pool:
    input:
        unpack(get_fitted_imatrix),
        quantize=rules.engine_build.output.quantize,
        run_settings=ancient(rules.run_settings.output[0]),
        model=get_model,
        model_files=get_model_files,
    output:
        gguf="results/pool/{model}/{pool_imatrix}/{ptype}.gguf",
        record="results/pool/{model}/{pool_imatrix}/{ptype}.json",
        manifest="results/pool/{model}/{pool_imatrix}/{ptype}.manifest.json",
    log:
        "logs/pool/{model}/{pool_imatrix}/{ptype}.log",
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_planned("pool"),
        disk_mb=disk_mb_planned("pool"),
        runtime=runtime_planned("pool"),
        slurm_partition=partition_cpu_job,
    params:
        bin_dir=get_bin_dir,
        imatrix=get_imatrix_arg,
    shell:
        "quantsweep pool --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " --type {wildcards.ptype:q} {params.imatrix:q} -o {output.gguf:q}"
        " --record {output.record:q} --log {log:q} --threads {threads}"
        " --manifest {output.manifest:q} --timeout-min {resources.runtime}"


checkpoint sensitivity_groups:
    input:
        model=get_model,
        model_files=get_model_files,
    output:
        "results/sensitivity/{model}/groups.json",
    log:
        "logs/sensitivity/{model}/groups.log",
    conda:
        "../../envs/quantsweep.yaml"
    resources:
        disk_mb=disk_mb_header_only,
    params:
        settings=ALLOC.sensitivity_json(),
        flags=get_sensitivity_group_flags,
    shell:
        "quantsweep sensitivity groups --model {input.model:q} --settings {params.settings:q}"
        " {params.flags:q} -o {output:q} > {log:q} 2>&1"


rule sensitivity_run:
    input:
        unpack(get_sensitivity_pools),
        # a rewritten groups.json reruns only the runs whose recipe changed (params.recipe)
        groups=ancient(rules.sensitivity_groups.output[0]),
        model=get_model,
        model_files=get_model_files,
        kld_base=rules.eval_baseline.output.kld_base,
        quantize=rules.engine_build.output.quantize,
        perplexity=rules.engine_build.output.perplexity,
        run_settings=ancient(rules.run_settings.output[0]),
    output:
        result="results/sensitivity/{model}/runs/{group}@{stype}.json",
        manifest="results/sensitivity/{model}/runs/{group}@{stype}.manifest.json",
    log:
        "logs/sensitivity/{model}/{group}@{stype}.log",
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_planned("sensitivity_run"),
        disk_mb=disk_mb_planned("sensitivity_run"),
        runtime=runtime_planned("sensitivity_run"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
    params:
        bin_dir=get_bin_dir,
        pools=get_pool_args,
        run=get_sensitivity_run_args,
        recipe=get_sensitivity_run_recipe,
        settings=EVAL_SETTINGS,
    shell:
        "quantsweep sensitivity run --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " --groups {input.groups:q} {params.run:q} {params.pools:q}"
        " --kld-base {input.kld_base:q} --result {output.result:q} --log {log:q}"
        " --threads {threads} --manifest {output.manifest:q} --settings {params.settings:q}"
        " --timeout-min {resources.runtime}"


use rule sensitivity_run as sensitivity_top with:
    output:
        result="results/sensitivity/{model}/top.json",
        manifest="results/sensitivity/{model}/top.manifest.json",
    log:
        "logs/sensitivity/{model}/top.log",
    resources:
        mem_mb=mem_mb_planned("sensitivity_top"),
        disk_mb=disk_mb_planned("sensitivity_top"),
        runtime=runtime_planned("sensitivity_top"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,


rule sensitivity_proxy:
    input:
        unpack(get_sensitivity_pools),
        model=get_model,
        model_files=get_model_files,
        dequant=get_dequant_tool,
    output:
        errors="results/sensitivity/{model}/errors.json",
        manifest="results/sensitivity/{model}/errors.manifest.json",
    log:
        "logs/sensitivity/{model}/proxy.log",
    conda:
        get_engine_env()
    resources:
        mem_mb=mem_mb_planned("sensitivity_proxy"),
        disk_mb=disk_mb_planned("sensitivity_proxy"),
        runtime=runtime_planned("sensitivity_proxy"),
        slurm_partition=partition_cpu_job,
    params:
        bin_dir=get_bin_dir,
        pools=get_pool_args,
        imatrix=get_imatrix_arg,
        settings=ALLOC.proxy_json(),
    shell:
        "quantsweep sensitivity proxy --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " {params.imatrix:q} {params.pools:q} --settings {params.settings:q}"
        " -o {output.errors:q} --manifest {output.manifest:q} --log {log:q}"


rule sensitivity_table:
    input:
        groups=rules.sensitivity_groups.output[0],
        top=get_sensitivity_top,
        errors=get_sensitivity_errors,
        external=get_sensitivity_external,
        runs=get_sensitivity_runs,
    output:
        table="results/sensitivity/{model}.json",
        manifest="results/sensitivity/{model}.manifest.json",
    log:
        "logs/sensitivity/{model}/table.log",
    localrule: True
    conda:
        "../../envs/quantsweep.yaml"
    params:
        sources=get_sensitivity_source_args,
    shell:
        "quantsweep sensitivity table --groups {input.groups:q} {params.sources:q}"
        " -o {output.table:q} --manifest {output.manifest:q} > {log:q} 2>&1"


rule allocate:
    input:
        unpack(get_allocate_input),
        table=rules.sensitivity_table.output.table,
        model=get_model,
        model_files=get_model_files,
    output:
        recipe="results/allocate/{model}/{quant}.yaml",
        json="results/allocate/{model}/{quant}.json",
        manifest="results/allocate/{model}/{quant}.manifest.json",
    log:
        "logs/allocate/{model}/{quant}.log",
    wildcard_constraints:
        quant=AUTO_QUANTS,
    localrule: True
    conda:
        "../../envs/quantsweep.yaml"
    params:
        settings=get_allocate_settings,
        size_of=get_size_of_args,
        refine=get_refine_args,
    shell:
        "quantsweep allocate --sensitivity {input.table:q} --model {input.model:q}"
        " --settings {params.settings:q} {params.size_of:q}"
        " {params.refine:q}"
        " -o {output.recipe:q} --json {output.json:q} --manifest {output.manifest:q}"
        " > {log:q} 2>&1"


rule sensitivity_context:
    input:
        unpack(get_sensitivity_pools),
        table=rules.sensitivity_table.output.table,
        allocation=rules.allocate.output.json,
        model=get_model,
        model_files=get_model_files,
        kld_base=rules.eval_baseline.output.kld_base,
        quantize=rules.engine_build.output.quantize,
        perplexity=rules.engine_build.output.perplexity,
        run_settings=ancient(rules.run_settings.output[0]),
    output:
        result="results/refine/{model}/{quant}/{group}.json",
        manifest="results/refine/{model}/{quant}/{group}.manifest.json",
    log:
        "logs/refine/{model}/{quant}/{group}.log",
    wildcard_constraints:
        quant=AUTO_QUANTS,
    conda:
        get_engine_env()
    threads: threads_engine
    resources:
        mem_mb=mem_mb_planned("sensitivity_context"),
        disk_mb=disk_mb_planned("sensitivity_context"),
        runtime=runtime_planned("sensitivity_context"),
        gpu=gpus_engine,
        slurm_partition=partition_gpu_job,
    params:
        bin_dir=get_bin_dir,
        pools=get_pool_args,
        imatrix=get_imatrix_arg,
        settings=EVAL_SETTINGS,
    shell:
        "quantsweep sensitivity context --bin-dir {params.bin_dir:q} --model {input.model:q}"
        " --sensitivity {input.table:q} --allocation {input.allocation:q}"
        " --group {wildcards.group:q} {params.imatrix:q} {params.pools:q}"
        " --kld-base {input.kld_base:q} --result {output.result:q} --log {log:q}"
        " --threads {threads} --manifest {output.manifest:q} --settings {params.settings:q}"
        " --timeout-min {resources.runtime}"


use rule allocate as refine with:
    input:
        unpack(get_allocate_input),
        table=rules.sensitivity_table.output.table,
        model=get_model,
        model_files=get_model_files,
        allocation=get_refined_allocation,
        measured=get_refined_measurement,
        context=get_context_runs,
    log:
        "logs/refine/{model}/{quant}.log",
    wildcard_constraints:
        quant=REFINED_QUANTS,
