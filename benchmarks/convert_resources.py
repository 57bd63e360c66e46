"""What converting DeepSeek-V3 (671B, deepseek-ai's FP8 release) to GGUF asks of a scheduler, on
paper: the checkpoint as its headers describe it (no files: quantsweep.hf.checkpoint's
`Checkpoint` built from the real V3 config), its parameter count and bytes, the predicted GGUF
size per outtype, and the mem_mb / disk_mb / runtime the convert job requests on attempts 1-3.

    python benchmarks/convert_resources.py

FP8 (e4m3) for every `*_proj.weight` of model.layers.* (the router `mlp.gate.weight` stays BF16),
each with a float32 `weight_scale_inv` of 128x128 blocks; norms, embeddings and lm_head BF16; the
expert score bias F32. Layer 61 is the multi-token-prediction layer, which the converter drops.
Checkpoint bytes are tensor data only (the ~163 shard headers add a few MB).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantsweep import sizing as R  # noqa: E402
from quantsweep.hf.checkpoint import OUTTYPES, Checkpoint, TensorEntry, dtype_size  # noqa: E402

V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "vocab_size": 129280, "num_nextn_predict_layers": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
FILE = "model-on-paper.safetensors"


def v3_tensors(c: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of the V3 FP8 checkpoint, MTP layer and scales included."""
    h, nh, nope, rope, v = (c["hidden_size"], c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                            c["v_head_dim"])
    ql, kvl, ff, ffe, ne, vocab = (c["q_lora_rank"], c["kv_lora_rank"], c["intermediate_size"],
                                   c["moe_intermediate_size"], c["n_routed_experts"], c["vocab_size"])
    b0, b1 = c["quantization_config"]["weight_block_size"]
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("BF16", (vocab, h)),
        "model.norm.weight": ("BF16", (h,)),
        "lm_head.weight": ("BF16", (vocab, h)),
    }

    def proj(name: str, rows: int, cols: int) -> None:
        out[name] = ("F8_E4M3", (rows, cols))
        out[name + "_scale_inv"] = ("F32", (math.ceil(rows / b0), math.ceil(cols / b1)))

    def mlp(prefix: str, inter: int) -> None:
        proj(f"{prefix}.gate_proj.weight", inter, h)
        proj(f"{prefix}.up_proj.weight", inter, h)
        proj(f"{prefix}.down_proj.weight", h, inter)

    n_layer = c["num_hidden_layers"]
    for i in range(n_layer + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = ("BF16", (h,))
        out[f"{p}.post_attention_layernorm.weight"] = ("BF16", (h,))
        proj(f"{p}.self_attn.q_a_proj.weight", ql, h)
        out[f"{p}.self_attn.q_a_layernorm.weight"] = ("BF16", (ql,))
        proj(f"{p}.self_attn.q_b_proj.weight", nh * (nope + rope), ql)
        proj(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kvl + rope, h)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = ("BF16", (kvl,))
        proj(f"{p}.self_attn.kv_b_proj.weight", nh * (nope + v), kvl)
        proj(f"{p}.self_attn.o_proj.weight", h, nh * v)
        if i < c["first_k_dense_replace"]:
            mlp(f"{p}.mlp", ff)
        else:
            out[f"{p}.mlp.gate.weight"] = ("BF16", (ne, h))
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


def v3_checkpoint() -> Checkpoint:
    specs = v3_tensors(V3_CONFIG)
    tensors = {n: TensorEntry(FILE, d, s) for n, (d, s) in specs.items()}
    data = sum(t.n_elements * dtype_size(t.dtype) for t in tensors.values())
    return Checkpoint(path=Path("/on-paper/DeepSeek-V3"), config=V3_CONFIG, tensors=tensors, files=(FILE,),
                      file_bytes={"config.json": 1700, FILE: data}, tokenizer_files=())


def main() -> int:
    ck = v3_checkpoint()
    all_params = sum(t.n_elements for n, t in ck.tensors.items() if not n.endswith("_scale_inv"))
    print(f"DeepSeek-V3 FP8 on paper: {len(ck.tensors)} tensors in the headers, {len(ck.model_tensors())} converted")
    print(f"  n_params (converted)      {ck.n_params():>17,}  ({ck.n_params() / 1e9:.1f} B; with MTP "
          f"{all_params / 1e9:.1f} B)")
    print(f"  checkpoint bytes          {ck.total_bytes():>17,}  ({ck.total_bytes() / 1e9:.1f} GB)")
    print(f"  largest held (elements)   {ck.largest_output_elements():>17,}  (256 experts x 2048 x 7168)")
    for t in OUTTYPES:
        b = ck.output_bytes(t)
        print(f"  output bytes {t:<5}        {b:>17,}  ({b / 1e9:.1f} GB, {8 * b / ck.n_params():.2f} bpw)")
    print()
    print(f"{'outtype':<8} {'attempt':>7} {'mem_mb':>9} {'disk_mb':>10} {'runtime_min':>12}")
    for t in OUTTYPES:
        for a in (1, 2, 3):
            print(f"{t:<8} {a:>7} {R.mem_mb_convert(ck, a):>9,} {R.disk_mb_convert(ck, t, a):>10,} "
                  f"{R.runtime_min_convert(ck, t, a):>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
