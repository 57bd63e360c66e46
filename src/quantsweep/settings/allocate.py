"""The size-budget allocator's settings (`allocate:`): the type ladder, how tensors are grouped,
pins, the budgets (one auto recipe each) and the solver's resolution."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..errors import ConfigError, PlanError
from ..gguf.types import BY_NAME, canonical_ftype, check_type
from .base import Settings, field, number
from .values import check_regex

PRESETS = ("classes", "layers")
SOURCES = ("measured", "proxy", "external")  # where the groups' sensitivities come from
PER = ("all", "layer", "tensor")
DEFAULT_EXPERTS = r"_exps\."


def _per(v, where: str) -> str | int:
    if not (v in PER or (isinstance(v, int) and not isinstance(v, bool) and v > 0)):
        raise ConfigError(f"{where}: {v!r} is not all, layer, tensor or a layer count")
    return v


@dataclass(frozen=True)
class GroupItem(Settings):
    """One `groups:` list item: the tensors its regex finds (first item wins), split `per`."""

    SECTION = "allocate.groups[]"

    match: str = field("", parse=lambda v, where: check_regex(v, where))
    per: str | int = field("all", parse=_per)  # all | layer | tensor | N (ranges of N layers)


def _groups(v, where: str) -> str | tuple[GroupItem, ...]:
    if isinstance(v, str):
        if v not in PRESETS:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(PRESETS)} or a list of {{match, per}} items")
        return v
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{where}: {v!r} is not {' or '.join(PRESETS)} or a non-empty list of {{match, per}} items")
    items = tuple(x if isinstance(x, GroupItem) else GroupItem.from_dict(x, f"{where}[{i}]") for i, x in enumerate(v))
    for i, it in enumerate(items):
        if not it.match:
            raise ConfigError(f"{where}[{i}].match: required")
    return items


def _dump_groups(v) -> str | list:
    return v if isinstance(v, str) else [it.to_dict() for it in v]


def _pin(v, where: str) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {v!r} is not a mapping of regex to type")
    for rx, t in v.items():
        check_regex(rx, where)
        check_type(t, f"{where}[{rx!r}]")
    return dict(v)


@dataclass(frozen=True)
class Budget(Settings):
    """One allocation target: a total in GiB, bits per weight or the size of a quant of the sweep,
    or split (non-expert tensors within gpu_gib, routed experts within ram_gib)."""

    SECTION = "allocate.budgets[]"

    name: str = ""  # the auto recipe's quant name ("": auto-<budget>)
    gib: float | None = field(None, positive=True)
    bpw: float | None = field(None, positive=True)
    size_of: str | None = field(None, nonempty=True)  # a quant of `quants`: its planned size
    gpu_gib: float | None = field(None, positive=True)
    ram_gib: float | None = field(None, positive=True)
    # skipped (with a note in the log and the report) when its size_of quant is not in the
    # sweep: what the shipped config's budgets say, so a user's own `quants` still runs
    optional: bool = False

    @classmethod
    def from_dict(cls, d, where: str = "") -> Budget:
        b = super().from_dict(d, where)
        return b if b.name else dataclasses.replace(b, name=b.default_name())

    def check(self, where: str) -> None:
        kinds = [k for k in ("gib", "bpw", "size_of", "gpu_gib") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: give exactly one of gib, bpw, size_of or gpu_gib+ram_gib (got "
                              f"{', '.join(kinds) or 'none'})")
        if (self.gpu_gib is None) != (self.ram_gib is None):
            raise ConfigError(f"{where}: gpu_gib and ram_gib go together (a split budget)")

    @property
    def split(self) -> bool:
        return self.gpu_gib is not None

    def describe(self) -> str:
        if self.split:
            return f"{self.gpu_gib:g} GiB GPU (non-expert tensors) + {self.ram_gib:g} GiB RAM (routed experts)"
        if self.size_of:
            return f"the size of {self.size_of}"
        return f"{self.gib:g} GiB" if self.gib is not None else f"{self.bpw:g} bpw"

    def kind(self) -> tuple[str, object]:
        if self.split:
            return "split", {"gpu_gib": self.gpu_gib, "ram_gib": self.ram_gib}
        if self.size_of:
            return "size_of", self.size_of
        return ("gib", self.gib) if self.gib is not None else ("bpw", self.bpw)

    @classmethod
    def of_kind(cls, kind: str, value, name: str = "") -> Budget:
        """The budget a record's (kind, value) stands for (Budget.kind's inverse)."""
        if kind == "split" and isinstance(value, dict):
            return cls(name, gpu_gib=value.get("gpu_gib"), ram_gib=value.get("ram_gib"))
        if kind == "size_of":
            return cls(name, size_of=value)
        if kind in ("gib", "bpw") and number(value):
            return cls(name, **{kind: value})
        raise ConfigError(f"budget: ({kind!r}, {value!r}) is not a budget")

    def default_name(self) -> str:
        kind, v = self.kind()
        if kind == "split":
            return f"auto-gpu{self.gpu_gib:g}-ram{self.ram_gib:g}"
        if kind == "size_of":
            return f"auto-{re.sub(r'[.](yaml|yml)$', '', str(v).rsplit('/', 1)[-1])}"
        return f"auto-{v:g}GiB" if kind == "gib" else f"auto-{v:g}bpw"


@dataclass(frozen=True)
class AllocateSettings(Settings):
    """Per-group KLD sensitivity and the size-budget allocator.

    The ladder lists candidate types from the fewest bits to the most; the last is the *top*: the
    type every other group keeps while one group is lowered, and the reference the increases are
    measured from. `groups` is a preset (classes: a tensor class across layers; layers: a class
    per layer) or a list of {match, per} items, before the preset; `pin` gives tensors one type;
    `experts` is what a split budget puts in RAM."""

    SECTION = "allocate"

    enabled: bool = False
    ladder: tuple[str, ...] = ()
    groups: str | tuple[GroupItem, ...] = field("classes", parse=_groups, dump=_dump_groups)
    pin: dict[str, str] = field(factory=dict, parse=_pin)  # regex -> type, first match wins
    experts: str = field(DEFAULT_EXPERTS, parse=lambda v, where: check_regex(v, where))
    budgets: tuple[Budget, ...] = ()
    resolution: int = field(1 << 16, minimum=256)  # size units per budget of the exact solver
    refine: bool = False
    pool: bool = True  # recipe quants assembled from the per-type pool (false: llama-quantize each)
    # measured: a run per (group, lower type); proxy: the class runs split over the groups by the
    # quantization-error proxy and `bands` band runs per class family (allocator.proxy); external:
    # a single-tensor KLD CSV (`external`, allocator.external), no runs
    sensitivity: str = field("measured", choices=SOURCES)
    external: str = ""  # the CSV of sensitivity: external
    bands: int = field(3, minimum=0)  # band runs per class family (proxy; 0: no depth correction)
    band_type: str = ""  # the type a band run lowers to ("": the ladder's first)
    proxy_rows: int = field(64, minimum=1)  # rows sampled per tensor by the proxy

    SENSITIVITY = ("ladder", "groups", "pin", "experts", "sensitivity", "bands", "band_type")

    def check(self, where: str) -> None:
        if self.active or self.ladder:
            self._check_ladder(where)
        if self.band_type:
            check_type(self.band_type, f"{where}.band_type")
            if self.ladder and self.band_type not in self.ladder[:-1]:
                raise ConfigError(f"{where}.band_type: {self.band_type} is not a ladder type below the top "
                                  f"({', '.join(self.ladder[:-1])})")
        if self.sensitivity == "external" and not self.external:
            raise ConfigError(f"{where}.external: required with sensitivity: external (the single-tensor KLD CSV, "
                              "QTYPE,<tensor>,...)")
        if self.external and self.sensitivity != "external":
            raise ConfigError(f"{where}.external: given, but sensitivity is {self.sensitivity} (set sensitivity: "
                              "external to read it)")
        if self.sensitivity == "proxy" and self.groups == "classes":
            raise ConfigError(f"{where}.sensitivity: proxy splits the class runs over finer groups, and groups is "
                              "classes (set groups: layers, or sensitivity: measured)")

    def _check_ladder(self, where: str) -> None:
        ladder = list(self.ladder)
        if len(ladder) < 2:
            raise ConfigError(f"{where}.ladder: needs at least two types (the last is the top), got {ladder!r}")
        for i, t in enumerate(ladder):
            check_type(t, f"{where}.ladder[{i}]")
        if len(set(ladder)) != len(ladder):
            raise ConfigError(f"{where}.ladder: lists a type twice ({ladder!r})")
        bpw = [BY_NAME[t].bpw for t in ladder]
        if any(b >= c for b, c in zip(bpw, bpw[1:])):
            raise ConfigError(f"{where}.ladder: must go from the fewest bits per weight to the most (the last is the "
                              f"top); got {', '.join(f'{t} {b:.3g}' for t, b in zip(ladder, bpw))}")

    @property
    def active(self) -> bool:
        """Whether the sweep allocates: enabled, with at least one budget."""
        return self.enabled and bool(self.budgets)

    @property
    def items(self) -> tuple[GroupItem, ...]:
        return () if isinstance(self.groups, str) else self.groups

    @property
    def preset(self) -> str:
        """What the tensors no item takes are grouped by."""
        return self.groups if isinstance(self.groups, str) else "classes"

    @property
    def pins(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.pin.items())

    @property
    def top(self) -> str:
        if not self.ladder:  # a step given settings without the shipped config's ladder
            raise ConfigError("allocate.ladder: empty; name the types, fewest bits first (e.g. [iq2_ks, iq4_ks, q8_0])")
        return self.ladder[-1]

    @property
    def base(self) -> str:
        """The recipes' base ftype: the top's, else Q8_0 (every quantized tensor has a rule)."""
        try:
            return canonical_ftype(self.top)
        except PlanError:
            return "Q8_0"

    @property
    def band(self) -> str:
        """The type a band run lowers its layers to."""
        return self.band_type or self.ladder[0]

    @property
    def class_level(self) -> AllocateSettings:
        """The class groups whose runs a proxy table splits: the same items and pins, each item
        over all its layers, the rest by class."""
        items = tuple(dataclasses.replace(it, per="all") for it in self.items)
        return dataclasses.replace(self, groups=items or "classes", sensitivity="measured")

    def types(self) -> list[str]:
        """Every type an allocated recipe or a sensitivity run may ask for (its pool files)."""
        return sorted(set(self.ladder) | set(self.pin.values()))

    def sensitivity_json(self) -> str:
        """What the sensitivity stage reads (a new budget, resolution or refinement reruns no run)."""
        return self.to_json(only=self.SENSITIVITY)

    def proxy_json(self) -> str:
        """What the proxy step reads: the ladder (its top decides which tensors are allocated) and
        the rows it samples."""
        return self.to_json(only=("ladder", "proxy_rows"))

    def budget_json(self, budget: Budget) -> str:
        """What one allocate job reads: its budget and the solver's resolution (the sensitivity
        settings come with the table)."""
        b = dataclasses.replace(budget, optional=False)  # whether it was optional changes no recipe
        return dataclasses.replace(self, budgets=(b,)).to_json(only=("budgets", "resolution"))
