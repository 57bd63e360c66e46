"""Running the engine: the one subprocess runner, and one function per engine tool run.

Each run writes the tool's whole output to a log, parses it (exit codes lie: llama-perplexity
exits 0 on failure) and renames its outputs into place only when the log says the run
finished. The functions return the parsed record; writing it is the caller's business.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO, TypeVar

import numpy as np

from ..errors import EngineOutputError, QuantsweepError, StepError
from ..fileio import partial_path
from ..gguf.reader import read_model, shards, verify_complete
from ..imatrix.verify import verify_collected
from ..settings import EvalSettings, ImatrixSettings
from . import argv, logparse
from .outputs import kld_base_header, vocab_size

T = TypeVar("T")


@dataclass
class Completed:
    cmd: list[str]
    rc: int  # negative: killed by that signal
    text: str  # stdout + stderr as the program printed them
    wall_s: float
    timed_out: bool = False
    started: float = 0.0  # epoch seconds

    def times(self) -> dict[str, float]:
        """When the run started and ended (epoch seconds): records keep them, so a check can
        see which jobs ran at the same time (a benchmark must run alone)."""
        return {"started_at": round(self.started, 3), "ended_at": round(self.started + self.wall_s, 3)}


def run_logged(cmd: list[str], log: Path | TextIO | None = None, cwd: Path | None = None,
               env: dict | None = None, timeout_s: float | None = None) -> Completed:
    """The one way quantsweep runs a program (an argument list, never a shell string).

    log: a file path, appended to while the program runs (a three-hour imatrix pass can be
    followed with tail -f); a text stream, written when it ends; or None, kept in memory.
    timeout_s: the watchdog; a hung program is killed after it."""
    t0, started = time.monotonic(), time.time()
    head = "+ " + shlex.join(cmd) + "\n"
    path = Path(log) if isinstance(log, (str, Path)) else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(head)
            start = f.tell()
        out = open(path, "a+b")
    else:
        out = tempfile.TemporaryFile()
    with out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env)
        timed_out = _wait(proc, timeout_s)
        out.flush()
        out.seek(start if path is not None else 0)
        text = out.read().decode("utf-8", errors="replace")
    if path is None and log is not None:
        log.write(head + text)
        log.flush()
    return Completed(cmd, proc.returncode, text, time.monotonic() - t0, timed_out, started)


def _wait(proc: subprocess.Popen, timeout_s: float | None) -> bool:
    """Wait for `proc`; past the timeout kill it. True if it was killed. The engine stays in
    quantsweep's process group, so a signal to the job's group (Snakemake, SLURM, kill -9 of
    the whole tree) reaches it too and no orphan writes a file a rerun is writing."""
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True
    except BaseException:  # interrupted (Ctrl-C): take the engine down too
        proc.kill()
        proc.wait()
        raise


def note(log: Path | TextIO | None, line: str) -> None:
    """A line of quantsweep's own in a run's log (stderr when there is none)."""
    if isinstance(log, (str, Path)):
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:
        (log or sys.stderr).write(line + "\n")


def checked(res: Completed, parse: Callable[[str], T], log: Path | None, what: str,
            timeout_s: float | None = None) -> T:
    """The parsed log of a finished run, or StepError naming the log to read."""
    where = f"; see {log}" if log else ""
    if res.timed_out:
        raise StepError(f"{what} did not finish within {timeout_s / 60:g} min (the step's runtime); "
                        f"killed{where}")
    try:
        parsed = parse(res.text)
    except EngineOutputError as e:
        raise StepError(f"{what} failed ({_status(res.rc)}): {e}{where}") from None
    if res.rc != 0:
        raise StepError(f"{what} ended with {_status(res.rc)} although its output looks complete{where}")
    return parsed


def ran_as_asked(res: Completed, what: str, log: Path | None) -> dict[str, int]:
    """What the run's context really was (logparse.parse_context); StepError naming both sides
    when the engine changed what was asked (ik_llama.cpp #1870: a partial GPU offload forces
    mla 3, which collects no attn_k_b/attn_v_b data and evaluates another graph)."""
    ran, asked = logparse.parse_context(res.text), argv.asked_context(res.cmd)
    diff = [f"{k} = {ran[k]} (asked {v})" for k, v in asked.items() if k in ran and ran[k] != v]
    where = f"; see {log}" if log else ""
    if diff:
        raise StepError(f"{what} ran with {', '.join(diff)}: the engine changed the attention mode or fused "
                        "ops it was given (a partial GPU offload forces mla 3)" + where)
    patterns = [v for f, v in zip(res.cmd, res.cmd[1:]) if f == "-ot"]
    if patterns and not ran.get("tensors_overridden"):
        raise StepError(f"{what}: the tensor override(s) {', '.join(patterns)} matched no tensor of the model "
                        "(run.*.override_tensors)" + where)
    return ran


def _status(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _verified(tmp: Path, out: Path, verify: Callable[[Path], object], what: str, log: Path | None) -> None:
    """StepError naming the final path when what the engine wrote at `tmp` does not read back."""
    try:
        verify(tmp)
    except QuantsweepError as e:
        full = " (the disk is full)" if _disk_full(tmp) else ""
        detail = str(e).replace(str(tmp), str(out))
        raise StepError(f"{what} wrote a bad file{full}: {detail}" + (f"; see {log}" if log else "")) from None


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        return False


def _all_chunks(got: int | None, wanted: int, what: str, text_file: Path, log: Path | None) -> None:
    """Fewer chunks than asked for is a failure (the engine just does fewer): the user asked
    for that much data, and a sweep's numbers must all rest on the same amount."""
    if got is not None and 0 < wanted and got < wanted:
        raise StepError(f"{what} ran {got} of the {wanted} chunks asked for: {text_file} is too short for "
                        f"{wanted} chunks" + (f"; see {log}" if log else ""))


def collect_imatrix(bin_dir: Path, model: Path, text: Path, out: Path, log: Path, mode: str,
                    s: ImatrixSettings, threads: int, timeout_s: float | None = None) -> dict:
    """One imatrix pass (`mode`: a key of argv.IMATRIX_PASSES); returns its parsed summary.
    The file is read back whole (every entry, value and the chunk count) before it is kept."""
    what = f"imatrix ({mode} pass)"
    with partial_path(out) as tmp:
        res = run_logged(argv.imatrix_cmd(bin_dir, model, text, tmp, mode, s, threads), log, timeout_s=timeout_s)
        parsed = checked(res, logparse.parse_imatrix_run, log, what, timeout_s)
        ran = ran_as_asked(res, what, log)
        _all_chunks(parsed.planned, s.chunks, what, text, log)
        if not tmp.exists():
            raise StepError(f"{what} wrote no file; see {log}")
        _verified(tmp, out, lambda p: verify_collected(p, read_model(model), parsed.chunks), what, log)
    # model: the file the pass ran on (imatrix.model: the source, or a quant of it)
    return {"mode": mode, "model": str(model), "chunks": parsed.chunks, "ppl": parsed.ppl, "run": s.run.to_dict(),
            "ran": ran, "wall_s": round(res.wall_s, 2), **res.times(), "cmd": res.cmd,
            "rate": measured_rate(parsed.chunks * s.ctx, "tokens", res)}


def measured_rate(amount: float, unit: str, res: Completed) -> dict:
    """What a run got through per second (tokens for imatrix and perplexity, source bytes for
    quantize): the measured side of the plan's throughput model (quantsweep status)."""
    return {f"{unit}_per_s": round(amount / res.wall_s, 1) if res.wall_s > 0 else None}


def quantize(bin_dir: Path, model: Path, out: Path, log: Path, ftype: str, threads: int,
             imatrix: Path | None = None, extra: list[str] | None = None, timeout_s: float | None = None,
             check_types: Callable[[dict[str, str | None]], None] | None = None) -> dict:
    """extra: recipe options (--custom-q, --token-embedding-type, ...) before the positionals.
    The GGUF is read back (header, tensor table, every tensor's data present) before it is kept;
    check_types, if given, sees the per-tensor types the engine logged first (and may raise)."""
    what = f"quantize {ftype}"
    with partial_path(out) as tmp:
        res = run_logged(argv.quantize_cmd(bin_dir, model, tmp, ftype, threads, imatrix, extra), log,
                         timeout_s=timeout_s)
        parsed = checked(res, logparse.parse_quantize, log, what, timeout_s)
        if check_types is not None:
            check_types(logparse.parse_quantize_tensors(res.text))
        _verified(tmp, out, verify_complete, what, log)
    source = sum(os.path.getsize(f) for f in shards(model))
    return {**asdict(parsed), "wall_s": round(res.wall_s, 2), **res.times(), "cmd": res.cmd,
            "rate": measured_rate(source, "bytes", res)}


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


def _eval_record(model: Path, res: logparse.PerplexityResult, ev: EvalSettings, threads: int, run: Completed,
                 ran: dict[str, int]) -> dict:
    """The evaluation record: the parsed numbers, what ran, and how it was measured (`eval`: the
    settings a perplexity run reads, with the job's threads)."""
    return {
        **asdict(res),
        "ran": ran,
        "model_file": str(model),
        "size_bytes": sum(os.path.getsize(f) for f in shards(model)),
        "eval": {**{k: v for k, v in ev.to_dict().items() if k in ev.MEASURE}, "threads": threads},
        "cmd": run.cmd,
        "wall_s": round(run.wall_s, 2),
        **run.times(),
        "rate": measured_rate((res.chunks or ev.chunks) * ev.ctx, "tokens", run),
    }


def perplexity_base(bin_dir: Path, model: Path, text: Path, kld_base: Path, log: Path, ev: EvalSettings,
                    threads: int, timeout_s: float | None = None) -> dict:
    """PPL of the reference; writes the KLD base logits once for every quant of the model
    (read back: its header must match the run and its size the tokens x vocabulary it holds)."""
    with partial_path(kld_base) as tmp:
        res = run_logged(argv.perplexity_base_cmd(bin_dir, model, text, tmp, ev, threads), log, timeout_s=timeout_s)
        parsed = checked(res, logparse.parse_perplexity, log, "baseline perplexity", timeout_s)
        ran = ran_as_asked(res, "baseline perplexity", log)
        _all_chunks(parsed.chunks, ev.chunks, "baseline perplexity", text, log)
        n_vocab = vocab_size(read_model(model))
        _verified(tmp, kld_base, lambda p: kld_base_header(p, ev.ctx, parsed.chunks, n_vocab),
                  "baseline perplexity", log)
    return _eval_record(model, parsed, ev, threads, res, ran)


def perplexity(bin_dir: Path, model: Path, text: Path, log: Path, ev: EvalSettings, threads: int) -> dict:
    """PPL of a model over ev.chunks chunks of a text (no logits written or read): what the
    engine scores, chunk by chunk, for a check that two files are the same model."""
    what = f"perplexity of {model.name}"
    res = run_logged(argv.perplexity_base_cmd(bin_dir, model, text, None, ev, threads), log)
    parsed = checked(res, logparse.parse_perplexity, log, what)
    ran_as_asked(res, what, log)
    _all_chunks(parsed.chunks, ev.chunks, what, text, log)
    return asdict(parsed)


def perplexity_kld(bin_dir: Path, model: Path, kld_base: Path, log: Path, ev: EvalSettings, threads: int,
                   timeout_s: float | None = None) -> dict:
    """PPL + KLD of a quant against the base logits (checked first: a cut or foreign base file
    is named as such, not left to the engine's exit code 0)."""
    what = f"perplexity/KLD of {model.name}"
    base = kld_base_header(kld_base, ev.ctx, None, vocab_size(read_model(model)))
    res = run_logged(argv.perplexity_kld_cmd(bin_dir, model, kld_base, ev, threads), log, timeout_s=timeout_s)
    parsed = checked(res, lambda t: logparse.parse_perplexity(t, expect_kld=True), log, what, timeout_s)
    ran = ran_as_asked(res, what, log)
    if len(parsed.chunk_kld) != min(base.n_chunk, ev.chunks):
        raise StepError(f"{what} scored {len(parsed.chunk_kld)} chunks, the base file {kld_base} holds "
                        f"{base.n_chunk}; see {log}")
    return _eval_record(model, parsed, ev, threads, res, ran)


def gguf_split(bin_dir: Path, model: Path, out_prefix: Path, max_tensors: int = 0, log: Path | None = None,
               max_mb: int = 0) -> list[Path]:
    """Split a GGUF with the engine's llama-gguf-split (metadata in shard 1 only, as real split
    models are): `max_tensors` per shard or `max_mb` x 10^6 bytes of tensor data; returns the
    shards, each read back complete."""
    res = run_logged(argv.gguf_split_cmd(bin_dir, model, out_prefix, max_tensors, max_mb), log)
    made = sorted(out_prefix.parent.glob(f"{out_prefix.name}-*-of-*.gguf"))
    if res.rc != 0 or not made or made != shards(made[0]):
        raise StepError(f"llama-gguf-split of {model} failed (exit code {res.rc}, {len(made)} shards written)"
                        + (f"; see {log}" if log else ""))
    for f in made:
        verify_complete(f)
    return made


def gguf_merge(bin_dir: Path, first_shard: Path, out: Path, log: Path | None = None) -> Path:
    """Join a split model into `out` with llama-gguf-split --merge (read back complete)."""
    res = run_logged(argv.gguf_merge_cmd(bin_dir, first_shard, out), log)
    if res.rc != 0 or not out.is_file():
        raise StepError(f"llama-gguf-split --merge of {first_shard} failed (exit code {res.rc})"
                        + (f"; see {log}" if log else ""))
    verify_complete(out)
    return out


def dequant_rows(bin_dir: Path, model: Path, wanted, log: Path | None = None) -> dict:
    """Rows of a model's tensors as float32, dequantized by the engine's own ggml
    (quantsweep-dequant, built with the engine): `wanted` = [(tensor, [(first row, rows)])]
    -> {tensor: array (rows, ne0)}. A split model: each tensor read from its own shard."""
    table = read_model(model)
    by_name = table.by_name()
    files = table.files or [table.path]
    per_file: dict[int, list] = {}
    for name, spans in wanted:
        if name not in by_name:
            raise StepError(f"{model}: no tensor {name}")
        per_file.setdefault(by_name[name].shard, []).append((name, spans))
    out = {}
    for shard, items in per_file.items():
        lines = "".join(f"{name} {first} {n}\n" for name, spans in items for first, n in spans)
        cmd = [str(Path(bin_dir) / "quantsweep-dequant"), str(files[shard])]
        res = subprocess.run(cmd, input=lines.encode(), capture_output=True)
        if res.returncode != 0:
            raise StepError(f"quantsweep-dequant {files[shard]} failed: "
                            f"{res.stderr.decode(errors='replace').strip() or f'exit code {res.returncode}'}")
        data = np.frombuffer(res.stdout, dtype="<f4")
        pos = 0
        for name, spans in items:
            ne0 = by_name[name].shape[0]
            n = sum(c for _, c in spans) * ne0
            if pos + n > data.size:
                raise StepError(f"quantsweep-dequant {files[shard]}: {data.size} values, fewer than asked for")
            out[name] = data[pos:pos + n].reshape(-1, ne0)
            pos += n
        if pos != data.size:
            raise StepError(f"quantsweep-dequant {files[shard]}: {data.size - pos} values more than asked for")
        if log is not None:
            note(log, f"+ {shlex.join(cmd)}: {len(items)} tensors, {pos} values")
    return out
