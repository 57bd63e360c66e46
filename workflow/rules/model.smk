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
