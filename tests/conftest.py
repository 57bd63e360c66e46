"""Shared test helpers: run Snakemake on the repo's workflow in a scratch directory."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantsweep.config import merged

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def smk(workdir: Path, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    """Snakemake on ROOT/Snakefile with `workdir` as working directory (its config/ is used)."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args],
        cwd=workdir, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


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


@pytest.fixture
def workdir(tmp_path):
    return make_workdir(tmp_path / "wd")
