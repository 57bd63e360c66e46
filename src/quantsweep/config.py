"""Checks of the workflow config that a JSON schema cannot express, and its normalised form.

The schema (workflow/schemas/config.schema.yaml) catches unknown keys and wrong types; this
module catches what needs the engine's tables (quant type names) or cross-references, and
names the offending key in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .engine.argv import BenchSettings
from .engine.settings import RunSettings, resolve
from .errors import ConfigError, PlanError, RecipeError
from .gguf.reader import first_shard
from .gguf.types import FTYPES, canonical_ftype, ftype_names
from .planner.allocate import Budget
from .planner.groups import Settings
from .planner.recipes import load_recipe
from .report.table import BASE_REFERENCE, BASELINE  # eval.reference value: the unquantized model

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Quant:
    name: str
    ftype: str
    imatrix: bool
    recipe: str | None = None  # recipe YAML path (its base is `ftype`)
    auto: bool = False  # an allocated recipe (written per model by the allocate step)
    budget: Budget | None = None
    refines: str | None = None  # allocate.refine: the auto quant whose measurement this one corrects

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


# Top-level sections that must be mappings, and lists whose items must have one of these types.
_SECTIONS = ("engine", "models", "texts", "imatrix", "eval", "resources", "gate", "run", "bench", "allocate")
_LISTS = {("quants",): (str, dict), ("imatrix", "passes"): (str,), ("imatrix", "external"): (str,)}


def check_structure(config: dict) -> None:
    """The shapes the schema and the rest of the checks assume (a mapping where a mapping is
    expected, list items of the right kind), so that `quants: [8]` is one clear line rather
    than an AttributeError from inside the schema validator."""
    if not isinstance(config, dict):
        raise ConfigError(f"config: the top level is {type(config).__name__}, not a mapping of sections")
    for key in _SECTIONS:
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
    import copy

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


def check_files(paths: list[str]) -> dict:
    """Config files merged in order (as --configfile merges over config/config.yaml), given the
    workflow's checks; the schema's type checks need Snakemake and run in the workflow only."""
    cfg = merged(*(load_yaml(p) for p in paths))
    check_structure(cfg)
    for key in ("models", "quants", "engine", "imatrix", "eval"):
        if key not in cfg:
            raise ConfigError(f"config {key}: missing (give the default config/config.yaml first)")
    cfg["quants"] = resolve_recipe_paths(cfg["quants"], ".")
    check(cfg)
    return cfg


def check(config: dict) -> None:
    """Semantic checks after schema validation; raises ConfigError naming the key."""
    for name, m in config["models"].items():
        if not NAME_RE.match(name):
            raise ConfigError(f"config models.{name}: model names must match {NAME_RE.pattern}")
        if m.get("split_kv_b") and m.get("layout", "kv_b") not in ("kv_b", "ik"):
            raise ConfigError(f"config models.{name}.split_kv_b: means layout ik, but layout is {m['layout']!r}")
        if m.get("source", "tiny") == "hf":
            check_hf_model(name, m)
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
    check_run(config)
    sweep_quants(config)
    names = [q.name for q in parse_quants(config["quants"])]
    for model, m in config["models"].items():
        ref, key = (m["reference"], f"models.{model}.reference") if m.get("reference") else (
            ev.get("reference", BASE_REFERENCE), "eval.reference")
        if ref != BASE_REFERENCE and ref not in names:
            raise ConfigError(f"config {key}: {ref!r} is neither {BASE_REFERENCE!r} nor a quant name of the sweep "
                              f"({', '.join(names)})")


def check_hf_model(name: str, m: dict) -> None:
    """A Hugging Face checkpoint (source: hf) is read and checked when the workflow starts (every
    safetensors header, the architecture, the tokenizer files, FP8 scales), so a truncated
    download or a wrong directory is one line now, not a failed job hours later."""
    from .convert.checkpoint import Checkpoint, check_outtype, check_split_max_size
    from .errors import ConvertError

    if not m.get("path"):
        raise ConfigError(f"config models.{name}.path: required when source is 'hf' (the checkpoint directory)")
    try:
        check_outtype(m.get("outtype", "bf16"))
        check_split_max_size(str(m.get("split_max_size", "")))
    except ConvertError as e:
        raise ConfigError(f"config models.{name}.{e}") from None
    try:
        Checkpoint.read(m["path"])
    except ConvertError as e:
        raise ConfigError(f"config models.{name}.path: {e}") from None


def check_run(config: dict) -> None:
    """run.* (each step's settings over run.defaults) and bench: what can be checked without the
    engine (its flags are checked once it is installed: quantsweep engine check-run)."""
    settings = run_settings(config)
    if bench_enabled(config):
        try:
            bench_settings(config, settings["bench"], threads=1).check()
        except ConfigError as e:
            raise ConfigError(f"config {e}") from None
    eng = config.get("engine") or {}
    if bench_enabled(config) and eng.get("source") == "bin_dir" and eng.get("bin_dir"):
        tool = Path(eng["bin_dir"]) / "llama-sweep-bench"
        if not tool.is_file():
            raise ConfigError(f"config engine.bin_dir: {eng['bin_dir']} has no llama-sweep-bench (the bench step "
                              "runs it); add it, or set bench.enabled: false")
    gate = config.get("gate") or {}
    for key in ("min_tg_tps", "min_pp_tps"):
        if gate.get(key) is not None and not bench_enabled(config):
            raise ConfigError(f"config gate.{key}: a speed limit needs bench.enabled: true")


def run_settings(config: dict) -> dict[str, RunSettings]:
    """Each engine step's run settings (run.<step> over run.defaults; none: CPU only, as before)."""
    try:
        return resolve(config.get("run"))
    except ConfigError as e:
        raise ConfigError(f"config {e}") from None


def bench_enabled(config: dict) -> bool:
    return bool((config.get("bench") or {}).get("enabled", True))


def bench_settings(config: dict, run: RunSettings, threads: int) -> BenchSettings:
    b = config.get("bench") or {}
    default = BenchSettings()
    return BenchSettings(depths=tuple(b.get("depths", default.depths)), tg=b.get("tg", default.tg),
                         repeats=b.get("repeats", default.repeats), mla=b.get("mla", default.mla),
                         fa=b.get("fa", default.fa), threads=threads, run=run)


def engine_steps(config: dict) -> list[str]:
    """The engine steps a sweep runs (whose run settings must suit the engine)."""
    return [s for s, on in (("imatrix", bool(config["imatrix"]["passes"])), ("eval", True),
                            ("bench", bench_enabled(config))) if on]


def allocation(config: dict) -> tuple[Settings | None, list[Budget]]:
    """allocate: the sensitivity settings and the budgets (None, [] when disabled or no budget)."""
    sec = config.get("allocate") or {}
    if not sec.get("enabled", False) or not sec.get("budgets"):
        return None, []
    try:
        s = Settings.from_config(sec, "allocate")
        budgets = [Budget.from_dict(b, f"allocate.budgets[{i}]") for i, b in enumerate(sec["budgets"])]
    except (PlanError, RecipeError) as e:
        raise ConfigError(f"config {e}") from None
    return s, budgets


def has_imatrix(config: dict) -> bool:
    imx = config["imatrix"]
    return bool(imx["passes"] or imx["external"])


def sweep_quants(config: dict) -> list[Quant]:
    """Every quant of the sweep: `quants`, then one auto recipe per allocate budget (after the
    quants they are compared with), then with allocate.refine each one refined."""
    quants = parse_quants(config["quants"])
    s, budgets = allocation(config)
    names = {q.name: q for q in quants}
    for i, b in enumerate(budgets):
        where = f"config allocate.budgets[{i}]"
        if b.name in names:
            raise ConfigError(f"{where}.name: {b.name!r} is already a quant of the sweep; name the budget")
        if not NAME_RE.match(b.name):
            raise ConfigError(f"{where}.name: {b.name!r} must match {NAME_RE.pattern}")
        if b.size_of is not None and (b.size_of not in names or names[b.size_of].auto):
            raise ConfigError(f"{where}.size_of: {b.size_of!r} is not a quant of `quants` "
                              f"({', '.join(q.name for q in quants)})")
        q = Quant(b.name, s.base, has_imatrix(config), None, True, b)
        names[q.name] = q
        quants.append(q)
    if (config.get("allocate") or {}).get("refine"):
        for q in [q for q in quants if q.auto]:
            r = Quant(f"{q.name}-refined", q.ftype, q.imatrix, None, True, q.budget, q.name)
            if r.name in names:
                raise ConfigError(f"config allocate.refine: {r.name!r} (the refined {q.name}) is already a quant")
            names[r.name] = r
            quants.append(r)
    return quants


def reference_of(config: dict, model: str) -> str:
    """What a model's KLD base logits come from: 'base' (the unquantized model) or a quant's name;
    models.<model>.reference, else eval.reference, else 'base'."""
    return config["models"][model].get("reference") or config["eval"].get("reference") or BASE_REFERENCE
