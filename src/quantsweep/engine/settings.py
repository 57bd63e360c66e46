"""How an engine step runs on the user's hardware: GPU layers, tensor overrides, batch sizes,
mmap, threads and extra engine arguments, per step (the `run:` section of the config).

The defaults add no flag at all, so a sweep without a `run:` section runs exactly as before:
CPU only, the engine's own batch sizes. Extra arguments are checked against the flags the
engine's own `--help` lists (asked once per engine install, kept in engine.json), so a typo
or a flag of another engine version is refused before the sweep starts instead of hours in.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

# The engine steps that take run settings, and the tool each one runs.
STEP_TOOLS = {"imatrix": "llama-imatrix", "eval": "llama-perplexity", "bench": "llama-sweep-bench"}
# Whose --help lists a tool's flags: llama-sweep-bench's prints only an example line, but it
# parses its arguments with the same common parser as llama-perplexity, whose --help lists them.
HELP_FROM = {"llama-sweep-bench": "llama-perplexity"}
# Flags quantsweep sets itself (file names, context, attention mode, the settings below): an
# extra argument may not set them again, the engine would take whichever comes last.
MANAGED_FLAGS = frozenset({
    "-m", "--model", "-f", "--file", "-o", "--output-file", "-c", "--ctx-size", "--chunks", "-mla", "--mla-use",
    "-fa", "--flash-attn", "-no-fa", "--no-flash-attn", "-no-fmoe", "--no-fused-moe", "-no-fug",
    "--no-fused-up-gate", "--kl-divergence-base", "--kl-divergence", "--log-disable", "--log-file", "-n", "--predict",
    "-ngl", "--gpu-layers", "--n-gpu-layers", "-ot", "--override-tensor", "-b", "--batch-size", "-ub",
    "--ubatch-size", "--no-mmap", "-t", "--threads", "-tb", "--threads-batch", "--output-format", "-h", "--help",
})
# "-ngl, --gpu-layers N" style option lines of `--help` (two leading spaces, then the flags).
_HELP_FLAGS = re.compile(r"^\s+(-[-\w]+(?:[,\s]+-[-\w]+)*)", re.M)
_FLAG = re.compile(r"-{1,2}[A-Za-z][-\w]*")
_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?")
_OVERRIDE = re.compile(r"^[^=\s]+=[A-Za-z][\w:]*$")


def help_flags(text: str) -> list[str]:
    """Every flag an engine tool's `--help` lists (sorted)."""
    flags = set()
    for m in _HELP_FLAGS.finditer(text):
        flags.update(_FLAG.findall(m.group(1)))
    return sorted(flags)


@dataclass(frozen=True)
class RunSettings:
    """One step's run settings; 0 / empty / True = the engine's default, no flag given."""

    gpu_layers: int = 0                      # -ngl: layers in VRAM (a number > the model's layers = all)
    override_tensors: tuple[str, ...] = ()   # -ot PATTERN=BUFFER each, e.g. "exps=CPU" (experts in RAM)
    batch: int = 0                           # -b
    ubatch: int = 0                          # -ub
    mmap: bool = True                        # False: --no-mmap
    threads: int = 0                         # -t; 0 = the job's threads
    threads_batch: int = 0                   # -tb; 0 = same as threads
    extra_args: tuple[str, ...] = ()         # further engine arguments, one item per word

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "run") -> RunSettings:
        """From a config mapping; a wrong key or value is a ConfigError naming `where`.key."""
        if d is not None and not isinstance(d, dict):
            raise ConfigError(f"{where}: {d!r} is not a mapping")
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for key in ("gpu_layers", "batch", "ubatch", "threads", "threads_batch"):
            v = d.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}.{key}: {v!r} is not a whole number >= 0")
        if not isinstance(d.get("mmap", True), bool):
            raise ConfigError(f"{where}.mmap: {d['mmap']!r} is not true or false")
        for key in ("override_tensors", "extra_args"):
            v = d.get(key, [])
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
                raise ConfigError(f"{where}.{key}: {v!r} is not a list of non-empty strings")
            d[key] = tuple(v)
        for ot in d.get("override_tensors", ()):
            if not all(_OVERRIDE.match(part) for part in ot.split(",")):  # the engine splits at commas
                raise ConfigError(f"{where}.override_tensors: {ot!r} is not PATTERN=BUFFER[,PATTERN=BUFFER...] "
                                  "(e.g. exps=CPU)")
        s = cls(**d)
        s._check_extra(where)
        return s

    def _check_extra(self, where: str) -> None:
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
        if self.gpu_layers:
            out += ["-ngl", str(self.gpu_layers)]
        for ot in self.override_tensors:
            out += ["-ot", ot]
        if self.batch:
            out += ["-b", str(self.batch)]
        if self.ubatch:
            out += ["-ub", str(self.ubatch)]
        if not self.mmap:
            out.append("--no-mmap")
        return out + list(self.extra_args)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "override_tensors": list(self.override_tensors), "extra_args": list(self.extra_args)}

    def changed(self) -> dict:
        """Only the keys that differ from the defaults: {} runs exactly as a sweep without `run:`."""
        default = RunSettings().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != default[k]}

    def check_engine(self, flags: list[str] | set[str], where: str, tool: str) -> None:
        """ConfigError unless the engine's `tool` knows every flag these settings give it. `flags`:
        what its --help lists (help_flags). A CPU build lists no -ngl: GPU layers are refused."""
        known = set(flags)
        if self.gpu_layers and "-ngl" not in known:
            raise ConfigError(f"{where}.gpu_layers: {self.gpu_layers} but this engine has no GPU offload ({tool} "
                              "--help lists no -ngl); build it with engine.cuda: true or set gpu_layers: 0")
        if bad := [f for f in self.flags() if f not in known]:
            raise ConfigError(f"{where}.extra_args: {tool} does not know {bad[0]} (not in its --help)")


def resolve(run: dict | None) -> dict[str, RunSettings]:
    """The `run:` section ({defaults, imatrix, eval, bench}) as each step's settings: the step's
    keys over the defaults' keys."""
    if run is not None and not isinstance(run, dict):
        raise ConfigError(f"run: {run!r} is not a mapping")
    run = dict(run or {})
    if unknown := sorted(set(run) - {"defaults", *STEP_TOOLS}):
        raise ConfigError(f"run: unknown key {unknown[0]!r} (known: defaults, {', '.join(STEP_TOOLS)})")
    base = run.get("defaults") or {}
    RunSettings.from_dict(base, "run.defaults")
    for step in STEP_TOOLS:
        RunSettings.from_dict(run.get(step), f"run.{step}")
    return {step: RunSettings.from_dict({**base, **(run.get(step) or {})}, f"run.{step}") for step in STEP_TOOLS}


def check_steps(settings: dict[str, RunSettings], flags: dict[str, list[str]], steps: list[str]) -> None:
    """ConfigError unless the engine has each step's tool and it knows every flag the step's
    settings give it (flags: tool -> what its --help lists, from engine.json)."""
    for step in steps:
        tool = STEP_TOOLS[step]
        if tool not in flags:
            raise ConfigError(f"run.{step}: the engine has no {tool} (engine.source: bin_dir without it?)")
        settings[step].check_engine(flags[tool], f"run.{step}", tool)
