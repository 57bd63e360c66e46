"""The converter wrapper without torch: which converter a config names, its tree fetched from a
pinned sdist into the cache, the architectures it registers read from its source, what is
refused before it runs, its failures turned into one line, its output's shards found; and the
config's checks of a `source: hf` model. The real conversions are in test_convert.py."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from test_checkpoint import make_checkpoint

from quantsweep import config as qconfig
from quantsweep.hf import converter
from quantsweep.hf.checkpoint import Checkpoint
from quantsweep.errors import ConfigError, ConvertError, EngineError
from quantsweep.settings import ConvertSettings, EngineSpec, ModelSettings

SCRIPT = '''
@ModelBase.register("LlamaForCausalLM")
class A: pass
'''
CONVERSION = '''
@ModelBase.register(
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)
class B: pass
'''


def make_sdist(path: Path, subdir: str, with_deepseek: bool = True) -> str:
    """A fake sdist holding a converter tree (and files that must not be extracted)."""
    top = "pkg-1.0"
    files = {
        f"{top}/{subdir}/convert_hf_to_gguf.py": SCRIPT,
        f"{top}/{subdir}/gguf-py/gguf/__init__.py": "",
        f"{top}/{subdir}/README.md": "not extracted",
        f"{top}/{subdir}/src/llama.cpp": "not extracted",
        f"{top}/setup.py": "not extracted",
    }
    if with_deepseek:
        files[f"{top}/{subdir}/conversion/deepseek.py"] = CONVERSION
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache_with_sdist(tmp_path) -> tuple[Path, ConverterSource]:
    cache = tmp_path / "cache"
    (cache / "sources").mkdir(parents=True)
    sdist = cache / "sources" / "pkg-1.0.tar.gz"
    digest = make_sdist(sdist, "vendor/llama.cpp")
    return cache, converter.ConverterSource("mainline", "pkg", "1.0", digest, "vendor/llama.cpp")


ConverterSource = converter.ConverterSource


def test_source_of_the_config():
    assert ConverterSource.of(EngineSpec()) == ConverterSource(
        "mainline", "llama-cpp-python", "0.3.36", EngineSpec().converter_pypi_sha256, "vendor/llama.cpp")
    ik = ConverterSource.of(EngineSpec(converter="ik"))
    assert (ik.kind, ik.package, ik.subdir, ik.fp8) == ("ik", "ik-llama-cpp-python", "vendor/ik_llama.cpp", False)
    assert ConverterSource.of(EngineSpec(converter="ik", source="path", path="/src/ik")).path == "/src/ik"
    assert ConverterSource.of(EngineSpec()).fp8


def test_engine_spec_refuses_unknown_converters():
    with pytest.raises(ConfigError, match=r"engine\.converter: 'hf' is not one of"):
        EngineSpec.from_dict({"converter": "hf"})
    with pytest.raises(ConfigError, match=r"engine\.converter: ik takes the converter from the engine's source"):
        EngineSpec.from_dict({"converter": "ik", "source": "bin_dir", "bin_dir": "/x"})


def test_cache_key_changes_with_what_is_fetched():
    a = ConverterSource("mainline", "p", "1", "0" * 64, "vendor/llama.cpp")
    assert a.key() != ConverterSource("mainline", "p", "2", "0" * 64, "vendor/llama.cpp").key()
    assert a.key() != ConverterSource("mainline", "p", "1", "1" * 64, "vendor/llama.cpp").key()
    assert a.key() == ConverterSource("mainline", "p", "1", "0" * 64, "vendor/llama.cpp").key()


def test_fetch_extracts_only_the_converter_tree_once(cache_with_sdist):
    cache, src = cache_with_sdist
    conv = converter.fetch(src, cache)
    got = sorted(str(p.relative_to(conv.root)) for p in conv.root.rglob("*") if p.is_file())
    assert got == ["conversion/deepseek.py", "convert_hf_to_gguf.py", "converter.json", "gguf-py/gguf/__init__.py"]
    assert conv.architectures() == {"LlamaForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}
    ident = conv.identity()
    assert ident["script_sha256"] == hashlib.sha256(SCRIPT.encode()).hexdigest() and ident["version"] == "1.0"
    (conv.root / "marker").write_text("kept")
    assert converter.fetch(src, cache).root == conv.root and (conv.root / "marker").exists()  # not again


def test_fetch_refuses_an_sdist_that_does_not_match_its_pin(cache_with_sdist):
    cache, src = cache_with_sdist
    bad = ConverterSource("mainline", "pkg", "1.0", "0" * 64, "vendor/llama.cpp")
    with pytest.raises(EngineError, match=r"^engine\.converter_pypi_sha256: pkg-1\.0\.tar\.gz has sha256 "):
        converter.fetch(bad, cache)
    assert not (cache / "converters" / bad.key()).exists()


def test_fetch_refuses_an_sdist_without_the_converter(tmp_path):
    cache = tmp_path / "cache"
    (cache / "sources").mkdir(parents=True)
    digest = make_sdist(cache / "sources" / "pkg-1.0.tar.gz", "vendor/other")
    src = ConverterSource("mainline", "pkg", "1.0", digest, "vendor/llama.cpp")
    with pytest.raises(ConvertError, match=r"pkg-1\.0\.tar\.gz: no vendor/llama\.cpp/convert_hf_to_gguf\.py inside"):
        converter.fetch(src, cache)
    assert not list((cache / "converters").glob(f"{src.key()}*/"))


def test_check_refuses_an_architecture_the_converter_does_not_register(tmp_path):
    cache = tmp_path / "cache"
    (cache / "sources").mkdir(parents=True)
    digest = make_sdist(cache / "sources" / "pkg-1.0.tar.gz", "vendor/llama.cpp", with_deepseek=False)
    conv = converter.fetch(ConverterSource("mainline", "pkg", "1.0", digest, "vendor/llama.cpp"), cache)
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck"))
    with pytest.raises(ConvertError) as e:
        converter.check(ck, conv)
    assert str(e.value) == (f"{ck.path}/config.json: architecture DeepseekV3ForCausalLM is unknown to the "
                            f"mainline converter ({conv.script})")


def test_check_refuses_fp8_for_the_ik_converter(tmp_path, cache_with_sdist):
    cache, src = cache_with_sdist
    ik = converter.Converter(ConverterSource("ik", "pkg", "1.0", src.sha256, src.subdir),
                             converter.fetch(src, cache).root)
    fp8 = Checkpoint.read(make_checkpoint(tmp_path / "fp8", fp8=True))
    with pytest.raises(ConvertError, match=r"config\.json: an FP8 checkpoint .* ik converter handles bf16 only"):
        converter.check(fp8, ik)
    converter.check(Checkpoint.read(make_checkpoint(tmp_path / "bf16")), ik)  # bf16 passes


def test_failure_names_the_tokenizer_or_the_last_error(tmp_path):
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck"))
    text = ("INFO:hf-to-gguf:Loading model\nWARNING:hf-to-gguf:** chkhsh:  " + "ab" * 32 + "\n"
            "Traceback (most recent call last):\n  File x\n"
            "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()\n")
    assert converter.failure(text, ck) == (
        f"{ck.path}/tokenizer.json: the converter does not recognise this tokenizer (pre-tokenizer hash "
        f"{'ab' * 32} is not in its list); is it the checkpoint's own tokenizer?")
    text = "INFO:x\nTraceback (most recent call last):\n  File y\nKeyError: 'model.layers.0.mlp.gate.weight'\n"
    assert converter.failure(text, ck) == f"{ck.path}: the converter failed: KeyError: 'model.layers.0.mlp.gate.weight'"
    assert converter.failure("", ck) == f"{ck.path}: the converter failed: no output"


def test_argv_is_a_list_with_the_split_only_for_the_model(tmp_path, cache_with_sdist):
    cache, src = cache_with_sdist
    conv = converter.fetch(src, cache)
    ck = Checkpoint.read(make_checkpoint(tmp_path / "a dir with spaces"))
    cmd = converter.argv(conv, "py", ck, tmp_path / "o.gguf", "bf16", "50G")
    assert cmd[:3] == ["py", str(conv.script), str(ck.path)] and cmd[-2:] == ["--split-max-size", "50G"]
    vocab = converter.argv(conv, "py", ck, tmp_path / "v.gguf", "bf16", "50G", vocab_only=True)
    assert "--split-max-size" not in vocab and vocab[-1] == "--vocab-only"


def test_model_file_is_the_single_file_or_shard_one(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.gguf").write_bytes(b"")
    assert converter.model_file(tmp_path / "a").name == "m.gguf"
    (tmp_path / "b").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "b" / f"m-{i:05d}-of-00003.gguf").write_bytes(b"")
    assert converter.model_file(tmp_path / "b").name == "m-00001-of-00003.gguf"
    (tmp_path / "c").mkdir()
    with pytest.raises(ConvertError, match="holds 0 GGUF files, not one model"):
        converter.model_file(tmp_path / "c")


def test_find_python_says_what_to_install(tmp_path):
    with pytest.raises(ConvertError) as e:
        converter.find_python("/bin/false")
    msg = str(e.value)
    assert "no Python with torch, transformers" in msg and "(tried /bin/false)" in msg
    assert "pip install 'quantsweep[convert]'" in msg and "envs/convert.yaml" in msg


# ---- the config's checks of a source: hf model (run when the workflow starts) ------------------------------


def _cfg(model: dict) -> dict:
    from conftest import ROOT

    cfg = qconfig.load_yaml(ROOT / "config" / "config.yaml")
    cfg["models"] = {"v3": model}
    cfg["allocate"]["enabled"] = False
    return cfg


def test_config_reads_the_checkpoint_when_the_workflow_starts(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    qconfig.load(_cfg({"source": "hf", "path": str(ck), "outtype": "bf16", "split_max_size": "50G"}))
    (ck / "config.json").unlink()
    with pytest.raises(ConfigError) as e:
        qconfig.load(_cfg({"source": "hf", "path": str(ck)}))
    assert str(e.value).startswith(f"config models.v3.path: {ck}/config.json: missing")


@pytest.mark.parametrize("model, match", [
    ({"source": "hf"}, r"config models\.v3\.path: required when source is 'hf'"),
    ({"source": "hf", "path": "x", "outtype": "f16"},
     r"config models\.v3\.outtype: 'f16' is not one of q8_0, bf16, f32"),
    ({"source": "hf", "path": "x", "split_max_size": "50GB"}, r"config models\.v3\.split_max_size: '50GB' is not"),
])
def test_config_refuses_bad_hf_settings(model, match):
    with pytest.raises(ConfigError, match=match):
        qconfig.load(_cfg(model))


def test_converter_keys_are_not_part_of_the_engine_build_key():
    """Changing the converter must not rebuild the engine (the workflow passes the converter keys
    to the convert rule only, and the engine's key is its source, flags and toolchain)."""
    from quantsweep.engine.build import cache_key

    tc = {"cc": "x"}
    assert cache_key(EngineSpec(), tc) == cache_key(EngineSpec(converter="ik", converter_pypi_version="9"), tc)
    assert cache_key(EngineSpec(), tc) != cache_key(EngineSpec(pypi_version="9"), tc)
    # and the other way: the convert rule's settings hold the converter keys and no build flag
    m = ModelSettings.from_dict({"source": "hf", "path": "x", "outtype": "q8_0", "seed": 3})
    conv = ConvertSettings.of(m, EngineSpec.from_dict({"cuda": True, "native": False, "converter_pypi_version": "9"}))
    assert json.loads(conv.to_json()) == {"model": {"outtype": "q8_0"}, "engine": {"converter_pypi_version": "9"}}
    ik = ConvertSettings.of(m, EngineSpec.from_dict({"converter": "ik", "pypi_version": "0.2", "cuda": True}))
    assert json.loads(ik.to_json())["engine"] == {"converter": "ik", "pypi_version": "0.2"}  # ik: the engine's sdist
    assert ConvertSettings.from_json(conv.to_json()) == conv
