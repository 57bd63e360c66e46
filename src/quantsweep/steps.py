"""The pipeline's steps, one function each, as the workflow's rules run them (through the CLI)
and as a user can call them by hand: each composes the engine, the model's tensor table, the
imatrix tools and the planner, and returns what the step produced. Writing records and
manifests is the CLI's business, so a step here never decides where its record goes.

Data flows one way: engine -> model -> imatrix passes -> remap -> check -> quantize ->
evaluate (the report reads only the evaluation records).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from . import imatrix as imx
from .engine import argv, run
from .engine.bench import sweep_bench
from .engine.build import installed_flags
from .engine.settings import RunSettings, check_steps
from .errors import ImatrixError
from .gguf.reader import first_shard, read_model, read_table
from .planner.plan import as_options, plan
from .planner.recipes import Recipe, load_recipe


def quant_spec(recipe: str | None, ftype: str | None) -> Recipe | str:
    """What a quant is made with: its recipe (loaded once), else its ftype."""
    return load_recipe(recipe) if recipe else str(ftype)


def quant_args(spec: Recipe | str) -> tuple[str, list[str]]:
    """(positional ftype, option flags) llama-quantize is given for a recipe or an ftype."""
    opts, _ = as_options(spec)
    return opts.ftype, opts.argv()


def matrices_per_entry(model: str | Path | None) -> dict[str, int]:
    """Matrices per imatrix entry (experts / heads of 3-D tensors) from a model's header."""
    if not model:
        return {}
    return {t.name: t.shape[2] for t in read_model(model).tensors if len(t.shape) > 2}


def run_settings(bin_dir: Path, step: str, d: dict | None) -> RunSettings:
    """A step's run settings (the config's run.<step>, defaults applied), checked against the
    flags the installed engine's tool lists in its --help."""
    s = RunSettings.from_dict(d, f"run.{step}")
    if s.extra_args or s.gpu_layers:  # else nothing the engine's --help has a say on
        check_steps({step: s}, installed_flags(bin_dir), [step])
    return s


def collect_imatrix(bin_dir: Path, model: Path, text: Path, output: Path, log: Path, mode: str,
                    ctx: int, chunks: int, threads: int, timeout_s: float | None = None,
                    settings: RunSettings = RunSettings()) -> dict:
    """One imatrix pass of the engine; returns its record."""
    return run.collect_imatrix(bin_dir, first_shard(model), text, output, log, mode, ctx, chunks, threads,
                               timeout_s, settings)


def remap_imatrix(inputs: list[str], model: str | Path, output: str | Path) -> tuple[imx.Imatrix, list[str]]:
    """Merge imatrix files (passes, external ones) and fit them to the model; returns the fitted
    imatrix (written to `output`) and one line per action taken."""
    merged = imx.merge([imx.read_any(p) for p in inputs], [str(p) for p in inputs])
    fitted, actions = imx.remap(merged, read_model(model))
    imx.write_any(fitted, output, matrices_per_entry(model))
    return fitted, actions


@dataclass
class CheckReport:
    imatrix: str
    model: str
    ftype: str
    recipe: str | None
    tensors_quantized: int
    problems: list[imx.Problem]

    def text(self) -> str:
        verdict = "FAIL" if self.problems else "OK"
        lines = [f"{p.tensor:40s} {p.type:10s} {p.entry:40s} {p.problem}" for p in self.problems]
        return "\n".join([f"{verdict}: {self.imatrix} for {self.model} at {self.recipe or self.ftype}: "
                          f"{self.tensors_quantized} tensors quantized, {len(self.problems)} problem(s)",
                          *lines]) + "\n"

    def json(self) -> str:
        return json.dumps({"ftype": self.ftype, "recipe": self.recipe, "tensors_quantized": self.tensors_quantized,
                           "problems": [asdict(p) for p in self.problems]}, indent=1) + "\n"


def check_imatrix(bin_dir: Path, model: Path, imatrix: Path, ftype: str | None, recipe: str | None,
                  log: Path | None = None) -> CheckReport:
    """Pre-flight: the engine's --dry-run gives each tensor's type; the imatrix must have finite
    data of the right size for every tensor whose type needs it."""
    spec = quant_spec(recipe, ftype)
    ft, extra = quant_args(spec)
    table = read_model(model)
    im = imx.read_any(imatrix)
    plan(table, spec, has_imatrix=True)  # a recipe rule that matches no tensor is refused here
    types = run.dry_run(bin_dir, first_shard(model), ft, extra, log=log).types
    problems = imx.check(im, table, types, ft)
    return CheckReport(str(imatrix), str(model), ft, recipe or None, sum(1 for v in types.values() if v), problems)


def quantize(bin_dir: Path, model: Path, output: Path, log: Path, ftype: str | None, recipe: str | None,
             threads: int, imatrix: Path | None = None, timeout_s: float | None = None) -> dict:
    """llama-quantize, with the size the planner predicted kept beside what the engine reports
    and what the written file's header says."""
    spec = quant_spec(recipe, ftype)
    ft, extra = quant_args(spec)
    predicted = plan(read_model(model), spec, has_imatrix=bool(imatrix))  # refuses a rule matching nothing
    rec = run.quantize(bin_dir, first_shard(model), output, log, ft, threads, imatrix, extra, timeout_s)
    rec.update(predicted_bytes=predicted.total_bytes, tensor_bytes=read_table(output).total_bytes,
               file_bytes=output.stat().st_size, recipe=recipe or None, ftype=ft)
    return rec


def evaluate_base(bin_dir: Path, model: Path, text: Path, kld_base: Path, log: Path,
                  ev: argv.EvalSettings, timeout_s: float | None = None) -> dict:
    """PPL of the reference, writing the KLD base logits; returns the evaluation record."""
    return run.perplexity_base(bin_dir, first_shard(model), text, kld_base, log, ev, timeout_s)


def evaluate_quant(bin_dir: Path, model: Path, kld_base: Path, log: Path, ev: argv.EvalSettings,
                   timeout_s: float | None = None) -> dict:
    """PPL + KLD of a quant against the base logits; returns the evaluation record."""
    return run.perplexity_kld(bin_dir, first_shard(model), kld_base, log, ev, timeout_s)


def bench(bin_dir: Path, model: Path, log: Path, b: argv.BenchSettings, timeout_s: float | None = None) -> dict:
    """Speed of a model (a quant or the reference): llama-sweep-bench, repeated; its record."""
    return sweep_bench(bin_dir, first_shard(model), log, b, timeout_s)


def require_clean(report: CheckReport) -> None:
    """ImatrixError when the pre-flight check found problems (the table is in the report)."""
    if report.problems:
        raise ImatrixError(f"imatrix check of {report.imatrix} failed: {len(report.problems)} problem(s) for "
                           f"{report.recipe or report.ftype}; first: {imx.describe(report.problems)}")
