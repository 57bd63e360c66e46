"""A whole sweep's settings: one object per config section, built once from the validated config
(quantsweep.config.load), and what follows from them (the quants, each model's reference, the
engine steps and tools the sweep runs)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..gguf.types import FTYPES
from .allocate import AllocateSettings, Budget
from .base import Settings, field
from .engine import EngineSpec
from .machine import MachineSettings
from .measure import BASE_REFERENCE, BenchSettings, EvalSettings, ImatrixSettings
from .model import ModelSettings, TextSettings
from .publish import PublishSettings
from .report import Gate
from .run import RunSettings
from .tools import TOOLS, Tool


@dataclass(frozen=True)
class Quant:
    """One quant of the sweep (a `quants` entry, or the auto recipe of an allocate budget)."""

    name: str
    ftype: str
    imatrix: bool
    recipe: str | None = None  # recipe YAML path (its base is `ftype`)
    auto: bool = False  # an allocated recipe (written per model by the allocate step)
    budget: Budget | None = None
    refines: str | None = None  # allocate.refine: the auto quant whose measurement this one corrects

    @property
    def needs_imatrix(self) -> bool:
        return FTYPES[self.ftype].needs_imatrix

    @property
    def spec(self) -> str:
        """What llama-quantize is asked for: the recipe file, else the ftype."""
        return self.recipe or self.ftype


@dataclass(frozen=True)
class ResourceSettings(Settings):
    """What engine jobs ask the scheduler for beside the sizes computed from the model."""

    SECTION = "resources"

    threads: int = field(0, minimum=0)       # engine jobs' threads; 0 = the cores Snakemake was given
    gpus: int | None = field(None, minimum=0)  # per imatrix/perplexity job; None = 1 with engine.cuda, else 0
    # SLURM partitions (slurm_partition of each job): GPU jobs' and the others'; "" = the profile's
    # or the cluster's default. Named once here instead of per rule in a profile.
    gpu_partition: str = ""
    cpu_partition: str = ""

    def partition(self, gpu_job: bool) -> str:
        return self.gpu_partition if gpu_job else self.cpu_partition

    def gpus_per_job(self, cuda: bool) -> int:
        return self.gpus if self.gpus is not None else int(cuda)


@dataclass(frozen=True)
class Sweep:
    engine: EngineSpec
    models: dict[str, ModelSettings]
    texts: TextSettings
    imatrix: ImatrixSettings
    quants: tuple[Quant, ...]  # `quants`, then one auto recipe per budget, then their refined forms
    eval: EvalSettings
    bench: BenchSettings
    allocate: AllocateSettings
    resources: ResourceSettings
    gate: Gate
    machine: MachineSettings = MachineSettings()
    publish: PublishSettings = PublishSettings()
    notes: tuple[str, ...] = ()  # what the config's defaults left out, and why (budgets skipped)

    def quant(self, name: str) -> Quant:
        for q in self.quants:
            if q.name == name:
                return q
        raise ConfigError(f"quants: {name!r} is not a quant of the sweep")

    def reference_of(self, model: str) -> str:
        """What a model's KLD base logits come from: 'base' (the unquantized model) or a quant's
        name; models.<model>.reference, else eval.reference."""
        return self.models[model].reference or self.eval.reference or BASE_REFERENCE

    def engine_steps(self) -> list[str]:
        """The engine steps the sweep runs (each one's run settings must suit the engine)."""
        return [t.step for t in TOOLS if t.step and getattr(self, t.step).enabled]

    def step_runs(self) -> dict[str, RunSettings]:
        """The run settings of every engine step the sweep runs."""
        return {step: getattr(self, step).run for step in self.engine_steps()}

    def tools(self) -> list[Tool]:
        """The engine tools the sweep runs: those every sweep needs, and each running step's."""
        steps = set(self.engine_steps())
        used = {"allocate.sensitivity: proxy": self.allocate.active and self.allocate.sensitivity == "proxy"}
        return [t for t in TOOLS if t.required or t.step in steps or used.get(t.used_by, False)]
