"""The engine build cache and the steps that run it, on the real binaries and the tiny model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from quantsweep import imatrix
from quantsweep.cli import bundled_text
from quantsweep.engine import build, run
from quantsweep.engine.spec import cmake_args
from quantsweep.errors import ConfigError, EngineError, StepError
from quantsweep.fileio import sha256_file
from quantsweep.gguf.reader import read_table
from quantsweep.gguf.types import needs_imatrix
from quantsweep.settings import EvalSettings, ImatrixSettings
from quantsweep.tinymodel import TinySpec

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def tiny(tiny_gguf) -> Path:
    return tiny_gguf()


def test_unchanged_spec_is_a_cache_hit(bin_dir, tmp_path):
    log = io.StringIO()
    meta = build.install_engine(build.EngineSpec(), tmp_path / "again", log=log)
    assert "engine cache hit" in log.getvalue()
    again = tmp_path / "again" / "bin" / "llama-quantize"
    assert meta["tools"]["llama-quantize"] == sha256_file(again)
    # own inode: touching one work dir's copy must not make another work dir out of date
    assert again.stat().st_ino != (bin_dir / "llama-quantize").stat().st_ino
    assert again.stat().st_nlink == 1


def test_key_changes_with_flags():
    tc = {"cc": "gcc 12"}
    base = build.cache_key(build.EngineSpec(), tc)
    assert build.cache_key(build.EngineSpec(cmake_flags=("-DGGML_SCHED_MAX_COPIES=1",)), tc) != base
    assert build.cache_key(build.EngineSpec(cuda=True), tc) != base
    assert build.cache_key(build.EngineSpec(), {"cc": "gcc 13"}) != base
    assert build.cache_key(build.EngineSpec(), tc) == base


def test_bin_dir_source_adopts_prebuilt_tools(bin_dir, tmp_path):
    meta = build.install_engine(build.EngineSpec(source="bin_dir", bin_dir=str(bin_dir)), tmp_path / "e")
    assert meta["source"] == "bin_dir"
    assert json.loads((tmp_path / "e" / "engine.json").read_text())["tools"] == meta["tools"]
    with pytest.raises(EngineError, match="lacks executable llama-imatrix"):
        build.install_engine(build.EngineSpec(source="bin_dir", bin_dir=str(tmp_path)), tmp_path / "f")


def test_wrong_sdist_hash_is_refused(bin_dir):
    """bin_dir's build downloaded the sdist into the cache; a different pin must not accept it."""
    spec = build.EngineSpec(pypi_sha256="0" * 64)
    cache = build.default_cache_dir()
    assert (cache / "sources" / "ik_llama_cpp_python-0.1.5.tar.gz").exists()
    with pytest.raises(EngineError, match="pypi_sha256"):
        build.build_into_cache(spec, cache, io.StringIO())


def test_perplexity_failure_with_exit_code_zero_is_caught(bin_dir, tiny, tmp_path):
    """Too little text: llama-perplexity exits 0 but prints no final estimate."""
    text = tmp_path / "short.txt"
    text.write_text("too short for two contexts\n" * 3)
    kld, result, log = tmp_path / "b.kld", tmp_path / "b.json", tmp_path / "b.log"
    with pytest.raises(StepError, match=r"exit code 0\).*Final estimate"):
        run.perplexity_base(bin_dir, tiny, text, kld, log, EvalSettings(chunks=4), 2)
    assert not kld.exists() and not result.exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_raw_mla_imatrix_aborts_quantize_and_remap_fixes_it(bin_dir, tiny, tmp_path):
    """The product's reason to exist, on the default (attn_kv_b only) layout."""
    cal = tmp_path / "cal.txt"
    cal.write_text(bundled_text("calibration"))
    raw = tmp_path / "mla.dat"
    run.collect_imatrix(bin_dir, tiny, cal, raw, tmp_path / "imx.log", "mla", ImatrixSettings(ctx=512, chunks=4), 2)
    out = tmp_path / "q.gguf"
    with pytest.raises(StepError, match="imatrix size 2048 is different from tensor size 512"):
        run.quantize(bin_dir, tiny, out, tmp_path / "q.log", "IQ2_KS", 2, raw)
    assert not out.exists()

    fitted, actions = imatrix.remap(imatrix.read_dat(raw), read_table(tiny))
    assert any(a.startswith("collapse blk.0.attn_kv_b.weight: 2048 -> 512") for a in actions)
    fit = tmp_path / "fit.dat"
    imatrix.write_dat(fitted, fit)
    rec = run.quantize(bin_dir, tiny, out, tmp_path / "q2.log", "IQ2_KS", 2, fit)
    assert out.exists() and rec["quant_mib"] > 0
    assert not [n for n in rec["not_found"] if n.startswith("blk.")]


@pytest.fixture(scope="session")
def tiny_split(tiny_gguf) -> Path:
    return tiny_gguf(TinySpec(split_kv_b=True))


@pytest.fixture(scope="session")
def split_passes(bin_dir, tiny_split, tmp_path_factory) -> dict[str, Path]:
    """Both imatrix passes on the 2-D attn_k_b/attn_v_b layout (4 chunks each)."""
    d = tmp_path_factory.mktemp("split-imatrix")
    cal = d / "cal.txt"
    cal.write_text(bundled_text("calibration"))
    out = {}
    for mode in ("mla", "std"):
        out[mode] = d / f"{mode}.dat"
        run.collect_imatrix(bin_dir, tiny_split, cal, out[mode], d / f"{mode}.log", mode, ImatrixSettings(ctx=512, chunks=4), 2)
    return out


def test_split_layout_mla_pass_names(split_passes):
    """What the engine stores for ik-style 2-D k_b/v_b (the problem remap solves)."""
    names = set(imatrix.read_dat(split_passes["mla"]).entries)
    assert "blk.0.attn_k_b.weight (reshaped)" in names
    assert not any("attn_v_b" in n for n in names) and not any("attn_kv_b" in n for n in names)
    assert "blk.0.attn_kv_b.weight" in set(imatrix.read_dat(split_passes["std"]).entries)


def test_split_layout_raw_fails_remapped_quantizes(bin_dir, tiny_split, split_passes, tmp_path):
    out = tmp_path / "q.gguf"
    with pytest.raises(StepError, match="Missing importance matrix for tensor blk.0.attn_v_b.weight"):
        run.quantize(bin_dir, tiny_split, out, tmp_path / "raw.log", "IQ2_XS", 2, split_passes["mla"])
    assert not out.exists()
    merged = imatrix.merge([imatrix.read_dat(split_passes[m]) for m in ("mla", "std")])
    fitted, actions = imatrix.remap(merged, read_table(tiny_split))
    assert "rename 'blk.0.attn_k_b.weight (reshaped)' -> blk.0.attn_k_b.weight" in actions
    assert "collapse blk.0.attn_k_b.weight: 512 -> 128 values (mean over heads)" in actions
    assert "copy blk.0.attn_kv_b.weight -> blk.0.attn_v_b.weight" in actions
    fit = tmp_path / "fit.dat"
    imatrix.write_dat(fitted, fit)
    rec = run.quantize(bin_dir, tiny_split, out, tmp_path / "fit.log", "IQ2_XS", 2, fit)
    assert rec["not_found"] == ["token_embd.weight", "output.weight"]


@pytest.mark.parametrize("layout", ["kv_b", "split"])
def test_check_catches_a_removed_entry(bin_dir, tiny, tiny_split, split_passes, layout, tmp_path):
    """The pre-flight check passes on the fitted imatrix and names the tensor once an entry is gone."""
    model = tiny if layout == "kv_b" else tiny_split
    if layout == "kv_b":
        cal = tmp_path / "cal.txt"
        cal.write_text(bundled_text("calibration"))
        raw = [tmp_path / "mla.dat"]
        run.collect_imatrix(bin_dir, model, cal, raw[0], tmp_path / "imx.log", "mla", ImatrixSettings(ctx=512, chunks=4), 2)
    else:
        raw = [split_passes["mla"], split_passes["std"]]
    table = read_table(model)
    fitted, _ = imatrix.remap(imatrix.merge([imatrix.read_dat(p) for p in raw]), table)
    types = run.dry_run(bin_dir, model, "IQ2_XS", log=tmp_path / "plan.log").types
    assert imatrix.check(fitted, table, types, "IQ2_XS") == []
    victim = "blk.2.ffn_down_exps.weight"
    assert needs_imatrix(types[victim], "IQ2_XS")
    del fitted.entries[victim]
    problems = imatrix.check(fitted, table, types, "IQ2_XS")
    assert [(p.tensor, p.problem) for p in problems] == [
        (victim, "no imatrix data (the engine refuses this type without)")]


def test_check_cli_fails_with_a_table_on_the_raw_imatrix(bin_dir, tiny_split, split_passes, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "report.txt"
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "imatrix", "check", "--bin-dir", str(bin_dir),
                        "--model", str(tiny_split), "--type", "IQ2_XS", "-o", str(out), str(split_passes["mla"])],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("FAIL: ")
    table = r.stderr.splitlines()
    assert any(ln.startswith("blk.0.attn_v_b.weight") and "no imatrix data" in ln for ln in table)
    assert not any(ln.startswith("blk.0.attn_k_b.weight") for ln in table)  # 128 columns: iq4_nl fallback
    assert table[-1].startswith(f"quantsweep: error: imatrix check of {split_passes['mla']} failed: 4 problem(s) "
                                "for IQ2_XS; first: blk.0.attn_v_b.weight (iq2_xs): imatrix entry -: no imatrix data")
    assert not out.exists()


def test_cuda_build_exposes_cooker_flags():
    spec = build.EngineSpec.from_dict({"cuda": True, "cuda_architectures": "86;90", "cuda_force_bf16": True,
                                        "sched_max_copies": 1, "max_contexts": 2048})
    args = cmake_args(spec)
    for flag in ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=86;90", "-DGGML_CUDA_IQK_FORCE_BF16=ON",
                 "-DGGML_SCHED_MAX_COPIES=1", "-DGGML_MAX_CONTEXTS=2048"):
        assert flag in args
    # defaults add no flag, so existing cache keys (and cached builds) stay valid
    assert not any("SCHED_MAX_COPIES" in a or "MAX_CONTEXTS" in a or "BF16" in a for a in cmake_args(build.EngineSpec()))
    tc = {"cc": "gcc 12"}
    assert build.cache_key(build.EngineSpec(max_contexts=2048), tc) != build.cache_key(build.EngineSpec(), tc)
    with pytest.raises(ConfigError, match=r"engine\.cuda_force_bf16: only applies to a CUDA build"):
        build.EngineSpec.from_dict({"cuda_force_bf16": True})
    with pytest.raises(ConfigError, match=r"engine\.max_contexts"):
        build.EngineSpec.from_dict({"max_contexts": -1})


def test_build_maps_its_temp_dir_out_of_the_binaries(tmp_path):
    """__FILE__ would embed the random build dir: the prefix map makes two builds byte-identical
    (measured: tool sha256s equal across two cold caches); it must not enter the cache key."""
    spec = build.EngineSpec(cuda=True)
    flags = build._reproducible_flags(tmp_path, spec)
    assert f"-DCMAKE_CXX_FLAGS=-ffile-prefix-map={tmp_path}=." in flags
    assert f"-DCMAKE_CUDA_FLAGS=-Xcompiler=-ffile-prefix-map={tmp_path}=." in flags
    assert not any("prefix-map" in a for a in cmake_args(spec))


@pytest.mark.parametrize("chars", [0, 300])
def test_a_text_too_short_for_one_window_says_how_many_tokens_it_has(bin_dir, tiny, tmp_path, chars):
    """The real engine's own words, surfaced: it exits 0 (perplexity) or 1 (imatrix) and says why."""
    text = tmp_path / "short.txt"
    text.write_text(bundled_text("calibration")[:chars])
    for step in ("imatrix", "perplexity"):
        out = tmp_path / ("i.dat" if step == "imatrix" else "b.kld")
        with pytest.raises(StepError, match=r"the text tokenizes to only \d+ tokens; a context of 512 needs at least "
                                            r"1024; see \S+\.log"):
            if step == "imatrix":
                run.collect_imatrix(bin_dir, tiny, text, out, tmp_path / "i.log", "mla", ImatrixSettings(ctx=512, chunks=4), 2)
            else:
                run.perplexity_base(bin_dir, tiny, text, out, tmp_path / "b.log", EvalSettings(chunks=4), 2)
        assert not out.exists()


def test_a_text_with_fewer_chunks_than_asked_fails_and_names_it(bin_dir, tiny, tmp_path):
    """The engine silently does fewer chunks than --chunks when the text is short; the step refuses."""
    text = tmp_path / "cal.txt"
    text.write_text(bundled_text("calibration")[:4000])
    out = tmp_path / "i.dat"
    with pytest.raises(StepError, match=r"imatrix \(mla pass\) ran ([2-9]|1\d) of the 32 chunks asked for: \S+cal\.txt "
                                        r"is too short for 32 chunks"):
        run.collect_imatrix(bin_dir, tiny, text, out, tmp_path / "i.log", "mla", ImatrixSettings(ctx=512, chunks=32), 2)
    assert not out.exists()


def test_install_removes_what_a_killed_install_left(bin_dir, tmp_path):
    """kill -9 during the engine install skips its cleanup; the next install removes the staging dir."""
    stale = tmp_path / ".engine.k1ll3d"
    (stale / "bin").mkdir(parents=True)
    (stale / "bin" / "llama-quantize").write_bytes(b"half a binary")
    build.install_engine(build.EngineSpec(source="bin_dir", bin_dir=str(bin_dir)), tmp_path / "engine",
                         log=io.StringIO())
    assert not stale.exists() and (tmp_path / "engine" / "bin" / "llama-quantize").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]
