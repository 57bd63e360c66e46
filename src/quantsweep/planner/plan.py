"""The plan of a quantization: every tensor's type and bytes (from the engine port in
planner.selection), totals, and what the engine would refuse or silently not do.

`plan()` takes an ftype, a recipe (planner.recipes) or EngineOptions, and optionally the
imatrix the quantization will use (checked with imatrix.check, the pre-flight step's check,
for what the engine's lookup decides: entries and their sizes), and returns a Plan with warnings for rules that never apply, overrides the
engine does not honour and tensors that need an imatrix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ImatrixError, RecipeError
from ..gguf.reader import GGUFTable
from ..gguf.types import FTYPES, needs_imatrix, quantized
from ..imatrix.check import check, describe
from ..imatrix.formats import read_any
from .selection import EngineOptions, TensorPlan, select


@dataclass
class Plan:
    model: str
    ftype: str
    options: EngineOptions
    tensors: list[TensorPlan]
    n_fallback: int
    has_imatrix: bool
    recipe: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def src_bytes(self) -> int:
        return sum(t.src_nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def gib(self) -> float:
        return self.total_bytes / 2**30

    @property
    def mib(self) -> float:
        """What llama-quantize prints as 'quant size = %.2f MB' (it is MiB)."""
        return self.total_bytes / 2**20

    @property
    def bpw(self) -> float:
        """8 * bytes / elements over all tensors (as llama's loader prints 'model size ... BPW')."""
        return 8.0 * self.total_bytes / self.n_elements if self.n_elements else 0.0

    def types(self) -> dict[str, str | None]:
        """{tensor: converted-to type or None when copied}: the form engine.logparse.parse_quantize_tensors gives."""
        return {t.name: t.engine_type for t in self.tensors}

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            d = out.setdefault(t.type, {"tensors": 0, "bytes": 0, "elements": 0})
            d["tensors"] += 1
            d["bytes"] += t.nbytes
            d["elements"] += t.n_elements
        return out

    def file_bytes(self, header_bytes: int, alignment: int = 32) -> int:
        """Size of the written GGUF: header (KVs + tensor infos, padded) + each tensor padded."""
        return header_bytes + sum((t.nbytes + alignment - 1) // alignment * alignment for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "ftype": self.ftype,
            "has_imatrix": self.has_imatrix,
            "engine_flags": self.options.argv(),
            "total_bytes": self.total_bytes,
            "src_bytes": self.src_bytes,
            "n_elements": self.n_elements,
            "gib": round(self.gib, 6),
            "bpw": round(self.bpw, 6),
            "n_fallback": self.n_fallback,
            "by_type": self.by_type(),
            "warnings": list(self.warnings),
            "tensors": [t.to_dict() for t in self.tensors],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        lines = [f"{self.recipe or self.ftype} on {self.model}: {self.gib:.3f} GiB, {self.bpw:.3f} bpw, "
                 f"{len(self.tensors)} tensors, {self.n_fallback} fallback(s)"]
        for ty, d in sorted(self.by_type().items(), key=lambda kv: -kv[1]["bytes"]):
            lines.append(f"  {ty:>10}: {d['tensors']:5d} tensors {d['bytes'] / 2**30:10.3f} GiB "
                         f"{8 * d['bytes'] / max(d['elements'], 1):7.3f} bpw")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def as_options(spec: Any) -> tuple[EngineOptions, str | None]:
    """What llama-quantize is told for an ftype name, a recipes.Recipe or EngineOptions, and the
    recipe's name (None for the others)."""
    if isinstance(spec, EngineOptions):
        return spec, None
    if isinstance(spec, str):
        return EngineOptions(ftype=spec), None
    if hasattr(spec, "options"):  # recipes.Recipe
        return spec.options(), getattr(spec, "name", None)
    raise TypeError(f"plan(): expected an ftype name, EngineOptions or Recipe, got {type(spec).__name__}")


def plan(table: GGUFTable, recipe_or_ftype: Any, imatrix: Any = None, *, has_imatrix: bool | None = None,
         strict: bool = True) -> Plan:
    """The engine's type for every tensor of `table`.

    recipe_or_ftype: an ftype name ("IQ4_KS"), a recipes.Recipe or EngineOptions.
    imatrix: None, a path, or an Imatrix (as remapped for this model). Given one, the
      heuristics run as with --imatrix, and a tensor whose type needs data without an entry,
      or any entry of the wrong size, raises ImatrixError (imatrix.check, values not read).
    has_imatrix: plan as if --imatrix were given without checking data (default: imatrix given).
    strict: with a recipe, a rule that matches no tensor name raises RecipeError (rules marked
      optional excepted); rules that never take effect are reported in Plan.warnings.
    """
    opts, recipe_name = as_options(recipe_or_ftype)
    im = read_any(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    has_im = (im is not None) if has_imatrix is None else bool(has_imatrix)
    tensors, n_fallback = select(table, opts, has_im)
    p = Plan(model=str(getattr(table, "path", "") or "model"), ftype=opts.ftype, options=opts, tensors=tensors,
             n_fallback=n_fallback, has_imatrix=has_im, recipe=recipe_name)
    requant = [t for t in tensors if t.quantized and quantized(t.src_type)]
    if requant:
        p.warnings.append(f"{len(requant)} tensor(s) are already quantized (e.g. {requant[0].name}: "
                          f"{requant[0].src_type}); llama-quantize needs --allow-requantize")
    _rule_report(p, opts, table, recipe_or_ftype, strict)
    _override_report(p, opts)
    _imatrix_report(p, table, im)
    return p


def _rule_report(p: Plan, opts: EngineOptions, table: GGUFTable, spec: Any, strict: bool) -> None:
    if not opts.custom:
        return
    optional = [bool(getattr(r, "optional", False)) for r in getattr(spec, "rules", ())] or [False] * len(opts.custom)
    where = getattr(spec, "source", None) or (p.recipe or "custom rules")
    names = [t.name for t in table.tensors]
    won: dict[int, list[TensorPlan]] = {}
    for t in p.tensors:
        if t.rule is not None:
            won.setdefault(t.rule, []).append(t)
    for i, (rx, ty) in enumerate(opts.custom):
        hits = [n for n in names if re.search(rx, n)]
        if not hits:
            if not optional[i]:
                if strict:
                    raise RecipeError(f"{where}: rules[{i}].match {rx!r} matches no tensor of {p.model}")
                p.warnings.append(f"rules[{i}] {rx}={ty} matches no tensor")
            continue
        if i not in won:
            p.warnings.append(f"rules[{i}] {rx}={ty} never applies: its {len(hits)} tensor(s) "
                              f"(e.g. {hits[0]}) are taken by earlier rules or never quantized")
            continue
        fb = [t for t in won[i] if t.fallback]
        if fb:
            p.warnings.append(f"rules[{i}] {rx}={ty}: {len(fb)} tensor(s) fall back to {fb[0].selected} "
                              f"(e.g. {fb[0].name}: {fb[0].shape[0]} columns)")
        ri = [t for t in won[i] if t.type != t.selected]
        if ri:
            p.warnings.append(f"rules[{i}] {rx}={ty}: {len(ri)} tensor(s) get {ri[0].type} instead "
                              f"(e.g. {ri[0].name}: {ri[0].shape[1]} rows, not a multiple of the interleave)")
    if opts.pure or not quantized(opts.default_type):
        p.warnings.append(f"the engine ignores --custom-q with {'--pure' if opts.pure else 'ftype ' + opts.ftype}")


def _override_report(p: Plan, opts: EngineOptions) -> None:
    """CLI type overrides the engine does not honour as asked (interleaving constraints)."""
    for flag, want, match in (("token_embd", opts.token_embd, lambda n: n == "token_embd.weight"),
                              ("output", opts.output, lambda n: n == "output.weight"),
                              ("ffn_gate_inp", opts.ffn_gate_inp, lambda n: "ffn_gate_inp.weight" in n)):
        if want is None:
            continue
        got = [t for t in p.tensors if match(t.name) and t.type != want and (t.quantized or t.src_type != want)]
        if got:
            t = got[0]
            why = ("token embeddings cannot be row-interleaved" if t.name == "token_embd.weight"
                   else f"{t.shape[1] if len(t.shape) > 1 else 1} rows are not a multiple of the interleave")
            p.warnings.append(f"{flag}: {want} asked, the engine writes {t.type} for {len(got)} tensor(s) "
                              f"(e.g. {t.name}: {why})")


def _imatrix_report(p: Plan, table: GGUFTable, im: Any) -> None:
    """Without an imatrix: what the engine refuses. With one: the pre-flight check's structural
    problems (missing or wrongly sized entries; the values are the pre-flight step's business)."""
    if im is not None:
        types = {t.name: t.selected if t.quantized else None for t in p.tensors}
        problems = check(im, table, types, p.ftype, data=False)
        if problems:
            raise ImatrixError(describe(problems))
        return
    if p.has_imatrix:
        return
    if FTYPES[p.ftype].needs_imatrix:
        p.warnings.append(f"llama-quantize refuses ftype {p.ftype} without --imatrix")
    exempt = ("token_embd.weight", "output.weight")
    need = [t for t in p.tensors if t.quantized and needs_imatrix(t.selected, p.ftype) and t.name not in exempt]
    if need:
        p.warnings.append(f"{len(need)} tensor(s) get a type that needs an imatrix (e.g. {need[0].name}: "
                          f"{need[0].selected}); the engine aborts without one")


def compare(planned: Plan, engine_types: dict[str, str | None]) -> list[str]:
    """Differences between a plan and the engine's per-tensor types, one line each."""
    diffs = []
    mine = planned.types()
    for n in sorted(set(mine) | set(engine_types)):
        if mine.get(n, "<absent>") != engine_types.get(n, "<absent>"):
            diffs.append(f"{n}: plan {mine.get(n, '<absent>')} engine {engine_types.get(n, '<absent>')}")
    return diffs

