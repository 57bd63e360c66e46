"""How the sweep measures: the imatrix passes (`imatrix:`), perplexity and KLD (`eval:`) and
speed (`bench:`), each an engine step with its run settings (settings.tools)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import Settings, field
from .run import RunSettings

# The imatrix passes (engine.argv.IMATRIX_PASSES says what each asks of the engine): "mla"
# collects per-head attn_k_b/attn_v_b data, "std" attn_kv_b data.
PASSES = ("mla", "std")
ATTENTION = ("on", "off", "auto")  # -fa values
MLA_MODES = (0, 1, 2, 3)
# eval.reference value meaning "the unquantized model writes the KLD base logits", and the
# name of the reference's evaluation record and summary row.
BASE_REFERENCE = "base"
BASELINE = "baseline"
# imatrix.model value meaning "the passes run on the model the sweep quantizes".
SOURCE = "source"
# The engine's physical batch when -ub is not given: sweep-bench's prompt step is one ubatch.
ENGINE_UBATCH = 512


def _passes(v, where: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or any(p not in PASSES for p in v) or len(set(v)) != len(v):
        raise ConfigError(f"{where}: {v!r} is not a list of distinct passes ({', '.join(PASSES)})")
    return tuple(v)


@dataclass(frozen=True)
class ImatrixSettings(Settings):
    """The imatrix: which passes the engine collects (each a job), imatrix files of the user's
    own merged with them, and the context and chunks of calibration text each pass reads."""

    SECTION = "imatrix"

    passes: tuple[str, ...] = field(PASSES, parse=_passes)
    external: tuple[str, ...] = ()
    ctx: int = field(512, minimum=64)
    chunks: int = field(32, minimum=1)
    # what the passes run on: "source", or a quant of `quants` made without an imatrix (e.g. a
    # Q8_0, half the source's size, when the source does not fit in memory)
    model: str = field(SOURCE, nonempty=True)
    run: RunSettings = field(factory=RunSettings)  # run.imatrix

    # what a pass job reads (the others change which jobs there are, not what one computes)
    COLLECT = ("ctx", "chunks", "run")

    @property
    def enabled(self) -> bool:
        """Whether the sweep runs the engine step (imatrix.passes: [] = only external files)."""
        return bool(self.passes)

    @property
    def any(self) -> bool:
        """Whether the sweep has an imatrix at all (passes or external files)."""
        return bool(self.passes or self.external)


@dataclass(frozen=True)
class EvalSettings(Settings):
    """How every model of a sweep is evaluated; identical for the reference and each quant."""

    SECTION = "eval"

    ctx: int = field(512, minimum=128)
    chunks: int = field(16, minimum=1)
    mla: int = field(1, choices=MLA_MODES)
    fa: str = field("off", choices=ATTENTION)
    reference: str = field(BASE_REFERENCE, nonempty=True)  # "base" or a quant name (models.<m>.reference wins)
    run: RunSettings = field(factory=RunSettings)  # run.eval

    # what a perplexity run reads (the reference decides which run writes the base logits)
    MEASURE = ("ctx", "chunks", "mla", "fa", "run")

    def check(self, where: str) -> None:
        if self.ctx % 2:
            raise ConfigError(f"{where}.ctx: {self.ctx} must be an even number >= 128")

    @property
    def enabled(self) -> bool:
        return True  # every sweep evaluates


@dataclass(frozen=True)
class BenchSettings(Settings):
    """What llama-sweep-bench measures: PP (one ubatch of tokens) and TG (`tg` tokens) at each KV
    depth, in the attention mode generation uses; the first depth is the report's headline."""

    SECTION = "bench"

    enabled: bool = True
    depths: tuple[int, ...] = field((0, 512), minimum=0)
    tg: int = field(128, minimum=1)
    repeats: int = field(5, minimum=1)
    mla: int = field(3, choices=MLA_MODES)
    fa: str = field("on", choices=ATTENTION)
    run: RunSettings = field(factory=RunSettings)  # run.bench

    MEASURE = ("depths", "tg", "repeats", "mla", "fa", "run")

    @property
    def pp(self) -> int:
        return self.run.ubatch or ENGINE_UBATCH

    @property
    def ctx(self) -> int:
        """sweep-bench measures at depths 0, pp, 2 pp, ... below the context: up to the deepest asked."""
        return max(self.depths) + self.pp

    def check(self, where: str) -> None:
        if not self.enabled:
            return
        bad = [d for d in self.depths if d % self.pp]
        if not self.depths or bad or len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"{where}.depths: {list(self.depths)}: each must be a different multiple of the "
                              f"prompt batch {self.pp} (run.bench.ubatch, else the engine's {ENGINE_UBATCH})")
