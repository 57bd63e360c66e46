"""Header-only (sparse) Hugging Face checkpoints of the real shapes: DeepSeek-V3's and Kimi-K2's
FP8 releases, DeepSeek-V2-Lite in bf16, or any DeepSeek-V2/V3 config.json. Every safetensors
header is real (names, dtypes, shapes, offsets as deepseek-ai ships them, FP8 weights with their
128x128 `weight_scale_inv`), the data a hole (the file is truncated to its full size), so a 690 GB
checkpoint takes a few MB of disk and the workflow plans it as it would the download.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fileio import partial_dir
from .checkpoint import dtype_size

# deepseek-ai/DeepSeek-V3's config.json (the keys the converter and the plan read)
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "vocab_size": 129280, "num_nextn_predict_layers": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
# deepseek-ai/DeepSeek-V2-Lite's: no q_lora, 2 shared experts, bf16
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "hidden_size": 2048, "num_hidden_layers": 27, "first_k_dense_replace": 1, "num_attention_heads": 16,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "vocab_size": 102400,
}
# moonshotai/Kimi-K2-Instruct's: V3's class and FP8 release with 384 experts, 64 heads, one dense
# layer, a 163840-token vocabulary and no MTP layer
KIMI_K2_CONFIG = {
    **V3_CONFIG, "model_type": "kimi_k2", "first_k_dense_replace": 1, "num_attention_heads": 64,
    "n_routed_experts": 384, "vocab_size": 163840, "num_nextn_predict_layers": 0,
}
SHAPES = {"v3": V3_CONFIG, "v2-lite": V2_LITE_CONFIG, "kimi-k2": KIMI_K2_CONFIG}


def checkpoint_tensors(c: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a DeepSeek-V2/V3 checkpoint as deepseek-ai ships it: with a
    quantization_config, FP8 projections with their block scales (the router stays BF16);
    V3's multi-token-prediction layers included."""
    h, nh, nope, rope, v = (c["hidden_size"], c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                            c["v_head_dim"])
    ql, kvl, ff, ffe, ne, vocab = (c.get("q_lora_rank"), c["kv_lora_rank"], c["intermediate_size"],
                                   c["moe_intermediate_size"], c["n_routed_experts"], c["vocab_size"])
    q = c.get("quantization_config")
    block = q["weight_block_size"] if q else None
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("BF16", (vocab, h)),
        "model.norm.weight": ("BF16", (h,)),
        "lm_head.weight": ("BF16", (vocab, h)),
    }

    def proj(name: str, rows: int, cols: int) -> None:
        if block is None:
            out[name] = ("BF16", (rows, cols))
            return
        out[name] = ("F8_E4M3", (rows, cols))
        out[name + "_scale_inv"] = ("F32", (math.ceil(rows / block[0]), math.ceil(cols / block[1])))

    def mlp(prefix: str, inter: int) -> None:
        proj(f"{prefix}.gate_proj.weight", inter, h)
        proj(f"{prefix}.up_proj.weight", inter, h)
        proj(f"{prefix}.down_proj.weight", h, inter)

    n_layer = c["num_hidden_layers"]
    for i in range(n_layer + c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = ("BF16", (h,))
        out[f"{p}.post_attention_layernorm.weight"] = ("BF16", (h,))
        if ql:
            proj(f"{p}.self_attn.q_a_proj.weight", ql, h)
            out[f"{p}.self_attn.q_a_layernorm.weight"] = ("BF16", (ql,))
            proj(f"{p}.self_attn.q_b_proj.weight", nh * (nope + rope), ql)
        else:
            proj(f"{p}.self_attn.q_proj.weight", nh * (nope + rope), h)
        proj(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kvl + rope, h)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = ("BF16", (kvl,))
        proj(f"{p}.self_attn.kv_b_proj.weight", nh * (nope + v), kvl)
        proj(f"{p}.self_attn.o_proj.weight", h, nh * v)
        if i < c["first_k_dense_replace"]:
            mlp(f"{p}.mlp", ff)
        else:
            out[f"{p}.mlp.gate.weight"] = ("BF16", (ne, h))
            if "DeepseekV3ForCausalLM" in c["architectures"]:  # noaux_tc routing (V3, Kimi-K2)
                out[f"{p}.mlp.gate.e_score_correction_bias"] = ("F32", (ne,))
            for e in range(ne):
                mlp(f"{p}.mlp.experts.{e}", ffe)
            mlp(f"{p}.mlp.shared_experts", ffe * c["n_shared_experts"])
        if i >= n_layer:  # the MTP layer's own tensors
            out[f"{p}.enorm.weight"] = ("BF16", (h,))
            out[f"{p}.hnorm.weight"] = ("BF16", (h,))
            proj(f"{p}.eh_proj.weight", h, 2 * h)
            out[f"{p}.embed_tokens.weight"] = ("BF16", (vocab, h))
            out[f"{p}.shared_head.norm.weight"] = ("BF16", (h,))
            out[f"{p}.shared_head.head.weight"] = ("BF16", (vocab, h))
    return out


def _header(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    meta, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * dtype_size(dtype)
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, offset


def write_sparse_checkpoint(out_dir: str | Path, config: dict, shard_bytes: int = 5 * 10**9) -> Path:
    """A checkpoint directory Checkpoint.read accepts (config.json, a minimal tokenizer, the
    index, shards of about `shard_bytes` each), its tensor data holes."""
    tensors = checkpoint_tensors(config)
    shards: list[dict] = [{}]
    size = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * dtype_size(dtype)
        if size and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dtype, shape)
        size += n
    out = Path(out_dir)
    with partial_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        (tmp / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
        weight_map = {}
        for k, part in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{len(shards):06d}.safetensors"
            raw, data = _header(part)
            with open(tmp / name, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(8 + len(raw) + data)  # the data: a hole
            weight_map.update(dict.fromkeys(part, name))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
