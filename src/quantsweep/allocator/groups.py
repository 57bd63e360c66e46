"""Sensitivity groups and the type ladder: which tensors share a type in an allocated recipe, the
types they may get, and the recipes the sensitivity stage measures (issue 13).

A group is a set of quantized tensors that always get one type: a tensor class across all layers
(`classes`), a class per layer (`layers`), or what a list of {match, per} items says (per: all,
layer, N layers, tensor). ffn_gate and ffn_up of a layer always share a group (the fused MoE
kernel wants them alike, ik_llama.cpp #495). A pinned tensor (`pin: {regex: type}`) is a group
with one option. Each group's rule is an anchored regex built from its members and checked to
match exactly them, so the recipe the allocator writes does what the sensitivity runs measured.

The ladder lists candidate types from the smallest to the largest; the last is the *top*: the
type every other group keeps while one group is lowered, and the reference the increases are
measured from. Bytes are the planner's (row-size fallbacks included); a type the planner refuses
for a group (one that needs an imatrix, without one) is not an option of that group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import PlanError
from ..gguf.reader import GGUFTable
from ..gguf.types import BY_NAME
from ..planner.plan import plan
from ..planner.pool import pool_recipe
from ..planner.recipes import Recipe, Rule
from ..settings import AllocateSettings
from .solver import TOTAL, group_bytes

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")
_PLAIN = re.compile(r"^(.+)\.weight$")
GPU, RAM, MIXED = "gpu", "ram", "mixed"  # split budgets: non-expert tensors vs routed experts


@dataclass
class Group:
    """A group as the sensitivity stage and the allocator see it (groups.json)."""

    name: str
    match: str
    tensors: list[str]
    budget: str = TOTAL                                    # gpu | ram | mixed (what a split budget counts it as)
    bytes: dict[str, int] = field(default_factory=dict)    # type -> exact bytes of its tensors
    pinned: str | None = None                              # the one type of a pinned group

    def to_dict(self) -> dict:
        return {"name": self.name, "match": self.match, "tensors": self.tensors, "budget": self.budget,
                "bytes": self.bytes, "pinned": self.pinned}

    @classmethod
    def from_dict(cls, d: dict) -> Group:
        return cls(d["name"], d["match"], list(d["tensors"]), d.get("budget", TOTAL),
                   {k: int(v) for k, v in d["bytes"].items()}, d.get("pinned"))


def tensor_class(name: str) -> tuple[int | None, str]:
    """(layer or None, class) of a weight: `blk.3.ffn_up_exps.weight` -> (3, 'ffn_gate_up_exps'):
    ffn_gate and ffn_up share a class, so no grouping can part them."""
    m = _BLOCK.match(name)
    layer, cls = (int(m.group(1)), m.group(2)) if m else (None, _PLAIN.sub(r"\1", name))
    return layer, re.sub(r"^ffn_(gate|up)(?=(_exps|_shexp)?$)", "ffn_gate_up", cls)


def layer_map(groups: Sequence[dict], choice: dict[str, str], ladder: Sequence[str]) -> dict:
    """What an allocation gives each layer of each class (the report's heat map): {n_layer,
    classes (in the groups' order), types: {class: [type or None per layer]}, other: {tensor
    outside the blocks: type}, ladder: the types, fewest bits first}."""
    placed = [(tensor_class(t), choice[g["name"]]) for g in groups if g["name"] in choice for t in g["tensors"]]
    n_layer = 1 + max((layer for (layer, _), _ in placed if layer is not None), default=-1)
    types: dict[str, list[str | None]] = {}
    other: dict[str, str] = {}
    for (layer, cls), typ in placed:
        if layer is None:
            other[cls] = typ
        else:
            types.setdefault(cls, [None] * n_layer)[layer] = typ
    order = sorted(set(ladder), key=lambda t: BY_NAME[t].bpw)
    return {"n_layer": n_layer, "classes": list(types), "types": types, "other": other, "ladder": order}


def quantized_tensors(table: GGUFTable, top: str) -> list[str]:
    """The tensors llama-quantize converts when asked for `top` everywhere (norms, biases and
    ffn_gate_inp are copied: no group)."""
    p = plan(table, pool_recipe(top), has_imatrix=True, strict=False)
    return [t.name for t in p.tensors if t.quantized]


def make_groups(table: GGUFTable, s: AllocateSettings, has_imatrix: bool = True) -> list[Group]:
    """The groups of `table`, pinned ones first (the rule order of every recipe built from them),
    each with its bytes at every ladder type the planner allows."""
    names = quantized_tensors(table, s.top)
    if not names:
        raise PlanError(f"{table.path}: no tensor is quantized at {s.top}; nothing to allocate")
    keyed: dict[tuple, list[str]] = {}
    pinned: dict[tuple, str] = {}
    for n in names:
        layer, cls = tensor_class(n)
        pin = next((i for i, (rx, _) in enumerate(s.pins) if re.search(rx, n)), None)
        if pin is not None:
            key: tuple = ("pin", pin)
            pinned[key] = s.pins[pin][1]
        else:
            item = next((i for i, it in enumerate(s.items) if re.search(it.match, n)), None)
            per = s.items[item].per if item is not None else ("all" if s.preset == "classes" else "layer")
            key = ("item", item, *_bucket(per, layer, cls, item))
        keyed.setdefault(key, []).append(n)
    groups = [Group(_name(k, members), _match(members, names), members, pinned=pinned.get(k))
              for k, members in keyed.items()]
    groups.sort(key=lambda g: g.pinned is None)  # pins first: their rules must win
    _check_fused(groups)  # before the names: a parted gate/up pair also gives two like-named groups
    _check_names(groups)
    for g in groups:  # every group says where a split budget counts it, so adding one reruns no run
        g.budget = _budget(g, s.experts)
    rules = [(g.name, g.match) for g in groups]
    types = s.types()
    sizes = group_bytes(table, rules, types, s.base, has_imatrix)
    for g in groups:
        g.bytes = {t: sizes[g.name][t] for t in ([g.pinned] if g.pinned else s.ladder) if t in sizes[g.name]}
        if not g.bytes:
            raise PlanError(f"group {g.name}: the planner allows none of {', '.join(types)} for its tensors "
                            f"(e.g. {g.tensors[0]}){'' if has_imatrix else '; an imatrix would allow more'}")
        if s.top not in g.bytes and not g.pinned:
            raise PlanError(f"group {g.name}: the ladder's top {s.top} is not allowed for its tensors")
    return groups


def _bucket(per, layer: int | None, cls: str, item) -> tuple:
    """The part of a group key that splits an item: nothing, the layer, a layer range, the tensor.
    The preset's items split by class, so do per-tensor groups (gate/up stay one class)."""
    by_class = item is None or per == "tensor"
    cls_key = (cls,) if by_class else ()
    if per == "all" or layer is None:
        return cls_key
    if per in ("layer", "tensor"):
        return (*cls_key, layer, layer)
    lo = layer // per * per
    return (*cls_key, lo, lo + per - 1)


def _name(key: tuple, members: list[str]) -> str:
    """A file-name-safe group name: its class(es) (`pinN-` for a pin, `gN-` for a long list
    item), then `.L5` or `.L3-5` for a layer or layer range."""
    classes = list(dict.fromkeys(tensor_class(n)[1] for n in members))
    text = "+".join(classes) if len(classes) <= 3 else f"{classes[0]}+{len(classes) - 1}more"
    if key[0] == "pin":
        return f"pin{key[1]}-{text}"
    if key[1] is not None and len(classes) > 1:
        text = f"g{key[1]}-{text}"
    if len(key) >= 4 and isinstance(key[-1], int):
        layers = sorted({tensor_class(n)[0] for n in members} - {None})
        lo, hi = max(key[-2], layers[0]), min(key[-1], layers[-1])
        text += f".L{lo}" if lo == hi else f".L{lo}-{hi}"
    return text


def _match(members: list[str], names: Sequence[str]) -> str:
    """An anchored regex for exactly `members` among `names` (the quantized tensors): the block
    part as blk.(layers).(classes).weight, `\\d+` when it covers every layer with those classes."""
    block = [(m.group(1), m.group(2)) for m in map(_BLOCK.match, members) if m]
    plain = [n for n in members if not _BLOCK.match(n)]
    parts = []
    if block:
        layers = sorted({int(b[0]) for b in block})
        classes = list(dict.fromkeys(b[1] for b in block))
        with_classes = sorted({int(m.group(1)) for m in map(_BLOCK.match, names) if m and m.group(2) in classes})
        lay = r"\d+" if layers == with_classes else _alt(str(x) for x in layers)
        parts.append(rf"blk\.{lay}\.{_alt(re.escape(c) for c in classes)}\.weight")
    if plain:
        parts.append(_alt(re.escape(_PLAIN.sub(r"\1", n)) for n in plain) + r"\.weight")
    rx = "^" + (parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")") + "$"
    got = [n for n in names if re.search(rx, n)]
    if sorted(got) != sorted(members):
        raise PlanError(f"group regex {rx} matches {len(got)} tensors, not its {len(members)} members")
    return rx


def _alt(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def _check_fused(groups: list[Group]) -> None:
    """ffn_gate and ffn_up of one layer in one group (they get one type: ik_llama.cpp #495)."""
    where = {n: i for i, g in enumerate(groups) for n in g.tensors}
    for n, i in where.items():
        other = re.sub(r"\.ffn_gate(_exps|_shexp)?\.weight$", r".ffn_up\1.weight", n)
        if other != n and other in where and where[other] != i:
            raise PlanError(f"groups: {n} is in group {groups[i].name} but {other} is in another group; ffn_gate "
                            "and ffn_up of a layer must share a type (the fused MoE kernel, ik_llama.cpp #495)")


def _check_names(groups: list[Group]) -> None:
    names = [g.name for g in groups]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise PlanError(f"groups: two groups are named {dup!r}; split them differently (per:) or merge them")


def _budget(g: Group, experts: str) -> str:
    hits = [bool(re.search(experts, n)) for n in g.tensors]
    if all(hits):
        return RAM
    return MIXED if any(hits) else GPU


def sensitivity_recipe(groups: Sequence[Group], s: AllocateSettings, group: str | None,
                       typ: str | None) -> Recipe:
    """What one sensitivity run measures: pins at their type, `group` at `typ`, every other
    quantized tensor at the top (group None: everything at the top, the reference run)."""
    rules = [Rule(g.match, g.pinned) for g in groups if g.pinned]
    if group is not None:
        g = next((g for g in groups if g.name == group), None)
        if g is None:
            raise PlanError(f"sensitivity: no group {group!r} (groups: {', '.join(x.name for x in groups)})")
        if typ not in g.bytes:
            raise PlanError(f"sensitivity: group {group} has no option {typ} ({', '.join(g.bytes)})")
        rules.append(Rule(g.match, typ))
    rules.append(Rule(".", s.top))
    name = "sensitivity-top" if group is None else f"sensitivity-{group}-{typ}"
    return Recipe(name=re.sub(r"[^A-Za-z0-9_.+-]", "_", name), base=s.base, rules=tuple(rules))


def runs(groups: Sequence[Group], s: AllocateSettings) -> list[tuple[str, str]]:
    """(group, type) of every sensitivity run besides the top one: each unpinned group at each
    of its options below the top."""
    return [(g.name, t) for g in groups if not g.pinned for t in g.bytes if t != s.top]

