"""The tensor table of a DeepSeek2-architecture GGUF (DeepSeek-V3/R1 and smaller MLA + MoE
models) from shapes alone: no weights needed, so recipes for a 700 GB model can be planned,
and the engine's --dry-run asked about them (gguf.writer.write_shape_gguf), on a laptop.
"""

from __future__ import annotations

from pathlib import Path

from .reader import GGUFTable, TensorInfo
from .types import FTYPES, by_name

# DeepSeek-V3/R1's dimensions; deepseek2_table(**dims) overrides any of them.
V3 = {
    "n_layer": 61, "n_dense": 3, "n_expert": 256, "n_expert_used": 8, "n_embd": 7168, "n_head": 128,
    "q_lora": 1536, "kv_lora": 512, "qk_nope": 128, "qk_rope": 64, "v_head": 128, "n_ff": 18432,
    "n_ff_exp": 2048, "n_vocab": 129280, "n_shared": 1,
}
# DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite config.json): 15.7B, no q_lora (one attn_q), 27
# layers of which 1 dense, 64 routed experts (6 used) and 2 shared, 16 heads.
V2_LITE = {
    "n_layer": 27, "n_dense": 1, "n_expert": 64, "n_expert_used": 6, "n_embd": 2048, "n_head": 16,
    "q_lora": 0, "kv_lora": 512, "qk_nope": 128, "qk_rope": 64, "v_head": 128, "n_ff": 10944,
    "n_ff_exp": 1408, "n_vocab": 102400, "n_shared": 2,
}
# Kimi-K2 (moonshotai/Kimi-K2-Instruct config.json, DeepseekV3ForCausalLM): 1.03T, V3's layers
# and MLA with 384 routed experts, 64 heads, one dense layer and a 163840-token vocabulary.
KIMI_K2 = {
    "n_layer": 61, "n_dense": 1, "n_expert": 384, "n_expert_used": 8, "n_embd": 7168, "n_head": 64,
    "q_lora": 1536, "kv_lora": 512, "qk_nope": 128, "qk_rope": 64, "v_head": 128, "n_ff": 18432,
    "n_ff_exp": 2048, "n_vocab": 163840, "n_shared": 1,
}
# the real shapes, by the name `quantsweep sparse-model --shape` takes (hf.sparse has their config.json)
SHAPES = {"v3": V3, "v2-lite": V2_LITE, "kimi-k2": KIMI_K2}
LAYOUTS = ("ik", "kv_b", "mainline")


def deepseek_v3_table(layout: str = "ik", source_type: str = "bf16") -> GGUFTable:
    """The tensor table of a DeepSeek-V3/R1 GGUF (see deepseek2_table)."""
    return deepseek2_table(layout=layout, source_type=source_type)


def deepseek2_table(layout: str = "ik", source_type: str = "bf16", **dims: int) -> GGUFTable:
    """The tensor table of a DeepSeek-V3/R1 GGUF, from shapes alone; `dims` override V3's sizes
    (keys of V3, e.g. n_embd=256, n_expert=8 for a small model with V3's names and layer count).

    layout "ik" (default): attn_kv_b plus 2-D attn_k_b/attn_v_b, 1147 tensors, in the order of
    the ik/evshiron-converted BF16 GGUFs (as logged in ik_llama.cpp issue #296 / PR #185);
    "kv_b": pre-MLA, attn_kv_b only (1025); "mainline": 3-D attn_k_b/attn_v_b, no attn_kv_b
    (1086). Matrices are `source_type`, norms/biases/ffn_gate_inp f32 (as convert_hf_to_gguf
    writes them). The KVs are the ones the engine reads for deepseek2.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    unknown = set(dims) - set(V3)
    if unknown:
        raise ValueError(f"unknown dimension(s) {sorted(unknown)}; known: {sorted(V3)}")
    c = {**V3, **dims}
    src, f32 = by_name(source_type).id, by_name("f32").id
    tensors: list[TensorInfo] = []

    def add(name: str, shape: tuple[int, ...], ty: int = src) -> None:
        tensors.append(TensorInfo(name, tuple(shape), ty, 0))

    add("token_embd.weight", (c["n_embd"], c["n_vocab"]))
    for il in range(c["n_layer"]):
        _layer(add, c, layout, il, f32)
    add("output_norm.weight", (c["n_embd"],), f32)
    label = "DeepSeek-V3" if not dims else "DeepSeek2-" + "-".join(f"{k}{v}" for k, v in sorted(dims.items()))
    return GGUFTable(path=Path(f"{label}-{layout}-{source_type}"), version=3,
                     kv=_kv(c, layout, source_type, bool(dims)), tensors=tensors, data_offset=0)


def _layer(add, c: dict, layout: str, il: int, f32: int) -> None:
    """One block's tensors, in the converted files' order (dense and MoE blocks differ)."""
    p, E = f"blk.{il}.", c["n_embd"]
    if il < c["n_dense"]:
        add(p + "attn_norm.weight", (E,), f32)
        add(p + "ffn_down.weight", (c["n_ff"], E))
        add(p + "ffn_gate.weight", (E, c["n_ff"]))
        add(p + "ffn_up.weight", (E, c["n_ff"]))
        add(p + "ffn_norm.weight", (E,), f32)
        _attention(add, c, layout, p, f32)
        return
    add(p + "exp_probs_b.bias", (c["n_expert"],), f32)
    add(p + "ffn_gate_inp.weight", (E, c["n_expert"]), f32)
    shexp = c["n_ff_exp"] * c["n_shared"]
    add(p + "ffn_down_shexp.weight", (shexp, E))
    add(p + "ffn_gate_shexp.weight", (E, shexp))
    add(p + "ffn_up_shexp.weight", (E, shexp))
    _attention(add, c, layout, p, f32)
    if il == c["n_layer"] - 1:
        add("output.weight", (E, c["n_vocab"]))
    add(p + "attn_norm.weight", (E,), f32)
    add(p + "ffn_down_exps.weight", (c["n_ff_exp"], E, c["n_expert"]))
    add(p + "ffn_gate_exps.weight", (E, c["n_ff_exp"], c["n_expert"]))
    add(p + "ffn_up_exps.weight", (E, c["n_ff_exp"], c["n_expert"]))
    add(p + "ffn_norm.weight", (E,), f32)


def _attention(add, c: dict, layout: str, p: str, f32: int) -> None:
    """MLA tensors; the layout decides attn_kv_b and the shape of attn_k_b / attn_v_b."""
    E, H = c["n_embd"], c["n_head"]
    add(p + "attn_kv_a_norm.weight", (c["kv_lora"],), f32)
    add(p + "attn_kv_a_mqa.weight", (E, c["kv_lora"] + c["qk_rope"]))
    if layout in ("ik", "kv_b"):
        add(p + "attn_kv_b.weight", (c["kv_lora"], H * (c["qk_nope"] + c["v_head"])))
    if layout == "ik":
        add(p + "attn_k_b.weight", (c["qk_nope"], H * c["kv_lora"]))
        add(p + "attn_v_b.weight", (c["kv_lora"], H * c["v_head"]))
    elif layout == "mainline":
        add(p + "attn_k_b.weight", (c["qk_nope"], c["kv_lora"], H))
        add(p + "attn_v_b.weight", (c["kv_lora"], c["v_head"], H))
    add(p + "attn_output.weight", (H * c["v_head"], E))
    if not c["q_lora"]:  # V2-Lite: the query straight from the hidden state
        add(p + "attn_q.weight", (E, H * (c["qk_nope"] + c["qk_rope"])))
        return
    add(p + "attn_q_a_norm.weight", (c["q_lora"],), f32)
    add(p + "attn_q_a.weight", (E, c["q_lora"]))
    add(p + "attn_q_b.weight", (c["q_lora"], H * (c["qk_nope"] + c["qk_rope"])))


def _kv(c: dict, layout: str, source_type: str, custom: bool) -> dict:
    """The KVs the engine reads for deepseek2 (mainline's layout has one MQA KV head)."""
    a, mainline = "deepseek2", layout == "mainline"
    kv = {
        "general.architecture": a,
        "general.name": "DeepSeek2 (shapes only)" if custom else "DeepSeek-V3 (shapes only)",
        "general.file_type": FTYPES[source_type.upper()].id,
        f"{a}.block_count": c["n_layer"],
        f"{a}.context_length": 163840,
        f"{a}.embedding_length": c["n_embd"],
        f"{a}.feed_forward_length": c["n_ff"],
        f"{a}.attention.head_count": c["n_head"],
        f"{a}.attention.head_count_kv": 1 if mainline else c["n_head"],
        f"{a}.attention.key_length": 576 if mainline else c["qk_nope"] + c["qk_rope"],
        f"{a}.attention.value_length": 512 if mainline else c["v_head"],
        f"{a}.rope.dimension_count": c["qk_rope"],
        f"{a}.rope.freq_base": 10000.0,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{a}.leading_dense_block_count": c["n_dense"],
        **({f"{a}.attention.q_lora_rank": c["q_lora"]} if c["q_lora"] else {}),  # the converter omits 0
        f"{a}.attention.kv_lora_rank": c["kv_lora"],
        f"{a}.expert_feed_forward_length": c["n_ff_exp"],
        f"{a}.expert_count": c["n_expert"],
        f"{a}.expert_used_count": min(c["n_expert_used"], c["n_expert"]),
        f"{a}.expert_shared_count": c["n_shared"],
        f"{a}.expert_weights_scale": 2.5,
        f"{a}.expert_weights_norm": True,
        f"{a}.expert_gating_func": 2,
        f"{a}.vocab_size": c["n_vocab"],
    }
    if mainline:
        kv[f"{a}.attention.key_length_mla"] = c["qk_nope"] + c["qk_rope"]
        kv[f"{a}.attention.value_length_mla"] = c["v_head"]
    return kv


def dims_from_gguf_kv(kv: dict) -> dict:
    """The dimensions (keys of V3) a DeepSeek2 GGUF's KVs give, in any of the layouts: mainline's
    MLA files say head_count_kv 1 and key/value_length 576/512, the per-head sizes then sit in
    key_length_mla/value_length_mla. n_ff_exp and n_dense come from their KVs; the vocabulary
    from vocab_size, else the tokenizer's tokens."""
    a = kv.get("general.architecture", "deepseek2")

    def g(key: str, default: int = 0) -> int:
        v = kv.get(f"{a}.{key}")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    rope = g("rope.dimension_count")
    key = g("attention.key_length_mla") or g("attention.key_length")
    toks = kv.get("tokenizer.ggml.tokens")
    return {
        "n_layer": g("block_count"), "n_dense": g("leading_dense_block_count"), "n_expert": g("expert_count"),
        "n_expert_used": g("expert_used_count"), "n_embd": g("embedding_length"), "n_head": g("attention.head_count"),
        "q_lora": g("attention.q_lora_rank"), "kv_lora": g("attention.kv_lora_rank"), "qk_nope": key - rope,
        "qk_rope": rope, "v_head": g("attention.value_length_mla") or g("attention.value_length"),
        "n_ff": g("feed_forward_length"), "n_ff_exp": g("expert_feed_forward_length"),
        "n_vocab": g("vocab_size") or (len(toks) if isinstance(toks, list) else 0),
        "n_shared": g("expert_shared_count", 1),
    }


def dims_from_hf_config(c: dict) -> dict:
    """The dimensions of the GGUF a DeepSeek-V2/V3 config.json converts to (the converter drops
    V3's multi-token-prediction layer: n_layer = num_hidden_layers; no q_lora_rank: 0)."""
    return {
        "n_layer": c["num_hidden_layers"], "n_dense": c.get("first_k_dense_replace", 0),
        "n_expert": c.get("n_routed_experts") or 0, "n_expert_used": c.get("num_experts_per_tok") or 0,
        "n_embd": c["hidden_size"], "n_head": c["num_attention_heads"], "q_lora": c.get("q_lora_rank") or 0,
        "kv_lora": c["kv_lora_rank"], "qk_nope": c["qk_nope_head_dim"], "qk_rope": c["qk_rope_head_dim"],
        "v_head": c["v_head_dim"], "n_ff": c["intermediate_size"], "n_ff_exp": c.get("moe_intermediate_size") or 0,
        "n_vocab": c["vocab_size"], "n_shared": c.get("n_shared_experts") or 0,
    }
