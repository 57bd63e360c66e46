rule summary:
    input:
        get_summary_input,
    output:
        csv="results/summary.csv",
        md="results/summary.md",
    log:
        "logs/summary.log",
    localrule: True
    conda:
        "../../envs/quantsweep.yaml"
    params:
        entries=get_summary_entries_json,
    shell:
        "quantsweep summary --entries {params.entries:q} --csv {output.csv:q}"
        " --md {output.md:q} > {log:q} 2>&1"
