"""Scheduler resources from a model's GGUF header: DeepSeek-V3 scale and the tiny demo."""

from __future__ import annotations

from quantsweep import sizing as r
from quantsweep.gguf.deepseek2 import deepseek_v3_table


def test_deepseek_v3_bf16_needs_terabytes_for_resident_jobs():
    m = r.ModelSize.of_table(deepseek_v3_table())
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
    m = r.ModelSize.of_table(deepseek_v3_table())
    for f in (r.mem_mb_resident, r.mem_mb_quantize, r.disk_mb_imatrix, r.runtime_min):
        assert abs(f(m, attempt=2) - 1.5 * f(m, attempt=1)) <= 1
        assert f(m, attempt=3) > f(m, attempt=2)


def test_split_model_is_planned_from_every_shard(tmp_path):
    """Shards as llama-gguf-split writes them: metadata in shard 1 only. Sizes sum over the
    shards, and the disk request of a quantize job is the plan of the whole model from any
    shard (planning shard 2 alone used to fail and fall back to the bf16 size)."""
    from dataclasses import replace

    from quantsweep.gguf.deepseek2 import deepseek2_table
    from quantsweep.gguf.writer import write_shape_gguf

    whole = deepseek2_table(n_layer=6, n_dense=1, n_embd=256, n_head=4, q_lora=256, n_ff=512, n_ff_exp=256,
                            n_expert=8, n_vocab=1000)
    half = len(whole.tensors) // 2
    split = {"split.count": 2, "split.tensors.count": len(whole.tensors)}
    write_shape_gguf(replace(whole, tensors=whole.tensors[:half], kv={**whole.kv, "split.no": 0, **split}),
                     tmp_path / "m-00001-of-00002.gguf")
    write_shape_gguf(replace(whole, tensors=whole.tensors[half:], kv={"split.no": 1, **split}),
                     tmp_path / "m-00002-of-00002.gguf")
    write_shape_gguf(whole, tmp_path / "whole.gguf")
    assert r.model_size(tmp_path / "m-00001-of-00002.gguf") == r.model_size(tmp_path / "whole.gguf")
    want = r.predicted_bytes(tmp_path / "whole.gguf", "IQ2_KS", True)
    assert want < whole.total_bytes / 3
    for shard in ("m-00001-of-00002.gguf", "m-00002-of-00002.gguf"):
        assert r.predicted_bytes(tmp_path / shard, "IQ2_KS", True) == want
    # a missing shard: the model is not there yet, so the placeholder size is used
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    assert r.model_size(tmp_path / "m-00001-of-00002.gguf") == r.UNKNOWN
    assert r.predicted_bytes(tmp_path / "m-00001-of-00002.gguf", "IQ2_KS", True) == r.UNKNOWN.bytes
