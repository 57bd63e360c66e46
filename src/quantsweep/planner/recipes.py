"""Quantization recipes: a YAML file -> the llama-quantize flags, and the planner's input.

A recipe (config/recipes/*.yaml) names a base ftype and ordered `--custom-q` rules (first
match wins, as in the engine), plus optional token_embd / output / ffn_gate_inp types and
--pure. The same Recipe object feeds `engine_args()` (what the engine is told) and
`planner.plan.plan()` (what it will do), so a planned size is the size of what gets quantized.

    name: tiny-mix-iq2
    description: routed experts at 2 bits, everything else higher
    base: IQ2_KS                      # llama-quantize's positional FTYPE (case-insensitive)
    token_embd: q8_0                  # --token-embedding-type
    output: q6_K                      # --output-tensor-type
    ffn_gate_inp: f32                 # --ffn-gate-inp-type (default: never quantized)
    pure: false                       # --pure (the engine then ignores rules)
    rules:                            # --custom-q "match=type,...", first match wins
      - {match: 'attn_k_b', type: q5_0, optional: true}   # optional: may match no tensor
      - {match: 'ffn_(gate|up|down)_exps', type: iq2_ks}
    published: {size_gib: 131, bpw: 1.664, source: "..."}   # optional, for comparisons

Type names are the engine's ggml_type_name() spellings, which it compares case-sensitively
(`q4_K`, `iq4_ks`, `q8_0_r8`); a wrong case is an error with the right spelling suggested.
Every error is one line naming the file and the key (`rules[2].type`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from ..errors import PlanError, RecipeError
from ..fileio import read_yaml
from ..gguf.types import canonical_ftype, check_type, ftype_names, quantized
from ..settings.values import check_regex
from .selection import EngineOptions

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "quantsweep recipe",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "base"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"},
        "description": {"type": "string"},
        "model": {"type": "string", "description": "the model family the recipe is written for"},
        "base": {"type": "string", "minLength": 1},
        "pure": {"type": "boolean"},
        "token_embd": {"type": "string", "minLength": 1},
        "output": {"type": "string", "minLength": 1},
        "ffn_gate_inp": {"type": "string", "minLength": 1},
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["match", "type"],
                "properties": {
                    "match": {"type": "string", "minLength": 1},
                    "type": {"type": "string", "minLength": 1},
                    "optional": {"type": "boolean"},
                    "comment": {"type": "string"},
                },
            },
        },
        "published": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "model": {"type": "string"},
                "size_gib": {"type": "number"},
                "bpw": {"type": "number"},
                "quant_mib": {"type": "number"},
                "source": {"type": "string"},
            },
        },
    },
}


@dataclass(frozen=True)
class Rule:
    match: str
    type: str
    optional: bool = False
    comment: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str  # canonical ftype, e.g. "IQ2_KS"
    rules: tuple[Rule, ...] = ()
    description: str = ""
    model: str = ""
    token_embd: str | None = None
    output: str | None = None
    ffn_gate_inp: str | None = None
    pure: bool = False
    published: dict = field(default_factory=dict, compare=False)
    source: str | None = None  # the file it came from (for messages)

    def options(self) -> EngineOptions:
        """The engine parameters this recipe stands for (what planner.plan.plan() models)."""
        return EngineOptions(ftype=self.base, custom=tuple((r.match, r.type) for r in self.rules), pure=self.pure,
                             token_embd=self.token_embd, output=self.output, ffn_gate_inp=self.ffn_gate_inp)


def _schema_error(e: jsonschema.ValidationError) -> str:
    key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(e.absolute_path))
    return f"{key or '(top level)'}: {e.message}"


def recipe_from_dict(d: Any, source: str = "<recipe>") -> Recipe:
    """Validate a parsed recipe (schema, ftype, type names, regexes) and build the Recipe."""
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(d).__name__}")
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(d), key=lambda e: list(e.absolute_path))
    if errors:
        raise RecipeError(f"{source}: {_schema_error(jsonschema.exceptions.best_match(errors))}")
    try:
        base = canonical_ftype(d["base"])
    except PlanError:
        close = difflib.get_close_matches(str(d["base"]).upper(), ftype_names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RecipeError(f"{source}: base: unknown llama-quantize ftype {d['base']!r}{hint}") from None
    opt = {k: check_type(d[k], f"{source}: {k}") for k in ("token_embd", "output", "ffn_gate_inp") if k in d}
    rules = []
    for i, r in enumerate(d.get("rules") or []):
        check_regex(r["match"], f"{source}: rules[{i}].match")
        check_type(r["type"], f"{source}: rules[{i}].type")
        rules.append(Rule(r["match"], r["type"], bool(r.get("optional", False)), r.get("comment", "")))
    pure = bool(d.get("pure", False))
    if rules and pure:
        raise RecipeError(f"{source}: rules: --pure makes llama-quantize skip --custom-q; drop one of them")
    if rules and not quantized(EngineOptions(ftype=base).default_type):
        raise RecipeError(f"{source}: rules: with base {base} the engine never applies --custom-q "
                          "(its default type is not quantized); use a quantized base such as Q8_0")
    return Recipe(name=d["name"], base=base, rules=tuple(rules), description=d.get("description", ""),
                  model=d.get("model", ""), pure=pure, published=dict(d.get("published") or {}), source=source,
                  **opt)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; RecipeError (one line, naming file and key) when invalid."""
    path = Path(path)
    d = read_yaml(path, RecipeError)
    return recipe_from_dict(d, str(path))


def recipe_or_ftype(arg: str | Path) -> Recipe | str:
    """A recipe file, or else an ftype name (for `recipe plan` given IQ4_KS instead of a file)."""
    path = Path(arg)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_recipe(path)
    try:
        return canonical_ftype(str(arg))
    except PlanError:
        raise RecipeError(f"{arg}: neither a recipe file nor a llama-quantize ftype") from None


def engine_args(recipe: Recipe) -> list[str]:
    """Options then the positional FTYPE: `llama-quantize [--imatrix F] *flags IN OUT FTYPE [threads]`
    (a = engine_args(r): ftype a[-1], options a[:-1])."""
    return recipe.options().argv() + [recipe.base]
