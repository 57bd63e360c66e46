"""Running the engine: the one subprocess runner, and one function per engine tool run.

Each run writes the tool's whole output to a log, parses it (exit codes lie: llama-perplexity
exits 0 on failure) and renames its outputs into place only when the log says the run
finished. The functions return the parsed record; writing it is the caller's business.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO, TypeVar

from ..errors import EngineOutputError, StepError
from ..fileio import partial_path
from ..gguf.reader import shards
from . import argv, logparse

T = TypeVar("T")


@dataclass
class Completed:
    cmd: list[str]
    rc: int
    text: str  # stdout + stderr as the program printed them
    wall_s: float


def run_logged(cmd: list[str], log: Path | TextIO | None = None, cwd: Path | None = None,
               env: dict | None = None) -> Completed:
    """The one way quantsweep runs a program (an argument list, never a shell string).

    log: a file path, appended to while the program runs (a three-hour imatrix pass can be
    followed with tail -f); a text stream, written when it ends; or None, kept in memory."""
    t0 = time.monotonic()
    head = "+ " + shlex.join(cmd) + "\n"
    if isinstance(log, (str, Path)):
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(head)
            f.flush()
            start = f.tell()
        with open(log, "ab") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=cwd, env=env)
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace")
        return Completed(cmd, proc.returncode, text, time.monotonic() - t0)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          cwd=cwd, env=env)
    text = proc.stdout.decode("utf-8", errors="replace")
    if log is not None:
        log.write(head + text)
        log.flush()
    return Completed(cmd, proc.returncode, text, time.monotonic() - t0)


def note(log: Path | TextIO | None, line: str) -> None:
    """A line of quantsweep's own in a run's log (stderr when there is none)."""
    if isinstance(log, (str, Path)):
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:
        (log or sys.stderr).write(line + "\n")


def checked(res: Completed, parse: Callable[[str], T], log: Path | None, what: str) -> T:
    """The parsed log of a finished run, or StepError naming the log to read."""
    where = f"; see {log}" if log else ""
    try:
        parsed = parse(res.text)
    except EngineOutputError as e:
        raise StepError(f"{what} failed (exit code {res.rc}): {e}{where}") from None
    if res.rc != 0:
        raise StepError(f"{what} exited with code {res.rc} although its output looks complete{where}")
    return parsed


def collect_imatrix(bin_dir: Path, model: Path, text: Path, out: Path, log: Path, mode: str,
                    ctx: int, chunks: int, threads: int) -> dict:
    """One imatrix pass (`mode`: a key of argv.IMATRIX_PASSES); returns its parsed summary."""
    with partial_path(out) as tmp:
        res = run_logged(argv.imatrix_cmd(bin_dir, model, text, tmp, mode, ctx, chunks, threads), log)
        parsed = checked(res, logparse.parse_imatrix_run, log, f"imatrix ({mode} pass)")
        if not tmp.exists():
            raise StepError(f"imatrix ({mode} pass) wrote no file; see {log}")
    return {"mode": mode, "chunks": parsed.chunks, "ppl": parsed.ppl, "wall_s": round(res.wall_s, 2),
            "cmd": res.cmd}


def quantize(bin_dir: Path, model: Path, out: Path, log: Path, ftype: str, threads: int,
             imatrix: Path | None = None, extra: list[str] | None = None) -> dict:
    """extra: recipe options (--custom-q, --token-embedding-type, ...) before the positionals."""
    with partial_path(out) as tmp:
        res = run_logged(argv.quantize_cmd(bin_dir, model, tmp, ftype, threads, imatrix, extra), log)
        parsed = checked(res, logparse.parse_quantize, log, f"quantize {ftype}")
    return {**asdict(parsed), "wall_s": round(res.wall_s, 2), "cmd": res.cmd}


@dataclass
class DryRun:
    """What llama-quantize --dry-run says it would do."""

    types: dict[str, str | None]  # per tensor, in file order: the converted-to type, None = copied
    quant_mib: float
    model_mib: float
    n_fallback: int
    text: str
    cmd: list[str]


def dry_run(bin_dir: Path, model: Path, ftype: str, extra: list[str] | None = None,
            imatrix: Path | None = None, log: Path | None = None, threads: int = 1,
            check_imatrix: bool = False) -> DryRun:
    """The type the engine gives each tensor: llama-quantize --dry-run (writes nothing, reads the
    header through mmap). By default with --ignore-imatrix-rules, so every tensor is listed;
    check_imatrix=True leaves the engine's own "Missing importance matrix" checks on."""
    flags = [*(extra or []), "--dry-run"] + ([] if check_imatrix else ["--ignore-imatrix-rules"])
    with tempfile.TemporaryDirectory() as tmp:
        res = run_logged(argv.quantize_cmd(bin_dir, model, Path(tmp) / "dry-run.gguf", ftype, threads, imatrix,
                                           flags), log)
    parsed = checked(res, logparse.parse_quantize, log, f"quantize --dry-run {ftype}")
    return DryRun(logparse.parse_quantize_tensors(res.text), parsed.quant_mib, parsed.model_mib,
                  parsed.n_fallback, res.text, res.cmd)


def _eval_record(model: Path, res: logparse.PerplexityResult, ev: argv.EvalSettings, run: Completed) -> dict:
    return {
        **asdict(res),
        "model_file": str(model),
        "size_bytes": sum(os.path.getsize(f) for f in shards(model)),
        "eval": asdict(ev),
        "cmd": run.cmd,
        "wall_s": round(run.wall_s, 2),
    }


def perplexity_base(bin_dir: Path, model: Path, text: Path, kld_base: Path, log: Path,
                    ev: argv.EvalSettings) -> dict:
    """PPL of the reference; writes the KLD base logits once for every quant of the model."""
    with partial_path(kld_base) as tmp:
        res = run_logged(argv.perplexity_base_cmd(bin_dir, model, text, tmp, ev), log)
        parsed = checked(res, logparse.parse_perplexity, log, "baseline perplexity")
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise StepError(f"baseline perplexity wrote no KLD base file; see {log}")
    return _eval_record(model, parsed, ev, res)


def perplexity_kld(bin_dir: Path, model: Path, kld_base: Path, log: Path, ev: argv.EvalSettings) -> dict:
    """PPL + KLD of a quant against the base logits."""
    res = run_logged(argv.perplexity_kld_cmd(bin_dir, model, kld_base, ev), log)
    parsed = checked(res, lambda t: logparse.parse_perplexity(t, expect_kld=True), log,
                     f"perplexity/KLD of {model.name}")
    return _eval_record(model, parsed, ev, res)


def gguf_split(bin_dir: Path, model: Path, out_prefix: Path, max_tensors: int, log: Path | None = None) -> list[Path]:
    """Split a GGUF with the engine's llama-gguf-split (metadata in shard 1 only, as real split
    models are); returns the shards."""
    res = run_logged(argv.gguf_split_cmd(bin_dir, model, out_prefix, max_tensors), log)
    made = sorted(out_prefix.parent.glob(f"{out_prefix.name}-*-of-*.gguf"))
    if res.rc != 0 or not made:
        raise StepError(f"llama-gguf-split of {model} failed (exit code {res.rc})" + (f"; see {log}" if log else ""))
    return made
