"""Engine command lines, as argument lists (never shell strings): the one place that knows
the engine's flags.

The flags follow what this engine version accepts (see docs/ik_llama.md of the project's
reference): `-fa` takes a value, `-fmoe` no longer exists, fused ops are switched off with
`-no-fmoe` / `-no-fug`. A flag drift in a new engine version is fixed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import StepError

# What each imatrix pass collects (ik_llama.md §1.5): `-mla 1 -fa off` gives per-head
# attn_k_b/attn_v_b data, `-mla 0` gives attn_kv_b. Fused MoE/up-gate ops would hide the
# gate tensors, so they stay off while collecting.
IMATRIX_PASSES = {
    "mla": ["-mla", "1", "-fa", "off"],
    "std": ["-mla", "0", "-fa", "off"],
}
COLLECT_FLAGS = ["-no-fmoe", "-no-fug"]
# The common-arg tools otherwise also write ./llama.log into whatever directory they run in;
# their stdout/stderr (which is parsed and kept in the step's log) is unaffected.
NO_LOG_FILE = ["--log-disable"]


@dataclass(frozen=True)
class EvalSettings:
    """How every model of a sweep is evaluated; identical for the base and each quant."""

    ctx: int = 512
    chunks: int = 16
    threads: int = 2
    mla: int = 1
    fa: str = "off"
    batch: int = 0  # 0 = engine default

    def attention_args(self) -> list[str]:
        return ["-mla", str(self.mla), "-fa", self.fa]


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


def imatrix_cmd(
    bin_dir: Path, model: Path, text: Path, out: Path, mode: str, ctx: int, chunks: int, threads: int
) -> list[str]:
    if mode not in IMATRIX_PASSES:
        raise StepError(f"imatrix pass {mode!r} is not one of {sorted(IMATRIX_PASSES)}")
    return [
        str(Path(bin_dir) / "llama-imatrix"),
        "-m", str(model),
        "-f", str(text),
        "-o", str(out),
        "-c", str(ctx),
        "--chunks", str(chunks),
        "-t", str(threads),
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


def perplexity_base_cmd(bin_dir: Path, model: Path, text: Path, kld_base: Path, ev: EvalSettings) -> list[str]:
    """PPL of the reference model; also writes the base logits every quant is compared with."""
    cmd = [
        str(Path(bin_dir) / "llama-perplexity"),
        "-m", str(model),
        "-f", str(text),
        "-c", str(ev.ctx),
        "--chunks", str(ev.chunks),
        "-t", str(ev.threads),
        *ev.attention_args(),
        "--kl-divergence-base", str(kld_base),
        *NO_LOG_FILE,
    ]
    return cmd + (["-b", str(ev.batch)] if ev.batch else [])


def perplexity_kld_cmd(bin_dir: Path, model: Path, kld_base: Path, ev: EvalSettings) -> list[str]:
    """PPL + KLD of a quant; tokens come from the base file, so no text argument."""
    cmd = [
        str(Path(bin_dir) / "llama-perplexity"),
        "-m", str(model),
        "-c", str(ev.ctx),
        "--chunks", str(ev.chunks),
        "-t", str(ev.threads),
        *ev.attention_args(),
        "--kl-divergence-base", str(kld_base),
        "--kl-divergence",
        *NO_LOG_FILE,
    ]
    return cmd + (["-b", str(ev.batch)] if ev.batch else [])


def gguf_split_cmd(bin_dir: Path, model: Path, out_prefix: Path, max_tensors: int) -> list[str]:
    """Split `model` into out_prefix-0000i-of-0000n.gguf, `max_tensors` tensors per shard."""
    return [str(Path(bin_dir) / "llama-gguf-split"), "--split", "--split-max-tensors", str(max_tensors),
            str(model), str(out_prefix)]
