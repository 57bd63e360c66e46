"""The sweep's settings: one typed object per concern, the only holder of its defaults.

Each config section has its class (`EngineSpec`, `ModelSettings` with the tiny model's
`TinySpec`, `TextSettings`, `ImatrixSettings`, `EvalSettings`, `BenchSettings` with each engine
step's `RunSettings`, `AllocateSettings` with its `Budget`s, `ResourceSettings`, `Gate`, `MachineSettings` with its `Throughput`,
`PublishSettings`);
`Sweep` holds them all, built once from the validated config by `quantsweep.config.load`. A
rule passes the object its step reads as one JSON (`to_json`: what differs from the defaults),
which the CLI reads back with `from_json`; records written by a step are read with the same
classes by the report. `tools` is the table of the engine's tools and the steps that run them.

This package sits above gguf (type names) and below everything that runs or reports a step.
"""

from .allocate import AllocateSettings, Budget, GroupItem
from .base import Settings, read_json_arg
from .engine import EngineSpec
from .machine import MachineSettings, Throughput
from .measure import BASE_REFERENCE, BASELINE, SOURCE, BenchSettings, EvalSettings, ImatrixSettings
from .model import ConvertSettings, ModelSettings, TextSettings
from .publish import PublishSettings
from .report import Gate
from .run import RunSettings
from .sweep import Quant, ResourceSettings, Sweep
from .tiny import TinySpec
from .tools import STEP_TOOLS, STEPS, TOOLS, Tool, check_steps, resolve_run

__all__ = [
    "AllocateSettings", "BASELINE", "BASE_REFERENCE", "BenchSettings", "Budget", "ConvertSettings", "EngineSpec", "EvalSettings", "Gate",
    "GroupItem", "ImatrixSettings", "MachineSettings", "ModelSettings", "PublishSettings", "Quant", "ResourceSettings", "RunSettings", "STEPS", "STEP_TOOLS",
    "SOURCE", "Settings", "Sweep", "TOOLS", "TextSettings", "Throughput", "TinySpec", "Tool", "check_steps", "read_json_arg", "resolve_run",
]
