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
import difflib
import os
import re
from pathlib import Path

from .errors import ConfigError, PlanError, QuantsweepError, RecipeError
from .fileio import read_yaml
from .gguf.reader import first_shard, read_model
from .gguf.types import canonical_ftype, close_ftype, quantized
from .planner.recipes import load_recipe
from .settings import (BASE_REFERENCE, BASELINE, SOURCE, AllocateSettings, BenchSettings, EngineSpec, EvalSettings,
                       Gate, ImatrixSettings, MachineSettings, ModelSettings, PublishSettings, Quant, ResourceSettings,
                       Sweep, TextSettings, resolve_run)
from .settings.publish import SELECTORS as PUBLISH_SELECTORS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# The settings class of each mapping section (`models` maps names to ModelSettings; `run` is
# resolved into each engine step's settings).
SECTIONS = {"engine": EngineSpec, "texts": TextSettings, "imatrix": ImatrixSettings, "eval": EvalSettings,
            "bench": BenchSettings, "allocate": AllocateSettings, "resources": ResourceSettings, "gate": Gate,
            "machine": MachineSettings, "publish": PublishSettings}
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
        if "ftype" in item and "recipe" in item:
            raise ConfigError(f"config {where}: give ftype or recipe, not both (a recipe names its base ftype)")
        recipe = item.get("recipe")
        if recipe:
            try:
                r = load_recipe(recipe)
            except (RecipeError, OSError) as e:
                raise ConfigError(f"config {where}.recipe: {e}") from None
            ftype, default_name = r.base, r.name
        else:
            if "ftype" not in item:
                raise ConfigError(f"config {where}: give ftype or recipe")
            try:
                ftype = canonical_ftype(item["ftype"])
            except PlanError:
                close = close_ftype(item["ftype"])
                hint = f"did you mean {close}?" if close else "llama-quantize accepts e.g. IQ4_KS, Q4_K_M, IQ2_K_R4"
                raise ConfigError(f"config {where}.ftype: unknown quant type {item['ftype']!r} ({hint})") from None
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


def sweep_quants(quants: list[Quant], allocate: AllocateSettings, has_imatrix: bool,
                 notes: list[str] | None = None) -> tuple[Quant, ...]:
    """Every quant of the sweep: `quants`, then one auto recipe per allocate budget (after the
    quants they are compared with), then with allocate.refine each one refined. An optional
    budget whose size_of quant is not in `quants` is skipped, saying so in `notes`."""
    out = list(quants)
    names = {q.name: q for q in out}
    for i, b in enumerate(allocate.budgets if allocate.active else ()):
        where = f"config allocate.budgets[{i}]"
        if b.optional and b.size_of is not None and b.size_of not in names:
            if notes is not None:
                notes.append(f"allocate.budgets[{i}] ({b.name}) skipped: it is the size of {b.size_of}, which "
                             "is not in quants (an optional budget of the shipped config)")
            continue
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
        if key == "machine":
            machine_section(config.get(key))  # detect, or a mapping
        elif key in config and config[key] is None:
            raise ConfigError(f"config {key}: is empty (null); write {key}: {{}} for its defaults, or leave it out")
        elif key in config and not isinstance(config[key], dict):
            raise ConfigError(f"config {key}: is {config[key]!r}, not a mapping")
    for name, m in (config.get("models") or {}).items():
        if m is not None and not isinstance(m, dict):
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


def schema_path(root: str | Path | None = None) -> Path:
    """The workflow's config schema (of the checkout at `root`, default the package's own)."""
    return Path(root or workflow_dir()) / "workflow" / "schemas" / "config.schema.yaml"


def check_schema(config: dict, schema: str | Path) -> None:
    """The workflow's JSON schema, its first error as one line naming the key (Snakemake's own
    validation prints the whole schema, ~700 lines, for a typo); the workflow and `config check`
    both run it, before the schema fills in defaults."""
    import jsonschema

    v = jsonschema.Draft202012Validator(read_yaml(schema, ConfigError))
    errors = sorted(v.iter_errors(config), key=lambda e: (len(e.absolute_path), str(list(e.absolute_path))))
    if not errors:
        return
    e = jsonschema.exceptions.best_match(errors)
    while e.validator in ("oneOf", "anyOf") and e.context and isinstance(e.instance, (dict, list)):
        e = jsonschema.exceptions.best_match(e.context)  # the branch of the instance's kind says why
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
    where = f"config {path}" if path else "config"
    if e.validator == "additionalProperties" and isinstance(e.instance, dict):
        known = sorted((e.schema.get("properties") or {}))
        extra = sorted(k for k in e.instance if k not in known)[0]
        close = difflib.get_close_matches(str(extra), known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
        raise ConfigError(f"{where + '.' if path else 'config '}{extra}: unknown key ({hint})")
    if e.validator == "enum":
        raise ConfigError(f"{where}: {e.instance!r} is not one of {', '.join(map(str, e.validator_value))}")
    if e.validator == "required":
        raise ConfigError(f"{where}: {e.message}")
    if e.validator in ("type", "oneOf", "anyOf"):
        raise ConfigError(f"{where}: {e.instance!r} is not {_schema_kind(e.schema)}")
    raise ConfigError(f"{where}: {e.message}")


def _schema_kind(schema: dict) -> str:
    kinds = schema.get("type") or [s.get("type") for s in schema.get("oneOf", []) + schema.get("anyOf", [])]
    kinds = [kinds] if isinstance(kinds, str) else [k for k in kinds if k]
    words = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "a whole number",
             "number": "a number", "boolean": "true or false", "null": "null"}
    return " or ".join(words.get(str(k), str(k)) for k in kinds) or "valid here"


def drop_null_models(config: dict) -> None:
    """`models: {name: null}` drops that model (a config merged over the shipped one drops the
    demo's `tiny` so); in place, before the schema fills in defaults."""
    if isinstance(config.get("models"), dict):
        config["models"] = {n: m for n, m in config["models"].items() if m is not None}


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
    config = {**config}
    drop_null_models(config)
    models = config["models"]
    if not isinstance(models, dict) or not models:
        raise ConfigError("models: name at least one model")
    for name in models:
        if not NAME_RE.match(name):
            raise ConfigError(f"models.{name}: model names must match {NAME_RE.pattern}")
    runs = resolve_run(config.get("run"))
    given = {**config, "machine": machine_section(config.get("machine"))}
    section = {key: cls.from_dict({**(given.get(key) or {}), **({"run": runs[key]} if key in runs else {})}, key)
               for key, cls in SECTIONS.items()}
    quants = parse_quants(resolve_recipe_paths(config["quants"], recipe_dir))
    if not quants:
        raise ConfigError("quants: name at least one quant")
    imx, notes = section["imatrix"], []
    return Sweep(models={n: ModelSettings.from_dict(m, f"models.{n}") for n, m in models.items()},
                 quants=sweep_quants(quants, section["allocate"], imx.any, notes), notes=tuple(notes), **section)


def machine_section(v) -> dict | None:
    """`machine: detect` is short for {detect: true}."""
    if v == "detect":
        return {"detect": True}
    if v is not None and not isinstance(v, dict):
        raise ConfigError(f"config machine: {v!r} is neither 'detect' nor a mapping (ram_gib, gpus, vram_gib, "
                          "disk_gib, jobs, throughput)")
    return v


def _check(s: Sweep) -> None:
    """What spans sections or needs files: each model's files, the imatrix the quants want, the
    engine's tools, the gate's speed limits, each model's reference."""
    for name, m in s.models.items():
        if m.source == "hf":
            check_hf_model(name, m)
        elif m.source == "gguf":
            first = first_shard(m.path)
            if str(first) != str(m.path):
                raise ConfigError(f"config models.{name}.path: {m.path} is not the first shard of a split "
                                  f"model; give {first} (the engine reads the other shards from it)")
            check_gguf_model(name, m.path, s.imatrix.external)
        elif m.path:
            raise ConfigError(f"config models.{name}.path: {m.path} is only read with source: gguf (a GGUF file) or "
                              f"hf (a checkpoint directory); this model's source is {m.source!r}")
    if not any(m.source == "gguf" for m in s.models.values()):  # no header to match them with yet: parsed
        check_external(s.imatrix.external)
    check_texts(s.texts)
    if s.allocate.active and s.allocate.sensitivity == "external":
        check_sensitivity_csv(s.allocate.external)
    if not s.imatrix.any and any(q.imatrix for q in s.quants if not q.auto):
        raise ConfigError("config imatrix: passes and external are both empty, but quants want an imatrix")
    if s.engine.source == "bin_dir":
        for tool in s.tools():
            if not (Path(s.engine.bin_dir) / tool.name).is_file():
                why = ("every sweep runs it" if tool.required else f"the {tool.step} step runs it" if tool.step
                       else f"{tool.used_by} runs it; quantsweep builds it with the engine (engine.source: "
                       "pypi, git or path)")
                fix = "" if tool.required or not tool.step else f", or set {tool.step}.enabled: false"
                raise ConfigError(f"config engine.bin_dir: {s.engine.bin_dir} has no {tool.name} ({why}); add "
                                  f"it{fix}")
    if unknown := [n for n in s.publish.names() if n not in {q.name for q in s.quants}]:
        raise ConfigError(f"config publish.quants: {unknown[0]!r} is not a quant of the sweep "
                          f"({', '.join(q.name for q in s.quants)}), nor one of {', '.join(PUBLISH_SELECTORS)}")
    for key in Gate.SPEED_KEYS:
        if getattr(s.gate, key) is not None and not s.bench.enabled:
            raise ConfigError(f"config gate.{key}: a speed limit needs bench.enabled: true")
    names = [q.name for q in s.quants if not q.auto]
    if s.imatrix.model != SOURCE:
        q = next((q for q in s.quants if q.name == s.imatrix.model and not q.auto), None)
        if q is None:
            raise ConfigError(f"config imatrix.model: {s.imatrix.model!r} is neither {SOURCE!r} nor a quant name of "
                              f"the sweep ({', '.join(names)})")
        if q.imatrix or q.recipe:
            raise ConfigError(f"config imatrix.model: {q.name} is made {'with an imatrix' if q.imatrix else 'from a recipe'};"
                              f" the imatrix's model must be an ftype quant with imatrix: false (e.g. "
                              f"{{ftype: {q.ftype}, imatrix: false}})")
    for model, m in s.models.items():
        key = f"models.{model}.reference" if m.reference else "eval.reference"
        ref = s.reference_of(model)
        if ref != BASE_REFERENCE and ref not in names:
            raise ConfigError(f"config {key}: {ref!r} is neither {BASE_REFERENCE!r} nor a quant name of the sweep "
                              f"({', '.join(names)})")


def check_gguf_model(name: str, path: str, external: tuple[str, ...] = ()) -> None:
    """A GGUF source is opened when the workflow starts (every shard's header, no tensor data):
    a missing, empty, truncated or non-GGUF file, another architecture, an already quantized
    model, or an external imatrix of another model is one line now, not a failed job hours in."""
    key = f"config models.{name}.path"
    try:
        table = read_model(path)
    except QuantsweepError as e:
        raise ConfigError(f"{key}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{key}: {path}: cannot be read ({e.strerror or e})") from None
    arch = table.kv.get("general.architecture")
    if arch != "deepseek2":
        raise ConfigError(f"{key}: {path} is a {arch!r} model; quantsweep sweeps DeepSeek-family (deepseek2: MLA + "
                          "MoE) models")
    done = next((t for t in table.tensors if len(t.shape) >= 2 and quantized(t.type)), None)
    if done is not None:
        raise ConfigError(f"{key}: {path} is already quantized ({done.name} is {done.type}); give the unquantized "
                          "model (F32, F16 or BF16): llama-quantize refuses to requantize")
    check_external(external, table)


def check_external(external: tuple[str, ...], table=None) -> None:
    """Each external imatrix read whole (a garbage file fails here), and fitted to the model's
    table when there is one (an imatrix of another model fails here)."""
    from .imatrix.fit import remap
    from .imatrix.formats import read_any

    for i, f in enumerate(external):
        try:
            im = read_any(f)
            if table is not None:
                remap(im, table)
        except QuantsweepError as e:
            raise ConfigError(f"config imatrix.external[{i}]: {e}") from None
        except OSError as e:
            raise ConfigError(f"config imatrix.external[{i}]: {f}: cannot be read ({e.strerror or e})") from None


def check_sensitivity_csv(path: str) -> None:
    """allocate.external is read when the run starts (a typo in a cell is one line now)."""
    from .allocator.external import read_csv

    try:
        read_csv(path)
    except QuantsweepError as e:
        raise ConfigError(f"config allocate.external: {e}") from None


def check_texts(t: TextSettings) -> None:
    """A text of the user's must be there and be UTF-8 (the engine would read bytes it cannot
    tokenize as the text it was given)."""
    for kind in ("calibration", "evaluation"):
        path = getattr(t, kind)
        if path == t.BUILTIN:
            continue
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config texts.{kind}: {path} {'is a directory' if p.is_dir() else 'does not exist'}")
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config texts.{kind}: {path} is not UTF-8 text (byte {e.start})") from None


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
    """A config file (fileio.read_yaml: syntax errors by line and column, non-UTF-8 text and a
    key given twice refused); ConfigError naming the file."""
    data = read_yaml(path, ConfigError)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level is {type(data).__name__}, not a mapping of sections")
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


def workflow_dir() -> Path:
    """The checkout the package runs from (its Snakefile, config/, workflow/): the CLI's checks
    and `init` read the shipped config, schema and recipes there, as the workflow does."""
    return Path(__file__).resolve().parents[2]


def check_files(paths: list[str], root: str | Path | None = None) -> Sweep:
    """Config files merged in order (as --configfile merges over config/config.yaml), given the
    workflow's checks: its schema, then everything `load` checks, recipe paths resolved as the
    workflow resolves them (the working directory, then the checkout at `root`)."""
    config = merged(*(load_yaml(p) for p in paths))
    check_structure(config)
    drop_null_models(config)
    check_schema(config, schema_path(root))
    return load(config, root or workflow_dir())
