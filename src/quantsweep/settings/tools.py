"""The engine's tools and the engine steps that run them: the one table of them.

An *engine step* is a config section whose jobs run an engine tool with run settings of their
own (`run.<step>` over `run.defaults`): imatrix (llama-imatrix), eval (llama-perplexity),
bench (llama-sweep-bench). The section's settings class (settings.measure) holds its
`run` and says whether the sweep runs it (`enabled`). Everything else that needs a tool name
(the build's target list, what a prebuilt bin dir must hold, the workflow's tool outputs, the
check of each step's run settings against the tool's --help, where a record keeps its run
settings for the manifest) reads it from here, so a new step's tool is named once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .measure import BenchSettings, EvalSettings, ImatrixSettings
from .run import RunSettings


@dataclass(frozen=True)
class Tool:
    name: str                 # the binary in bin/
    step: str = ""            # the engine step (config section and run.<step>) that runs it; "" = none
    settings: type | None = None  # the step's settings class (its section; holds `run` and `enabled`)
    help_from: str = ""       # whose --help lists its flags ("" = its own)
    required: bool = False    # a prebuilt bin dir (engine.source: bin_dir) must have it for any sweep
    record_run: str = "run"   # where the step's record keeps the run settings ("eval.run": record["eval"]["run"])
    used_by: str = ""         # the setting that runs a tool of no engine step (a sweep with it needs the tool)

    @property
    def output(self) -> str:
        """Its key among the engine build's outputs (rules.engine_build.output.<key>)."""
        return self.name.removeprefix("llama-").replace("-", "_")

    @property
    def help_tool(self) -> str:
        return self.help_from or self.name

    def run_of(self, record: dict) -> dict | None:
        """The run settings a record of this step keeps (None: not one of its records)."""
        value = record
        for key in self.record_run.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, dict) else None


TOOLS = (
    Tool("llama-imatrix", step="imatrix", settings=ImatrixSettings, required=True),
    Tool("llama-quantize", required=True),
    Tool("llama-perplexity", step="eval", settings=EvalSettings, required=True, record_run="eval.run"),
    Tool("llama-gguf-split"),  # publish splits each quant with it (and tests, by hand)
    # its --help prints only an example; it parses its arguments with llama-perplexity's common parser
    Tool("llama-sweep-bench", step="bench", settings=BenchSettings, help_from="llama-perplexity"),
    # ours (src/quantsweep/engine/tools): rows of any type dequantized by the engine's ggml, for
    # allocate.sensitivity: proxy
    Tool("quantsweep-dequant", used_by="allocate.sensitivity: proxy"),
)  # the build's target order (part of its cache key)
BY_NAME = {t.name: t for t in TOOLS}
STEP_TOOLS = {t.step: t for t in TOOLS if t.step}  # engine step -> its tool
STEPS = tuple(STEP_TOOLS)


def record_run(record: dict) -> dict | None:
    """The run settings a step's record keeps, wherever its step keeps them (None: a record of
    no engine step, e.g. quantize's)."""
    return next((r for t in STEP_TOOLS.values() if (r := t.run_of(record)) is not None), None)


def resolve_run(run: dict | None) -> dict[str, RunSettings]:
    """The `run:` section ({defaults, <step>...}) as each engine step's settings: the step's keys
    over the defaults' keys."""
    if run is not None and not isinstance(run, dict):
        raise ConfigError(f"run: {run!r} is not a mapping")
    run = dict(run or {})
    if unknown := sorted(set(run) - {"defaults", *STEPS}):
        raise ConfigError(f"run: unknown key {unknown[0]!r} (known: defaults, {', '.join(STEPS)})")
    base = run.get("defaults") or {}
    RunSettings.from_dict(base, "run.defaults")
    for step in STEPS:
        RunSettings.from_dict(run.get(step), f"run.{step}")
    return {step: RunSettings.from_dict({**base, **(run.get(step) or {})}, f"run.{step}") for step in STEPS}


def check_steps(runs: dict[str, RunSettings], flags: dict[str, list[str]]) -> None:
    """ConfigError unless the engine has each step's tool and it knows every flag the step's run
    settings give it (runs: the steps the sweep runs; flags: tool -> what its --help lists, from
    engine.json)."""
    for step, settings in runs.items():
        tool = STEP_TOOLS[step].name
        if tool not in flags:
            raise ConfigError(f"run.{step}: the engine has no {tool} (engine.source: bin_dir without it?)")
        settings.check_engine(flags[tool], f"run.{step}", tool)
