"""The pipeline steps that run the engine: each runs one command into a log, parses the log
(never trusting the exit code alone) and renames its outputs into place only on success."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from . import commands, logparse
from .fileio import partial_path, write_json


class StepError(RuntimeError):
    """A step failed; the message names the log to read."""


def run_logged(cmd: list[str], log: Path) -> tuple[int, str, float]:
    """Run cmd with stdout+stderr appended to log; return (exit code, its output, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write("+ " + shlex.join(cmd) + "\n")
        f.flush()
        start = f.tell()
    with open(log, "ab") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", errors="replace")
    return proc.returncode, text, wall


def _check(rc: int, text: str, parse, log: Path, what: str):
    try:
        parsed = parse(text)
    except logparse.EngineOutputError as e:
        raise StepError(f"{what} failed (exit code {rc}): {e}; see {log}") from None
    if rc != 0:
        raise StepError(f"{what} exited with code {rc} although its output looks complete; see {log}")
    return parsed


def collect_imatrix(bin_dir: Path, model: Path, text: Path, out: Path, log: Path, mode: str,
                    ctx: int, chunks: int, threads: int) -> dict:
    """One imatrix pass (`mode` is 'mla' or 'std'); returns its parsed summary."""
    with partial_path(out) as tmp:
        cmd = commands.imatrix_cmd(bin_dir, model, text, tmp, mode, ctx, chunks, threads)
        rc, out_text, wall = run_logged(cmd, log)
        res = _check(rc, out_text, logparse.parse_imatrix_run, log, f"imatrix ({mode} pass)")
        if not tmp.exists():
            raise StepError(f"imatrix ({mode} pass) wrote no file; see {log}")
    return {"mode": mode, "chunks": res.chunks, "ppl": res.ppl, "wall_s": round(wall, 2), "cmd": cmd}


def quantize(bin_dir: Path, model: Path, out: Path, log: Path, ftype: str, threads: int,
             imatrix: Path | None = None, extra: list[str] | None = None) -> dict:
    """extra: recipe options (--custom-q, --token-embedding-type, ...) before the positionals."""
    with partial_path(out) as tmp:
        cmd = commands.quantize_cmd(bin_dir, model, tmp, ftype, threads, imatrix, extra)
        rc, text, wall = run_logged(cmd, log)
        res = _check(rc, text, logparse.parse_quantize, log, f"quantize {ftype}")
    return {**asdict(res), "wall_s": round(wall, 2), "cmd": cmd}


def quantize_plan(bin_dir: Path, model: Path, ftype: str, log: Path, threads: int = 1,
                  extra: list[str] | None = None) -> dict[str, str | None]:
    """The type the engine gives each tensor for `ftype`: llama-quantize --dry-run (writes nothing,
    reads only the header through mmap), with --ignore-imatrix-rules so it lists every tensor."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = commands.quantize_cmd(bin_dir, model, Path(tmp) / "dry-run.gguf", ftype, threads, None,
                                    [*(extra or []), "--dry-run", "--ignore-imatrix-rules"])
        rc, text, _ = run_logged(cmd, log)
    _check(rc, text, logparse.parse_quantize, log, f"quantize --dry-run {ftype}")
    return logparse.parse_quantize_tensors(text)


def _eval_record(model: Path, res: logparse.PerplexityResult, ev: commands.EvalSettings,
                 cmd: list[str], wall: float) -> dict:
    return {
        **asdict(res),
        "model_file": str(model),
        "size_bytes": os.path.getsize(model),
        "eval": asdict(ev),
        "cmd": cmd,
        "wall_s": round(wall, 2),
    }


def perplexity_base(bin_dir: Path, model: Path, text: Path, kld_base: Path, result: Path,
                    log: Path, ev: commands.EvalSettings) -> dict:
    """Baseline PPL; writes the KLD base logits once for every quant of the model."""
    with partial_path(kld_base) as tmp:
        cmd = commands.perplexity_base_cmd(bin_dir, model, text, tmp, ev)
        rc, out, wall = run_logged(cmd, log)
        res = _check(rc, out, logparse.parse_perplexity, log, "baseline perplexity")
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise StepError(f"baseline perplexity wrote no KLD base file; see {log}")
    rec = _eval_record(model, res, ev, cmd, wall)
    write_json(result, rec)
    return rec


def perplexity_kld(bin_dir: Path, model: Path, kld_base: Path, result: Path, log: Path,
                   ev: commands.EvalSettings) -> dict:
    cmd = commands.perplexity_kld_cmd(bin_dir, model, kld_base, ev)
    rc, out, wall = run_logged(cmd, log)
    res = _check(rc, out, lambda t: logparse.parse_perplexity(t, expect_kld=True), log, f"perplexity/KLD of {model.name}")
    rec = _eval_record(model, res, ev, cmd, wall)
    write_json(result, rec)
    return rec
