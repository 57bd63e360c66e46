"""Run settings (GPU layers, tensor overrides, batch sizes, mmap, threads, extra arguments): their
validation, the command lines they give, the check against the flags the real engine's --help
lists (tests/fixtures/help, made by make_fixtures.sh), and the benchmark's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FIXTURES

from quantsweep import config as qconfig
from quantsweep.engine import argv
from quantsweep.engine.argv import help_flags
from quantsweep.engine.hardware import parse_nvidia_smi
from quantsweep.errors import ConfigError
from quantsweep.settings import (STEP_TOOLS, STEPS, BenchSettings, EvalSettings, ImatrixSettings, RunSettings,
                                 check_steps)
from quantsweep.settings import resolve_run as resolve

HELP = FIXTURES / "help"


def flags_of(tool: str) -> list[str]:
    return help_flags((HELP / f"{tool}.txt").read_text())


def test_help_flags_of_the_real_engine():
    """What the CPU engine's --help lists: the run settings' flags, both spellings; no -ngl (a CPU
    build does not print GPU options)."""
    ppl = flags_of("llama-perplexity")
    for f in ("-b", "--batch-size", "-ub", "--ubatch-size", "--no-mmap", "-t", "-tb", "--n-cpu-moe", "-mla", "-fa",
              "--kl-divergence", "--run-time-repack", "--chunks"):
        assert f in ppl, f
    assert "-ngl" not in ppl and "--gpu-layers" not in ppl
    assert "-mla" in flags_of("llama-imatrix")
    assert all(f.startswith("-") and not f[1:2].isdigit() for f in ppl)
    assert len(ppl) > 200


def test_defaults_add_no_flag_but_threads():
    s = RunSettings()
    assert s.argv(7) == ["-t", "7"]
    assert s.changed() == {}
    assert RunSettings.from_dict({}) == s == RunSettings.from_dict(None)


def test_every_setting_becomes_its_flag():
    s = RunSettings.from_dict({"gpu_layers": 99, "override_tensors": ["exps=CPU", "blk\\.1\\.=CUDA0,attn=CPU"],
                               "batch": 4096, "ubatch": 2048, "mmap": False, "threads": 16, "threads_batch": 32,
                               "extra_args": ["--n-cpu-moe", "3", "-amb", "512"]})
    assert s.argv(2) == ["-t", "16", "-tb", "32", "-ngl", "99", "-ot", "exps=CPU", "-ot", "blk\\.1\\.=CUDA0,attn=CPU",
                         "-b", "4096", "-ub", "2048", "--no-mmap", "--n-cpu-moe", "3", "-amb", "512"]
    assert s.flags() == ["--n-cpu-moe", "-amb"]
    assert set(s.changed()) == {"gpu_layers", "override_tensors", "batch", "ubatch", "mmap", "threads",
                                "threads_batch", "extra_args"}
    assert RunSettings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("d, expected", [
    ({"gpu_layer": 1}, "run.eval: unknown key 'gpu_layer'"),
    ({"batch": -1}, "run.eval.batch: -1 is not a whole number >= 0"),
    ({"ubatch": 1.5}, "run.eval.ubatch: 1.5 is not a whole number"),
    ({"threads": True}, "run.eval.threads: True is not a whole number"),
    ({"mmap": "no"}, "run.eval.mmap: 'no' is not true or false"),
    ({"override_tensors": "exps=CPU"}, "run.eval.override_tensors: 'exps=CPU' is not a list"),
    ({"override_tensors": ["exps"]}, "run.eval.override_tensors: 'exps' is not PATTERN=BUFFER"),
    ({"override_tensors": ["exps=CPU,attn"]}, "'exps=CPU,attn' is not PATTERN=BUFFER"),
    ({"extra_args": ["-ngl", "99"]}, "run.eval.extra_args: -ngl is set by quantsweep itself"),
    ({"extra_args": ["--ctx-size=4096"]}, "run.eval.extra_args: --ctx-size=4096 is set by quantsweep itself"),
    ({"extra_args": ["-mla", "3"]}, "-mla is set by quantsweep itself"),
    ({"extra_args": ["--seed 1; rm -rf /"]}, None),  # one word with spaces is passed as one argument
    ({"extra_args": ["a\nb"]}, "holds a line break"),
    ({"extra_args": [3]}, "is not a list of non-empty strings"),
])
def test_bad_settings_name_the_key(d, expected):
    if expected is None:
        assert RunSettings.from_dict(d, "run.eval").argv(1)[-1] == d["extra_args"][0]
        return
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        RunSettings.from_dict(d, "run.eval")


def test_engine_flags_check():
    ppl = flags_of("llama-perplexity")
    RunSettings.from_dict({"extra_args": ["--n-cpu-moe", "2", "-amb", "256", "--run-time-repack"]}).check_engine(
        ppl, "run.eval", "llama-perplexity")
    with pytest.raises(ConfigError, match=r"run\.eval\.extra_args: llama-perplexity does not know --n-cpu-mo "):
        RunSettings.from_dict({"extra_args": ["--n-cpu-mo", "2"]}).check_engine(ppl, "run.eval", "llama-perplexity")
    with pytest.raises(ConfigError, match=r"run\.eval\.gpu_layers: 99 but this engine has no GPU offload"):
        RunSettings(gpu_layers=99).check_engine(ppl, "run.eval", "llama-perplexity")
    RunSettings(gpu_layers=99).check_engine([*ppl, "-ngl"], "run.eval", "llama-perplexity")  # a CUDA build
    # a negative number is a value, not a flag
    RunSettings.from_dict({"extra_args": ["--seed", "-1"]}).check_engine(ppl, "run.eval", "llama-perplexity")


def test_check_steps_names_the_step_and_a_missing_tool():
    flags = {t.name: flags_of(t.help_tool) for t in STEP_TOOLS.values()}
    settings = resolve({"defaults": {"extra_args": ["--no-warmup"]}, "imatrix": {"extra_args": []}})
    check_steps(settings, flags)
    bad = resolve({"bench": {"extra_args": ["--chunks-per-batch"]}})
    with pytest.raises(ConfigError, match=r"run\.bench\.extra_args: llama-sweep-bench does not know"):
        check_steps(bad, flags)
    check_steps({s: bad[s] for s in ("imatrix", "eval")}, flags)  # bench disabled: its settings are not checked
    del flags["llama-sweep-bench"]
    with pytest.raises(ConfigError, match=r"run\.bench: the engine has no llama-sweep-bench"):
        check_steps({"bench": settings["bench"]}, flags)


def test_resolve_step_over_defaults():
    s = resolve({"defaults": {"gpu_layers": 99, "override_tensors": ["exps=CPU"], "threads": 8},
                 "eval": {"threads": 4, "ubatch": 512}, "bench": {"override_tensors": []}})
    assert s["imatrix"] == RunSettings(gpu_layers=99, override_tensors=("exps=CPU",), threads=8)
    assert s["eval"] == RunSettings(gpu_layers=99, override_tensors=("exps=CPU",), threads=4, ubatch=512)
    assert s["bench"] == RunSettings(gpu_layers=99, threads=8)
    assert resolve(None) == {step: RunSettings() for step in STEPS}
    with pytest.raises(ConfigError, match="run: unknown key 'perplexity'"):
        resolve({"perplexity": {}})
    with pytest.raises(ConfigError, match=r"run\.defaults: unknown key"):
        resolve({"defaults": {"ngl": 1}})


def test_default_command_lines_are_unchanged():
    """Without run settings the engine gets exactly the flags it got before they existed."""
    ev = EvalSettings(ctx=512, chunks=16)
    base = argv.perplexity_base_cmd(Path("b"), Path("m.gguf"), Path("t.txt"), Path("k.kld"), ev, 2)
    assert base[1:] == ["-m", "m.gguf", "-f", "t.txt", "-c", "512", "--chunks", "16", "-t", "2", "-mla", "1", "-fa",
                        "off", "--kl-divergence-base", "k.kld", "--log-disable"]
    imx = argv.imatrix_cmd(Path("b"), Path("m.gguf"), Path("t.txt"), Path("o.dat"), "mla",
                           ImatrixSettings(ctx=512, chunks=8), 2)
    assert imx[1:] == ["-m", "m.gguf", "-f", "t.txt", "-o", "o.dat", "-c", "512", "--chunks", "8", "-t", "2",
                       "-mla", "1", "-fa", "off", "-no-fmoe", "-no-fug", "--log-disable"]


def test_settings_reach_every_engine_command():
    run = RunSettings(gpu_layers=99, override_tensors=("exps=CPU",), ubatch=256, mmap=False)
    want = ["-ngl", "99", "-ot", "exps=CPU", "-ub", "256", "--no-mmap"]
    ev = EvalSettings(run=run)
    cmds = [argv.imatrix_cmd(Path("b"), Path("m"), Path("t"), Path("o"), "std", ImatrixSettings(chunks=8, run=run), 2),
            argv.perplexity_base_cmd(Path("b"), Path("m"), Path("t"), Path("k"), ev, 2),
            argv.perplexity_kld_cmd(Path("b"), Path("m"), Path("k"), ev, 2),
            argv.sweep_bench_cmd(Path("b"), Path("m"), BenchSettings(depths=(0, 256), run=run), 2, Path("l"))]
    for cmd in cmds:
        joined = " ".join(cmd)
        assert " ".join(want) in joined, joined


def test_bench_settings():
    b = BenchSettings(depths=(0, 1024), tg=16)
    assert (b.pp, b.ctx) == (512, 1536)
    cmd = argv.sweep_bench_cmd(Path("bin"), Path("m.gguf"), b, 2, Path("logs/q.engine"))
    assert cmd[0] == str(Path("bin") / "llama-sweep-bench")
    assert cmd[cmd.index("-c") + 1] == "1536" and cmd[cmd.index("-n") + 1] == "16"
    assert cmd[cmd.index("-ub") + 1] == "512" and cmd[cmd.index("--output-format") + 1] == "jsonl"
    assert cmd.count("-ub") == 1 and cmd[-2:] == ["--log-file", "logs/q.engine"]  # not ./llama.log
    own = BenchSettings(depths=(0, 256), run=RunSettings(ubatch=128))
    assert (own.pp, own.ctx) == (128, 384)
    assert argv.sweep_bench_cmd(Path("bin"), Path("m"), own, 2, Path("l")).count("-ub") == 1
    for depths in ((0, 100), (), (512, 512), (-512,)):
        with pytest.raises(ConfigError, match="bench.depths"):
            BenchSettings.from_dict({"depths": list(depths)}, "bench")


def _config(**over) -> dict:
    import yaml

    from conftest import ROOT

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["quants"] = qconfig.resolve_recipe_paths(cfg["quants"], str(ROOT))
    for k, v in over.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("over, expected", [
    ({"run": {"eval": {"batch": "big"}}}, "config run.eval.batch: 'big' is not a whole number"),
    ({"run": {"bench": {"extra_args": ["-c", "1"]}}}, "config run.bench.extra_args: -c is set by quantsweep"),
    ({"bench": {"depths": [0, 100]}}, "config bench.depths: [0, 100]: each must be a different multiple"),
    ({"bench": {"depths": [0, 100]}, "run": {"bench": {"ubatch": 100}}}, None),
    ({"bench": {"enabled": False, "depths": [0, 100]}}, None),
    ({"bench": {"enabled": False}, "gate": {"min_tg_tps": 10}}, "config gate.min_tg_tps: a speed limit needs bench"),
])
def test_config_check_of_run_and_bench(over, expected):
    cfg = _config(**over)
    if expected is None:
        qconfig.load(cfg)
        return
    with pytest.raises(ConfigError) as e:
        qconfig.load(cfg)
    assert str(e.value).startswith(expected), str(e.value)


def test_a_prebuilt_engine_without_sweep_bench_is_refused_when_the_sweep_benchmarks(tmp_path):
    eng = {"source": "bin_dir", "bin_dir": str(tmp_path)}
    for tool in ("llama-imatrix", "llama-quantize"):  # what every sweep runs, but llama-perplexity
        (tmp_path / tool).write_text("")
    with pytest.raises(ConfigError, match=r"config engine\.bin_dir: \S+ has no llama-perplexity \(every sweep runs "
                                          r"it\); add it$"):
        qconfig.load(_config(engine=eng))
    (tmp_path / "llama-perplexity").write_text("")
    with pytest.raises(ConfigError, match=r"config engine\.bin_dir: \S+ has no llama-sweep-bench .*bench\.enabled: "
                                          "false"):
        qconfig.load(_config(engine=eng))
    qconfig.load(_config(engine=eng, bench={"enabled": False}))
    (tmp_path / "llama-sweep-bench").write_text("")
    qconfig.load(_config(engine=eng))


def test_engine_steps_follow_the_config():
    sweep = qconfig.load(_config())
    assert sweep.engine_steps() == ["imatrix", "eval", "bench"]
    assert [t.name for t in sweep.tools()] == ["llama-imatrix", "llama-quantize", "llama-perplexity",
                                               "llama-sweep-bench"]
    cfg = _config(bench={"enabled": False})
    cfg["imatrix"] = {**cfg["imatrix"], "passes": [], "external": [str(FIXTURES / "tiny-mla.dat")]}
    sweep = qconfig.load(cfg)
    assert sweep.engine_steps() == ["eval"] and list(sweep.step_runs()) == ["eval"]
    assert "llama-sweep-bench" not in [t.name for t in sweep.tools()]


def test_nvidia_smi_parsing():
    """Lines as `nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader,nounits`
    prints them; CUDA_VISIBLE_DEVICES (numbers) keeps the job's GPUs."""
    text = "0, NVIDIA H200, 570.86.15, 143771\n1, NVIDIA H200, 570.86.15, 143771\n"
    gpus = parse_nvidia_smi(text)
    assert gpus == [{"index": 0, "name": "NVIDIA H200", "driver": "570.86.15", "memory_mib": 143771},
                    {"index": 1, "name": "NVIDIA H200", "driver": "570.86.15", "memory_mib": 143771}]
    assert [g["index"] for g in parse_nvidia_smi(text, "1")] == [1]
    assert len(parse_nvidia_smi(text, "GPU-8f2a")) == 2  # UUIDs: not filtered
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") == []
