"""Parsers on logs the real engine wrote (tests/fixtures/logs, see its README for how)."""

from __future__ import annotations

import re

import pytest

from conftest import FIXTURES
from quantsweep.engine import logparse

LOGS = FIXTURES / "logs"


def _read(name: str) -> str:
    return (LOGS / name).read_text(encoding="utf-8")


def test_baseline_perplexity():
    r = logparse.parse_perplexity(_read("ppl_base.log"))
    text = _read("ppl_base.log")
    assert f"= {r.ppl:.4f} +/- {r.ppl_err:.5f}" in text
    assert r.chunks == 16 and r.n_ctx == 512
    assert len(r.chunk_ppl) == 16 and r.chunk_ppl[-1] == pytest.approx(r.ppl, rel=1e-3)
    assert r.bpw == 16.0 or 15.5 < r.bpw < 16.6  # bf16 weights + f32 norms
    assert r.kld_mean is None


def test_kld_block_with_utf8_plus_minus():
    text = _read("ppl_kld.log")
    r = logparse.parse_perplexity(text, expect_kld=True)
    assert f"Mean    KLD: {r.kld_mean:10.6f} ± {r.kld_err:10.6f}" in text
    assert f"Same top p: {r.same_top_p:6.3f} ± {r.same_top_p_err:5.3f} %" in text
    assert set(r.kld_percentiles) >= {"99.9", "99.0", "95.0", "90.0", "10.0", "5.0", "1.0", "0.1", "maximum", "median", "minimum"}
    assert r.kld_percentiles["minimum"] <= r.kld_percentiles["median"] <= r.kld_percentiles["maximum"]
    assert r.ppl_base is not None and r.ln_ratio is not None and r.bpw is not None
    # per-chunk rows (running values): 16 chunks, the last one equals the final statistics
    assert len(r.chunk_kld) == len(r.chunk_ppl) == 16
    assert r.chunk_kld[-1] == pytest.approx(r.kld_mean, abs=1e-5)
    assert r.chunk_ppl[-1] == pytest.approx(r.ppl, abs=1e-4)
    assert "   1      " + f"{r.chunk_ppl[0]:.4f}" in text


def test_kld_expected_but_missing_is_an_error():
    with pytest.raises(logparse.EngineOutputError, match="KL divergence"):
        logparse.parse_perplexity(_read("ppl_base.log"), expect_kld=True)


def test_truncated_log_is_an_error():
    text = _read("ppl_base.log")
    cut = text[: text.index("Final estimate")]
    with pytest.raises(logparse.EngineOutputError, match="Final estimate"):
        logparse.parse_perplexity(cut)


def test_old_final_line_format_and_imatrix_log():
    r = logparse.parse_imatrix_run(_read("imatrix_mla.log"))
    assert r.chunks == 8 and r.ppl is not None
    p = logparse.parse_perplexity("Final estimate: PPL = 3.2130 +/- 0.01234\n")
    assert (p.ppl, p.ppl_err, p.chunks) == (3.2130, 0.01234, None)


def test_nan_perplexity_is_an_error():
    with pytest.raises(logparse.EngineOutputError, match="nan"):
        logparse.parse_perplexity("[1]nan,\nFinal estimate: PPL over 1 chunks for n_ctx=512 = nan +/- nan\n")


def test_quantize_success_and_failure():
    ok = logparse.parse_quantize(_read("quantize_ok.log"))
    assert ok.quant_mib < ok.model_mib and ok.imatrix_entries > 0
    assert ok.not_found == ["token_embd.weight", "output.weight"]
    with pytest.raises(logparse.EngineOutputError, match="imatrix size 2048 is different from tensor size 512"):
        logparse.parse_quantize(_read("quantize_size_mismatch.log"))


def _completed(name: str, text: str | None = None):
    import shlex

    from quantsweep.engine.run import Completed

    text = _read(name) if text is None else text
    return Completed(shlex.split(text.splitlines()[0][2:]), 0, text, 1.0)


@pytest.mark.parametrize("name, ran", [
    ("imatrix_mla.log", {"n_ctx": 512, "n_batch": 512, "n_ubatch": 512, "flash_attn": 0, "mla_attn": 1,
                         "fused_moe": 0, "fused_up_gate": 0}),
    ("ppl_base.log", {"n_ctx": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, "mla_attn": 1,
                      "fused_moe": 1, "fused_up_gate": 1}),
    # -ot exps=CPU -b 256 -ub 128 --no-mmap: the batches ran as asked, 3 layers x 3 expert tensors moved
    ("ppl_kld_run_settings.log", {"n_ctx": 512, "n_batch": 256, "n_ubatch": 128, "flash_attn": 0, "mla_attn": 1,
                                  "fused_moe": 1, "fused_up_gate": 1, "tensors_overridden": 9}),
])
def test_the_attention_mode_that_ran_is_read_from_the_log(name, ran):
    """What the engine reports at context creation, checked against what its command line asked."""
    from quantsweep.engine.argv import asked_context
    from quantsweep.engine.run import ran_as_asked

    assert logparse.parse_context(_read(name)) == ran
    res = _completed(name)
    assert asked_context(res.cmd).items() <= ran.items()
    assert ran_as_asked(res, "x", None) == ran


@pytest.mark.parametrize("edit, said", [
    # ik_llama.cpp #1870 (newer engines): a partial GPU offload forces mla 3; the log then says so
    (lambda t: t.replace("llama_init_from_model: mla_attn      = 1", "llama_init_from_model: mla_attn      = 3"),
     r"mla_attn = 3 \(asked 1\)"),
    # a GGUF without attn_kv_b: the engine switches to MLA 1 after printing the context
    (lambda t: t.replace("-mla 1", "-mla 3", 1).replace("llama_init_from_model: mla_attn      = 1",
                                                        "llama_init_from_model: mla_attn      = 3")
     + "llama_kv_cache_init: changing MLA from 3 to 1\n", r"mla_attn = 1 \(asked 3\)"),
    (lambda t: t.replace("llama_init_from_model: fused_moe     = 0", "llama_init_from_model: fused_moe     = 1"),
     r"fused_moe = 1 \(asked 0\)"),
])
def test_a_run_in_another_mode_than_asked_fails_naming_both(edit, said):
    from quantsweep.engine.run import ran_as_asked
    from quantsweep.errors import StepError

    res = _completed("imatrix_mla.log", edit(_read("imatrix_mla.log")))
    with pytest.raises(StepError, match=f"x ran with {said}: the engine changed the attention mode"):
        ran_as_asked(res, "x", None)


def test_an_override_that_moves_nothing_fails():
    """-ot with a pattern matching no tensor name: the engine says nothing; the step must."""
    from quantsweep.engine.run import ran_as_asked
    from quantsweep.errors import StepError

    text = _read("ppl_kld_run_settings.log")
    assert ran_as_asked(_completed("ppl_kld_run_settings.log"), "x", None)["tensors_overridden"] == 9
    moved = "\n".join(ln for ln in text.splitlines() if "buffer type overriden" not in ln)
    res = _completed("ppl_kld_run_settings.log", moved.replace("-ot exps=CPU", "-ot expz=CPU", 1))
    with pytest.raises(StepError, match=r"x: the tensor override\(s\) expz=CPU matched no tensor of the model"):
        ran_as_asked(res, "x", None)


def test_offloaded_layers_are_read():
    """What a CUDA build prints after loading (src/llama.cpp: "offloaded %d/%d layers to GPU");
    a CPU build prints no such line (the fixture), so no GPU layers are recorded."""
    text = _read("ppl_base.log")
    assert "gpu_layers" not in logparse.parse_context(text)
    gpu = text.replace("llm_load_tensors:", "llm_load_tensors: offloaded 4/4 layers to GPU\nllm_load_tensors:", 1)
    ran = logparse.parse_context(gpu)
    assert (ran["gpu_layers"], ran["layers"]) == (4, 4)


def _bench_run(n: int) -> str:
    """The n-th run (0-based) of the two in sweep_bench.log (quantsweep's "+ cmd" line starts each)."""
    runs = [r for r in re.split(r"^(?=\+ )", _read("sweep_bench.log"), flags=re.M) if r.startswith("+ ")]
    return runs[n]


def test_sweep_bench_rows():
    text = _bench_run(0)
    rows = logparse.parse_sweep_bench(text)
    assert [(r.n_kv, r.pp, r.tg, r.n_kv_max) for r in rows] == [(0, 128, 16, 256), (128, 128, 16, 256)]
    for r in rows:
        assert f'"n_kv": {r.n_kv}, "t_pp"' in text and f'"speed_pp": {r.pp_tps:f}' in text
        assert r.pp_tps > 0 and r.tg_tps > 0
    assert logparse.parse_context(text)["mla_attn"] == 3
    assert logparse.parse_sweep_bench(_bench_run(1))[0].n_kv == 0


@pytest.mark.parametrize("edit, said", [
    (lambda t: "\n".join(ln for ln in t.splitlines() if '"n_kv": 128' not in ln), r"measured depths \[0\]"),
    (lambda t: "\n".join(ln for ln in t.splitlines() if not ln.startswith("{")), "no sweep-bench result lines"),
    (lambda t: t.replace('"speed_tg": ', '"speed_tg": -', 1), "speed at depth 0 is PP"),
    (lambda t: t.replace('"speed_pp": ', '"speed_pp": nan, "x": ', 1), "unreadable sweep-bench result line"),
    (lambda t: t.replace('"n_kv": 0,', '', 1), "unreadable sweep-bench result line"),
])
def test_sweep_bench_incomplete_or_bad(edit, said):
    from quantsweep.errors import EngineOutputError

    with pytest.raises(EngineOutputError, match=said):
        logparse.parse_sweep_bench(edit(_bench_run(0)))


def _cut(name: str, marker: str) -> str:
    """The log as it stood when the engine had just written `marker` (what a running job's log
    holds: the engine writes its progress as it goes)."""
    text = _read(name)
    return text[:text.index(marker) + len(marker)]


@pytest.mark.parametrize("name, marker, want", [
    # llama-imatrix: before its first chunk, then mid-line (it prints chunk after chunk on one line)
    ("imatrix_mla.log", "computing over 8 chunks", ("llama-imatrix", 0, 8, "chunks")),
    ("imatrix_mla.log", "[4]11.3403,", ("llama-imatrix", 4, 8, "chunks")),
    ("imatrix_mla.log", "[8]11.7609,", ("llama-imatrix", 8, 8, "chunks")),
    # llama-perplexity: the baseline announces its chunks; a KLD run does not (its --chunks counts)
    ("ppl_base.log", "calculating perplexity over 16 chunks", ("llama-perplexity", 0, 16, "chunks")),
    ("ppl_base.log", "[3]13.7258,", ("llama-perplexity", 3, 16, "chunks")),
    ("ppl_kld.log", "--kl-divergence", ("llama-perplexity", 0, 16, "chunks")),
    ("ppl_kld.log", "    69.882 ±  1.285 %", ("llama-perplexity", 5, 16, "chunks")),
    # llama-quantize: the tensor it is on
    ("quantize_ok.log", "IQ2_KS 2", ("llama-quantize", 0, None, "tensors")),
    ("quantize_ok.log", "[  10/  66]", ("llama-quantize", 10, 66, "tensors")),
    # sweep-bench: the runs the step has finished, from the line it writes before each
    ("sweep_bench.log", "quantsweep: sweep-bench run 1 of 2\n+ bin/llama-sweep-bench", ("llama-sweep-bench", 0, 2, "runs")),
    ("sweep_bench.log", "quantsweep: sweep-bench run 2 of 2\n+ bin/llama-sweep-bench", ("llama-sweep-bench", 1, 2, "runs")),
])
def test_progress_at_points_of_a_real_run(name, marker, want):
    p = logparse.parse_progress(_cut(name, marker))
    assert (p.tool, p.done, p.total, p.unit) == want


def test_progress_of_whole_logs_and_before_the_engine():
    for name, total in (("imatrix_mla.log", 8), ("ppl_base.log", 16), ("ppl_kld.log", 16), ("quantize_ok.log", 66)):
        p = logparse.parse_progress(_read(name))
        assert p.done == p.total == total, name
    # a sensitivity run's log before its engine started: quantsweep's own line only
    assert logparse.parse_progress("quantsweep: assembled .x.gguf from pools iq2_ks, q8_0\n") is None
    # a log holding an earlier (failed) run and a rerun: the last run counts
    rerun = _read("quantize_size_mismatch.log") + _cut("quantize_ok.log", "[  10/  66]")
    assert logparse.parse_progress(rerun).done == 10
