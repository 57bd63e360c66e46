"""The `quantsweep` subcommands: each a thin wrapper over one package function, taking the
parsed arguments and returning what the step produced (its record, for the manifest)."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from ..errors import QuantsweepError


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


def _write_record(path: str, rec: dict) -> None:
    from ..fileio import write_json

    if path:
        write_json(path, rec)


def _engine_build(a) -> None:
    from ..engine.build import EngineSpec, install_engine

    spec = EngineSpec.from_dict(_json_arg(a.spec, "spec") if a.spec else {})
    meta = install_engine(spec, Path(a.out), Path(a.cache_dir) if a.cache_dir else None,
                          Path(a.log) if a.log else sys.stderr)
    print(f"engine ready in {a.out} (source {meta['source']}, key {meta.get('key', '-')})")


def _engine_check_run(a) -> None:
    """Every step's run settings against the installed engine's flags, before the sweep starts."""
    from ..engine.settings import check_steps, resolve
    from ..fileio import read_json_object, write_json

    meta = read_json_object(a.engine, "engine metadata")
    settings = resolve(_json_arg(a.run, "run"))
    steps = [s for s in a.steps.split(",") if s]
    check_steps(settings, meta.get("flags") or {}, steps)
    if a.output:
        write_json(a.output, {step: settings[step].to_dict() for step in steps})
    print(f"run settings OK for {', '.join(steps)} against {a.engine}")


def _convert(a) -> dict:
    import os

    from ..engine.build import default_cache_dir
    from ..engine.spec import EngineSpec
    from ..steps import convert

    spec = EngineSpec.from_dict(_json_arg(a.spec, "spec") if a.spec else {})
    if a.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the converter's torch
    rec = convert(Path(a.checkpoint), spec, Path(a.cache_dir) if a.cache_dir else default_cache_dir(),
                  Path(a.out_dir), a.name, a.outtype, a.split_max_size, a.python, Path(a.log) if a.log else None)
    print(f"converted {a.checkpoint} -> {rec['model']} ({len(rec['files'])} file(s))")
    return rec


def _tiny_model(a) -> None:
    from ..tinymodel import TinySpec, write_tiny_model

    train = Path(a.train_text).read_text(encoding="utf-8") if a.train_text else bundled_text("train")
    spec = TinySpec(seed=a.seed, layout=a.layout, split_kv_b=a.split_kv_b, dead_channels=a.dead_channels)
    write_tiny_model(a.output, train, spec)


def _tiny_checkpoint(a) -> None:
    from ..tinymodel.hf import HFTinySpec, write_checkpoint

    groups = max(a.n_group, 1)
    spec = HFTinySpec(seed=a.seed, n_group=groups, topk_group=max(1, groups // 2))
    print(f"wrote {write_checkpoint(a.output, a.flavour, spec)} ({a.flavour})")


def _text(a) -> None:
    from ..fileio import write_text

    write_text(a.output, bundled_text(a.name))


def _config_check(a) -> None:
    from .. import config

    cfg = config.check_files(a.files)
    print(f"OK: {' + '.join(a.files)}: {len(cfg['models'])} model(s), {len(cfg['quants'])} quant(s)")


def _imatrix_collect(a) -> dict:
    from ..steps import collect_imatrix, run_settings

    settings = run_settings(Path(a.bin_dir), "imatrix", _json_arg(a.run, "run"))
    rec = collect_imatrix(Path(a.bin_dir), Path(a.model), Path(a.text), Path(a.output), Path(a.log), a.mode,
                          a.ctx, a.chunks, a.threads, _timeout(a), settings)
    _write_record(a.record, rec)
    return rec


def _imatrix_info(a) -> None:
    from dataclasses import asdict

    from .. import imatrix as imx
    from ..steps import matrices_per_entry

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
        print(f"{r.name:44s} {r.ncall:6d} {r.nval:8d} {r.mean:11.4g} {r.max:11.4g} {r.zeros:6d} "
              f"{r.nonfinite:7d}  {empty}")


def _imatrix_convert(a) -> None:
    from .. import imatrix as imx
    from ..steps import matrices_per_entry

    imx.write_any(imx.read_any(a.input), a.output, matrices_per_entry(a.model))
    print(f"wrote {a.output}")


def _imatrix_merge(a) -> None:
    from .. import imatrix as imx
    from ..steps import matrices_per_entry

    merged = imx.merge([imx.read_any(p) for p in a.inputs], a.inputs)
    imx.write_any(merged, a.output, matrices_per_entry(a.model))
    print(f"wrote {a.output}: {len(merged.entries)} entries")


def _imatrix_remap(a) -> None:
    from ..steps import remap_imatrix

    fitted, actions = remap_imatrix(a.inputs, a.model, a.output)
    if a.json:
        print(json.dumps({"entries": len(fitted.entries), "actions": actions}, indent=2))
        return
    for line in actions:
        print(line)
    print(f"wrote {a.output}: {len(fitted.entries)} entries")


def _imatrix_check(a) -> None:
    from ..fileio import write_text
    from ..steps import check_imatrix, require_clean

    report = check_imatrix(Path(a.bin_dir), Path(a.model), Path(a.imatrix), a.ftype, a.recipe or None,
                           Path(a.log) if a.log else None)
    text = report.json() if a.json else report.text()
    if report.problems:
        sys.stderr.write(text)
        require_clean(report)
    if a.output:
        write_text(a.output, text)
    sys.stdout.write(text)


def _pools(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        typ, sep, path = item.partition("=")
        if not sep or not typ or not path:
            raise QuantsweepError(f"--pool: {item!r} is not TYPE=FILE")
        out[typ] = Path(path)
    return out


def _quantize(a) -> dict:
    from ..steps import quantize

    rec = quantize(Path(a.bin_dir), Path(a.model), Path(a.output), Path(a.log), a.ftype, a.recipe or None,
                   a.threads, Path(a.imatrix) if a.imatrix else None, _timeout(a), _pools(a.pool))
    _write_record(a.record, rec)
    return rec


def _pool(a) -> dict:
    from ..planner.recipes import check_type
    from ..steps import pool_quantize

    rec = pool_quantize(Path(a.bin_dir), Path(a.model), check_type(a.type, "--type"), Path(a.output), Path(a.log),
                        a.threads, Path(a.imatrix) if a.imatrix else None, _timeout(a))
    _write_record(a.record, rec)
    return rec


def _sensitivity_groups(a) -> None:
    from ..fileio import write_json
    from ..planner.groups import Settings
    from ..steps import sensitivity_groups

    s = Settings.from_config(_json_arg(a.settings, "settings"), "--settings")
    doc = sensitivity_groups(Path(a.model), s, not a.no_imatrix)
    write_json(a.output, doc)
    print(f"{len(doc['groups'])} groups, {len(doc['runs'])} runs besides the top run ({s.top} everywhere)")


def _work_file(result: str) -> Path:
    """Where a measuring run assembles its model: hidden beside its record, removed after."""
    out = Path(result)
    return out.with_name(f".{out.name}.assembled.gguf")


def _sensitivity_run(a) -> dict:
    from ..steps import sensitivity_run

    if bool(a.group) != bool(a.type):
        raise QuantsweepError("sensitivity run: give --group and --type together (neither: the all-top run)")
    rec = sensitivity_run(Path(a.bin_dir), Path(a.model), Path(a.groups), a.group or None, a.type or None,
                          _pools(a.pool), Path(a.kld_base), Path(a.log), _eval_settings(a),
                          Path(a.imatrix) if a.imatrix else None, _work_file(a.result), _timeout(a))
    _write_record(a.result, rec)
    return rec


def _sensitivity_context(a) -> dict:
    from ..steps import context_run

    rec = context_run(Path(a.bin_dir), Path(a.model), Path(a.sensitivity), Path(a.allocation), a.group,
                      _pools(a.pool), Path(a.kld_base), Path(a.log), _eval_settings(a),
                      Path(a.imatrix) if a.imatrix else None, _work_file(a.result), _timeout(a))
    _write_record(a.result, rec)
    return rec


def _sensitivity_table(a) -> None:
    from ..fileio import read_json_object, write_json
    from ..planner.sensitivity import table

    runs = {}
    for path in a.runs:
        rec = read_json_object(path, "sensitivity run")
        runs[(rec.get("group"), rec.get("type"))] = path
    write_json(a.output, table(a.groups, a.top, runs))


def _allocate(a) -> dict:
    from ..fileio import write_json, write_text
    from ..planner.allocate import Budget
    from ..steps import allocate, size_of

    if (a.gpu_gib is None) != (a.ram_gib is None):
        raise QuantsweepError("allocate: --gpu-gib and --ram-gib go together (a split budget)")
    budget = Budget.from_dict({"name": a.name, "gib": a.gib, "bpw": a.bpw, "size_of": a.size_of_name or a.size_of,
                               "gpu_gib": a.gpu_gib, "ram_gib": a.ram_gib}, "allocate")
    nbytes = None
    if a.size_of:
        if not a.model:
            raise QuantsweepError("allocate: --size-of needs --model (the quant is planned on it)")
        nbytes = size_of(Path(a.model), a.size_of, not a.size_of_no_imatrix)
    if bool(a.refine) != bool(a.measured):
        raise QuantsweepError("allocate: --refine and --measured go together")
    refine = (Path(a.refine), Path(a.measured), [Path(p) for p in a.context]) if a.refine else None
    text, info = allocate(Path(a.sensitivity), budget, nbytes, a.resolution, refine)
    info["recipe"] = a.output
    write_text(a.output, text)
    if a.json:
        write_json(a.json, info)
    p = info["predicted"]
    print(f"{budget.name}: {p['tensor_bytes']} of {info['budget']['bytes']} tensor bytes, "
          f"predicted mean KLD {p['kld_mean']:.6g}; wrote {a.output}")
    return {}


def _recipe_plan(a) -> None:
    from ..gguf.deepseek2 import deepseek_v3_table
    from ..gguf.reader import read_model
    from ..planner.plan import plan
    from ..planner.recipes import recipe_or_ftype

    table = deepseek_v3_table() if a.model == "deepseek-v3" else read_model(a.model)
    p = plan(table, recipe_or_ftype(a.recipe), a.imatrix or None)
    print(p.to_json() if a.json else p.summary())


def _recipe_args(a) -> None:
    import shlex

    from ..planner.recipes import engine_args, load_recipe

    print(shlex.join(engine_args(load_recipe(a.recipe))))


def _eval_settings(a):
    from ..engine.argv import EvalSettings
    from ..steps import run_settings

    return EvalSettings(ctx=a.ctx, chunks=a.chunks, threads=a.threads, mla=a.mla, fa=a.fa,
                        run=run_settings(Path(a.bin_dir), "eval", _json_arg(a.run, "run")))


def _bench(a) -> dict:
    from ..engine.argv import BenchSettings
    from ..steps import bench, run_settings

    try:
        depths = tuple(int(d) for d in a.depths.split(","))
    except ValueError:
        raise QuantsweepError(f"--depths: {a.depths!r} is not a comma-separated list of numbers") from None
    b = BenchSettings(depths=depths, tg=a.tg, repeats=a.repeats, mla=a.mla, fa=a.fa, threads=a.threads,
                      run=run_settings(Path(a.bin_dir), "bench", _json_arg(a.run, "run")))
    rec = bench(Path(a.bin_dir), Path(a.model), Path(a.log), b, _timeout(a))
    _write_record(a.result, rec)
    return rec


def _eval_base(a) -> dict:
    from ..steps import evaluate_base

    rec = evaluate_base(Path(a.bin_dir), Path(a.model), Path(a.text), Path(a.kld_base), Path(a.log),
                        _eval_settings(a), _timeout(a))
    _write_record(a.result, rec)
    return rec


def _eval_kld(a) -> dict:
    from ..steps import evaluate_quant

    rec = evaluate_quant(Path(a.bin_dir), Path(a.model), Path(a.kld_base), Path(a.log), _eval_settings(a),
                         _timeout(a))
    _write_record(a.result, rec)
    return rec


def _report(a) -> dict:
    from ..report import Gate, parse_entries, smallest_passing, write_report
    from ..report.entries import bench_paths, evaluation_paths

    gate = Gate.from_dict(_json_arg(a.gate, "gate"))
    entries = parse_entries(_json_arg(a.entries, "entries"))
    plots = {"lnppl": a.plot_lnppl, "kld": a.plot_kld, **({"speed": a.plot_speed} if a.plot_speed else {})}
    rows = write_report(entries, gate, a.csv, a.md, a.html, plots)
    print(f"wrote {a.csv}, {a.md}, {a.html}, {', '.join(plots.values())}: {len(rows)} rows; gate: {gate.describe()}")
    for model in dict.fromkeys(r.model for r in rows):
        best = smallest_passing(rows, model)
        if gate.active:
            print(f"{model}: smallest passing quant: {best.quant if best else 'none'}")
    return {"inputs": {"evaluations": evaluation_paths(entries), "bench": bench_paths(entries)}}


def _gguf_info(a) -> None:
    from ..gguf.reader import read_model

    t = read_model(a.model)
    if a.json:
        print(json.dumps({
            "files": [str(f) for f in t.files],
            "tensors": [{"name": x.name, "shape": list(x.shape), "type": x.type, "nbytes": x.nbytes}
                        for x in t.tensors],
            "total_bytes": t.total_bytes,
            "bpw": t.bpw,
        }, indent=1))
        return
    for x in t.tensors:
        print(f"{x.name:48s} {str(list(x.shape)):24s} {x.type:10s} {x.nbytes:>14d}")
    shards = f" in {len(t.files)} shards" if len(t.files) > 1 else ""
    print(f"total {t.total_bytes} bytes = {t.total_bytes / 2**30:.3f} GiB, {t.bpw:.4f} bpw, "
          f"{len(t.tensors)} tensors{shards}")
