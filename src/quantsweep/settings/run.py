"""How an engine step runs on the user's hardware: GPU layers, tensor overrides, batch sizes,
mmap, threads and extra engine arguments (one `RunSettings` per step: the config's `run.<step>`
over `run.defaults`, settings.tools.resolve_run).

The defaults add no flag at all, so a sweep without a `run:` section runs exactly as before:
CPU only, the engine's own batch sizes. Extra arguments are checked against the flags the
engine's own `--help` lists (asked once per engine install, kept in engine.json), so a typo
or a flag of another engine version is refused before the sweep starts instead of hours in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Settings, field

# Flags quantsweep sets itself (file names, context, attention mode, the settings below): an
# extra argument may not set them again, the engine would take whichever comes last.
MANAGED_FLAGS = frozenset({
    "-m", "--model", "-f", "--file", "-o", "--output-file", "-c", "--ctx-size", "--chunks", "-mla", "--mla-use",
    "-fa", "--flash-attn", "-no-fa", "--no-flash-attn", "-no-fmoe", "--no-fused-moe", "-no-fug",
    "--no-fused-up-gate", "--kl-divergence-base", "--kl-divergence", "--log-disable", "--log-file", "-n", "--predict",
    "-ngl", "--gpu-layers", "--n-gpu-layers", "-ot", "--override-tensor", "-b", "--batch-size", "-ub",
    "--ubatch-size", "--no-mmap", "-t", "--threads", "-tb", "--threads-batch", "--output-format", "-h", "--help",
})
_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?")
_OVERRIDE = re.compile(r"^[^=\s]+=[A-Za-z][\w:]*$")


@dataclass(frozen=True)
class RunSettings(Settings):
    """One step's run settings; 0 / empty / True = the engine's default, no flag given."""

    SECTION = "run"

    gpu_layers: int = field(0, minimum=0)            # -ngl: layers in VRAM (a number > the model's layers = all)
    override_tensors: tuple[str, ...] = ()           # -ot PATTERN=BUFFER each, e.g. "exps=CPU" (experts in RAM)
    batch: int = field(0, minimum=0)                 # -b
    ubatch: int = field(0, minimum=0)                # -ub
    mmap: bool = True                                # False: --no-mmap
    threads: int = field(0, minimum=0)               # -t; 0 = the job's threads
    threads_batch: int = field(0, minimum=0)         # -tb; 0 = same as threads
    extra_args: tuple[str, ...] = ()                 # further engine arguments, one item per word

    def check(self, where: str) -> None:
        for ot in self.override_tensors:
            if not all(_OVERRIDE.match(part) for part in ot.split(",")):  # the engine splits at commas
                raise ConfigError(f"{where}.override_tensors: {ot!r} is not PATTERN=BUFFER[,PATTERN=BUFFER...] "
                                  "(e.g. exps=CPU)")
        for arg in self.extra_args:
            if any(c in arg for c in "\n\r\0"):
                raise ConfigError(f"{where}.extra_args: {arg!r} holds a line break or NUL")
            if arg.split("=", 1)[0] in MANAGED_FLAGS:
                raise ConfigError(f"{where}.extra_args: {arg} is set by quantsweep itself; use the {where} key "
                                  "for it (gpu_layers, override_tensors, batch, ubatch, mmap, threads, "
                                  "threads_batch) or the step's own config")

    def flags(self) -> list[str]:
        """The flags of extra_args (words that start with '-' and are not numbers)."""
        return [a.split("=", 1)[0] for a in self.extra_args if a.startswith("-") and not _NUMBER.fullmatch(a)]

    def argv(self, job_threads: int) -> list[str]:
        """The engine arguments; job_threads: the job's threads, used when `threads` is 0."""
        out = ["-t", str(self.threads or job_threads)]
        if self.threads_batch:
            out += ["-tb", str(self.threads_batch)]
        return out + self.placement() + list(self.extra_args)

    def placement(self) -> list[str]:
        """The flags that say where the model lives and how it is batched (no threads, no extra
        arguments): -ngl, -ot, -b, -ub, --no-mmap."""
        out = ["-ngl", str(self.gpu_layers)] if self.gpu_layers else []
        for ot in self.override_tensors:
            out += ["-ot", ot]
        if self.batch:
            out += ["-b", str(self.batch)]
        if self.ubatch:
            out += ["-ub", str(self.ubatch)]
        return out + ([] if self.mmap else ["--no-mmap"])

    def words(self) -> list[str]:
        """These settings as the engine flags they give, threads aside, one item a flag and its
        value ("-ngl 99", "-ot exps=CPU", "--no-warmup"): what the report shows."""
        pairs, out = self.placement(), []
        while pairs:
            flag = pairs.pop(0)
            out.append(flag if flag == "--no-mmap" else f"{flag} {pairs.pop(0)}")
        return out + list(self.extra_args)

    def check_engine(self, flags: list[str] | set[str], where: str, tool: str) -> None:
        """ConfigError unless the engine's `tool` knows every flag these settings give it. `flags`:
        what its --help lists. A CPU build lists no -ngl: GPU layers are refused."""
        known = set(flags)
        if self.gpu_layers and "-ngl" not in known:
            raise ConfigError(f"{where}.gpu_layers: {self.gpu_layers} but this engine has no GPU offload ({tool} "
                              "--help lists no -ngl); build it with engine.cuda: true or set gpu_layers: 0")
        if bad := [f for f in self.flags() if f not in known]:
            raise ConfigError(f"{where}.extra_args: {tool} does not know {bad[0]} (not in its --help)")
