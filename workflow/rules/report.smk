include: "report_functions.smk"


rule report:
    input:
        get_summary_input,
    output:
        **get_speed_plot_output(),
        **get_layers_plot_output(),
        csv=report(
            "results/report/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"file": "summary.csv"},
        ),
        md="results/report/summary.md",
        html=report(
            "results/report/summary.html",
            caption="../report/summary_html.rst",
            category="Summary",
            labels={"file": "summary.html"},
        ),
        lnppl=report(
            "results/report/size_vs_lnppl.png",
            caption="../report/size_vs_lnppl.rst",
            category="Plots",
            labels={"plot": "size vs ln(PPL(Q)/PPL(ref))"},
        ),
        manifest="results/report/summary.manifest.json",
        kld=report(
            "results/report/size_vs_kld.png",
            caption="../report/size_vs_kld.rst",
            category="Plots",
            labels={"plot": "size vs mean KLD"},
        ),
    log:
        "logs/report.log",
    localrule: True
    conda:
        "../../envs/quantsweep.yaml"
    params:
        entries=get_summary_entries_json,
        settings=SWEEP.gate.to_json(),
        speed=get_speed_plot_arg,
        layers=get_layers_plot_arg,
        notes=get_report_notes(),
    shell:
        "quantsweep report --entries {params.entries:q} --settings {params.settings:q} {params.notes:q}"
        " --csv {output.csv:q} --md {output.md:q} --html {output.html:q}"
        " --plot-lnppl {output.lnppl:q} --plot-kld {output.kld:q} {params.speed:q} {params.layers:q}"
        " --manifest {output.manifest:q} > {log:q} 2>&1"


# The report of what is measured so far (quantsweep report --partial), beside the final one:
#   snakemake --nolock partial_report      (beside a running sweep; it reads finished records only)
rule partial_report:
    input:
        get_partial_report_input,
    output:
        get_partial_report_output(),
    log:
        "logs/partial_report.log",
    localrule: True
    conda:
        "../../envs/quantsweep.yaml"
    shell:
        "quantsweep report --partial . > {log:q} 2>&1"
