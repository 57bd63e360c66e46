"""The workflow config as settings objects: `load` builds the sweep's `Sweep` once, with the
checks a JSON schema cannot express.

The schema (workflow/schemas/config.schema.yaml) catches unknown keys and wrong types in the
workflow; the settings classes check their own values (so a config checked by hand, or a
step's JSON, gets the same checks); this module adds what needs the engine's tables (quant type
names), recipe files, the models' files or several sections at once, and names the offending
key in one line.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

from .errors import ConfigError, PlanError, QuantsweepError, RecipeError
from .gguf.reader import first_shard
from .gguf.types import canonical_ftype, ftype_names
from .planner.recipes import load_recipe
from .settings import (BASE_REFERENCE, BASELINE, AllocateSettings, BenchSettings, EngineSpec, EvalSettings, Gate,
                       ImatrixSettings, ModelSettings, Quant, ResourceSettings, Sweep, TextSettings, resolve_run)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# The settings class of each mapping section (`models` maps names to ModelSettings; `run` is
# resolved into each engine step's settings).
SECTIONS = {"engine": EngineSpec, "texts": TextSettings, "imatrix": ImatrixSettings, "eval": EvalSettings,
            "bench": BenchSettings, "allocate": AllocateSettings, "resources": ResourceSettings, "gate": Gate}
REQUIRED = ("models", "quants")  # no default: a sweep names its models and quants
# Lists whose items must have one of these types (checked before the schema, whose validator
# would otherwise fail with an AttributeError on `quants: [8]`).
_LISTS = {("quants",): (str, dict), ("imatrix", "passes"): (str,), ("imatrix", "external"): (str,)}


def resolve_recipe_paths(items: list, fallback_dir: str) -> list:
    """Recipe paths are relative to the working directory; one not found there is looked up
    relative to `fallback_dir` (the workflow's own directory, which ships config/recipes/)."""
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


def sweep_quants(quants: list[Quant], allocate: AllocateSettings, has_imatrix: bool) -> tuple[Quant, ...]:
    """Every quant of the sweep: `quants`, then one auto recipe per allocate budget (after the
    quants they are compared with), then with allocate.refine each one refined."""
    out = list(quants)
    names = {q.name: q for q in out}
    for i, b in enumerate(allocate.budgets if allocate.active else ()):
        where = f"config allocate.budgets[{i}]"
        if b.name in names:
            raise ConfigError(f"{where}.name: {b.name!r} is already a quant of the sweep; name the budget")
        if not NAME_RE.match(b.name):
            raise ConfigError(f"{where}.name: {b.name!r} must match {NAME_RE.pattern}")
        if b.size_of is not None and (b.size_of not in names or names[b.size_of].auto):
            raise ConfigError(f"{where}.size_of: {b.size_of!r} is not a quant of `quants` "
                              f"({', '.join(q.name for q in quants)})")
        q = Quant(b.name, allocate.base, has_imatrix, None, True, b)
        names[q.name] = q
        out.append(q)
    if allocate.refine:
        for q in [q for q in out if q.auto]:
            r = Quant(f"{q.name}-refined", q.ftype, q.imatrix, None, True, q.budget, q.name)
            if r.name in names:
                raise ConfigError(f"config allocate.refine: {r.name!r} (the refined {q.name}) is already a quant")
            names[r.name] = r
            out.append(r)
    return tuple(out)


def check_structure(config: dict) -> None:
    """The shapes the schema and the rest of the checks assume (a mapping where a mapping is
    expected, list items of the right kind), so that `quants: [8]` is one clear line rather
    than an AttributeError from inside the schema validator."""
    if not isinstance(config, dict):
        raise ConfigError(f"config: the top level is {type(config).__name__}, not a mapping of sections")
    for key in (*SECTIONS, "models", "run"):
        if key in config and not isinstance(config[key], dict):
            raise ConfigError(f"config {key}: is {config[key]!r}, not a mapping")
    for name, m in (config.get("models") or {}).items():
        if not isinstance(m, dict):
            raise ConfigError(f"config models.{name}: is {m!r}, not a mapping")
    for path, kinds in _LISTS.items():
        value = config
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        where = ".".join(path)
        if not isinstance(value, list):
            raise ConfigError(f"config {where}: is {value!r}, not a list")
        for i, item in enumerate(value):
            if not isinstance(item, kinds):
                want = " or ".join({str: "a name", dict: "a mapping"}[k] for k in kinds)
                raise ConfigError(f"config {where}[{i}]: {item!r} is not {want}")


def load(config: dict, recipe_dir: str | Path = ".") -> Sweep:
    """The sweep's settings from a config (after check_structure and, in the workflow, the
    schema); ConfigError naming the key. Recipe paths not found in the working directory are
    looked up in `recipe_dir` (the workflow's own directory, which ships config/recipes/)."""
    check_structure(config)
    if missing := [k for k in REQUIRED if k not in config]:
        raise ConfigError(f"config {missing[0]}: missing (give the default config/config.yaml first)")
    try:
        sweep = _build(config, str(recipe_dir))
    except (ConfigError, RecipeError, PlanError) as e:
        text = str(e)
        raise ConfigError(text if text.startswith("config ") else f"config {text}") from None
    _check(sweep)
    return sweep


def _build(config: dict, recipe_dir: str) -> Sweep:
    models = config["models"]
    if not isinstance(models, dict) or not models:
        raise ConfigError("models: name at least one model")
    for name in models:
        if not NAME_RE.match(name):
            raise ConfigError(f"models.{name}: model names must match {NAME_RE.pattern}")
    runs = resolve_run(config.get("run"))
    section = {key: cls.from_dict({**(config.get(key) or {}), **({"run": runs[key]} if key in runs else {})}, key)
               for key, cls in SECTIONS.items()}
    quants = parse_quants(resolve_recipe_paths(config["quants"], recipe_dir))
    if not quants:
        raise ConfigError("quants: name at least one quant")
    imx = section["imatrix"]
    return Sweep(models={n: ModelSettings.from_dict(m, f"models.{n}") for n, m in models.items()},
                 quants=sweep_quants(quants, section["allocate"], imx.any), **section)


def _check(s: Sweep) -> None:
    """What spans sections or needs files: each model's files, the imatrix the quants want, the
    engine's tools, the gate's speed limits, each model's reference."""
    for name, m in s.models.items():
        if m.source == "hf":
            check_hf_model(name, m)
        if m.source == "gguf":
            first = first_shard(m.path)
            if str(first) != str(m.path):
                raise ConfigError(f"config models.{name}.path: {m.path} is not the first shard of a split "
                                  f"model; give {first} (the engine reads the other shards from it)")
    if not s.imatrix.any and any(q.imatrix for q in s.quants if not q.auto):
        raise ConfigError("config imatrix: passes and external are both empty, but quants want an imatrix")
    if s.engine.source == "bin_dir":
        for tool in s.tools():
            if not (Path(s.engine.bin_dir) / tool.name).is_file():
                why = "every sweep runs it" if tool.required else f"the {tool.step} step runs it"
                fix = "" if tool.required else f", or set {tool.step}.enabled: false"
                raise ConfigError(f"config engine.bin_dir: {s.engine.bin_dir} has no {tool.name} ({why}); add "
                                  f"it{fix}")
    for key in Gate.SPEED_KEYS:
        if getattr(s.gate, key) is not None and not s.bench.enabled:
            raise ConfigError(f"config gate.{key}: a speed limit needs bench.enabled: true")
    names = [q.name for q in s.quants if not q.auto]
    for model, m in s.models.items():
        key = f"models.{model}.reference" if m.reference else "eval.reference"
        ref = s.reference_of(model)
        if ref != BASE_REFERENCE and ref not in names:
            raise ConfigError(f"config {key}: {ref!r} is neither {BASE_REFERENCE!r} nor a quant name of the sweep "
                              f"({', '.join(names)})")


def check_hf_model(name: str, m: ModelSettings) -> None:
    """A Hugging Face checkpoint (source: hf) is read and checked when the workflow starts (every
    safetensors header, the architecture, the tokenizer files, FP8 scales), so a truncated
    download or a wrong directory is one line now, not a failed job hours later."""
    from .hf.checkpoint import Checkpoint

    try:
        Checkpoint.read(m.path)
    except QuantsweepError as e:
        raise ConfigError(f"config models.{name}.path: {e}") from None


def load_yaml(path: str | Path) -> dict:
    """A config file, with a YAML syntax error named by file, line and column."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}{getattr(e, 'problem', None) or e}") from None
    return data if data is not None else {}


def merged(*configs: dict) -> dict:
    """Later configs deep-update earlier ones (as Snakemake's --configfile does); the inputs
    are left as they were."""
    out: dict = {}
    for c in configs:
        _deep_update(out, copy.deepcopy(c))
    return out


def _deep_update(d: dict, u: dict) -> None:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v


def check_files(paths: list[str]) -> Sweep:
    """Config files merged in order (as --configfile merges over config/config.yaml), given the
    workflow's checks (the settings classes check every value the schema does)."""
    return load(merged(*(load_yaml(p) for p in paths)))
