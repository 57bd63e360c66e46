"""Checks of the workflow config that a JSON schema cannot express, and its normalised form.

The schema (workflow/schemas/config.schema.yaml) catches unknown keys and wrong types; this
module catches what needs the engine's tables (quant type names) or cross-references, and
names the offending key in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError, PlanError, RecipeError
from .gguf.reader import first_shard
from .gguf.types import FTYPES, canonical_ftype, ftype_names
from .planner.recipes import load_recipe
from .report.table import BASE_REFERENCE, BASELINE  # eval.reference value: the unquantized model

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Quant:
    name: str
    ftype: str
    imatrix: bool
    recipe: str | None = None  # recipe YAML path (its base is `ftype`)

    @property
    def needs_imatrix(self) -> bool:
        return FTYPES[self.ftype].needs_imatrix


def resolve_recipe_paths(items: list, fallback_dir: str) -> list:
    """Recipe paths are relative to the working directory; one not found there is looked up
    relative to `fallback_dir` (the workflow's own directory, which ships config/recipes/)."""
    import os

    out = []
    for item in items:
        if isinstance(item, dict) and item.get("recipe") and not os.path.exists(item["recipe"]):
            alt = os.path.join(fallback_dir, item["recipe"])
            if os.path.exists(alt):
                item = {**item, "recipe": alt}
        out.append(item)
    return out


def parse_quants(items: list, key: str = "quants") -> list[Quant]:
    """Entries are an ftype name, or {name, ftype, imatrix}, or {name, recipe, imatrix}."""
    out: list[Quant] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"ftype": item}
        recipe = item.get("recipe")
        if recipe:
            try:
                r = load_recipe(recipe)
            except (RecipeError, OSError) as e:
                raise ConfigError(f"config {where}.recipe: {e}") from None
            ftype, default_name = r.base, r.name
        else:
            try:
                ftype = canonical_ftype(item["ftype"])
            except PlanError:
                raise ConfigError(f"config {where}.ftype: unknown quant type {item['ftype']!r}; "
                                  f"known: {', '.join(sorted(ftype_names()))}") from None
            default_name = ftype
        use_imatrix = bool(item.get("imatrix", True))
        name = item.get("name") or (default_name if use_imatrix else f"{default_name}-noimatrix")
        if not NAME_RE.match(name):
            raise ConfigError(f"config {where}.name: {name!r} must match {NAME_RE.pattern}")
        if name == BASELINE:
            raise ConfigError(f"config {where}.name: {name!r} is reserved (the reference's evaluation record)")
        q = Quant(name, ftype, use_imatrix, recipe or None)
        if q.needs_imatrix and not use_imatrix:
            raise ConfigError(f"config {where}: {ftype} cannot be made without an imatrix (the engine refuses)")
        out.append(q)
    names = [q.name for q in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config {key}: duplicate quant name(s) {', '.join(dup)}")
    return out


def check(config: dict) -> None:
    """Semantic checks after schema validation; raises ConfigError naming the key."""
    for name, m in config["models"].items():
        if not NAME_RE.match(name):
            raise ConfigError(f"config models.{name}: model names must match {NAME_RE.pattern}")
        if m.get("source", "tiny") == "gguf":
            if not m.get("path"):
                raise ConfigError(f"config models.{name}.path: required when source is 'gguf'")
            first = first_shard(m["path"])
            if str(first) != str(m["path"]):
                raise ConfigError(f"config models.{name}.path: {m['path']} is not the first shard of a split "
                                  f"model; give {first} (the engine reads the other shards from it)")
    parse_quants(config["quants"])
    eng = config["engine"]
    need = {"git": "git_commit", "path": "path", "bin_dir": "bin_dir"}.get(eng.get("source", "pypi"))
    if need and not eng.get(need):
        raise ConfigError(f"config engine.{need}: required when engine.source is {eng['source']!r}")
    imx = config["imatrix"]
    if not imx["passes"] and not imx["external"] and any(q.imatrix for q in parse_quants(config["quants"])):
        raise ConfigError("config imatrix: passes and external are both empty, but quants want an imatrix")
    ev = config["eval"]
    if ev["ctx"] < 128 or ev["ctx"] % 2:
        raise ConfigError(f"config eval.ctx: {ev['ctx']} must be an even number >= 128")
    names = [q.name for q in parse_quants(config["quants"])]
    for model, m in config["models"].items():
        ref, key = (m["reference"], f"models.{model}.reference") if m.get("reference") else (
            ev.get("reference", BASE_REFERENCE), "eval.reference")
        if ref != BASE_REFERENCE and ref not in names:
            raise ConfigError(f"config {key}: {ref!r} is neither {BASE_REFERENCE!r} nor a quant name of the sweep "
                              f"({', '.join(names)})")


def reference_of(config: dict, model: str) -> str:
    """What a model's KLD base logits come from: 'base' (the unquantized model) or a quant's name;
    models.<model>.reference, else eval.reference, else 'base'."""
    return config["models"][model].get("reference") or config["eval"].get("reference") or BASE_REFERENCE
