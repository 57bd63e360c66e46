"""Writing the tiny model as a BF16 GGUF (norm gains and biases F32, as convert scripts do),
with the metadata keys ik_llama.cpp's deepseek2 loader reads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..fileio import partial_path
from .forward import mainline_kv_b, split_kv_b
from ..settings.tiny import TinySpec
from .tokenizer import BOS_ID, EOS_ID, N_VOCAB, TOKEN_TYPES, TOKENS, UNK_ID, tokenize
from .weights import build_weights

if TYPE_CHECKING:
    import gguf

MODEL_NAME = "quantsweep-tiny-deepseek"
ARCH = "deepseek2"

_F32_SUFFIXES = ("_norm.weight", ".bias")
_ATTN_TENSORS = (
    "attn_norm.weight",
    "attn_q_a.weight",
    "attn_q_a_norm.weight",
    "attn_q_b.weight",
    "attn_kv_a_mqa.weight",
    "attn_kv_a_norm.weight",
)
_KV_B_TENSORS = {  # per layout, after _ATTN_TENSORS
    "kv_b": ("attn_kv_b.weight",),
    "ik": ("attn_kv_b.weight", "attn_k_b.weight", "attn_v_b.weight"),
    "mainline": ("attn_k_b.weight", "attn_v_b.weight"),
}
_MOE_TENSORS = (
    "ffn_gate_inp.weight",
    "exp_probs_b.bias",
    "ffn_gate_exps.weight",
    "ffn_up_exps.weight",
    "ffn_down_exps.weight",
    "ffn_gate_shexp.weight",
    "ffn_up_shexp.weight",
    "ffn_down_shexp.weight",
)


def _tensor_order(spec: TinySpec) -> list[str]:
    """Tensor names in file order (fixed, so the file is byte-identical for equal inputs)."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        names += [p + n for n in _ATTN_TENSORS + _KV_B_TENSORS[spec.layout]]
        names += [p + "attn_output.weight", p + "ffn_norm.weight"]
        if il < spec.n_dense:
            names += [p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight"]
        else:
            names += [p + n for n in _MOE_TENSORS]
    return names


def build_tensors(train_text: str, spec: TinySpec = TinySpec()) -> dict[str, np.ndarray]:
    """All tensors of the file (float64, GGUF numpy layout, BF16-representable for matrices).

    The construction always makes ``attn_kv_b``; the layouts only re-arrange its elements
    (`split_kv_b`, `mainline_kv_b`), so every layout computes the same function.
    """
    W = build_weights(tokenize(train_text), spec)
    derive = {"ik": split_kv_b, "mainline": mainline_kv_b}.get(spec.layout)
    if derive is not None:
        for il in range(spec.n_layer):
            p = f"blk.{il}."
            k_b, v_b = derive(W[p + "attn_kv_b.weight"], spec.n_head, spec.qk_nope, spec.v_head)
            W[p + "attn_k_b.weight"], W[p + "attn_v_b.weight"] = k_b, v_b
            if spec.layout == "mainline":
                del W[p + "attn_kv_b.weight"]
    return W


def _add_kv(w: gguf.GGUFWriter, spec: TinySpec) -> None:
    """Hyperparameters and tokenizer (the architecture key is added by the writer itself)."""
    a = ARCH
    w.add_string("general.name", MODEL_NAME)
    w.add_uint32("general.file_type", 32)  # LLAMA_FTYPE_MOSTLY_BF16
    w.add_uint32(f"{a}.block_count", spec.n_layer)
    w.add_uint32(f"{a}.context_length", spec.context_length)
    w.add_uint32(f"{a}.embedding_length", spec.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head)
    w.add_uint32(f"{a}.attention.key_length", spec.key_length)
    w.add_uint32(f"{a}.attention.value_length", spec.v_head)
    w.add_uint32(f"{a}.rope.dimension_count", spec.qk_rope)
    w.add_float32(f"{a}.rope.freq_base", spec.rope_freq_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", spec.rms_eps)
    w.add_uint32(f"{a}.leading_dense_block_count", spec.n_dense)
    w.add_uint32(f"{a}.attention.q_lora_rank", spec.q_lora_rank)
    w.add_uint32(f"{a}.attention.kv_lora_rank", spec.kv_lora_rank)
    w.add_uint32(f"{a}.expert_feed_forward_length", spec.n_ff_exp)
    w.add_uint32(f"{a}.expert_count", spec.n_expert)
    w.add_uint32(f"{a}.expert_used_count", spec.n_expert_used)
    w.add_uint32(f"{a}.expert_shared_count", spec.n_shared)
    w.add_float32(f"{a}.expert_weights_scale", 1.0)
    w.add_bool(f"{a}.expert_weights_norm", True)
    w.add_uint32(f"{a}.expert_gating_func", 2)  # sigmoid
    w.add_uint32(f"{a}.vocab_size", N_VOCAB)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", list(TOKENS))
    w.add_array("tokenizer.ggml.scores", [0.0] * N_VOCAB)
    w.add_array("tokenizer.ggml.token_type", list(TOKEN_TYPES))
    w.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    w.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    w.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)


def stored_type(name: str) -> str:
    """The type a tensor of the demo model is written in: norm gains and biases F32, every
    matrix (the router too) BF16 (capacity.files.tiny_table plans the file before it exists)."""
    return "f32" if name.endswith(_F32_SUFFIXES) else "bf16"


def _add_tensors(w: gguf.GGUFWriter, W: dict[str, np.ndarray], spec: TinySpec) -> None:
    """Norm gains and biases as F32, every matrix as BF16, in `_tensor_order`."""
    import gguf

    bf16 = gguf.GGMLQuantizationType.BF16
    for name in _tensor_order(spec):
        arr = W[name]
        if stored_type(name) == "f32":
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), bf16)
            w.add_tensor(name, q, raw_dtype=bf16)


def write_tiny_model(path: str | Path, train_text: str, spec: TinySpec = TinySpec()) -> None:
    """Write the tiny DeepSeek2 GGUF for ``train_text`` to ``path``.

    Written to a sibling temp file that is renamed into place (`fileio.partial_path`), so a
    failure leaves nothing behind.  The output is byte-identical for identical inputs.
    """
    W = build_tensors(train_text, spec)  # before touching the file system: bad input writes nothing
    write_tensors(path, W, spec)


def write_tensors(path: str | Path, W: dict[str, np.ndarray], spec: TinySpec) -> None:
    """Write built tensors as the tiny model's GGUF; ``W`` may hold more than ``spec.layout``
    writes (e.g. an ``ik`` build written as ``kv_b``), so tests need no second construction."""
    import gguf  # local import keeps `tokenize` usable without gguf

    with partial_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_kv(w, spec)
            _add_tensors(w, W, spec)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
