"""The whole sweep on a DeepSeek2 GGUF in mainline llama.cpp's layout (3-D attn_k_b/attn_v_b,
no attn_kv_b) whose layer 0 has 256 dead input channels, as users bring them: the standard
pass's attn_kv_b data reaches attn_v_b (per head), the dead channels' all-zero imatrix groups
are floored by the remap (logged), and every quant, q4_K-bearing ones included, is made and
evaluated. The pre-flight check is exact: the raw imatrix fails it at Q4_K_M (q4_K aborts the
engine on an all-zero 256-group) and passes at IQ4_KS and IQ3_K (which the engine accepts)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_workdir, smk

from quantsweep import imatrix
from quantsweep.report.table import read_csv

pytestmark = pytest.mark.e2e

QUANTS = ["IQ4_KS", "IQ2_KS", "Q4_K_M", "IQ3_K"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    wd = make_workdir(tmp_path_factory.mktemp("mainline"),
                      {"quants": QUANTS, "imatrix": {"chunks": 8}, "eval": {"chunks": 4}, "bench": {"enabled": False}})
    cfg_file = wd / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["models"] = {"ml": {"source": "tiny", "layout": "mainline", "dead_channels": 256, "seed": 0}}
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = smk(wd, "--cores", "2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return wd


def test_every_quant_is_made_and_evaluated(sweep):
    rows = {r["quant"]: r for r in read_csv(sweep / "results" / "report" / "summary.csv")}
    assert set(QUANTS) <= set(rows)
    for q in QUANTS:
        kld = float(rows[q]["kld_mean"])
        assert math.isfinite(kld) and kld >= 0, (q, kld)


def test_remap_floors_dead_channels_and_uses_the_standard_pass(sweep):
    log = (sweep / "logs" / "imatrix_remap" / "ml.log").read_text()
    assert "floor blk.0.attn_q_a.weight: 16 all-zero group(s) of 16 values (first: columns 0-15)" in log
    assert "floor blk.0.attn_kv_a_mqa.weight:" in log
    for il in range(4):
        assert f"add blk.{il}.attn_kv_b.weight -> blk.{il}.attn_v_b.weight" in log
        assert f"drop blk.{il}.attn_kv_b.weight" not in log
    raw = imatrix.read_dat(sweep / "results" / "imatrix" / "ml" / "mla.dat").entries["blk.0.attn_q_a.weight"].values
    assert np.array_equal(np.flatnonzero(raw == 0), np.arange(256))
    fitted = imatrix.read_dat(sweep / "results" / "imatrix" / "ml" / "imatrix.dat")
    for name, e in fitted.entries.items():
        assert np.count_nonzero(e.values) == e.nval, name
    q_a = fitted.entries["blk.0.attn_q_a.weight"].values
    assert np.allclose(q_a[:256], 1e-3 * q_a[256:].mean(), rtol=1e-5)


@pytest.mark.parametrize("ftype, fails", [("Q4_K_M", True), ("IQ4_KS", False), ("IQ3_K", False)])
def test_check_is_exact_about_what_the_engine_fails_on(sweep, ftype, fails, tmp_path):
    """The raw pass (dead channels unfloored) against the engine's own verdict."""
    raw = sweep / "results" / "imatrix" / "ml" / "mla.dat"
    model, bin_dir = sweep / "resources" / "models" / "ml.gguf", sweep / "resources" / "engine" / "bin"
    r = subprocess.run([sys.executable, "-m", "quantsweep.cli", "imatrix", "check", "--bin-dir", str(bin_dir),
                        "--model", str(model), "--ftype", ftype, str(raw)], capture_output=True, text=True)
    engine = subprocess.run([str(bin_dir / "llama-quantize"), "--imatrix", str(raw), str(model),
                             str(tmp_path / "q.gguf"), ftype, "2"], capture_output=True, text=True)
    assert (r.returncode == 1) == fails == (engine.returncode != 0), (r.stderr[-2000:], engine.returncode)
    if fails:
        assert "blk.0.attn_q_a.weight (q4_K): imatrix entry blk.0.attn_q_a.weight: 1 all-zero group(s) of 256" \
            in r.stderr


def test_every_engine_log_stays_under_logs(sweep):
    logs = sweep / "logs"
    for q in QUANTS:
        assert (logs / "imatrix_check" / f"ml-{q}.log").read_text().startswith("OK:")
        assert "--dry-run" in (logs / "imatrix_check" / f"ml-{q}.dry-run.log").read_text()
        assert "quant size" in (logs / "quantize" / f"ml-{q}.log").read_text()
    for p in ("mla", "std"):
        assert "stored collected data" in (logs / "imatrix_collect" / f"ml.{p}.log").read_text()
