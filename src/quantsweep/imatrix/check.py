"""Is an imatrix fit for a quantization? The pre-flight check (what the engine would refuse,
abort on, or quantize blind) and per-entry statistics for `imatrix info`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf.reader import GGUFTable
from ..gguf.types import by_name, needs_imatrix
from .fit import engine_lookup, expected_size, zero_groups
from .formats import Imatrix


@dataclass
class EntryStats:
    name: str
    ncall: int
    nval: int
    n_mat: int
    mean: float
    max: float
    zeros: int
    nonfinite: int
    empty_mats: list[int]  # experts/heads with no data (ik stores them as all-1 means)


def stats(im: Imatrix, n_mat: dict[str, int] | None = None) -> list[EntryStats]:
    """Per-entry statistics, one entry in memory at a time. NaN/inf are counted, not raised."""
    out = []
    for name in sorted(im.entries):
        e = im.entries[name]
        v = e.raw()
        m = (n_mat or {}).get(name, 1)
        means = (v / e.ncall if e.ncall > 0 else v).reshape(m, -1)
        finite = np.isfinite(v)
        empty = [i for i in range(m) if m > 1 and np.all(means[i] == 1.0)]
        fv = v[finite]
        out.append(EntryStats(name, e.ncall, e.nval, m,
                              float(fv.mean() / max(e.ncall, 1)) if fv.size else float("nan"),
                              float(fv.max() / max(e.ncall, 1)) if fv.size else float("nan"),
                              int(np.count_nonzero(v == 0)), int(v.size - np.count_nonzero(finite)), empty))
    return out


@dataclass
class Problem:
    tensor: str
    type: str
    entry: str
    problem: str


def check(im: Imatrix, model: GGUFTable, types: dict[str, str | None], ftype: str = "",
          data: bool = True) -> list[Problem]:
    """What would make quantizing `model` with `im` fail or run blind, tensor by tensor.

    types: the type the engine converts each tensor to (None: copied), from its --dry-run or
    the planner; the same check serves the pre-flight step and `recipe plan`. A tensor whose
    type needs an imatrix must have an entry of exactly ne0*ne2 finite values with data for
    every expert; any found entry of the wrong size aborts the engine, so it is reported too;
    so is an all-zero group of values where the type table says the engine fails on one
    (gguf.types, column zero: e.g. 256 for q4_K, 32 for iq4_nl); scattered zeros pass. data=False
    checks only what the engine's lookup decides (entries and sizes), reading no values."""
    problems: list[Problem] = []
    names = set(im.entries)
    for t in model.tensors:
        new = types.get(t.name)
        if new is None:
            continue
        requires = needs_imatrix(new, ftype) and t.name not in (
            "token_embd.weight", "output.weight")
        key = engine_lookup(names, t.name)
        if key is None:
            if requires:
                problems.append(Problem(t.name, new, "-", "no imatrix data (the engine refuses this type without)"))
            continue
        e = im.entries[key]
        n_mat = t.shape[2] if len(t.shape) > 2 else 1
        want = expected_size(t.shape)
        if e.nval != want:
            if t.name != "token_embd.weight":
                problems.append(Problem(t.name, new, key, f"{e.nval} values, tensor needs {want} (the engine aborts)"))
            continue
        if not data:
            continue
        v = e.raw()
        if not np.all(np.isfinite(v)):
            problems.append(Problem(t.name, new, key, f"{int(np.count_nonzero(~np.isfinite(v)))} NaN/inf values"))
            continue
        group = by_name(new).zero_group
        dead = zero_groups(v, t.shape[0], group) if group else []
        if dead:
            g = min(group, t.shape[0])
            m, c = dead[0]
            where = f"columns {c}-{c + g - 1}" + (f" of matrix {m}" if n_mat > 1 else "")
            problems.append(Problem(t.name, new, key, f"{len(dead)} all-zero group(s) of {g} values (first: {where}): "
                                    f"llama-quantize fails on them at {new} (imatrix remap floors them)"))
        if requires and n_mat > 1:
            means = (v / max(e.ncall, 1)).reshape(n_mat, -1)
            empty = [i for i in range(n_mat) if np.all(means[i] == 1.0)]
            if empty:
                problems.append(Problem(t.name, new, key, f"no data for expert(s) {','.join(map(str, empty))}"))
    return problems


def describe(problems: list[Problem]) -> str:
    """The first problem in one line, and how many more there are."""
    p = problems[0]
    more = f" [and {len(problems) - 1} more]" if len(problems) > 1 else ""
    return f"{p.tensor} ({p.type}): imatrix entry {p.entry}: {p.problem}{more}"
