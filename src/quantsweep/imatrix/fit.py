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


def _fit(e: Entry, want: int, ne0: int) -> Entry | None:
    """Collapse per-head data (k * ne0 values) to the ne0 a 2-D tensor needs (mean over heads)."""
    n = e.nval
    if n == want:
        return e
    if want == ne0 and n % ne0 == 0:
        return Entry(e.ncall, nval=ne0, load=lambda check=True, out=None:
                     e.values.reshape(n // ne0, ne0).mean(axis=0, dtype=np.float32, out=out))
    return None


_SUFFIX = re.compile(r"^(.*?\.weight)(?: \((?:reshaped|view|permuted|transposed)\))+$")


def _renamed(im: Imatrix, actions: list[str]) -> dict[str, Entry]:
    """Entries under their tensor's name: the engine's ` (reshaped)`-style suffixes removed."""
    fixed: dict[str, Entry] = {}
    for name in sorted(im.entries):
        m = _SUFFIX.match(name)
        base = m.group(1) if m else name
        if base != name:
            actions.append(f"rename {name!r} -> {base}")
        if base in fixed:
            actions.append(f"drop {name}: duplicate of {base}")
            continue
        fixed[base] = im.entries[name]
    return fixed


def remap(im: Imatrix, model: GGUFTable) -> tuple[Imatrix, list[str]]:
    """Make `im` fit the tensors of `model`; returns the new imatrix and one line per action."""
    actions: list[str] = []
    tensors = {t.name: t for t in model.tensors if len(t.shape) >= 2}
    fixed = _renamed(im, actions)
    out: dict[str, Entry] = {}
    for name, t in sorted(tensors.items()):
        want = expected_size(t.shape)
        src_name = name if name in fixed else next((s for s in stand_ins(name) if s in fixed), None)
        if src_name is None:
            continue
        e = _fit(fixed[src_name], want, t.shape[0])
        if e is None:
            actions.append(f"skip {name}: {src_name} has {fixed[src_name].nval} values, tensor needs {want}")
            continue
        if src_name != name:
            actions.append(f"copy {src_name} -> {name}")
        if e is not fixed[src_name]:
            actions.append(f"collapse {name}: {fixed[src_name].nval} -> {want} values (mean over heads)")
        out[name] = e
    for name in sorted(set(fixed) - set(out)):
        if name not in tensors:
            actions.append(f"drop {name}: no such tensor in the model")
    return Imatrix(out, im.chunks, im.dataset), actions
