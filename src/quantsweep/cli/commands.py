"""The `quantsweep` subcommands: each a thin wrapper over one package function, taking the
parsed arguments and returning what the step produced (its record, for the manifest)."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from ..errors import QuantsweepError
from ..settings import read_json_arg


def bundled_text(name: str) -> str:
    return resources.files("quantsweep").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")


def _settings(a, cls, section: str, **overrides):
    """The step's settings: --settings (the config's `section` as the workflow passes it), with
    the options given by hand put over it (None: not given), checked as the config is."""
    from ..settings import RunSettings

    s = cls.from_dict(read_json_arg(a.settings, "--settings"), section)
    if getattr(a, "run", None) is not None:  # the step's run settings, key by key over the settings' run
        given = read_json_arg(a.run, "--run")
        RunSettings.from_dict(given, f"run.{section}")
        overrides["run"] = {**s.run.to_dict(), **given}
    return s.updated(overrides, section)


def _timeout(a) -> float | None:
    """--timeout-min (the rule's resources.runtime) in seconds; None = no watchdog."""
    return a.timeout_min * 60 if a.timeout_min and a.timeout_min > 0 else None


def _write_record(path: str, rec: dict) -> None:
    from ..fileio import write_json

    if path:
        write_json(path, rec)


def _engine_build(a) -> None:
    from ..engine.build import install_engine
    from ..settings import EngineSpec

    spec = EngineSpec.from_json(a.settings, "engine")
    meta = install_engine(spec, Path(a.out), Path(a.cache_dir) if a.cache_dir else None,
                          Path(a.log) if a.log else sys.stderr, jobs=a.jobs)
    print(f"engine ready in {a.out} (source {meta['source']}, key {meta.get('key', '-')})")


def _engine_check_run(a) -> None:
    """Every step's run settings against the installed engine's flags, before the sweep starts."""
    from ..fileio import read_json_object, write_json
    from ..settings import STEPS, check_steps, resolve_run

    meta = read_json_object(a.engine, "engine metadata")
    section = read_json_arg(a.settings, "--settings")
    runs = resolve_run(section)
    named = [k for k in section if k in STEPS] if isinstance(section, dict) else []
    steps = [s for s in a.steps.split(",") if s] if a.steps else (named or list(STEPS))
    if unknown := [s for s in steps if s not in runs]:
        raise QuantsweepError(f"--steps: {unknown[0]!r} is not an engine step ({', '.join(STEPS)})")
    check_steps({step: runs[step] for step in steps}, meta.get("flags") or {})
    if a.output:
        write_json(a.output, {step: runs[step].to_dict() for step in steps})
    print(f"run settings OK for {', '.join(steps)} against {a.engine}")


def _convert(a) -> dict:
    import os

    from ..engine.build import default_cache_dir
    from ..settings import ConvertSettings
    from ..steps import convert

    s = ConvertSettings.from_json(a.settings, "--settings")
    model = s.model.updated({"outtype": a.outtype, "split_max_size": a.split_max_size}, "model")
    if a.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the converter's torch
    cache_dir = a.cache_dir or s.engine.cache_dir
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    rec = convert(Path(a.checkpoint), model, s.engine, cache, Path(a.out_dir), a.name, a.python,
                  Path(a.log) if a.log else None)
    print(f"converted {a.checkpoint} -> {rec['model']} ({len(rec['files'])} file(s))")
    return rec


def tiny_spec(a):
    """The tiny model's spec: --settings (models.<name>'s knobs), the options by hand over it."""
    from ..settings import TinySpec

    return _settings(a, TinySpec, "tiny-model", seed=a.seed, layout="ik" if a.split_kv_b else a.layout,
                     dead_channels=a.dead_channels)


def _tiny_model(a) -> None:
    from ..tinymodel import write_tiny_model

    train = Path(a.train_text).read_text(encoding="utf-8") if a.train_text else bundled_text("train")
    write_tiny_model(a.output, train, tiny_spec(a))


def _tiny_checkpoint(a) -> None:
    from ..tinymodel.hf import HFTinySpec, write_checkpoint

    groups = max(a.n_group, 1)
    spec = HFTinySpec(seed=a.seed, n_group=groups, topk_group=max(1, groups // 2))
    print(f"wrote {write_checkpoint(a.output, a.flavour, spec)} ({a.flavour})")


def _sparse_model(a) -> None:
    from ..gguf.deepseek2 import SHAPES, deepseek2_table
    from ..gguf.writer import write_shape_gguf
    from ..hf.sparse import SHAPES as CONFIGS
    from ..hf.sparse import write_sparse_checkpoint

    if a.format == "hf":
        out = write_sparse_checkpoint(a.output, CONFIGS[a.shape])
    else:
        out = Path(a.output)
        write_shape_gguf(deepseek2_table(layout="mainline", **SHAPES[a.shape]), out)
    print(f"wrote {out} ({a.shape}, {a.format}, header only)")


def _text(a) -> None:
    from ..fileio import write_text

    write_text(a.output, bundled_text(a.name))


def _config_check(a) -> None:
    from .. import config

    sweep = config.check_files(a.files)
    print(f"OK: {' + '.join(a.files)}: {len(sweep.models)} model(s), {len(sweep.quants)} quant(s)")


def _plan(a) -> None:
    from .. import capacity, config
    from ..fileio import write_text
    from ..settings import MachineSettings

    sweep = config.check_files(a.files)
    machine = sweep.machine
    for kv in a.machine:
        if kv == "detect":
            machine = machine.updated({"detect": True})
            continue
        key, sep, value = kv.partition("=")
        if not sep:
            raise QuantsweepError(f"--machine {kv}: not KEY=VALUE (keys: {', '.join(MachineSettings().to_dict())})")
        machine = machine.updated({key: json.loads(value) if value.replace(".", "", 1).isdigit() else value},
                                  "--machine")
    p = capacity.plan_sweep(sweep, machine=machine)
    if a.learned:
        from ..status import sweep_status

        st = sweep_status(a.learned)
        p = p.scaled(st.factors)
        print(f"times: the estimates x measured/planned of {len(st.finished)} finished job(s) in {a.learned}")
    sys.stdout.write(capacity.text(p, sweep))
    if a.json:
        write_text(a.json, capacity.to_json(p, sweep))
    if refused := capacity.refusal(p, sweep):
        raise QuantsweepError(refused)


def _init(a) -> None:
    from .. import capacity, config
    from ..capacity.init import init_config, write_workdir
    from ..settings import MachineSettings

    given = {"ram_gib": a.ram_gib, "gpus": a.gpus, "vram_gib": a.vram_gib, "disk_gib": a.disk_gib}
    machine = MachineSettings().updated(given, "init")
    if a.machine == "workstation":
        machine = capacity.detected(machine.updated({"detect": True}), a.dir)
    source = {"source": "gguf", "path": a.model} if a.model else {"source": "hf", "path": a.hf, "outtype": "bf16",
                                                                  "split_max_size": "50G"}
    root = config.workflow_dir()
    base = config.load_yaml(root / "config" / "config.yaml")
    cfg = init_config(base, source, machine, a.machine, str(root))
    path = write_workdir(a.dir, cfg, f"--machine {a.machine}: {machine.describe()}")
    sweep = config.load(cfg, root)
    sys.stdout.write(capacity.text(capacity.plan_sweep(sweep, machine=sweep.machine), sweep))
    run = "--workflow-profile profiles/slurm" if a.machine == "slurm" else "--cores all"
    print(f"wrote {path}; run (in the quantsweep checkout): snakemake --directory {a.dir} {run}")


def _imatrix_collect(a) -> dict:
    from ..settings import ImatrixSettings
    from ..steps import collect_imatrix

    s = _settings(a, ImatrixSettings, "imatrix", ctx=a.ctx, chunks=a.chunks)
    rec = collect_imatrix(Path(a.bin_dir), Path(a.model), Path(a.text), Path(a.output), Path(a.log), a.mode,
                          s, a.threads, _timeout(a))
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

    from ..fileio import refuse_overwrite

    refuse_overwrite(a.output, {"input": a.inputs})
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
    from ..settings import AllocateSettings
    from ..steps import sensitivity_groups

    s = AllocateSettings.from_json(a.settings, "allocate")
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
                          _pools(a.pool), Path(a.kld_base), Path(a.log), _eval_settings(a), a.threads,
                          Path(a.imatrix) if a.imatrix else None, _work_file(a.result), _timeout(a))
    _write_record(a.result, rec)
    return rec


def _sensitivity_context(a) -> dict:
    from ..steps import context_run

    rec = context_run(Path(a.bin_dir), Path(a.model), Path(a.sensitivity), Path(a.allocation), a.group,
                      _pools(a.pool), Path(a.kld_base), Path(a.log), _eval_settings(a), a.threads,
                      Path(a.imatrix) if a.imatrix else None, _work_file(a.result), _timeout(a))
    _write_record(a.result, rec)
    return rec


def _sensitivity_table(a) -> None:
    from ..fileio import read_json_object, write_json
    from ..allocator.sensitivity import table

    runs = {}
    for path in a.runs:
        rec = read_json_object(path, "sensitivity run")
        runs[(rec.get("group"), rec.get("type"))] = path
    write_json(a.output, table(a.groups, a.top or None, runs, a.errors or None, a.external or None))


def _budget(a, s):
    """The budget: one given by hand (--gib, --bpw, --size-of, --gpu-gib/--ram-gib), else the one
    of --settings (the workflow's: a size_of budget then names its quant, --size-of its ftype or
    recipe); checked once, by Budget.from_dict."""
    from ..settings import Budget

    hand = {"gib": a.gib, "bpw": a.bpw, "gpu_gib": a.gpu_gib, "ram_gib": a.ram_gib}
    if any(v is not None for v in hand.values()) or (a.size_of and not s.budgets):
        name = a.size_of_name or a.size_of
        return Budget.from_dict({k: v for k, v in {**hand, "size_of": name, "name": a.name}.items() if v}, "allocate")
    if len(s.budgets) != 1:
        raise QuantsweepError(f"allocate: give one budget (--settings has {len(s.budgets)}; or --gib, --bpw, "
                              "--size-of, --gpu-gib with --ram-gib)")
    b = s.budgets[0]
    return b.updated({"name": a.name or None}, "allocate.budgets[0]")


def _allocate(a) -> dict:
    from ..fileio import write_json, write_text
    from ..settings import AllocateSettings
    from ..steps import allocate, size_of

    s = _settings(a, AllocateSettings, "allocate", resolution=a.resolution)
    budget = _budget(a, s)
    nbytes = None
    if budget.size_of:
        if not a.model:
            raise QuantsweepError("allocate: a size_of budget needs --model (the quant is planned on it)")
        nbytes = size_of(Path(a.model), a.size_of or budget.size_of, not a.size_of_no_imatrix)
    if bool(a.refine) != bool(a.measured):
        raise QuantsweepError("allocate: --refine and --measured go together")
    refine = (Path(a.refine), Path(a.measured), [Path(p) for p in a.context]) if a.refine else None
    text, info = allocate(Path(a.sensitivity), budget, nbytes, s.resolution, refine)
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
    from ..settings import EvalSettings

    return _settings(a, EvalSettings, "eval", ctx=a.ctx, chunks=a.chunks, mla=a.mla, fa=a.fa)


def _bench(a) -> dict:
    from ..settings import BenchSettings
    from ..steps import bench

    depths = None
    if a.depths is not None:
        try:
            depths = [int(d) for d in a.depths.split(",")]
        except ValueError:
            raise QuantsweepError(f"--depths: {a.depths!r} is not a comma-separated list of numbers") from None
    b = _settings(a, BenchSettings, "bench", depths=depths, tg=a.tg, repeats=a.repeats, mla=a.mla, fa=a.fa)
    rec = bench(Path(a.bin_dir), Path(a.model), Path(a.log), b, a.threads, _timeout(a))
    _write_record(a.result, rec)
    return rec


def _eval_base(a) -> dict:
    from ..steps import evaluate_base

    rec = evaluate_base(Path(a.bin_dir), Path(a.model), Path(a.text), Path(a.kld_base), Path(a.log),
                        _eval_settings(a), a.threads, _timeout(a))
    _write_record(a.result, rec)
    return rec


def _eval_kld(a) -> dict:
    from ..steps import evaluate_quant

    rec = evaluate_quant(Path(a.bin_dir), Path(a.model), Path(a.kld_base), Path(a.log), _eval_settings(a),
                         a.threads, _timeout(a))
    _write_record(a.result, rec)
    return rec


def _report(a) -> dict:
    from ..report import parse_entries, smallest_passing, write_report
    from ..report.entries import bench_paths, evaluation_paths
    from ..settings import Gate

    given = {"--entries": a.entries, "--csv": a.csv, "--md": a.md, "--html": a.html, "--plot-lnppl": a.plot_lnppl,
             "--plot-kld": a.plot_kld}
    if missing := [k for k, v in given.items() if not v]:
        raise QuantsweepError(f"report: {', '.join(missing)} required (or --partial DIR)")
    gate = Gate.from_json(a.settings, "gate")
    entries = parse_entries(read_json_arg(a.entries, "--entries"))
    plots = {"lnppl": a.plot_lnppl, "kld": a.plot_kld, **({"speed": a.plot_speed} if a.plot_speed else {}),
             **({"layers": a.plot_layers} if a.plot_layers else {})}
    rows = write_report(entries, gate, a.csv, a.md, a.html, plots, a.note)
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
