"""The `quantsweep` argument parser: one builder per group of subcommands; each subcommand's
`func` is its function in `commands`, and `--manifest` names the files its manifest hashes."""

from __future__ import annotations

import argparse

from .. import __version__
from ..gguf.deepseek2 import SHAPES
from ..settings import (AllocateSettings, BenchSettings, EngineSpec, EvalSettings, Gate, ImatrixSettings, ModelSettings,
                        RunSettings, TinySpec)
from ..settings.measure import ATTENTION, MLA_MODES, PASSES
from ..settings.model import OUTTYPES
from ..settings.tiny import LAYOUTS
from . import commands as c
from . import perlayer, publishing, watching

DESCRIPTION = ("quantsweep: imatrix-guided ik_llama.cpp quantization sweeps of DeepSeek-family models. "
               "Each subcommand is one pipeline step, as the workflow's rules run it: the config's settings "
               "of the step as one --settings JSON (what differs from the defaults; {} = every default), "
               "files and the job's threads as options. The other options override one setting by hand.")


def _add_timeout(p) -> None:
    p.add_argument("--timeout-min", type=float, default=0,
                   help="kill the engine run after this many minutes (the workflow passes the rule's runtime)")


def _add_settings(p, section: str, cls, keys: str = "") -> None:
    """--settings: the step's settings object (config `section`) as JSON; the class holds the defaults."""
    keys = keys or ", ".join(cls().to_dict())
    p.add_argument("--settings", default="{}", metavar="JSON",
                   help=f"JSON (or a .json file) of the config's {section} settings this step reads ({keys}); "
                        "missing keys take the defaults; the options below override single keys")


def _add_run(p, step: str) -> None:
    p.add_argument("--run", default=None, metavar="JSON",
                   help="override the settings' run: JSON of the step's run settings ("
                        f"{', '.join(RunSettings().to_dict())}; config run.{step} over run.defaults)")


def _default(cls, key: str) -> str:
    """A default in words for --help, read from the settings class that holds it."""
    v = cls().to_dict()[key]
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _manifested(p, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    """Give a step --manifest; `inputs`/`outputs` name its file arguments (hashed into it)."""
    p.add_argument("--manifest", default="", help="write a provenance manifest (JSON) here")
    p.set_defaults(manifest_inputs=inputs, manifest_outputs=outputs)


def _add_engine(sub) -> None:
    eng = sub.add_parser("engine", help="build or adopt the ik_llama.cpp tools").add_subparsers(dest="sub",
                                                                                              required=True)
    p = eng.add_parser("build", help="build (cached) and place bin/ + engine.json in --out")
    p.add_argument("--settings", "--spec", default="{}", metavar="JSON",
                   help="JSON (or a .json file) of the config's engine section (" + ", ".join(EngineSpec().to_dict())
                        + "); missing keys take the defaults")
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default="", help="where builds are cached (default: the settings' cache_dir, "
                   "else $QUANTSWEEP_CACHE, else ~/.cache/quantsweep)")
    p.add_argument("--jobs", type=int, default=0, help="parallel build jobs (0: every usable CPU)")
    p.add_argument("--log", default="")
    p.set_defaults(func=c._engine_build)
    p = eng.add_parser("check-run", help="check the run settings of every step against the engine's flags")
    p.add_argument("--engine", required=True, help="engine.json of the installed engine")
    p.add_argument("--settings", "--run", default="{}", metavar="JSON",
                   help="JSON (or a .json file): a run section ({defaults, imatrix, eval, bench}; the workflow "
                        "gives each step it runs, resolved)")
    p.add_argument("--steps", default="", help="the steps to check (comma-separated; default: the steps the JSON "
                   "names, every step when it names none)")
    p.add_argument("-o", "--output", default="", help="write each step's resolved settings here (JSON)")
    p.set_defaults(func=c._engine_check_run)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint (bf16 or FP8 safetensors) to GGUF",
                       description="Checks the checkpoint (config.json, every safetensors header, tokenizer, "
                       "FP8 scales) and the converter (architecture, FP8 support), runs a vocab-only pass "
                       "(an unknown tokenizer fails in seconds), then converts into --out-dir and reads the "
                       "result back. The converter needs torch: pip install 'quantsweep[convert]'.")
    p.add_argument("--checkpoint", required=True, help="the checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--out-dir", required=True, help="where <name>.gguf (or its shards) go")
    p.add_argument("--name", required=True, help="the model's name (file name stem)")
    p.add_argument("--settings", default="{}", metavar="JSON",
                   help='JSON (or a .json file): {"model": the model\'s outtype and split_max_size, "engine": the '
                        "engine section's converter keys}; missing keys take the defaults")
    p.add_argument("--outtype", choices=OUTTYPES, default=None,
                   help=f"override the model's outtype (default {_default(ModelSettings, 'outtype')})")
    p.add_argument("--split-max-size", default=None,
                   help="override the model's split_max_size: shards of at most this size (e.g. 50G; default: "
                        "one file)")
    p.add_argument("--cache-dir", default="", help="where the converter's sdist is cached (as engine build)")
    p.add_argument("--python", default="", help="the interpreter that runs the converter (default: the first "
                   "of this one, python3, python that imports torch and transformers)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--log", default="")
    _manifested(p, (), ())
    p.set_defaults(func=c._convert)


def _add_inputs(sub) -> None:
    p = sub.add_parser("tiny-model", help="write the embedded tiny DeepSeek2 GGUF")
    p.add_argument("-o", "--output", required=True)
    _add_settings(p, "models.<name> (source: tiny)", TinySpec, "seed, layout, dead_channels, and every other "
                  "knob of quantsweep.settings.TinySpec")
    p.add_argument("--seed", type=int, default=None, help=f"override the seed (default {_default(TinySpec, 'seed')})")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="kv_b: 2-D attn_kv_b only; ik: also 2-D attn_k_b/attn_v_b; "
                        f"mainline: 3-D attn_k_b/attn_v_b, no attn_kv_b (default {_default(TinySpec, 'layout')})")
    p.add_argument("--split-kv-b", action="store_true", help="same as --layout ik")
    p.add_argument("--dead-channels", type=int, default=None, metavar="N",
                   help="layer 0's attn_norm gain is zero on channels [0, N) (default "
                        f"{_default(TinySpec, 'dead_channels')})")
    p.add_argument("--train-text", default="", help="text for the bigram statistics (default: bundled)")
    p.set_defaults(func=c._tiny_model)
    p = sub.add_parser("sparse-model", help="write a header-only (sparse) model of a real shape: a GGUF (bf16) or "
                       "a Hugging Face checkpoint (V3, Kimi-K2: FP8 as shipped; V2-Lite: bf16), its data a hole, to "
                       "plan a sweep (quantsweep plan, snakemake -n) without the files")
    p.add_argument("--shape", choices=list(SHAPES), required=True)
    p.add_argument("--format", choices=["gguf", "hf"], required=True)
    p.add_argument("-o", "--output", required=True, help="the GGUF file or the checkpoint directory")
    p.set_defaults(func=c._sparse_model)
    p = sub.add_parser("tiny-checkpoint", help="write a tiny DeepSeek-V3 Hugging Face checkpoint (bf16, FP8 or "
                       "FP8 dequantized to bf16) made with transformers: a source: hf demo (needs the convert extra)")
    p.add_argument("-o", "--output", required=True, help="the checkpoint directory")
    p.add_argument("--flavour", choices=["bf16", "fp8", "dequantized"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-group", type=int, default=1, help="expert groups (the engine ignores group-limited routing)")
    p.set_defaults(func=c._tiny_checkpoint)
    p = sub.add_parser("config", help="config files").add_subparsers(dest="sub", required=True)
    p = p.add_parser("check", help="check config files (merged in order, as --configfile does) "
                     "with YAML errors named by line")
    p.add_argument("files", nargs="+", help="e.g. config/config.yaml my-sweep.yaml")
    p.set_defaults(func=c._config_check)
    p = sub.add_parser("plan", help="the capacity plan of a sweep: every job's file, RAM, GPU memory, disk and "
                       "time, peak disk, engine-hours, and whether it fits the machine",
                       description="Config files are merged in order (as --configfile merges over "
                       "config/config.yaml). Exit 1 with one line per shortfall when the sweep does not fit.")
    p.add_argument("files", nargs="+", help="e.g. config/config.yaml my-sweep.yaml")
    p.add_argument("--machine", action="append", default=[], metavar="KEY=VALUE",
                   help="override the config's machine: ram_gib, gpus, vram_gib, disk_gib, jobs (repeatable), or "
                   "'detect' for this host")
    p.add_argument("--json", default="", help="also write the plan as JSON to this file")
    p.add_argument("--learned", default="", metavar="DIR",
                   help="a work dir whose sweep has run (some of) its jobs: every time is the plan's estimate x what "
                   "that rule's finished jobs measured against theirs (quantsweep status)")
    p.set_defaults(func=c._plan)
    p = sub.add_parser("status", help="where a sweep stands: jobs done, running (with their progress, rate and ETA "
                       "from their logs) and left, engine-hours, the sweep's ETA",
                       description="Reads Snakemake's records of the work dir (.snakemake/), the capacity plan the "
                       "sweep started with (results/plan/plan.json) and each running engine job's log; it needs no "
                       "lock, so it runs beside the sweep (on a SLURM sweep: on the submit host).")
    p.add_argument("dir", nargs="?", default=".", help="the work dir (default: here)")
    p.add_argument("--watch", type=float, nargs="?", const=5.0, default=0.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 5) until interrupted")
    p.add_argument("--json", action="store_true", help="the status as JSON")
    p.set_defaults(func=watching.status)
    p = sub.add_parser("init", help="write a work dir with its own config for one model, sized from its header "
                       "and the machine (run it with snakemake --directory DIR)")
    p.add_argument("dir", help="the work dir (its config/config.yaml is written; an existing one is refused)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an unquantized GGUF (shard 1 of a split one)")
    src.add_argument("--hf", help="a Hugging Face checkpoint directory (bf16 or FP8)")
    p.add_argument("--machine", choices=["workstation", "slurm"], default="workstation",
                   help="workstation: this host's RAM, GPUs and free disk unless given; slurm: one compute node as "
                   "given, many jobs at once")
    p.add_argument("--ram-gib", type=float, default=None)
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--vram-gib", type=float, default=None, help="memory of each GPU")
    p.add_argument("--disk-gib", type=float, default=None, help="free disk for the work dir")
    p.set_defaults(func=c._init)
    p = sub.add_parser("text", help="write a bundled text (train, calibration, evaluation)")
    p.add_argument("name", choices=["train", "calibration", "evaluation"])
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=c._text)


def _add_imatrix(sub) -> None:
    imx = sub.add_parser("imatrix", help="collect and fit importance matrices").add_subparsers(dest="sub",
                                                                                              required=True)
    p = imx.add_parser("collect", help="run one llama-imatrix pass")
    for flag in ("--bin-dir", "--model", "--text", "--log"):
        p.add_argument(flag, required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mode", choices=PASSES, default=PASSES[0], help="the pass (imatrix.passes; default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="the job's threads (default %(default)s)")
    p.add_argument("--record", default="", help="JSON record of the run")
    _add_settings(p, "imatrix", ImatrixSettings, ", ".join(ImatrixSettings.COLLECT))
    p.add_argument("--ctx", type=int, default=None,
                   help=f"override the context (default {_default(ImatrixSettings, 'ctx')})")
    p.add_argument("--chunks", type=int, default=None,
                   help=f"override the chunks of text (default {_default(ImatrixSettings, 'chunks')})")
    _add_run(p, "imatrix")
    _add_timeout(p)
    _manifested(p, inputs=("model", "text"), outputs=("output", "record"))
    p.set_defaults(func=c._imatrix_collect)
    p = imx.add_parser("info", help="entries, ncall, per-tensor stats, experts without data")
    p.add_argument("input")
    p.add_argument("--model", default="", help="GGUF whose 3-D tensors tell experts/heads per entry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c._imatrix_info)
    p = imx.add_parser("convert", help="legacy .dat <-> mainline GGUF imatrix (by content / output extension)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="*.gguf writes GGUF, anything else .dat")
    p.add_argument("--model", default="", help="GGUF to split per-expert entries into matrices")
    p.set_defaults(func=c._imatrix_convert)
    p = imx.add_parser("merge", help="ncall-weighted merge of imatrices (either format)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--model", default="")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=c._imatrix_merge)
    _add_imatrix_fit(imx)


def _add_imatrix_fit(imx) -> None:
    p = imx.add_parser("check", help="pre-flight: does IMATRIX cover what quantizing MODEL at FTYPE needs?")
    p.add_argument("--bin-dir", required=True, help="engine bin dir (its --dry-run gives each tensor's type)")
    p.add_argument("--model", required=True, help="GGUF (shard 1 or any shard of a split model)")
    _add_quant_type(p)
    p.add_argument("--log", default="", help="keep the engine's --dry-run output here")
    p.add_argument("-o", "--output", default="", help="write the report here when the check passes")
    p.add_argument("--json", action="store_true")
    p.add_argument("imatrix")
    p.set_defaults(func=c._imatrix_check)
    p = imx.add_parser("remap", help="merge imatrices and fit them to MODEL's tensors")
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("inputs", nargs="+")
    _manifested(p, inputs=("model", "inputs"), outputs=("output",))
    p.set_defaults(func=c._imatrix_remap)


def _add_pool(p, why: str) -> None:
    p.add_argument("--pool", action="append", default=[], metavar="TYPE=FILE",
                   help=f"a pool file and its type (repeat); {why}")


def _add_quant_type(p) -> None:
    """What to quantize to: the same two options for check and quantize."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ftype", "--type", dest="ftype", default=None, help="llama-quantize FTYPE")
    g.add_argument("--recipe", default="", help="recipe YAML (config/recipes/): base ftype + per-tensor rules")


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="run llama-quantize for one ftype or recipe")
    for flag in ("--bin-dir", "--model", "--log"):
        p.add_argument(flag, required=True)
    _add_quant_type(p)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--imatrix", default="")
    p.add_argument("--record", default="")
    _add_pool(p, "assemble a recipe from these pool files when every tensor can come from one "
                 "(else llama-quantize runs, and the record says why)")
    _add_timeout(p)
    _manifested(p, inputs=("model", "imatrix", "recipe", "pool"), outputs=("output", "record"))
    p.set_defaults(func=c._quantize)
    p = sub.add_parser("pool", help="one pool file: the model with every tensor at one type (llama-quantize), "
                       "which recipes are then assembled from")
    for flag in ("--bin-dir", "--model", "--log"):
        p.add_argument(flag, required=True)
    p.add_argument("--type", required=True, help="the ggml type every tensor is asked for (e.g. iq4_ks)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--imatrix", default="")
    p.add_argument("--record", default="")
    _add_timeout(p)
    _manifested(p, inputs=("model", "imatrix"), outputs=("output", "record"))
    p.set_defaults(func=c._pool)
    rc = sub.add_parser("recipe", help="quantization recipes").add_subparsers(dest="sub", required=True)
    p = rc.add_parser("plan", help="per tensor: the type the engine will use and its bytes; totals")
    p.add_argument("--model", required=True, help="GGUF (header only is read), or 'deepseek-v3' for a V3-shaped table")
    p.add_argument("--imatrix", default="", help="fitted imatrix: tensors needing one must have data")
    p.add_argument("--json", action="store_true")
    p.add_argument("recipe", help="recipe YAML or an ftype name")
    p.set_defaults(func=c._recipe_plan)
    p = rc.add_parser("args", help="the llama-quantize arguments a recipe compiles to")
    p.add_argument("recipe")
    p.set_defaults(func=c._recipe_args)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity and KL divergence").add_subparsers(dest="sub", required=True)
    base = ev.add_parser("base", help="baseline PPL; writes the KLD base logits")
    kld = ev.add_parser("kld", help="PPL + KLD of a quant against the base logits")
    for p in (base, kld):
        for flag in ("--bin-dir", "--model", "--log"):
            p.add_argument(flag, required=True)
        p.add_argument("--kld-base", required=True,
                       help="base logits file (written by 'eval base', read by 'eval kld')")
        p.add_argument("--result", required=True, help="JSON record of the parsed results")
        _add_eval_args(p)
    base.add_argument("--text", required=True)
    _manifested(base, inputs=("model", "text"), outputs=("kld_base", "result"))
    base.set_defaults(func=c._eval_base)
    _manifested(kld, inputs=("model", "kld_base"), outputs=("result",))
    kld.set_defaults(func=c._eval_kld)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="PP and TG speed of a model with llama-sweep-bench, repeated")
    for flag in ("--bin-dir", "--model", "--log"):
        p.add_argument(flag, required=True)
    p.add_argument("--result", required=True, help="JSON record: speeds per depth (median, min, max), host")
    p.add_argument("--threads", type=int, default=2, help="the job's threads (default %(default)s)")
    _add_settings(p, "bench", BenchSettings, ", ".join(BenchSettings.MEASURE))
    p.add_argument("--depths", default=None, help="override the KV depths to report, comma-separated (multiples of "
                   f"the ubatch; default {_default(BenchSettings, 'depths')})")
    p.add_argument("--tg", type=int, default=None,
                   help=f"override the tokens generated per measurement (default {_default(BenchSettings, 'tg')})")
    p.add_argument("--repeats", type=int, default=None, help="override the separate runs (median and range are "
                   f"reported; default {_default(BenchSettings, 'repeats')})")
    p.add_argument("--mla", type=int, default=None, choices=MLA_MODES,
                   help=f"override -mla (default {_default(BenchSettings, 'mla')})")
    p.add_argument("--fa", default=None, choices=ATTENTION,
                   help=f"override -fa (default {_default(BenchSettings, 'fa')})")
    _add_run(p, "bench")
    _add_timeout(p)
    _manifested(p, inputs=("model",), outputs=("result",))
    p.set_defaults(func=c._bench)


def _add_eval_args(p) -> None:
    """How a perplexity/KLD run is made (eval and the sensitivity runs alike: config eval)."""
    p.add_argument("--threads", type=int, default=2, help="the job's threads (default %(default)s)")
    _add_settings(p, "eval", EvalSettings, ", ".join(EvalSettings.MEASURE))
    p.add_argument("--ctx", type=int, default=None,
                   help=f"override the context (default {_default(EvalSettings, 'ctx')})")
    p.add_argument("--chunks", type=int, default=None,
                   help=f"override the chunks of text (default {_default(EvalSettings, 'chunks')})")
    p.add_argument("--mla", type=int, default=None, choices=MLA_MODES,
                   help=f"override -mla (default {_default(EvalSettings, 'mla')})")
    p.add_argument("--fa", default=None, choices=ATTENTION,
                   help=f"override -fa (default {_default(EvalSettings, 'fa')})")
    _add_run(p, "eval")
    _add_timeout(p)


SETTINGS_HELP = ("JSON (or a .json file) of the config's allocate section; the groups step reads ladder (types, "
                 "fewest bits first; the last is the top every other group keeps), groups (classes | layers | a "
                 "list of {match, per: all|layer|tensor|N}), pin ({regex: type}), experts (regex of the tensors a "
                 "split budget puts in RAM)")


def _add_sensitivity(sub) -> None:
    sv = sub.add_parser("sensitivity", help="per-group KLD sensitivity, the allocator's input").add_subparsers(
        dest="sub", required=True)
    p = sv.add_parser("groups", help="the groups of a model and their exact bytes per ladder type (groups.json)")
    p.add_argument("--model", required=True)
    p.add_argument("--settings", required=True, metavar="JSON", help=SETTINGS_HELP)
    p.add_argument("--no-imatrix", action="store_true", help="plan without an imatrix (types needing one drop out)")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=c._sensitivity_groups)
    p = sv.add_parser("run", help="one run: GROUP at TYPE, the rest at the ladder's top, assembled from the pool; "
                      "its KLD against the reference (no --group: the all-top run)")
    for flag in ("--bin-dir", "--model", "--log", "--groups", "--kld-base", "--result"):
        p.add_argument(flag, required=True)
    p.add_argument("--group", default="")
    p.add_argument("--type", default="")
    p.add_argument("--imatrix", default="", help="the imatrix the pool files were made with (recorded)")
    _add_pool(p, "the pool files of the ladder's types and the pins")
    _add_eval_args(p)
    _manifested(p, inputs=("model", "groups", "kld_base", "pool"), outputs=("result",))
    p.set_defaults(func=c._sensitivity_run)
    p = sv.add_parser("context", help="the refinement's run: an allocated recipe with GROUP one rung up, its KLD")
    for flag in ("--bin-dir", "--model", "--log", "--sensitivity", "--allocation", "--group", "--kld-base",
                 "--result"):
        p.add_argument(flag, required=True)
    p.add_argument("--imatrix", default="", help="the imatrix the pool files were made with (recorded)")
    _add_pool(p, "the pool files of the ladder's types and the pins")
    _add_eval_args(p)
    _manifested(p, inputs=("model", "sensitivity", "allocation", "kld_base", "pool"), outputs=("result",))
    p.set_defaults(func=c._sensitivity_context)
    p = sv.add_parser("table", help="the sensitivity table of groups.json's groups: from its runs (measured), its "
                      "class and band runs split by the proxy (proxy), or a CSV (external)")
    p.add_argument("--groups", required=True)
    p.add_argument("--top", default="", help="the all-top run's record (measured, proxy)")
    p.add_argument("--errors", default="", help="the proxy's errors (proxy: quantsweep sensitivity proxy)")
    p.add_argument("--external", default="", help="the single-tensor KLD CSV (external)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("runs", nargs="*", help="the other runs' records")
    _manifested(p, inputs=("groups", "top", "errors", "external", "runs"), outputs=("output",))
    p.set_defaults(func=c._sensitivity_table)
    perlayer.add_parsers(sv, _manifested, _add_pool)


ALLOCATE_EPILOG = """\
The allocator picks one ladder type per group so that the predicted mean KLD is lowest and the
file fits the budget. Predicted KLD = the all-top run's KLD + the sum of each group's measured
increase at its type (additive model: the report shows predicted vs measured). The solver is
exact (multiple-choice knapsack by dynamic programming over sizes rounded up to 1/RESOLUTION
of the budget, so the answer always fits). Bytes are the planner's exact tensor bytes; the
budget covers the whole file: the tensors no group holds (norms, ffn_gate_inp), the header and
each tensor's alignment padding come off it first.

Budgets: the one budget of --settings (its `budgets`: what the workflow passes), or one of:
  --gib X            the whole file within X GiB
  --bpw X            X bits per weight over all tensors
  --size-of Q        as large as quant Q: an ftype (IQ2_KS) or a recipe YAML, planned on --model
                     (with a size_of budget from --settings: that quant's ftype or recipe)
  --gpu-gib X --ram-gib Y
                     split: non-expert tensors (and the copied ones) within X GiB, the routed
                     experts (the groups' `experts` regex) within Y; a group mixing both is refused

Constraints come from the groups: ffn_gate and ffn_up of a layer are always one group (the fused
MoE kernel wants them alike); pinned tensors have one type; a type the planner refuses for a
group (one that needs an imatrix, without one) is not an option; row-size fallbacks are in the
bytes. Output: a recipe YAML (config/recipes/ format, a header says the budget, the prediction
and the sensitivity data) and --json with the prediction the report reads.

Refinement (--refine A.json --measured EVAL.json --context RUN.json...): the additive model
ignores how groups interact. Measure the allocated recipe (the sweep does) and, for each group,
the recipe with that group one rung up (`quantsweep sensitivity context`); the step from the
chosen type to the next is then set to what was measured inside the recipe (the rungs below move
with it), the budget is solved again, and the prediction is anchored at the measured KLD.
"""


def _add_allocate(sub) -> None:
    p = sub.add_parser("allocate", help="the recipe with the lowest predicted KLD that fits a size budget",
                       description="Write the recipe with the lowest predicted mean KLD that fits a size budget.",
                       epilog=ALLOCATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sensitivity", required=True, help="the sensitivity table (quantsweep sensitivity table)")
    _add_settings(p, "allocate", AllocateSettings, "budgets: one budget; resolution")
    p.add_argument("--gib", type=float, help="budget: the whole file in GiB")
    p.add_argument("--bpw", type=float, help="budget: bits per weight over all tensors")
    p.add_argument("--size-of", default=None, help="budget: the planned size of this ftype or recipe YAML (--model)")
    p.add_argument("--gpu-gib", type=float, help="split budget: non-expert tensors in GiB (with --ram-gib)")
    p.add_argument("--ram-gib", type=float, help="split budget: routed experts in GiB")
    p.add_argument("--model", default="", help="the model (for --size-of)")
    p.add_argument("--size-of-no-imatrix", action="store_true", help="plan --size-of's quant as made without imatrix")
    p.add_argument("--size-of-name", default="", help="--size-of's quant name in the sweep (what the report says)")
    p.add_argument("--name", default="", help="the recipe's name (default: auto-<budget>)")
    p.add_argument("--resolution", type=int, default=None, help="override the size units per budget of the exact "
                   f"solver (more: finer, slower; default {_default(AllocateSettings, 'resolution')})")
    p.add_argument("--refine", default="", metavar="ALLOCATION_JSON",
                   help="refine that allocation: correct the sensitivities by its context runs and measured KLD")
    p.add_argument("--measured", default="", help="with --refine: the evaluation record of the recipe refined")
    p.add_argument("--context", nargs="*", default=[], help="with --refine: its context runs (sensitivity context)")
    p.add_argument("-o", "--output", required=True, help="the recipe YAML")
    p.add_argument("--json", default="", help="the prediction (budget, predicted bytes and KLD, choices) as JSON")
    _manifested(p, inputs=("sensitivity", "model", "refine", "measured", "context"), outputs=("output", "json"))
    p.set_defaults(func=c._allocate)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="summary.csv/.md, size-vs-quality plots (PNG) and a self-contained HTML page")
    p.add_argument("--partial", nargs="?", const=".", default="", metavar="DIR",
                   help="the report of what a sweep has measured so far, from the sweep's own request "
                   "(DIR/results/plan/report.json, written when it starts) into DIR/results/report/partial/ (the "
                   "final report is never touched); the quants not measured yet are listed as pending with their ETA "
                   "(quantsweep status). Runs beside the sweep; the options below are then not given")
    p.add_argument("--entries", help="JSON (or a .json file) listing models, references and quants")
    p.add_argument("--settings", "--gate", default="{}", metavar="JSON",
                   help="JSON (or a .json file) of the config's gate section (" + ", ".join(Gate().to_dict())
                        + "; null or missing: not checked)")
    for flag in ("--csv", "--md", "--html"):
        p.add_argument(flag)
    p.add_argument("--plot-lnppl", help="PNG: size vs ln(PPL(Q)/PPL(ref))")
    p.add_argument("--plot-kld", help="PNG: size vs mean KLD")
    p.add_argument("--plot-speed", default="", help="PNG: mean KLD vs generation speed (needs bench records)")
    p.add_argument("--plot-layers", default="", help="PNG: the auto recipes' types by layer and tensor class")
    p.add_argument("--note", action="append", default=[],
                   help="a line under 'Sweep notes' on both pages (a budget skipped, the imatrix's model); repeatable")
    _manifested(p, inputs=(), outputs=("csv", "md", "html", "plot_lnppl", "plot_kld", "plot_speed", "plot_layers"))
    p.set_defaults(func=watching.report)
    gg = sub.add_parser("gguf", help="GGUF tensor tables").add_subparsers(dest="sub", required=True)
    p = gg.add_parser("info", help="every tensor's name, shape, type and bytes (ik types, split models included)")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c._gguf_info)


def _add_publish(sub) -> None:
    p = sub.add_parser("publish", help="a ready-to-upload Hugging Face repository of a model's chosen quants",
                       description=publishing.DESCRIPTION)
    publishing.add_arguments(p)
    _manifested(p, inputs=("summary", "source", "text", "imatrix", "calibration", "plot"), outputs=())
    p.set_defaults(func=publishing.publish)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantsweep", description=DESCRIPTION)
    ap.add_argument("--version", action="version", version=f"quantsweep {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in (_add_engine, _add_convert, _add_inputs, _add_imatrix, _add_quantize, _add_eval, _add_bench,
                _add_sensitivity, _add_allocate, _add_report, _add_publish):
        add(sub)
    return ap
