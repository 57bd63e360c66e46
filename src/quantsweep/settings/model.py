"""The models of a sweep (`models.<name>`) and the texts they are calibrated and evaluated on."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..gguf.types import FTYPES
from .base import Settings, field
from .engine import EngineSpec
from .tiny import TinySpec

SOURCES = ("tiny", "gguf", "hf")
# What the Hugging Face converter may write (its --outtype): the ftypes the type table marks so.
OUTTYPES = tuple(f.default for f in FTYPES.values() if f.converter_outtype)
_SPLIT_SIZE = re.compile(r"^(\d+[KMG]?)?$")  # the converter's --split-max-size ("" = no split)


def _split_size(v, where: str) -> str:
    if not isinstance(v, str) or not _SPLIT_SIZE.match(v):
        raise ConfigError(f"{where}: {v!r} is not a size like 50G, 500M or '' (no split)")
    return v


@dataclass(frozen=True)
class ModelSettings(Settings):
    """One model of the sweep: where it comes from (the demo generator, a GGUF, a Hugging Face
    checkpoint) and what its KLD base logits come from. The tiny generator's keys (seed,
    layout, dead_channels; split_kv_b, the older spelling of layout ik) are its `tiny` spec."""

    SECTION = "models.<name>"

    source: str = field("tiny", choices=SOURCES)
    path: str = ""                 # gguf: the model file (shard 1 of a split one); hf: the checkpoint directory
    outtype: str = field("bf16", choices=OUTTYPES)        # hf: what the converter writes
    split_max_size: str = field("", parse=_split_size)   # hf: shards of at most this size ("" = one file)
    reference: str = ""            # "" = eval.reference
    tiny: TinySpec = field(factory=TinySpec)

    CONVERT = ("outtype", "split_max_size")  # what a conversion reads besides the checkpoint

    @classmethod
    def from_dict(cls, d, where: str = "") -> ModelSettings:
        """The config's flat form: the tiny generator's keys beside the others (or as `tiny`)."""
        where = where or cls.SECTION
        if not isinstance(d, dict):
            return super().from_dict(d, where)
        nested = d.get("tiny")
        tiny = {**(nested.to_dict() if isinstance(nested, TinySpec) else nested or {}),
                **{k: d[k] for k in TinySpec.CONFIG_KEYS if k in d}}
        if tiny.get("split_kv_b") and tiny.get("layout", "kv_b") not in ("kv_b", "ik"):
            raise ConfigError(f"{where}.split_kv_b: means layout ik, but layout is {tiny['layout']!r}")
        rest = {k: v for k, v in d.items() if k not in (*TinySpec.CONFIG_KEYS, "tiny")}
        return super().from_dict({**rest, "tiny": TinySpec.from_dict(tiny, where)}, where)

    def to_dict(self) -> dict:
        d = super().to_dict()
        tiny = d.pop("tiny")
        return {**d, **{k: tiny[k] for k in TinySpec.CONFIG_KEYS if k in tiny}}

    def check(self, where: str) -> None:
        if self.source in ("gguf", "hf") and not self.path:
            what = "the model file" if self.source == "gguf" else "the checkpoint directory"
            raise ConfigError(f"{where}.path: required when source is {self.source!r} ({what})")


@dataclass(frozen=True)
class TextSettings(Settings):
    """The calibration (imatrix) and evaluation (PPL/KLD) texts: a file, or `builtin` (bundled)."""

    SECTION = "texts"

    calibration: str = field("builtin", nonempty=True)
    evaluation: str = field("builtin", nonempty=True)

    BUILTIN = "builtin"

    def name_of(self, kind: str) -> str:
        """How a published card names the text: the bundled one in words, else its file name
        (never the sweep's path)."""
        path = getattr(self, kind)
        return f"quantsweep's bundled {kind} text" if path == self.BUILTIN else os.path.basename(path)


@dataclass(frozen=True)
class ConvertSettings(Settings):
    """What a conversion reads besides the checkpoint: the model's outtype and split size, and
    the engine section's converter (`of` keeps only those, so nothing else reruns it)."""

    SECTION = "convert"

    model: ModelSettings = field(factory=ModelSettings)
    engine: EngineSpec = field(factory=EngineSpec)

    @classmethod
    def of(cls, model: ModelSettings, engine: EngineSpec) -> ConvertSettings:
        kept = {k: v for k, v in model.to_dict().items() if k in ModelSettings.CONVERT}
        return cls(ModelSettings.from_dict(kept, "model"), EngineSpec.from_json(engine.converter_json(), "engine"))
