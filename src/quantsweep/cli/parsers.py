"""The `quantsweep` argument parser: one builder per group of subcommands; each subcommand's
`func` is its function in `commands`, and `--manifest` names the files its manifest hashes."""

from __future__ import annotations

import argparse

from .. import __version__
from . import commands as c

DESCRIPTION = ("quantsweep: imatrix-guided ik_llama.cpp quantization sweeps of DeepSeek-family models. "
               "Each subcommand is one pipeline step, as the workflow's rules run it.")


def _add_timeout(p) -> None:
    p.add_argument("--timeout-min", type=float, default=0,
                   help="kill the engine run after this many minutes (the workflow passes the rule's runtime)")


def _add_run(p) -> None:
    p.add_argument("--run", default="{}", help="JSON (or a .json file) of the step's run settings: gpu_layers, "
                   "override_tensors, batch, ubatch, mmap, threads, threads_batch, extra_args (config run.<step>)")


def _manifested(p, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    """Give a step --manifest; `inputs`/`outputs` name its file arguments (hashed into it)."""
    p.add_argument("--manifest", default="", help="write a provenance manifest (JSON) here")
    p.set_defaults(manifest_inputs=inputs, manifest_outputs=outputs)


def _add_engine(sub) -> None:
    eng = sub.add_parser("engine", help="build or adopt the ik_llama.cpp tools").add_subparsers(dest="sub",
                                                                                              required=True)
    p = eng.add_parser("build", help="build (cached) and place bin/ + engine.json in --out")
    p.add_argument("--spec", default="", help="JSON of the config's engine section")
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--log", default="")
    p.set_defaults(func=c._engine_build)
    p = eng.add_parser("check-run", help="check the run settings of every step against the engine's flags")
    p.add_argument("--engine", required=True, help="engine.json of the installed engine")
    p.add_argument("--run", default="{}", help="JSON of the config's run section")
    p.add_argument("--steps", default="imatrix,eval,bench", help="the steps the sweep runs (comma-separated)")
    p.add_argument("-o", "--output", default="", help="write each step's resolved settings here (JSON)")
    p.set_defaults(func=c._engine_check_run)


def _add_inputs(sub) -> None:
    p = sub.add_parser("tiny-model", help="write the embedded tiny DeepSeek2 GGUF")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["kv_b", "ik", "mainline"], default="kv_b",
                   help="kv_b: 2-D attn_kv_b only; ik: also 2-D attn_k_b/attn_v_b; "
                        "mainline: 3-D attn_k_b/attn_v_b, no attn_kv_b")
    p.add_argument("--split-kv-b", action="store_true", help="same as --layout ik")
    p.add_argument("--dead-channels", type=int, default=0, metavar="N",
                   help="layer 0's attn_norm gain is zero on channels [0, N)")
    p.add_argument("--train-text", default="", help="text for the bigram statistics (default: bundled)")
    p.set_defaults(func=c._tiny_model)
    p = sub.add_parser("config", help="config files").add_subparsers(dest="sub", required=True)
    p = p.add_parser("check", help="check config files (merged in order, as --configfile does) "
                     "with YAML errors named by line")
    p.add_argument("files", nargs="+", help="e.g. config/config.yaml my-sweep.yaml")
    p.set_defaults(func=c._config_check)
    p = sub.add_parser("text", help="write a bundled text (train, calibration, evaluation)")
    p.add_argument("name", choices=["train", "calibration", "evaluation"])
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=c._text)


def _add_imatrix(sub) -> None:
    from ..engine.argv import IMATRIX_PASSES

    imx = sub.add_parser("imatrix", help="collect and fit importance matrices").add_subparsers(dest="sub",
                                                                                              required=True)
    p = imx.add_parser("collect", help="run one llama-imatrix pass")
    for flag in ("--bin-dir", "--model", "--text", "--log"):
        p.add_argument(flag, required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mode", choices=sorted(IMATRIX_PASSES), default="mla")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", default="", help="JSON record of the run")
    _add_run(p)
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
    _add_timeout(p)
    _manifested(p, inputs=("model", "imatrix", "recipe"), outputs=("output", "record"))
    p.set_defaults(func=c._quantize)
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
        p.add_argument("--ctx", type=int, default=512)
        p.add_argument("--chunks", type=int, default=16)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--mla", type=int, default=1)
        p.add_argument("--fa", default="off", choices=["on", "off", "auto"])
        _add_run(p)
        _add_timeout(p)
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
    p.add_argument("--depths", default="0", help="KV depths to report, comma-separated (multiples of the ubatch)")
    p.add_argument("--tg", type=int, default=128, help="tokens generated per measurement")
    p.add_argument("--repeats", type=int, default=5, help="separate runs (median and range are reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mla", type=int, default=3)
    p.add_argument("--fa", default="on", choices=["on", "off", "auto"])
    _add_run(p)
    _add_timeout(p)
    _manifested(p, inputs=("model",), outputs=("result",))
    p.set_defaults(func=c._bench)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="summary.csv/.md, size-vs-quality plots (PNG) and a self-contained HTML page")
    p.add_argument("--entries", required=True, help="JSON (or a .json file) listing models, references and quants")
    p.add_argument("--gate", default="{}", help='JSON (or a .json file): {"max_dppl_pct": X, "max_kld": Y}')
    for flag in ("--csv", "--md", "--html"):
        p.add_argument(flag, required=True)
    p.add_argument("--plot-lnppl", required=True, help="PNG: size vs ln(PPL(Q)/PPL(ref))")
    p.add_argument("--plot-kld", required=True, help="PNG: size vs mean KLD")
    p.add_argument("--plot-speed", default="", help="PNG: mean KLD vs generation speed (needs bench records)")
    _manifested(p, inputs=(), outputs=("csv", "md", "html", "plot_lnppl", "plot_kld", "plot_speed"))
    p.set_defaults(func=c._report)
    gg = sub.add_parser("gguf", help="GGUF tensor tables").add_subparsers(dest="sub", required=True)
    p = gg.add_parser("info", help="every tensor's name, shape, type and bytes (ik types, split models included)")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c._gguf_info)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantsweep", description=DESCRIPTION)
    ap.add_argument("--version", action="version", version=f"quantsweep {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in (_add_engine, _add_inputs, _add_imatrix, _add_quantize, _add_eval, _add_bench, _add_report):
        add(sub)
    return ap
