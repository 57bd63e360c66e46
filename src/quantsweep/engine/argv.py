"""Engine command lines, as argument lists (never shell strings): the one place that knows
the engine's flags.

The flags follow what this engine version accepts (see docs/ik_llama.md of the project's
reference): `-fa` takes a value, `-fmoe` no longer exists, fused ops are switched off with
`-no-fmoe` / `-no-fug`. A flag drift in a new engine version is fixed here.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import StepError
from ..settings import BenchSettings, EvalSettings, ImatrixSettings
from ..settings.measure import PASSES

# What each imatrix pass collects (ik_llama.md §1.5): `-mla 1 -fa off` gives per-head
# attn_k_b/attn_v_b data, `-mla 0` gives attn_kv_b. Fused MoE/up-gate ops would hide the
# gate tensors, so they stay off while collecting.
IMATRIX_PASSES = dict(zip(PASSES, (["-mla", "1", "-fa", "off"], ["-mla", "0", "-fa", "off"]), strict=True))
COLLECT_FLAGS = ["-no-fmoe", "-no-fug"]
# The common-arg tools otherwise also write ./llama.log into whatever directory they run in;
# their stdout/stderr (which is parsed and kept in the step's log) is unaffected.
NO_LOG_FILE = ["--log-disable"]
# "-ngl, --gpu-layers N" style option lines of `--help` (two leading spaces, then the flags).
_HELP_FLAGS = re.compile(r"^\s+(-[-\w]+(?:[,\s]+-[-\w]+)*)", re.M)
_FLAG = re.compile(r"-{1,2}[A-Za-z][-\w]*")


def help_flags(text: str) -> list[str]:
    """Every flag an engine tool's `--help` lists (sorted)."""
    flags = set()
    for m in _HELP_FLAGS.finditer(text):
        flags.update(_FLAG.findall(m.group(1)))
    return sorted(flags)


def attention_args(mla: int, fa: str) -> list[str]:
    return ["-mla", str(mla), "-fa", fa]


def asked_context(cmd: list[str]) -> dict[str, int]:
    """What a command line asks of the engine's context, in the names the engine reports it
    with (logparse.parse_context): -mla, -fa on/off (auto: whatever it picks), fused ops off."""
    asked: dict[str, int] = {}
    for flag, value in zip(cmd, cmd[1:]):
        if flag == "-mla":
            asked["mla_attn"] = int(value)
        elif flag == "-fa" and value in ("on", "off"):
            asked["flash_attn"] = int(value == "on")
    asked.update({"fused_moe": 0} if "-no-fmoe" in cmd else {})
    asked.update({"fused_up_gate": 0} if "-no-fug" in cmd else {})
    return asked


def imatrix_cmd(bin_dir: Path, model: Path, text: Path, out: Path, mode: str, s: ImatrixSettings,
                threads: int) -> list[str]:
    if mode not in IMATRIX_PASSES:
        raise StepError(f"imatrix pass {mode!r} is not one of {sorted(IMATRIX_PASSES)}")
    return [
        str(Path(bin_dir) / "llama-imatrix"),
        "-m", str(model),
        "-f", str(text),
        "-o", str(out),
        "-c", str(s.ctx),
        "--chunks", str(s.chunks),
        *s.run.argv(threads),
        *IMATRIX_PASSES[mode],
        *COLLECT_FLAGS,
        *NO_LOG_FILE,
    ]


def quantize_cmd(
    bin_dir: Path, model: Path, out: Path, ftype: str, threads: int, imatrix: Path | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    cmd = [str(Path(bin_dir) / "llama-quantize")]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += list(extra or [])
    return cmd + [str(model), str(out), ftype, str(threads)]


def perplexity_base_cmd(bin_dir: Path, model: Path, text: Path, kld_base: Path | None, ev: EvalSettings,
                        threads: int) -> list[str]:
    """PPL of the reference model; also writes the base logits every quant is compared with
    (kld_base None: PPL over the text only)."""
    cmd = [
        str(Path(bin_dir) / "llama-perplexity"),
        "-m", str(model),
        "-f", str(text),
        "-c", str(ev.ctx),
        "--chunks", str(ev.chunks),
        *ev.run.argv(threads),
        *attention_args(ev.mla, ev.fa),
        *(["--kl-divergence-base", str(kld_base)] if kld_base is not None else []),
        *NO_LOG_FILE,
    ]
    return cmd


def perplexity_kld_cmd(bin_dir: Path, model: Path, kld_base: Path, ev: EvalSettings, threads: int) -> list[str]:
    """PPL + KLD of a quant; tokens come from the base file, so no text argument."""
    cmd = [
        str(Path(bin_dir) / "llama-perplexity"),
        "-m", str(model),
        "-c", str(ev.ctx),
        "--chunks", str(ev.chunks),
        *ev.run.argv(threads),
        *attention_args(ev.mla, ev.fa),
        "--kl-divergence-base", str(kld_base),
        "--kl-divergence",
        *NO_LOG_FILE,
    ]
    return cmd


def sweep_bench_cmd(bin_dir: Path, model: Path, b: BenchSettings, threads: int, engine_log: Path) -> list[str]:
    """One llama-sweep-bench run (JSON lines out, one per depth). --log-disable would silence the
    result lines too, so the tool's own log file goes to `engine_log`.log instead of ./llama.log."""
    return [
        str(Path(bin_dir) / "llama-sweep-bench"),
        "-m", str(model),
        "-c", str(b.ctx),
        "-n", str(b.tg),
        *b.run.argv(threads),
        *(["-ub", str(b.pp)] if not b.run.ubatch else []),
        *attention_args(b.mla, b.fa),
        "--output-format", "jsonl",
        "--log-file", str(engine_log),
    ]


def gguf_split_cmd(bin_dir: Path, model: Path, out_prefix: Path, max_tensors: int = 0, max_mb: int = 0) -> list[str]:
    """Split `model` into out_prefix-0000i-of-0000n.gguf: `max_tensors` tensors per shard, or
    shards of at most `max_mb` x 10^6 bytes of tensor data (the engine counts no header)."""
    limit = ["--split-max-size", f"{max_mb}M"] if max_mb else ["--split-max-tensors", str(max_tensors)]
    return [str(Path(bin_dir) / "llama-gguf-split"), "--split", *limit, str(model), str(out_prefix)]


def gguf_merge_cmd(bin_dir: Path, first_shard: Path, out: Path) -> list[str]:
    """Join a split model (given shard 1) into one file."""
    return [str(Path(bin_dir) / "llama-gguf-split"), "--merge", str(first_shard), str(out)]
