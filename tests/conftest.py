"""Shared test helpers: run Snakemake on the repo's workflow in a scratch directory."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantsweep.config import merged

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# the environment of every Snakemake run but test_slurm's: see tests/noslurm/scontrol
SMK_ENV = {**os.environ, "PATH": f"{Path(__file__).resolve().parent / 'noslurm'}{os.pathsep}{os.environ.get('PATH', '')}"}


def smk(workdir: Path, *args: str, timeout: int = 3600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Snakemake on ROOT/Snakefile with `workdir` as working directory (its config/ is used);
    env: variables set (None: removed) over the tests' environment."""
    run_env = {k: v for k, v in {**SMK_ENV, **(env or {})}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args],
        cwd=workdir, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=run_env,
    )


# every rule the default sweep runs: test_e2e holds the default sweep to it, test_slurm's small
# sweep must run each of them through SLURM
DEFAULT_RULES = {"all", "allocate", "bench_base", "bench_quant", "bundled_text", "engine_build", "eval_baseline",
                 "eval_quant", "imatrix_check", "imatrix_collect", "imatrix_remap", "pool", "quantize", "report",
                 "run_settings", "sensitivity_groups", "sensitivity_run", "sensitivity_table", "sensitivity_top",
                 "tiny_model"}


def make_workdir(path: Path, overrides: dict | None = None) -> Path:
    """A scratch work dir with config/config.yaml = the repo's default, deep-updated by overrides.
    A test that names its own quants gets no allocation unless it asks (the default budgets are
    the sizes of the default quants, which it may not have)."""
    overrides = dict(overrides or {})
    if "quants" in overrides and "allocate" not in overrides:
        overrides["allocate"] = {"enabled": False}
    cfg = merged(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), overrides)
    (path / "config").mkdir(parents=True, exist_ok=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def bin_dir(tmp_path_factory) -> Path:
    """The default engine's tools (built once into the cache outside the repo, then copied)."""
    from quantsweep.engine import build

    out = tmp_path_factory.mktemp("engine") / "engine"
    build.install_engine(build.EngineSpec(), out, log=io.StringIO())
    return out / "bin"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """The demo model of a TinySpec (default: the default one), written once per session and
    spec (building its weights takes seconds): tests only read it, one that changes a model
    writes its own."""
    from quantsweep.cli import bundled_text
    from quantsweep.tinymodel import TinySpec, write_tiny_model

    made: dict = {}

    def make(spec=None) -> Path:
        spec = spec or TinySpec()
        key = (spec, spec.split_kv_b)  # split_kv_b takes no part in equality
        if key not in made:
            path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
            write_tiny_model(path, bundled_text("train"), spec)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def v3_gguf(tmp_path_factory) -> Path:
    """DeepSeek-V3 at bf16 (ik layout), header only: 1.34 TB that take a few MB of disk."""
    from quantsweep.gguf.deepseek2 import deepseek_v3_table
    from quantsweep.gguf.writer import write_shape_gguf

    out = tmp_path_factory.mktemp("v3") / "DeepSeek-V3-BF16.gguf"
    write_shape_gguf(deepseek_v3_table(), out)
    return out


@pytest.fixture
def workdir(tmp_path):
    return make_workdir(tmp_path / "wd")
