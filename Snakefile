# quantsweep: imatrix-guided ik_llama.cpp quantization sweeps for DeepSeek-family models.
#
# resources/engine/            llama-imatrix, -quantize, -perplexity, -sweep-bench + engine.json
# resources/models/{model}.gguf  generated demo model (source: tiny)
# resources/text/{kind}.txt    bundled calibration / evaluation text
# results/imatrix/{model}/     one .dat per pass, then imatrix.dat fitted to the model
# results/pool/{model}/        per-type pool files: recipes are assembled from them
# results/sensitivity/{model}/ groups.json, one KLD run per (group, type); {model}.json: the table
# results/allocate/{model}/    {quant}.yaml: the auto recipe of each allocate budget (+ .json)
# results/quants/{model}/      {model}-{quant}.gguf (+ .json: parsed quantize log)
# results/eval/{model}/        baseline.kld (base logits of the reference), baseline.json, {quant}.json
# results/bench/{model}/       baseline.json, {quant}.json: PP/TG tokens/s per depth (bench.enabled)
# results/report/              summary.{csv,md,html}: one row per (model, quant) plus each
#                              reference, gate and Pareto marks; size_vs_{lnppl,kld}.png,
#                              kld_vs_speed.png
# results/publish/{model}/     snakemake publish: the ready-to-upload model repository
from snakemake.utils import min_version

min_version("9.19")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/engine.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/imatrix.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/allocate.smk"


if BENCH:

    include: "workflow/rules/bench.smk"


include: "workflow/rules/report.smk"
include: "workflow/rules/publish.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
    localrule: True
