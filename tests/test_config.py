"""Config validation: bad input is refused at parse time with the offending key named."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, make_workdir, smk
from quantsweep.config import ConfigError, parse_quants


def _n_quants() -> int:
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    return len(cfg["quants"]) + len(cfg["allocate"]["budgets"])


def test_default_config_dry_run(workdir):
    r = smk(workdir, "-n")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for rule in ("engine_build", "tiny_model", "imatrix_collect", "imatrix_remap", "quantize", "eval_quant", "summary"):
        assert rule in out
    # one quantize + one eval job per configured quant and per allocate budget (its auto recipe)
    n_quants = _n_quants()
    assert f"quantize             {n_quants}" in out or f"quantize {n_quants}" in " ".join(out.split())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"imatrix": {"chunkz": 3}}, "chunkz"),
        ({"eval": {"ctx": "big"}}, "big"),
        ({"engine": {"cuda": "yes"}}, "yes"),
        ({"quants": ["Q8_0", "IQ2_KX"]}, "quants[1].ftype: unknown quant type 'IQ2_KX'"),
        ({"quants": [{"ftype": "IQ2_XS", "imatrix": False}]}, "quants[0]: IQ2_XS cannot be made without an imatrix"),
        ({"engine": {"source": "git", "git_commit": ""}}, "engine.git_commit"),
        ({"models": {"big": {"source": "gguf"}}}, "models.big.path"),
        ({"quants": ["Q8_0", {"name": "baseline", "ftype": "IQ4_KS"}]}, "quants[1].name: 'baseline' is reserved"),
    ],
)
def test_bad_config_names_the_key(tmp_path, overrides, expected):
    wd = make_workdir(tmp_path / "wd", overrides)
    r = smk(wd, "-n")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert expected in out, out[-2000:]


def test_names_with_regex_characters_match_their_wildcards(tmp_path):
    """`v3+r1` and `IQ4_KS.v2` are valid names; the wildcard constraints escape them (an unescaped
    '+' made the model never match, '.' matched any character)."""
    wd = make_workdir(tmp_path / "wd", {
        "models": {"v3+r1": {"source": "tiny", "split_kv_b": False, "seed": 0},
                   "v3r1": {"source": "tiny", "split_kv_b": False, "seed": 1}},
        "quants": ["Q8_0", {"name": "IQ4_KS.v2", "ftype": "IQ4_KS"}],
    })
    r = smk(wd, "-n", "--cores", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for path in ("results/quants/v3+r1/v3+r1-IQ4_KS.v2.gguf", "results/eval/v3+r1/IQ4_KS.v2.json",
                 "results/eval/v3r1/IQ4_KS.v2.json", "resources/models/v3+r1.gguf"):
        assert f"output: {path}" in r.stdout or f" {path}," in r.stdout or f" {path}\n" in r.stdout, path
    # a name the regex would match only unescaped is not a target
    r = smk(wd, "-n", "--cores", "1", "results/eval/v33r1/Q8_0.json")  # v3+r1 as a regex
    assert r.returncode != 0


def test_parse_quants_names_and_defaults():
    qs = parse_quants(["q8_0", {"ftype": "iq2_ks", "imatrix": False}, {"name": "mine", "ftype": "IQ3_K"}])
    assert [(q.name, q.ftype, q.imatrix) for q in qs] == [
        ("Q8_0", "Q8_0", True), ("IQ2_KS-noimatrix", "IQ2_KS", False), ("mine", "IQ3_K", True)]
    with pytest.raises(ConfigError, match="duplicate"):
        parse_quants(["Q8_0", "q8_0"])


def test_lint_is_clean(workdir):
    r = smk(workdir, "--lint")
    assert r.returncode == 0, r.stdout + r.stderr


def test_snakefmt_is_clean():
    r = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_conda_env_paths_resolve():
    """Neither lint nor a dry run notices a mistyped conda: path: every one must exist, every env
    file must parse and name its packages with versions, and every env file must be used."""
    import re

    used = set()
    for smk_file in (ROOT / "workflow" / "rules").glob("*.smk"):
        for rel in re.findall(r'"(\.\./\.\./envs/[^"]+\.yaml)"', smk_file.read_text()):
            env = (smk_file.parent / rel).resolve()
            assert env.exists(), f"{smk_file.name}: {rel}"
            used.add(env)
    assert used == {p.resolve() for p in (ROOT / "envs").glob("*.yaml")}
    for env in used:
        spec = yaml.safe_load(env.read_text())
        assert spec["channels"][0] == "conda-forge" and "nodefaults" in spec["channels"], env
        names = []
        for dep in spec["dependencies"]:
            if isinstance(dep, dict):  # pip: [...]
                assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", d) for d in dep["pip"]), (env, dep)
                continue
            m = re.fullmatch(r"([a-z0-9_.-]+)(?: *=(\S+))?", dep)
            assert m, (env, dep)
            names.append(m.group(1))
            # versions pinned, except pip itself and packages whose version a pinned meta package fixes
            assert m.group(2) or dep in ("pip", "cuda-nvcc", "cuda-cudart-dev", "libcublas-dev"), (env, dep)
        assert "cmake" in names or "numpy" in names, env
        if "cuda" in env.name:
            assert {"cuda-version", "cuda-nvcc", "cuda-cudart-dev", "libcublas-dev"} <= set(names)
        pin = env.with_name(env.stem + ".linux-64.pin.txt")
        if pin.exists():  # Snakemake's pinning convention: conda's explicit format
            lines = [ln for ln in pin.read_text().splitlines() if ln and not ln.startswith("#")]
            assert lines[0] == "@EXPLICIT" and all(re.fullmatch(r"https://\S+\.(conda|tar\.bz2)#[0-9a-f]{32}", ln)
                                                   for ln in lines[1:]), pin


def test_external_imatrix_replaces_the_passes(tmp_path):
    from conftest import FIXTURES

    ext = str(FIXTURES / "tiny-mla.dat")
    wd = make_workdir(tmp_path / "wd", {"imatrix": {"passes": [], "external": [ext]}})
    r = smk(wd, "-n", "-p", "results/imatrix/tiny/imatrix.dat")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "imatrix_collect" not in out
    assert f"-o results/imatrix/tiny/imatrix.dat --manifest results/imatrix/tiny/imatrix.manifest.json {ext}" in out
    bad = make_workdir(tmp_path / "bad", {"imatrix": {"passes": [], "external": []}})
    r = smk(bad, "-n")
    assert r.returncode != 0 and "config imatrix: passes and external are both empty" in r.stdout + r.stderr


def test_recipe_quant_wiring(tmp_path):
    """A recipe entry compiles to the engine flags in both the check and the quantize command."""
    wd = make_workdir(tmp_path / "wd", {"quants": [{"recipe": "config/recipes/tiny-mix-iq2.yaml"}]})
    r = smk(wd, "-n", "-p")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    recipe = str(ROOT / "config" / "recipes" / "tiny-mix-iq2.yaml")  # found beside the workflow
    assert f"quantsweep quantize --bin-dir resources/engine/bin --model resources/models/tiny.gguf --recipe {recipe}" in out
    assert f"quantsweep imatrix check --bin-dir resources/engine/bin --model resources/models/tiny.gguf --recipe {recipe}" in out
    assert "results/quants/tiny/tiny-tiny-mix-iq2.gguf" in out
    bad = make_workdir(tmp_path / "bad", {"quants": [{"recipe": "config/recipes/nope.yaml"}]})
    r = smk(bad, "-n")
    assert r.returncode != 0 and "config quants[0].recipe: " in r.stdout + r.stderr


def test_recipe_cli_plan_json_and_args(tmp_path):
    import json

    from quantsweep.planner.recipes import engine_args, load_recipe

    rec = ROOT / "config" / "recipes" / "deepseek-v3-iq4_ks_r4.yaml"
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "recipe", "plan", "--model", "deepseek-v3", str(rec),
                        "--json"], capture_output=True, text=True, check=True)
    p = json.loads(r.stdout)
    assert {"name", "type", "nbytes"} <= set(p["tensors"][0]) and len(p["tensors"]) == 1147
    assert p["total_bytes"] == sum(t["nbytes"] for t in p["tensors"])
    assert p["gib"] == pytest.approx(p["total_bytes"] / 2**30)
    assert round(p["gib"], 3) == 338.456  # published size of this recipe (see its header)
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "recipe", "args", str(rec)],
                       capture_output=True, text=True, check=True)
    import shlex

    assert shlex.split(r.stdout) == engine_args(load_recipe(rec))


def test_several_models_fan_out(tmp_path):
    """Every quant of the sweep is made and evaluated for every model of the config."""
    wd = make_workdir(tmp_path / "wd", {"models": {"tiny": {"source": "tiny"},
                                                   "tiny2d": {"source": "tiny", "split_kv_b": True}}})
    r = smk(wd, "-n")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    n_quants = _n_quants()
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    assert int(stats["quantize"]) == 2 * n_quants and int(stats["eval_quant"]) == 2 * n_quants
    assert int(stats["tiny_model"]) == 2 and int(stats["imatrix_collect"]) == 4
    for model in ("tiny", "tiny2d"):
        assert f"results/quants/{model}/{model}-IQ2_XS.gguf" in out


# per-setting flags a rule used to pass (the CLI keeps them as hand overrides)
_SETTING_FLAGS = {"--run", "--spec", "--gate", "--ctx", "--chunks", "--mla", "--fa", "--depths", "--tg", "--repeats",
                  "--gib", "--bpw", "--gpu-gib", "--ram-gib", "--resolution"}


def test_each_rule_gets_its_settings_as_one_json(tmp_path):
    """Every config-fed step gets one --settings JSON (what differs from the defaults, read back by
    the same class) and no setting as a flag of its own."""
    import json
    import shlex

    from quantsweep.settings import AllocateSettings, BenchSettings, EvalSettings

    over = {"eval": {"ctx": 256, "chunks": 3}, "bench": {"depths": [0, 1024], "repeats": 2},
            "run": {"defaults": {"gpu_layers": 7}, "bench": {"threads": 1}},
            "allocate": {"resolution": 4096, "budgets": [{"gpu_gib": 0.004, "ram_gib": 0.004}]}}
    wd = make_workdir(tmp_path / "wd", over)
    r = smk(wd, "-n", "-p")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    seen = {}
    for line in out.splitlines():
        if not line.startswith("Shell command: quantsweep "):
            continue
        words = shlex.split(line.removeprefix("Shell command: "))
        step = " ".join(words[1:3]) if words[1] in ("engine", "imatrix", "eval", "sensitivity") else words[1]
        assert not _SETTING_FLAGS & set(words), line
        n = words.count("--settings")
        assert n <= 1, line
        if n:
            seen.setdefault(step, []).append(json.loads(words[words.index("--settings") + 1]))
    assert {"engine build", "engine check-run", "tiny-model", "imatrix collect", "eval base", "eval kld", "bench",
            "sensitivity groups", "sensitivity run", "allocate", "report"} <= set(seen)
    ev = EvalSettings.from_dict(seen["eval kld"][0])
    assert (ev.ctx, ev.chunks, ev.run.gpu_layers) == (256, 3, 7)
    b = BenchSettings.from_dict(seen["bench"][0])
    assert (b.depths, b.repeats, b.run.gpu_layers, b.run.threads) == ((0, 1024), 2, 7, 1)
    a = AllocateSettings.from_dict(seen["allocate"][0])
    assert a.resolution == 4096 and len(a.budgets) == 1 and a.budgets[0].gpu_gib == 0.004
    assert seen["engine check-run"][0]["imatrix"] == {"gpu_layers": 7}
