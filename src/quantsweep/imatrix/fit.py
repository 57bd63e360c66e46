"""Merging imatrix passes and fitting the result to the model it quantizes.

Why a fit is needed (the project's reference ik_llama.md §1.5, §2.2): an `-mla 1` pass stores
per-head attn_k_b/attn_v_b entries (ne0 * n_head values) and names 2-D ik-layout k_b
`... (reshaped)`; llama-quantize then finds attn_v_b's per-head data through its kv_b<->v_b
stand-in for a 2-D attn_kv_b and aborts on the size mismatch. The engine's stand-in rules
live in STAND_INS, the one table both the fit and the pre-flight check read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import ImatrixError
from ..fileio import GrowBuffer
from ..gguf.reader import GGUFTable
from ..gguf.types import TYPES, ZERO_FLOOR_GROUP
from .formats import Entry, Imatrix


@dataclass(frozen=True)
class StandIn:
    """An entry that may stand in for a tensor's own (`target`, `source`: name suffixes)."""

    target: str
    source: str
    engine: bool  # llama-quantize itself takes it (src/llama-quantize.cpp:1462-1515); else remap copies it
    why: str


STAND_INS: tuple[StandIn, ...] = (
    StandIn(".ffn_up_exps.weight", ".ffn_gate_up_exps.weight", True, "merged up/gate experts"),
    StandIn(".ffn_gate_exps.weight", ".ffn_gate_up_exps.weight", True, "merged up/gate experts"),
    StandIn(".ffn_gate_exps.weight", ".ffn_up_exps.weight", True, "gate and up read the same input"),
    StandIn(".ffn_gate_up_exps.weight", ".ffn_up_exps.weight", True, "gate and up read the same input"),
    StandIn(".attn_v_b.weight", ".attn_kv_b.weight", True, "PR 250: both read the compressed KV"),
    StandIn(".attn_kv_b.weight", ".attn_v_b.weight", True, "PR 250: both read the compressed KV"),
    StandIn(".ffn_gate.weight", ".ffn_up.weight", False, "gate and up read the same input"),
    StandIn(".ffn_gate_shexp.weight", ".ffn_up_shexp.weight", False, "gate and up read the same input"),
)


def stand_ins(tensor: str, engine_only: bool = False) -> list[str]:
    """The entries that may stand in for `tensor`, in the engine's order of trying them."""
    for rule in STAND_INS:
        if tensor.endswith(rule.target):  # the first matching target decides, as in the engine
            stem = tensor[: -len(rule.target)]
            return [stem + r.source for r in STAND_INS
                    if r.target == rule.target and (r.engine or not engine_only)]
    return []


def engine_lookup(names: Iterable[str] | set[str], tensor: str) -> str | None:
    """The imatrix entry llama-quantize uses for `tensor`: its own, then the engine's stand-ins."""
    names = names if isinstance(names, (set, frozenset, dict)) else set(names)
    if tensor in names:
        return tensor
    return next((n for n in stand_ins(tensor, engine_only=True) if n in names), None)


def expected_size(shape: tuple[int, ...]) -> int:
    """What quantize checks: ne0 * ne2 (per expert or per head for 3-D tensors)."""
    return shape[0] * (shape[2] if len(shape) > 2 else 1)


def merge(ims: list[Imatrix], names: list[str] | None = None) -> Imatrix:
    """ncall-weighted merge (values and ncall add); disjoint entries are united. Lazy."""
    names = names or [f"input {i}" for i in range(len(ims))]
    out = Imatrix(chunks=sum(i.chunks for i in ims),
                  dataset=",".join(dict.fromkeys(i.dataset for i in ims if i.dataset)))
    parts: dict[str, list[tuple[str, Entry]]] = {}
    for label, im in zip(names, ims):
        for name, e in im.entries.items():
            have = parts.setdefault(name, [])
            if have and have[0][1].nval != e.nval:
                raise ImatrixError(f"imatrix entry {name}: {have[0][0]} has {have[0][1].nval} values, "
                                   f"{label} has {e.nval}")
            have.append((label, e))
    buf = GrowBuffer()
    for name, es in parts.items():
        if len(es) == 1:
            out.entries[name] = es[0][1]
        else:
            group = [e for _, e in es]
            out.entries[name] = Entry(sum(e.ncall for e in group), nval=group[0].nval, load=_sum_loader(group, buf))
    return out


def _sum_loader(group: list[Entry], buf: GrowBuffer) -> Callable[..., np.ndarray]:
    def load(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        acc = group[0].into(buf.get(group[0].nval) if out is None else out)  # own buffer: inputs may share a reader's
        for e in group[1:]:
            acc += e.values
        return acc

    return load


# Tensors whose imatrix data comes per attention head: an `-mla 1` pass stores head-major
# entries for 3-D attn_k_b/attn_v_b, `-mla 0` one row-length entry for attn_kv_b. Only
# these may change layout in a fit (by n_head from the model); any other size mismatch
# means the imatrix is not for this model.
PER_HEAD = (".attn_k_b.weight", ".attn_v_b.weight", ".attn_kv_b.weight")


_HOW = {"collapse": "mean over heads", "repeat": "the same row data for every head"}


def _fit(e: Entry, src: str, tensor: str, shape: tuple[int, ...], n_head: int) -> tuple[Entry, str]:
    """`e` (stored under `src`) laid out as `tensor` needs: as is, collapsed to the mean over
    heads (per-head data for a 2-D tensor) or repeated per head (row data for a 3-D one)."""
    n, want, ne0 = e.nval, expected_size(shape), shape[0]
    if n == want:
        return e, ""
    per_head = tensor.endswith(PER_HEAD) and src.endswith(PER_HEAD) and n_head > 1
    if per_head and want == ne0 and n == ne0 * n_head:
        return Entry(e.ncall, nval=ne0, load=lambda check=True, out=None:
                     e.values.reshape(n_head, ne0).mean(axis=0, dtype=np.float32, out=out)), "collapse"
    if per_head and n == ne0 and len(shape) > 2 and shape[2] == n_head:
        def tile(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
            out = np.empty(want, dtype=np.float32) if out is None else out
            out.reshape(n_head, ne0)[:] = e.values
            return out
        return Entry(e.ncall, nval=want, load=tile), "repeat"
    raise ImatrixError(f"imatrix entry {src} has {n} values but tensor {tensor} {list(shape)} needs {want}: "
                       "the imatrix is not for this model")


_SUFFIX = re.compile(r"^(.*?\.weight)(?: \((?:reshaped|view|permuted|transposed)\))+$")


def base_name(name: str) -> str:
    """An entry's tensor name without the engine's ` (reshaped)`-style suffixes."""
    m = _SUFFIX.match(name)
    return m.group(1) if m else name


def _renamed(im: Imatrix, actions: list[str]) -> dict[str, Entry]:
    """Entries under their tensor's name: the engine's ` (reshaped)`-style suffixes removed."""
    fixed: dict[str, Entry] = {}
    for name in sorted(im.entries):
        base = base_name(name)
        if base != name:
            actions.append(f"rename {name!r} -> {base}")
        if base in fixed:
            actions.append(f"drop {name}: duplicate of {base}")
            continue
        fixed[base] = im.entries[name]
    return fixed


def _sources(name: str, fixed: dict[str, Entry], tensors: dict) -> list[str]:
    """Where a tensor's data comes from: its own entry, plus every stand-in whose own tensor
    the model lacks (data nothing else would use: a 3-D attn_v_b takes a -mla 0 pass's
    attn_kv_b, a 2-D attn_kv_b a -mla 1 pass's attn_v_b); with neither, the first stand-in."""
    alts = [s for s in stand_ins(name) if s in fixed]
    srcs = ([name] if name in fixed else []) + [s for s in alts if s not in tensors]
    return srcs or alts[:1]


ZERO_TYPES = tuple(t.name for t in TYPES.values() if t.zero_group)
FLOOR_FRACTION = 1e-3  # an all-zero group becomes this fraction of its matrix's mean value


def zero_groups(values: np.ndarray, ne0: int, group: int) -> list[tuple[int, int]]:
    """(matrix, first column) of every aligned all-zero group of `group` values (at most ne0)
    in each row of ne0 values; a short last group counts when it is all zero."""
    if np.count_nonzero(values) == values.size:  # the usual case, at memory speed
        return []
    g = min(group, ne0)
    rows = values.reshape(-1, ne0)
    out = []
    for start in range(0, ne0, g):
        dead = ~rows[:, start:start + g].any(axis=1)
        out += [(int(m), start) for m in np.flatnonzero(dead)]
    return sorted(out)


def _floored(e: Entry, name: str, ne0: int, actions: list[str]) -> Entry:
    """`e` with every all-zero group the engine could fail on (ZERO_FLOOR_GROUP values, the
    finest any type breaks on) raised to FLOOR_FRACTION of its matrix's mean: dead input
    channels are normal, and a tiny weight says "unimportant" without dividing by zero."""
    v = e.values
    groups = zero_groups(v, ne0, ZERO_FLOOR_GROUP)
    if not groups:
        return e
    g = min(ZERO_FLOOR_GROUP, ne0)
    rows = v.reshape(-1, ne0)
    floors = {m: FLOOR_FRACTION * float(rows[m].sum() / max(np.count_nonzero(rows[m]), 1)) or float(e.ncall)
              for m in {m for m, _ in groups}}
    m0, c0 = groups[0]
    where = f"columns {c0}-{c0 + g - 1}" + (f" of matrix {m0}" if rows.shape[0] > 1 else "")
    actions.append(f"floor {name}: {len(groups)} all-zero group(s) of {g} values (first: {where}) set to "
                   f"{FLOOR_FRACTION:g} x their matrix's mean; llama-quantize fails on all-zero groups at "
                   f"{', '.join(ZERO_TYPES)}")

    def load(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        out = e.into(np.empty(e.nval, np.float32) if out is None else out)
        r = out.reshape(-1, ne0)
        for m, c in groups:
            r[m, c:c + g] = floors[m]
        return out

    return Entry(e.ncall, nval=e.nval, load=load)


def remap(im: Imatrix, model: GGUFTable) -> tuple[Imatrix, list[str]]:
    """Make `im` fit the tensors of `model`; returns the new imatrix and one line per action.
    ImatrixError when an entry cannot fit (the imatrix is for another model) or none matches."""
    actions: list[str] = []
    tensors = {t.name: t for t in model.tensors if len(t.shape) >= 2}
    fixed = _renamed(im, actions)
    n_head = int(model.arch_kv("attention.head_count") or 0)
    out: dict[str, Entry] = {}
    used: set[str] = set()
    for name, t in sorted(tensors.items()):
        parts = []
        for src in _sources(name, fixed, tensors):
            e, how = _fit(fixed[src], src, name, t.shape, n_head)
            parts.append(e)
            used.add(src)
            if src != name:
                actions.append(f"{'copy' if len(parts) == 1 else 'add'} {src} -> {name}")
            if how:
                actions.append(f"{how} {name}: {fixed[src].nval} -> {e.nval} values ({_HOW[how]})")
        if parts:
            e = parts[0] if len(parts) == 1 else merge([Imatrix({name: p}) for p in parts]).entries[name]
            out[name] = _floored(e, name, t.shape[0], actions)
    if not out:
        first = next(iter(sorted(im.entries)), "-")
        raise ImatrixError(f"no entry of the imatrix matches a tensor of {model.path} (first entry: {first}): "
                           "the imatrix is not for this model")
    for name in sorted(set(fixed) - used):
        actions.append(f"drop {name}: no such tensor in the model")
    return Imatrix(out, im.chunks, im.dataset), actions
