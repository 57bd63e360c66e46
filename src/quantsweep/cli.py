"""`quantsweep` command line: thin wrappers over the package, called by the workflow's rules
and usable by hand. An expected failure (bad input, an engine run that did not finish) is
one line on stderr and exit code 1; anything else is a bug: its traceback and exit code 2
(2 is also argparse's code for usage errors)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from . import __version__
from .errors import QuantsweepError


def bundled_text(name: str) -> str:
    return resources.files("quantsweep").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")


def _json_arg(value: str, what: str):
    """A JSON argument given inline or as a .json file."""
    try:
        return json.loads(Path(value).read_text()) if value.endswith(".json") else json.loads(value)
    except json.JSONDecodeError as e:
        raise QuantsweepError(f"--{what}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _timeout(a) -> float | None:
    """--timeout-min (the rule's resources.runtime) in seconds; None = no watchdog."""
    return a.timeout_min * 60 if a.timeout_min and a.timeout_min > 0 else None


def _add_timeout(p) -> None:
    p.add_argument("--timeout-min", type=float, default=0,
                   help="kill the engine run after this many minutes (the workflow passes the rule's runtime)")


def _write_record(path: str, rec: dict) -> None:
    from .fileio import write_json

    if path:
        write_json(path, rec)


# ---- subcommands ------------------------------------------------------------------------------


def _engine_build(a) -> None:
    from .engine.build import EngineSpec, install_engine

    spec = EngineSpec.from_dict(_json_arg(a.spec, "spec") if a.spec else {})
    meta = install_engine(spec, Path(a.out), Path(a.cache_dir) if a.cache_dir else None,
                          Path(a.log) if a.log else sys.stderr)
    print(f"engine ready in {a.out} (source {meta['source']}, key {meta.get('key', '-')})")


def _tiny_model(a) -> None:
    from .tinymodel import TinySpec, write_tiny_model

    train = Path(a.train_text).read_text(encoding="utf-8") if a.train_text else bundled_text("train")
    spec = TinySpec(seed=a.seed, layout=a.layout, split_kv_b=a.split_kv_b, dead_channels=a.dead_channels)
    write_tiny_model(a.output, train, spec)


def _text(a) -> None:
    from .fileio import write_text

    write_text(a.output, bundled_text(a.name))


def _config_check(a) -> None:
    from . import config

    cfg = config.check_files(a.files)
    print(f"OK: {' + '.join(a.files)}: {len(cfg['models'])} model(s), {len(cfg['quants'])} quant(s)")


def _imatrix_collect(a) -> dict:
    from .steps import collect_imatrix

    rec = collect_imatrix(Path(a.bin_dir), Path(a.model), Path(a.text), Path(a.output), Path(a.log), a.mode,
                          a.ctx, a.chunks, a.threads, _timeout(a))
    _write_record(a.record, rec)
    return rec


def _imatrix_info(a) -> None:
    from dataclasses import asdict

    from . import imatrix as imx
    from .steps import matrices_per_entry

    data = imx.read_any(a.input)
    rows = imx.stats(data, matrices_per_entry(a.model))
    head = {"file": a.input, "entries": len(data.entries), "chunks": data.chunks, "dataset": data.dataset}
    if a.json:
        print(json.dumps({**head, "tensors": [asdict(r) for r in rows]}, indent=1))
        return
    print(" ".join(f"{k}={v}" for k, v in head.items()))
    print(f"{'name':44s} {'ncall':>6s} {'nval':>8s} {'mean':>11s} {'max':>11s} {'zeros':>6s} {'nan/inf':>7s}  no data")
    for r in rows:
        empty = ",".join(map(str, r.empty_mats)) or "-"
        print(f"{r.name:44s} {r.ncall:6d} {r.nval:8d} {r.mean:11.4g} {r.max:11.4g} {r.zeros:6d} {r.nonfinite:7d}  {empty}")


def _imatrix_convert(a) -> None:
    from . import imatrix as imx
    from .steps import matrices_per_entry

    imx.write_any(imx.read_any(a.input), a.output, matrices_per_entry(a.model))
    print(f"wrote {a.output}")


def _imatrix_merge(a) -> None:
    from . import imatrix as imx
    from .steps import matrices_per_entry

    merged = imx.merge([imx.read_any(p) for p in a.inputs], a.inputs)
    imx.write_any(merged, a.output, matrices_per_entry(a.model))
    print(f"wrote {a.output}: {len(merged.entries)} entries")


def _imatrix_remap(a) -> None:
    from .steps import remap_imatrix

    fitted, actions = remap_imatrix(a.inputs, a.model, a.output)
    if a.json:
        print(json.dumps({"entries": len(fitted.entries), "actions": actions}, indent=2))
        return
    for line in actions:
        print(line)
    print(f"wrote {a.output}: {len(fitted.entries)} entries")


def _imatrix_check(a) -> None:
    from .fileio import write_text
    from .steps import check_imatrix, require_clean

    report = check_imatrix(Path(a.bin_dir), Path(a.model), Path(a.imatrix), a.ftype, a.recipe or None,
                           Path(a.log) if a.log else None)
    text = report.json() if a.json else report.text()
    if report.problems:
        sys.stderr.write(text)
        require_clean(report)
    if a.output:
        write_text(a.output, text)
    sys.stdout.write(text)


def _quantize(a) -> dict:
    from .steps import quantize

    rec = quantize(Path(a.bin_dir), Path(a.model), Path(a.output), Path(a.log), a.ftype, a.recipe or None,
                   a.threads, Path(a.imatrix) if a.imatrix else None, _timeout(a))
    _write_record(a.record, rec)
    return rec


def _recipe_plan(a) -> None:
    from .gguf.deepseek2 import deepseek_v3_table
    from .gguf.reader import read_model
    from .planner.plan import plan
    from .planner.recipes import recipe_or_ftype

    table = deepseek_v3_table() if a.model == "deepseek-v3" else read_model(a.model)
    p = plan(table, recipe_or_ftype(a.recipe), a.imatrix or None)
    print(p.to_json() if a.json else p.summary())


def _recipe_args(a) -> None:
    import shlex

    from .planner.recipes import engine_args, load_recipe

    print(shlex.join(engine_args(load_recipe(a.recipe))))


def _eval_settings(a):
    from .engine.argv import EvalSettings

    return EvalSettings(ctx=a.ctx, chunks=a.chunks, threads=a.threads, mla=a.mla, fa=a.fa)


def _eval_base(a) -> dict:
    from .steps import evaluate_base

    rec = evaluate_base(Path(a.bin_dir), Path(a.model), Path(a.text), Path(a.kld_base), Path(a.log),
                        _eval_settings(a), _timeout(a))
    _write_record(a.result, rec)
    return rec


def _eval_kld(a) -> dict:
    from .steps import evaluate_quant

    rec = evaluate_quant(Path(a.bin_dir), Path(a.model), Path(a.kld_base), Path(a.log), _eval_settings(a),
                         _timeout(a))
    _write_record(a.result, rec)
    return rec


def _report(a) -> dict:
    from .report import Gate, parse_entries, record_paths, smallest_passing, write_report

    gate = Gate.from_dict(_json_arg(a.gate, "gate"))
    entries = parse_entries(_json_arg(a.entries, "entries"))
    rows = write_report(entries, gate, a.csv, a.md, a.html, {"lnppl": a.plot_lnppl, "kld": a.plot_kld})
    print(f"wrote {a.csv}, {a.md}, {a.html}, {a.plot_lnppl}, {a.plot_kld}: {len(rows)} rows; gate: {gate.describe()}")
    for model in dict.fromkeys(r.model for r in rows):
        best = smallest_passing(rows, model)
        if gate.active:
            print(f"{model}: smallest passing quant: {best.quant if best else 'none'}")
    return {"inputs": {"evaluations": record_paths(entries)}}


def _gguf_info(a) -> None:
    from .gguf.reader import read_model

    t = read_model(a.model)
    if a.json:
        print(json.dumps({
            "files": [str(f) for f in t.files],
            "tensors": [{"name": x.name, "shape": list(x.shape), "type": x.type, "nbytes": x.nbytes} for x in t.tensors],
            "total_bytes": t.total_bytes,
            "bpw": t.bpw,
        }, indent=1))
        return
    for x in t.tensors:
        print(f"{x.name:48s} {str(list(x.shape)):24s} {x.type:10s} {x.nbytes:>14d}")
    shards = f" in {len(t.files)} shards" if len(t.files) > 1 else ""
    print(f"total {t.total_bytes} bytes = {t.total_bytes / 2**30:.3f} GiB, {t.bpw:.4f} bpw, "
          f"{len(t.tensors)} tensors{shards}")


# ---- manifests -------------------------------------------------------------------------------


def _manifested(p, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    """Give a step --manifest; `inputs`/`outputs` name its file arguments (hashed into it)."""
    p.add_argument("--manifest", default="", help="write a provenance manifest (JSON) here")
    p.set_defaults(manifest_inputs=inputs, manifest_outputs=outputs)


def _files(a, names: tuple[str, ...]) -> dict[str, list[str]]:
    """The files behind each argument; a split model's every shard."""
    from .gguf.reader import shards

    out = {}
    for name in names:
        v = getattr(a, name, None)
        files = [f for f in ([v] if isinstance(v, str) else list(v or [])) if f]
        out[name] = [str(s) for f in files for s in shards(f)] if name == "model" else files
    return out


def _write_manifest(a, result, argv: list[str], started: float, wall: float) -> None:
    from . import manifest
    from .fileio import write_json

    result = result if isinstance(result, dict) else {}
    inputs = {**_files(a, a.manifest_inputs), **result.get("inputs", {})}
    outputs = [f for files in _files(a, a.manifest_outputs).values() for f in files]
    cmds = [result["cmd"]] if result.get("cmd") else []
    write_json(a.manifest, manifest.build(argv=["quantsweep", *argv], inputs=inputs, outputs=outputs,
                                          started=started, wall_s=wall, bin_dir=getattr(a, "bin_dir", None),
                                          engine_cmds=cmds))


# ---- the parser ------------------------------------------------------------------------------


def _add_engine(sub) -> None:
    eng = sub.add_parser("engine", help="build or adopt the ik_llama.cpp tools").add_subparsers(dest="sub", required=True)
    p = eng.add_parser("build", help="build (cached) and place bin/ + engine.json in --out")
    p.add_argument("--spec", default="", help="JSON of the config's engine section")
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--log", default="")
    p.set_defaults(func=_engine_build)


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
    p.set_defaults(func=_tiny_model)
    p = sub.add_parser("config", help="config files").add_subparsers(dest="sub", required=True)
    p = p.add_parser("check", help="check config files (merged in order, as --configfile does) "
                     "with YAML errors named by line")
    p.add_argument("files", nargs="+", help="e.g. config/config.yaml my-sweep.yaml")
    p.set_defaults(func=_config_check)
    p = sub.add_parser("text", help="write a bundled text (train, calibration, evaluation)")
    p.add_argument("name", choices=["train", "calibration", "evaluation"])
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_text)


def _add_imatrix(sub) -> None:
    from .engine.argv import IMATRIX_PASSES

    imx = sub.add_parser("imatrix", help="collect and fit importance matrices").add_subparsers(dest="sub", required=True)
    p = imx.add_parser("collect", help="run one llama-imatrix pass")
    for flag in ("--bin-dir", "--model", "--text", "--log"):
        p.add_argument(flag, required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--mode", choices=sorted(IMATRIX_PASSES), default="mla")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", default="", help="JSON record of the run")
    _add_timeout(p)
    _manifested(p, inputs=("model", "text"), outputs=("output", "record"))
    p.set_defaults(func=_imatrix_collect)
    p = imx.add_parser("info", help="entries, ncall, per-tensor stats, experts without data")
    p.add_argument("input")
    p.add_argument("--model", default="", help="GGUF whose 3-D tensors tell experts/heads per entry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_imatrix_info)
    p = imx.add_parser("convert", help="legacy .dat <-> mainline GGUF imatrix (by content / output extension)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="*.gguf writes GGUF, anything else .dat")
    p.add_argument("--model", default="", help="GGUF to split per-expert entries into matrices")
    p.set_defaults(func=_imatrix_convert)
    p = imx.add_parser("merge", help="ncall-weighted merge of imatrices (either format)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--model", default="")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=_imatrix_merge)
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
    p.set_defaults(func=_imatrix_check)
    p = imx.add_parser("remap", help="merge imatrices and fit them to MODEL's tensors")
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("inputs", nargs="+")
    _manifested(p, inputs=("model", "inputs"), outputs=("output",))
    p.set_defaults(func=_imatrix_remap)


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
    p.set_defaults(func=_quantize)
    rc = sub.add_parser("recipe", help="quantization recipes").add_subparsers(dest="sub", required=True)
    p = rc.add_parser("plan", help="per tensor: the type the engine will use and its bytes; totals")
    p.add_argument("--model", required=True, help="GGUF (header only is read), or 'deepseek-v3' for a V3-shaped table")
    p.add_argument("--imatrix", default="", help="fitted imatrix: tensors needing one must have data")
    p.add_argument("--json", action="store_true")
    p.add_argument("recipe", help="recipe YAML or an ftype name")
    p.set_defaults(func=_recipe_plan)
    p = rc.add_parser("args", help="the llama-quantize arguments a recipe compiles to")
    p.add_argument("recipe")
    p.set_defaults(func=_recipe_args)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity and KL divergence").add_subparsers(dest="sub", required=True)
    base = ev.add_parser("base", help="baseline PPL; writes the KLD base logits")
    kld = ev.add_parser("kld", help="PPL + KLD of a quant against the base logits")
    for p in (base, kld):
        for flag in ("--bin-dir", "--model", "--log"):
            p.add_argument(flag, required=True)
        p.add_argument("--kld-base", required=True, help="base logits file (written by 'eval base', read by 'eval kld')")
        p.add_argument("--result", required=True, help="JSON record of the parsed results")
        p.add_argument("--ctx", type=int, default=512)
        p.add_argument("--chunks", type=int, default=16)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--mla", type=int, default=1)
        p.add_argument("--fa", default="off", choices=["on", "off", "auto"])
        _add_timeout(p)
    base.add_argument("--text", required=True)
    _manifested(base, inputs=("model", "text"), outputs=("kld_base", "result"))
    base.set_defaults(func=_eval_base)
    _manifested(kld, inputs=("model", "kld_base"), outputs=("result",))
    kld.set_defaults(func=_eval_kld)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="summary.csv/.md, size-vs-quality plots (PNG) and a self-contained HTML page")
    p.add_argument("--entries", required=True, help="JSON (or a .json file) listing models, references and quants")
    p.add_argument("--gate", default="{}", help='JSON (or a .json file): {"max_dppl_pct": X, "max_kld": Y}')
    for flag in ("--csv", "--md", "--html"):
        p.add_argument(flag, required=True)
    p.add_argument("--plot-lnppl", required=True, help="PNG: size vs ln(PPL(Q)/PPL(ref))")
    p.add_argument("--plot-kld", required=True, help="PNG: size vs mean KLD")
    _manifested(p, inputs=(), outputs=("csv", "md", "html", "plot_lnppl", "plot_kld"))
    p.set_defaults(func=_report)
    gg = sub.add_parser("gguf", help="GGUF tensor tables").add_subparsers(dest="sub", required=True)
    p = gg.add_parser("info", help="every tensor's name, shape, type and bytes (ik types, split models included)")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_gguf_info)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantsweep", description=__doc__)
    ap.add_argument("--version", action="version", version=f"quantsweep {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in (_add_engine, _add_inputs, _add_imatrix, _add_quantize, _add_eval, _add_report):
        add(sub)
    return ap


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        started, t0 = time.time(), time.monotonic()
        result = args.func(args)
        if getattr(args, "manifest", ""):
            _write_manifest(args, result, argv, started, time.monotonic() - t0)
    except (QuantsweepError, OSError) as e:
        print(f"quantsweep: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception:  # a bug: show where it is
        traceback.print_exc()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
