"""The settings classes are the only holder of the defaults: the workflow's schema repeats them for
its documentation, and these tests hold the two equal (keys and defaults), check that every object
crosses a rule as JSON and comes back equal, and that a bad value is refused naming its key."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from quantsweep import config as qconfig
from quantsweep.errors import ConfigError, QuantsweepError
from quantsweep.settings import (
    STEPS, AllocateSettings, BenchSettings, Budget, ConvertSettings, EngineSpec, EvalSettings, Gate,
    ImatrixSettings, ModelSettings, ResourceSettings, RunSettings, TextSettings, Throughput, TinySpec,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
PROPS = SCHEMA["properties"]
CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())

# a step's run settings sit under run.<step>, not in the step's own section
STEP_FIELDS = {"run"}


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.repr}


def _schema_default_pairs():
    for section, cls in qconfig.SECTIONS.items():
        yield section, PROPS[section]["properties"], cls().to_dict()
    # the flat config form: tiny's knobs beside the others (split_kv_b too, an older spelling)
    model = {**ModelSettings().to_dict(), **{k: getattr(TinySpec(), k) for k in TinySpec.CONFIG_KEYS}}
    yield "models.<name>", PROPS["models"]["additionalProperties"]["properties"], model
    yield "machine.throughput", PROPS["machine"]["properties"]["throughput"]["properties"], Throughput().to_dict()


@pytest.mark.parametrize("section,props,defaults", list(_schema_default_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_schema_defaults_are_the_classes_defaults(section, props, defaults):
    for key, prop in props.items():
        if "default" in prop:
            assert key in defaults, f"{section}.{key}: schema default, no settings field"
            assert prop["default"] == defaults[key], f"{section}.{key}: schema says {prop['default']!r}, class {defaults[key]!r}"


@pytest.mark.parametrize("section", sorted(qconfig.SECTIONS))
def test_schema_keys_are_the_classes_fields(section):
    cls = qconfig.SECTIONS[section]
    assert set(PROPS[section]["properties"]) == set(_fields(cls)) - STEP_FIELDS
    # a field with a real default documents it in the schema (empty ones: nothing to say)
    empty = (None, "", (), [], {})
    for name, value in cls().to_dict().items():
        if name not in STEP_FIELDS and value not in empty and not hasattr(getattr(cls(), name), "to_dict"):
            assert "default" in PROPS[section]["properties"][name], f"{section}.{name}: default {value!r} not in the schema"


def test_schema_model_and_run_keys():
    model = PROPS["models"]["additionalProperties"]["properties"]
    assert set(model) == (set(_fields(ModelSettings)) - {"tiny"}) | set(TinySpec.CONFIG_KEYS)
    assert set(PROPS["run"]["properties"]) == {"defaults", *STEPS}
    assert set(SCHEMA["$defs"]["run_settings"]["properties"]) == set(_fields(RunSettings))
    # run settings have no defaults in the schema: a missing key is the engine's own default
    assert not any("default" in p for p in SCHEMA["$defs"]["run_settings"]["properties"].values())
    budget = PROPS["allocate"]["properties"]["budgets"]["items"]["properties"]
    assert set(budget) == set(_fields(Budget))
    quant = PROPS["quants"]["items"]["oneOf"][1]["properties"]
    assert set(quant) == {"name", "ftype", "recipe", "imatrix"}


SAMPLES = [
    RunSettings(gpu_layers=99, override_tensors=("exps=CPU",), ubatch=2048, mmap=False, extra_args=("-fmoe",)),
    ImatrixSettings(passes=("mla",), ctx=1024, chunks=4, run=RunSettings(gpu_layers=5)),
    EvalSettings(ctx=256, chunks=3, fa="on", reference="Q8_0", run=RunSettings(threads=3)),
    BenchSettings(enabled=False, depths=(0, 1024), tg=16, repeats=2),
    AllocateSettings.from_dict({"enabled": True, "ladder": ["iq2_ks", "q8_0"], "pin": {"attn_kv_b": "q8_0"},
                                "groups": [{"match": "exps", "per": 2}, {"match": ".", "per": "layer"}],
                                "budgets": [{"gib": 1.5}, {"gpu_gib": 20, "ram_gib": 200}], "resolution": 4096}),
    Budget(bpw=3.5, name="b35"),
    EngineSpec(cuda=True, cmake_flags=("-DGGML_X=1",), sched_max_copies=1),
    ModelSettings.from_dict({"source": "tiny", "seed": 3, "layout": "ik", "dead_channels": 2}),
    TextSettings(calibration="a.txt"),
    TinySpec(n_layer=3, seed=7),
    ResourceSettings(threads=4, gpus=1),
    Gate(max_kld=0.05, min_tg_tps=10),
    ConvertSettings.of(ModelSettings.from_dict({"source": "hf", "path": "ck", "outtype": "q8_0"}), EngineSpec(converter="ik")),
]


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_json_round_trip(obj):
    cls = type(obj)
    assert cls.from_json(obj.to_json()) == obj
    assert cls.from_dict(json.loads(json.dumps(obj.to_dict()))) == obj
    if cls is not Budget:  # a budget has no default: it names exactly one limit
        assert cls.from_json(cls().to_json()) == cls() and cls().changed() == {}


def test_to_json_carries_only_what_differs_and_what_the_step_reads():
    e = EvalSettings(ctx=256, reference="Q8_0")
    assert json.loads(e.to_json()) == {"ctx": 256, "reference": "Q8_0"}
    # the reference decides which run writes the base logits, not what one run reads
    assert json.loads(e.to_json(only=EvalSettings.MEASURE)) == {"ctx": 256}
    assert json.loads(e.to_json(omit=("ctx",))) == {"reference": "Q8_0"}


def test_hand_overrides_keep_the_rest():
    s = EvalSettings(ctx=256, chunks=3)
    t = s.updated({"chunks": 5, "ctx": None})  # None: the flag was not given
    assert (t.ctx, t.chunks) == (256, 5)
    with pytest.raises(ConfigError, match=r"eval\.chunks"):
        s.updated({"chunks": 0})


@pytest.mark.parametrize("cls,d,match", [
    (EvalSettings, {"ctx": 64}, r"eval\.ctx"),
    (EvalSettings, {"fa": "maybe"}, r"eval\.fa"),
    (EvalSettings, {"ctxx": 512}, r"eval: unknown key 'ctxx'"),
    (BenchSettings, {"depths": [0, -1]}, r"bench\.depths"),
    (AllocateSettings, {"resolution": 100}, r"allocate\.resolution"),
    (AllocateSettings, {"pin": {"(": "q8_0"}}, r"allocate\.pin: invalid regex"),
    (Budget, {"gpu_gib": 20}, r"ram_gib"),
    (RunSettings, {"gpu_layers": -1}, r"gpu_layers"),
    (ResourceSettings, {"threads": "4"}, r"resources\.threads"),
    (Gate, {"max_kld": 0}, r"gate\.max_kld"),
])
def test_bad_values_name_their_key(cls, d, match):
    with pytest.raises(QuantsweepError, match=match):
        cls.from_dict(d)


def test_the_default_config_builds_one_sweep_whose_sections_are_the_classes():
    sweep = qconfig.load(CONFIG, ROOT)
    for section, cls in qconfig.SECTIONS.items():
        assert isinstance(getattr(sweep, section), cls)
    # run.<step> ends up in the step's settings, over run.defaults
    cfg = {**CONFIG, "run": {"defaults": {"gpu_layers": 7}, "eval": {"gpu_layers": 9}}}
    s = qconfig.load(cfg, ROOT)
    assert (s.imatrix.run.gpu_layers, s.eval.run.gpu_layers, s.bench.run.gpu_layers) == (7, 9, 7)
