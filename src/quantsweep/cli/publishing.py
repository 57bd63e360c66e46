"""`quantsweep publish`: the ready-to-upload repository of a model's chosen quants, or with
--check the checks of a published folder (before an upload, after a copy)."""

from __future__ import annotations

from pathlib import Path

from ..settings import BASELINE, BenchSettings, EvalSettings, ImatrixSettings, PublishSettings, read_json_arg

DESCRIPTION = """Publish a model's chosen quants (publish.quants: names, pareto or gate) as a Hugging Face
model repository in OUTPUT: each quant split by llama-gguf-split into shards of at most
publish.split_max_size with general.* keys set, the imatrix, recipes, commands, records,
plots, a model card (README.md) with the measured table and download/run commands, SHA256SUMS
and provenance.json. Nothing is left at OUTPUT unless every check passed: shard sizes, the
shards joined equal the unsplit quant, shard 1 loads and scores as the unsplit quant, the
sums, the card's numbers equal summary.csv, no machine path in any file or key."""


def add_arguments(p) -> None:
    p.add_argument("--check", default="", metavar="DIR",
                   help="only check a published folder (sums, shard sizes with --split-max-size, the card's numbers "
                        "against --summary or its own summary.csv, machine paths); the other options are not needed")
    p.add_argument("--model", help="the model's name in the sweep")
    p.add_argument("--summary", help="the sweep's summary.csv")
    p.add_argument("--settings", default="{}", metavar="JSON", help="JSON (or a .json file) of the config's "
                   "publish section (" + ", ".join(PublishSettings().to_dict()) + ")")
    p.add_argument("--eval-settings", default="{}", metavar="JSON", help="the config's eval section (the load check "
                   "scores publish.check_chunks chunks as the sweep scored them)")
    p.add_argument("--bench-settings", default="{}", metavar="JSON",
                   help="the config's bench section (the card's run command)")
    p.add_argument("--imatrix-settings", default="{}", metavar="JSON", help="the config's imatrix section")
    p.add_argument("--bin-dir", help="the engine's tools (llama-gguf-split, llama-perplexity)")
    p.add_argument("--source", help="the unquantized model (shard 1)")
    p.add_argument("--text", help="the evaluation text (the load check scores its first chunks)")
    p.add_argument("--imatrix", default="", help="the sweep's imatrix (.dat)")
    p.add_argument("--calibration", default="", help="the calibration text the imatrix was computed on")
    p.add_argument("--calibration-name", default="", help="how the card names it (default: its file name)")
    p.add_argument("--evaluation-name", default="the evaluation text", help="how the card names the evaluation text")
    p.add_argument("--model-license", default="", help="the model's license when its GGUF names none")
    p.add_argument("--plot", action="append", default=[], help="a report plot for the card; repeatable")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split-max-size", default="", help="with --check: the shard limit (e.g. 50G)")
    p.add_argument("--log", default="publish.log")
    p.add_argument("-o", "--output", help="the folder to write (replaced whole when every check passed)")


def publish(a) -> dict:
    from ..errors import QuantsweepError
    from ..publish import Sweep, check_folder, publish
    from ..settings.publish import split_bytes

    if a.check:
        limit = split_bytes(a.split_max_size) if a.split_max_size else None
        rows = None
        if a.summary:
            from ..report.table import read_rows
            rows = {r.quant: r for r in read_rows(a.summary) if (r.model == a.model or not a.model)
                    and r.quant != BASELINE}
            listed = Path(a.check, "summary.csv")
            if listed.is_file():  # only the quants the folder publishes
                names = {r.quant for r in read_rows(listed)}
                rows = {k: v for k, v in rows.items() if k in names}
        if problems := check_folder(a.check, rows, limit):
            raise QuantsweepError(f"{a.check}: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                                  if len(problems) > 1 else ""))
        print(f"{a.check}: publishable")
        return {}
    missing = [f for f in ("model", "summary", "bin_dir", "source", "text", "output") if not getattr(a, f)]
    if missing:
        raise QuantsweepError(f"publish: --{missing[0].replace('_', '-')} is required (or --check DIR)")
    ps = PublishSettings.from_dict(read_json_arg(a.settings, "--settings"))
    s = Sweep(model=a.model, summary=Path(a.summary), bin_dir=Path(a.bin_dir), source=Path(a.source),
              text=Path(a.text), eval=EvalSettings.from_dict(read_json_arg(a.eval_settings, "--eval-settings")),
              bench=BenchSettings.from_dict(read_json_arg(a.bench_settings, "--bench-settings")),
              imatrix=Path(a.imatrix) if a.imatrix else None,
              imatrix_settings=ImatrixSettings.from_dict(read_json_arg(a.imatrix_settings, "--imatrix-settings")),
              calibration=Path(a.calibration) if a.calibration else None,
              calibration_name=a.calibration_name or (Path(a.calibration).name if a.calibration else ""),
              evaluation_name=a.evaluation_name, model_license=a.model_license,
              plots=[Path(p) for p in a.plot], threads=a.threads, log=Path(a.log))
    done = publish(s, ps, Path(a.output))
    print(f"{a.output}: {len(done['quants'])} quants (" + ", ".join(f"{q}: {n} shard{'s' if n > 1 else ''}" for q, n in
                                                                   done["shards"].items()) + ")")
    print(f"upload: {done['upload']}")
    # the card, the sums and provenance: SHA256SUMS holds every other file's hash
    return {"outputs": [str(Path(a.output, f)) for f in ("README.md", "SHA256SUMS", "provenance.json")]}
