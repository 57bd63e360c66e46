"""Config validation: bad input is refused at parse time with the offending key named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, make_workdir, smk
from quantsweep.config import ConfigError, parse_quants


def test_default_config_dry_run(workdir):
    r = smk(workdir, "-n")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for rule in ("engine_build", "tiny_model", "imatrix_collect", "imatrix_remap", "quantize", "eval_quant", "summary"):
        assert rule in out
    # one quantize + one eval job per configured quant
    n_quants = len(yaml.safe_load((ROOT / "config/config.yaml").read_text())["quants"])
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
    ],
)
def test_bad_config_names_the_key(tmp_path, overrides, expected):
    wd = make_workdir(tmp_path / "wd", overrides)
    r = smk(wd, "-n")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert expected in out, out[-2000:]


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
    """Neither lint nor a dry run notices a mistyped conda: path; check each one exists and parses."""
    import re

    for smk_file in (ROOT / "workflow" / "rules").glob("*.smk"):
        for rel in re.findall(r'"(\.\./\.\./envs/[^"]+\.yaml)"', smk_file.read_text()):
            env = (smk_file.parent / rel).resolve()
            assert env.exists(), f"{smk_file.name}: {rel}"
            spec = yaml.safe_load(env.read_text())
            assert "conda-forge" in spec["channels"] and spec["dependencies"], env


def test_external_imatrix_replaces_the_passes(tmp_path):
    from conftest import FIXTURES

    ext = str(FIXTURES / "tiny-mla.dat")
    wd = make_workdir(tmp_path / "wd", {"imatrix": {"passes": [], "external": [ext]}})
    r = smk(wd, "-n", "-p", "results/imatrix/tiny/imatrix.dat")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "imatrix_collect" not in out
    assert f"-o results/imatrix/tiny/imatrix.dat {ext}" in out
    bad = make_workdir(tmp_path / "bad", {"imatrix": {"passes": [], "external": []}})
    r = smk(bad, "-n")
    assert r.returncode != 0 and "config imatrix: passes and external are both empty" in r.stdout + r.stderr
