"""Scheduler resources from a model's GGUF header: DeepSeek-V3 scale and the tiny demo."""

from __future__ import annotations

import shutil

from quantsweep import resources as r
from quantsweep.plan import deepseek_v3_table


def test_deepseek_v3_bf16_needs_terabytes_for_resident_jobs():
    m = r.ModelSize.of_table([deepseek_v3_table()])
    assert 1.30e12 < m.bytes < 1.40e12 and m.n_vocab == 129280
    mem = r.mem_mb_resident(m)
    assert 1.3e6 < mem < 1.45e6  # MB: the 1.34 TB model resident plus buffers
    # quantize streams: the largest tensor (256 experts x 2048 x 7168) as f32, ~3x
    assert m.largest_elements == 256 * 2048 * 7168
    assert 40_000 < r.mem_mb_quantize(m) < 60_000
    # a 2-bit output of a 1.34 TB model is ~200 GB: disk follows the predicted size, not the source
    assert r.disk_mb_quantize(200 * 10**9) < 0.2 * m.bytes / 2**20
    assert 900 < r.disk_mb_imatrix(m) < 1100               # ~1 GB imatrix
    assert 6000 < r.disk_mb_kld_base(m, 512, 100) < 7000   # KLD base logits at ctx 512 x 100 chunks


def test_retries_grow_every_figure():
    m = r.ModelSize.of_table([deepseek_v3_table()])
    for f in (r.mem_mb_resident, r.mem_mb_quantize, r.disk_mb_imatrix, r.runtime_min):
        assert abs(f(m, attempt=2) - 1.5 * f(m, attempt=1)) <= 1
        assert f(m, attempt=3) > f(m, attempt=2)


def test_split_model_sums_its_shards(tmp_path):
    from quantsweep.cli import bundled_text
    from quantsweep.tinymodel import TinySpec, write_tiny_model

    one = tmp_path / "tiny.gguf"
    write_tiny_model(one, bundled_text("train"), TinySpec())
    single = r.model_size(one)
    assert single.bytes > 0 and single.n_vocab == 354
    for i in (1, 2):
        shutil.copy(one, tmp_path / f"m-{i:05d}-of-00002.gguf")
    split = r.model_size(tmp_path / "m-00001-of-00002.gguf")
    assert split.bytes == 2 * single.bytes
    # a missing shard: the model is not there yet, so the placeholder size is used
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    assert r.model_size(tmp_path / "m-00001-of-00002.gguf") == r.UNKNOWN
    assert r.predicted_bytes(one, "IQ2_KS", True) < single.bytes / 3
