"""Parsers for what the engine prints. Exit codes lie (llama-perplexity exits 0 on failure),
so a run counts as done only when its log carries the final lines parsed here."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..errors import EngineOutputError

_NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"

# Both forms: "Final estimate: PPL over 16 chunks for n_ctx=512 = 12.3456 +/- 0.12345" and "... PPL = X +/- Y".
_FINAL_PPL = re.compile(
    rf"Final estimate: PPL(?: over (\d+) chunks for n_ctx=(\d+))? = ({_NUM}) \+/- ({_NUM})"
)
_CHUNK_PPL = re.compile(rf"\[(\d+)\]({_NUM}),")
# KLD mode, one row per chunk (running values): chunk, PPL, ln ratio, KLD, Δp RMS %, same top p %
_CHUNK_KLD = re.compile(
    rf"^\s*(\d+)\s+({_NUM}) ±\s+{_NUM}\s+({_NUM}) ±\s+{_NUM}\s+({_NUM}) ±\s+{_NUM}\s+"
    rf"({_NUM}) ±\s+{_NUM} %\s+({_NUM}) ±\s+{_NUM} %", re.M)
_META_SIZE = re.compile(rf"model size\s*=\s*({_NUM}) (KiB|MiB|GiB) \(({_NUM}) BPW\)")
_UNIT = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_META_PARAMS = re.compile(rf"model params\s*=\s*({_NUM}) ([KMBT])")
_KLD_MEAN = re.compile(rf"^\s*Mean\s+KLD:\s+({_NUM})\s+±\s+({_NUM})", re.M)
_KLD_PCT = re.compile(rf"^\s*({_NUM})%\s+KLD:\s+({_NUM})", re.M)
_KLD_NAMED = re.compile(rf"^\s*(Maximum|Median|Minimum)\s+KLD:\s+({_NUM})", re.M)
_PPL_Q = re.compile(rf"^Mean PPL\(Q\)\s*:\s*({_NUM})\s+±\s+({_NUM})", re.M)
_PPL_BASE = re.compile(rf"^Mean PPL\(base\)\s*:\s*({_NUM})\s+±\s+({_NUM})", re.M)
_LN_RATIO = re.compile(rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*({_NUM})\s+±\s+({_NUM})", re.M)
_SAME_TOP = re.compile(rf"^Same top p\s*:\s*({_NUM})\s+±\s+({_NUM})\s*%", re.M)
_RMS_DP = re.compile(rf"^RMS Δp\s*:\s*({_NUM})\s+±\s+({_NUM})\s*%", re.M)
_QUANT_SIZE = re.compile(rf"quant size\s*=\s*({_NUM}) MB")
_MODEL_SIZE = re.compile(rf"model size\s*=\s*({_NUM}) MB")
_IMATRIX_LOADED = re.compile(r"load_imatrix: loaded (\d+) importance matrix entries from (.+?) computed on (\d+) chunks")
_NOT_FOUND = re.compile(r"did not find weights for (\S+)")
_FALLBACK = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")
_IMATRIX_STORED = re.compile(r"stored collected data after (\d+) chunks in (\S+)")


_IMATRIX_CHUNKS = re.compile(r"computing over (\d+) chunks")
_TOO_FEW = re.compile(r"you need at least (\d+) tokens .*?context of (\d+)")
_ONLY = re.compile(r"tokenizes to only (\d+) tokens")
# Lines in which the engine says why it stopped (the first one found is quoted in the error).
_WHY = re.compile(r"\b(?:failed|error)\b|(?:GGML_ASSERT|what\(\)|does not look like|has been computed with|"
                  r"inconsistent vocabulary|Missing importance|is different from tensor size|detected in|"
                  r"Unsupported|no data in file|terminate called)", re.I)


def failure_reason(text: str) -> str:
    """Why an engine run stopped, in one line, from its own output ("" when it does not say)."""
    if (need := _TOO_FEW.search(text)) and (only := _ONLY.search(text)):
        return (f"the text tokenizes to only {only.group(1)} tokens; a context of {need.group(2)} "
                f"needs at least {need.group(1)}")
    return next((" ".join(ln.split()) for ln in text.splitlines() if _WHY.search(ln)), "")


def _with_reason(what: str, text: str) -> str:
    reason = failure_reason(text)
    return f"{what}: {reason}" if reason else what


_CONTEXT = re.compile(r"^llama_init_from_model: (n_ctx|n_batch|n_ubatch|flash_attn|mla_attn|fused_moe|fused_up_gate)"
                      r"\s*=\s*(\d+)\s*$", re.M)
_MLA_CHANGED = re.compile(r"changing MLA from (\d+) to (\d+)")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_OVERRIDDEN = re.compile(r"^Tensor \S+ \(size = .*?\) buffer type overriden to (\S+)", re.M)


def parse_context(text: str) -> dict[str, int]:
    """What a run really used, as the engine reports it: its context (n_ctx, n_batch, n_ubatch,
    flash_attn, mla_attn, fused_moe, fused_up_gate) with a later "changing MLA from X to Y" (a
    GGUF without attn_kv_b) applied; the layers offloaded to a GPU (GPU builds print it) and the
    number of tensors an -ot pattern moved (any build prints each one)."""
    ran = {m.group(1): int(m.group(2)) for m in _CONTEXT.finditer(text)}
    if changed := _MLA_CHANGED.search(text):
        ran["mla_attn"] = int(changed.group(2))
    if off := _OFFLOADED.search(text):
        ran["gpu_layers"], ran["layers"] = int(off.group(1)), int(off.group(2))
    if moved := _OVERRIDDEN.findall(text):
        ran["tensors_overridden"] = len(moved)
    return ran


_BENCH_ROW = re.compile(r'^\{"n_kv_max":.*\}\s*$', re.M)


@dataclass
class BenchRow:
    """One sweep-bench measurement: at `n_kv` tokens of context, a prompt of `pp` tokens and
    `tg` generated tokens, in tokens per second."""

    n_kv: int
    pp: int
    tg: int
    pp_tps: float
    tg_tps: float
    n_kv_max: int


def parse_sweep_bench(text: str) -> list[BenchRow]:
    """The JSON lines of a llama-sweep-bench run (--output-format jsonl); complete only when a row
    came for every depth 0, pp, 2 pp, ... below its context and every speed is a positive number."""
    rows = []
    for m in _BENCH_ROW.finditer(text):
        try:
            d = json.loads(m.group(0))
            rows.append(BenchRow(int(d["n_kv"]), int(d["pp"]), int(d["tg"]), float(d["speed_pp"]),
                                 float(d["speed_tg"]), int(d["n_kv_max"])))
        except (ValueError, KeyError, TypeError) as e:
            raise EngineOutputError(f"unreadable sweep-bench result line ({e}): {m.group(0)[:120]}") from None
    if not rows:
        raise EngineOutputError(_with_reason("no sweep-bench result lines in the output", text))
    want = list(range(0, rows[0].n_kv_max, rows[0].pp))
    if [r.n_kv for r in rows] != want:
        raise EngineOutputError(f"sweep-bench measured depths {[r.n_kv for r in rows]}, not {want}: it stopped early")
    bad = next((r for r in rows if not (math.isfinite(r.pp_tps) and r.pp_tps > 0 and math.isfinite(r.tg_tps)
                                        and r.tg_tps > 0)), None)
    if bad is not None:
        raise EngineOutputError(f"sweep-bench speed at depth {bad.n_kv} is PP {bad.pp_tps}, TG {bad.tg_tps} t/s")
    return rows


_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+) - \[([\d,\s]+)\], type =\s*(\S+),(.*)$")
_CONVERTING = re.compile(r"converting to (\S+) \.\.")


def _f(s: str) -> float:
    return float(s)


@dataclass
class PerplexityResult:
    """One llama-perplexity run: PPL always; the KLD block when run against a base file."""

    ppl: float
    ppl_err: float
    chunks: int | None = None
    n_ctx: int | None = None
    chunk_ppl: list[float] = field(default_factory=list)
    chunk_kld: list[float] = field(default_factory=list)  # running mean KLD after each chunk
    model_bytes: float | None = None  # as the engine's loader reports it (tensor data only)
    bpw: float | None = None
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_percentiles: dict[str, float] = field(default_factory=dict)
    ppl_base: float | None = None
    ln_ratio: float | None = None
    ln_ratio_err: float | None = None
    same_top_p: float | None = None
    same_top_p_err: float | None = None
    rms_dp: float | None = None


def parse_perplexity(text: str, expect_kld: bool = False) -> PerplexityResult:
    """Parse a llama-perplexity log (stdout+stderr). Raises when the final statistics are missing."""
    kld = _KLD_MEAN.search(text)
    ppl_q = _PPL_Q.search(text)
    final = _FINAL_PPL.search(text)
    if expect_kld and not (kld and ppl_q):
        raise EngineOutputError(_with_reason("no KL divergence statistics in the perplexity output", text))
    if not final and not ppl_q:
        raise EngineOutputError(_with_reason("no 'Final estimate: PPL' line in the perplexity output", text))
    if final:
        res = PerplexityResult(ppl=_f(final.group(3)), ppl_err=_f(final.group(4)))
        if final.group(1):
            res.chunks, res.n_ctx = int(final.group(1)), int(final.group(2))
    else:
        res = PerplexityResult(ppl=_f(ppl_q.group(1)), ppl_err=_f(ppl_q.group(2)))
    res.chunk_ppl = [_f(m.group(2)) for m in _CHUNK_PPL.finditer(text)]
    if kld_rows := list(_CHUNK_KLD.finditer(text)):
        res.chunk_ppl = [_f(m.group(2)) for m in kld_rows]
        res.chunk_kld = [_f(m.group(4)) for m in kld_rows]
    meta = _META_SIZE.search(text)
    if meta:
        res.model_bytes = _f(meta.group(1)) * _UNIT[meta.group(2)]
        res.bpw = _f(meta.group(3))
    if kld:
        res.kld_mean, res.kld_err = _f(kld.group(1)), _f(kld.group(2))
        res.kld_percentiles = {m.group(1): _f(m.group(2)) for m in _KLD_PCT.finditer(text)}
        res.kld_percentiles.update({m.group(1).lower(): _f(m.group(2)) for m in _KLD_NAMED.finditer(text)})
    if ppl_q:
        res.ppl, res.ppl_err = _f(ppl_q.group(1)), _f(ppl_q.group(2))
    if m := _PPL_BASE.search(text):
        res.ppl_base = _f(m.group(1))
    if m := _LN_RATIO.search(text):
        res.ln_ratio, res.ln_ratio_err = _f(m.group(1)), _f(m.group(2))
    if m := _SAME_TOP.search(text):
        res.same_top_p, res.same_top_p_err = _f(m.group(1)), _f(m.group(2))
    if m := _RMS_DP.search(text):
        res.rms_dp = _f(m.group(1))
    if not math.isfinite(res.ppl):
        raise EngineOutputError(f"perplexity is {res.ppl}")
    bad = [k for k, v in (("mean KLD", res.kld_mean), ("PPL(Q)/PPL(base) ln ratio", res.ln_ratio))
           if v is not None and not math.isfinite(v)]
    if bad:
        raise EngineOutputError(f"{bad[0]} is not a number in the perplexity output")
    return res


@dataclass
class QuantizeResult:
    model_mib: float
    quant_mib: float
    imatrix_entries: int | None = None
    imatrix_chunks: int | None = None
    not_found: list[str] = field(default_factory=list)
    n_fallback: int = 0


def parse_quantize(text: str) -> QuantizeResult:
    """Parse a llama-quantize log; the 'quant size' line only appears after a complete run."""
    q = _QUANT_SIZE.search(text)
    m = _MODEL_SIZE.search(text)
    if not q or not m or "failed to quantize" in text:
        said = (ln.strip() for ln in text.splitlines() if "failed to quantize" in ln or "Missing importance" in ln)
        reason = next(said, "") or failure_reason(text)
        raise EngineOutputError("quantize did not finish" + (f": {reason}" if reason else " (no 'quant size' line)"))
    res = QuantizeResult(model_mib=_f(m.group(1)), quant_mib=_f(q.group(1)))
    if lm := _IMATRIX_LOADED.search(text):
        res.imatrix_entries, res.imatrix_chunks = int(lm.group(1)), int(lm.group(3))
    res.not_found = [n for n in _NOT_FOUND.findall(text)]
    if fb := _FALLBACK.search(text):
        res.n_fallback = int(fb.group(1))
    return res


def parse_quantize_tensors(text: str) -> dict[str, str | None]:
    """Per tensor, the type llama-quantize converts it to (None: kept as is), in file order.

    The "converting to" part may come lines after the tensor's line when the engine logs
    "did not find weights" or "Using custom type" in between."""
    out: dict[str, str | None] = {}
    pending = None
    for line in text.splitlines():
        if m := _TENSOR_LINE.match(line):
            name, rest = m.group(1), m.group(4)
            out[name] = None
            if c := _CONVERTING.search(rest):
                out[name] = c.group(1)
                pending = None
            else:
                pending = None if "size =" in rest else name
        elif pending and (c := _CONVERTING.search(line)):
            out[pending] = c.group(1)
            pending = None
    if not out:
        raise EngineOutputError("no per-tensor lines in the quantize output")
    return out


@dataclass
class ImatrixRunResult:
    chunks: int  # stored (the file's chunk count)
    ppl: float | None = None
    planned: int | None = None  # "computing over N chunks": what the text allowed


def parse_imatrix_run(text: str) -> ImatrixRunResult:
    """A llama-imatrix run is complete when it stored its data and printed its final PPL."""
    stored = _IMATRIX_STORED.findall(text)
    final = _FINAL_PPL.search(text)
    if "detected in" in text:
        bad = next(ln.strip() for ln in text.splitlines() if "detected in" in ln)
        raise EngineOutputError(f"imatrix aborted: {bad}")
    if not stored or not final:
        raise EngineOutputError(_with_reason("imatrix did not finish (no 'stored collected data' and final PPL lines)",
                                             text))
    planned = _IMATRIX_CHUNKS.search(text)
    return ImatrixRunResult(chunks=int(stored[-1][0]), ppl=_f(final.group(3)),
                            planned=int(planned.group(1)) if planned else None)


@dataclass(frozen=True)
class Progress:
    """How far a running engine tool is, read from its log so far (the last `+ argv` run in it)."""

    tool: str            # llama-imatrix, llama-perplexity, llama-quantize, llama-sweep-bench
    done: int
    total: int | None    # None: the tool has not said yet
    unit: str            # chunks, tensors, runs


_RUN_LINE = re.compile(r"^\+ (\S+)", re.M)
_PERPLEXITY_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")
_ASKED_CHUNKS = re.compile(r" --chunks (\d+)\b")
_CHUNK_DONE = re.compile(r"\[(\d+)\]" + _NUM + ",")
_QUANT_DONE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]", re.M)
BENCH_RUN_NOTE = "quantsweep: sweep-bench run {k} of {n}"
_BENCH_RUN = re.compile(r"^quantsweep: sweep-bench run (\d+) of (\d+)$", re.M)


def parse_progress(text: str) -> Progress | None:
    """Progress of the engine run a step's log ends with (None before the engine started): the
    chunks llama-imatrix and llama-perplexity have finished out of the ones they announced, the
    tensors llama-quantize has written, the sweep-bench runs a bench step has finished (the
    step notes each run as it starts). Read from the log while the run is still writing it."""
    runs = list(_RUN_LINE.finditer(text))
    if not runs:
        return None
    tool = runs[-1].group(1).rsplit("/", 1)[-1]
    tail = text[runs[-1].start():]
    if tool == "llama-sweep-bench":
        notes = _BENCH_RUN.findall(text)
        k, n = (int(notes[-1][0]), int(notes[-1][1])) if notes else (1, None)
        return Progress(tool, k - 1, n, "runs")
    if tool == "llama-quantize":
        rows = _QUANT_DONE.findall(tail)
        return Progress(tool, int(rows[-1][0]) if rows else 0, int(rows[-1][1]) if rows else None, "tensors")
    if tool in ("llama-imatrix", "llama-perplexity"):
        # the tool's own count, else the --chunks asked (KLD runs announce none)
        said = (_IMATRIX_CHUNKS if tool == "llama-imatrix" else _PERPLEXITY_CHUNKS).search(tail)
        asked = _ASKED_CHUNKS.search(tail.split("\n", 1)[0])
        total = int(said.group(1)) if said else int(asked.group(1)) if asked else None
        done = [int(m.group(1)) for m in _CHUNK_KLD.finditer(tail)] or [int(k) for k in _CHUNK_DONE.findall(tail)]
        return Progress(tool, max(done, default=0), total, "chunks")
    return Progress(tool, 0, None, "")
