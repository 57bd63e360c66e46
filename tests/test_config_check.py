"""`quantsweep config check` is the workflow's checks (schema included, paths resolved as the
workflow resolves them), and every input the sweep reads is opened when it starts: each bad
config or file below is one line naming the key or file, never a traceback, and no step writes
its output over one of its inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from quantsweep import config
from quantsweep.cli import main
from quantsweep.errors import ConfigError, QuantsweepError
from quantsweep.gguf.deepseek2 import deepseek2_table
from quantsweep.gguf.writer import write_shape_gguf

DEFAULT = ROOT / "config" / "config.yaml"
SMALL = dict(n_layer=4, n_dense=1, n_embd=256, n_head=4, q_lora=256, n_ff=512, n_ff_exp=256, n_expert=8,
             n_vocab=1000)


def check(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    """`config check DEFAULT FILE` as a user runs it: '' when it passes, else its one line."""
    f = tmp_path / name
    f.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        config.check_files([str(DEFAULT), str(f)])
    except ConfigError as e:
        assert "\n" not in str(e)
        return str(e)
    return ""


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("m") / "small-bf16.gguf"
    write_shape_gguf(deepseek2_table(**SMALL), out)
    return out


CASES = [
    ("quant: [Q8_0]", "config quant: unknown key (did you mean quants?)"),
    ("imatrx: {ctx: 512}", "config imatrx: unknown key (did you mean imatrix?)"),
    ("models: {tiny: {source: huggingface}}", "config models.tiny.source: 'huggingface' is not one of tiny, gguf, hf"),
    ("eval: {ctx: x}", "config eval.ctx: 'x' is not a whole number"),
    ("eval: {chunks: -1}", "config eval.chunks: -1 is less than the minimum of 1"),
    ("imatrix:", "config imatrix: is empty (null); write imatrix: {} for its defaults, or leave it out"),
    ("quants: [iq4ks]", "config quants[0].ftype: unknown quant type 'iq4ks' (did you mean IQ4_KS?)"),
    ("quants: [q9_9_z]", "config quants[0].ftype: unknown quant type 'q9_9_z' (llama-quantize accepts e.g. "
                         "IQ4_KS, Q4_K_M, IQ2_K_R4)"),
    ("quants: [{ftype: Q8_0, recipe: config/recipes/tiny-mix-iq2.yaml}]",
     "config quants[0]: give ftype or recipe, not both (a recipe names its base ftype)"),
    ("quants: [{name: x}]", "config quants[0]: 'ftype' is a required property"),
    ("quants: []", "config quants: [] should be non-empty"),
    ("quants: 8", "config quants: is 8, not a list"),
    ("- a\n- b\n", "c.yaml: the top level is list, not a mapping of sections"),
    ("quants: [Q8_0]\nquants: [IQ4_KS]\n", "c.yaml: line 2: key 'quants' given twice in one mapping"),
    ("eval: {ctx: 512\n", "c.yaml: line 2, column 1: not valid YAML: expected ',' or '}'"),
    (b"eval: {ctx: 512}\n# \xff\n", "c.yaml: not UTF-8 text (byte 19)"),
    ("machine: big", "config machine: 'big' is neither 'detect' nor a mapping"),
    ("imatrix: {model: Q4_0}", "config imatrix.model: 'Q4_0' is neither 'source' nor a quant name of the sweep"),
    ("models: {m: {path: /x.gguf}}", "config models.m.path: /x.gguf is only read with source: gguf"),
    ("models: {m: {source: gguf, path: /nonexistent.gguf}}",
     "config models.m.path: /nonexistent.gguf: does not exist"),
    ("texts: {calibration: /nonexistent.txt}", "config texts.calibration: /nonexistent.txt does not exist"),
    ("imatrix: {}", ""),
    ("eval: {}", ""),
    ("allocate: {budgets: []}", ""),
    ("quants: [{recipe: config/recipes/tiny-mix-iq2.yaml}]", ""),  # found as the workflow finds it
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_each_bad_config_is_one_line_naming_the_key(tmp_path, text, expected):
    got = check(tmp_path, text)
    assert (expected in got) if expected.startswith("c.yaml") else got.startswith(expected), got
    if not expected:
        assert got == ""


def test_recipe_paths_resolve_as_the_workflow_resolves_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: config/recipes/ is found in the workflow's directory
    assert check(tmp_path, "quants: [{recipe: config/recipes/tiny-mix-iq2.yaml}]") == ""
    assert check(tmp_path, "quants: [{recipe: config/recipes/nope.yaml}]").startswith("config quants[0].recipe: ")


def test_model_files_are_opened_when_the_sweep_starts(tmp_path, gguf):
    def model(path) -> str:
        return check(tmp_path, f"models: {{tiny: null, m: {{source: gguf, path: '{path}'}}}}")

    assert model(gguf) == ""
    assert model(tmp_path) == f"config models.m.path: {tmp_path}: is a directory, not a GGUF file"
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert model(tmp_path / "empty.gguf").startswith(f"config models.m.path: {tmp_path}/empty.gguf: truncated")
    (tmp_path / "text.gguf").write_text("hello\n")
    assert model(tmp_path / "text.gguf").endswith("text.gguf: not a GGUF file (bad magic at offset 0)")
    (tmp_path / "cut.gguf").write_bytes(gguf.read_bytes()[:2000])
    assert "cut.gguf: truncated at offset" in model(tmp_path / "cut.gguf")
    q = deepseek2_table(source_type="q8_0", **SMALL)
    write_shape_gguf(q, tmp_path / "q8.gguf")
    assert "q8.gguf is already quantized (token_embd.weight is q8_0)" in model(tmp_path / "q8.gguf")
    other = deepseek2_table(**SMALL)
    other.kv["general.architecture"] = "llama"
    write_shape_gguf(other, tmp_path / "llama.gguf")
    assert "llama.gguf is a 'llama' model; quantsweep sweeps DeepSeek-family" in model(tmp_path / "llama.gguf")


def test_texts_and_external_imatrices_are_read_at_start(tmp_path, gguf, tiny_gguf):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert check(tmp_path, f"texts: {{evaluation: '{tmp_path}/latin1.txt'}}") == (
        f"config texts.evaluation: {tmp_path}/latin1.txt is not UTF-8 text (byte 3)")
    (tmp_path / "garbage.dat").write_bytes(b"\x07\x00\x00\x00garbage")
    got = check(tmp_path, f"imatrix: {{external: ['{tmp_path}/garbage.dat']}}")
    assert got.startswith(f"config imatrix.external[0]: {tmp_path}/garbage.dat"), got
    # a real imatrix of the tiny model given to another model: refused at start
    dat = Path(__file__).parent / "fixtures" / "tiny-mla.dat"
    got = check(tmp_path, f"models: {{tiny: null, m: {{source: gguf, path: '{gguf}'}}}}\n"
                          f"imatrix: {{external: ['{dat}']}}")
    assert got.startswith("config imatrix.external[0]: "), got
    assert check(tmp_path, f"models: {{tiny: null, m: {{source: gguf, path: '{tiny_gguf()}'}}}}\n"
                           f"imatrix: {{external: ['{dat}']}}") == ""


def test_config_check_cli_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("quant: [Q8_0]\n")
    assert main(["config", "check", str(DEFAULT), str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert err == "quantsweep: error: config quant: unknown key (did you mean quants?)\n"


@pytest.mark.parametrize("argv", [
    ["imatrix", "merge", "-o", "{f}", "{f}"],
    ["imatrix", "remap", "--model", "{m}", "-o", "{f}", "{f}"],
    ["quantize", "--bin-dir", "/nowhere", "--model", "{m}", "--ftype", "Q8_0", "-o", "{m}", "--log", "{d}/q.log"],
])
def test_no_step_writes_over_its_input(tmp_path, gguf, capsys, argv):
    f = tmp_path / "in.dat"
    f.write_bytes(b"data")
    m = tmp_path / "model.gguf"
    m.write_bytes(gguf.read_bytes())
    before = (f.read_bytes(), m.read_bytes())
    args = [a.format(f=f, m=m, d=tmp_path) for a in argv]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is also an input" in err and err.count("\n") == 1, err
    assert (f.read_bytes(), m.read_bytes()) == before


def test_reader_messages_for_missing_and_directories(tmp_path):
    from quantsweep.gguf.reader import read_model

    with pytest.raises(QuantsweepError, match=r"nonexistent.gguf: does not exist$"):
        read_model(tmp_path / "nonexistent.gguf")
    with pytest.raises(QuantsweepError, match=r": is a directory, not a GGUF file$"):
        read_model(tmp_path)
