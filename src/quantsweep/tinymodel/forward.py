"""Numpy reference forward pass of the tiny DeepSeek2 model (float64, GGUF numpy layout).

The weight construction runs it on the fit sample to calibrate block scales, balance the
experts and fit the output; the tests run it on weights read back from the file. It follows
the engine's MLA and MoE math, so its predictions are the engine's up to BF16/F32 rounding.
Dead input channels (``TinySpec.dead_channels``) need no case here: they are zero norm gains,
and ``rmsnorm(x) * 0`` is an exact zero, as in the engine. A file without ``attn_kv_b``
(``layout="mainline"``) is evaluated through its ``attn_k_b``/``attn_v_b`` (`kv_heads`).
"""

from __future__ import annotations

import numpy as np

from ..settings.tiny import TinySpec


def rmsnorm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def rope_norm(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """ggml rope mode 0 (NORM, used by deepseek2): rotate adjacent pairs."""
    n = x.shape[-1]
    inv = base ** (-np.arange(0, n, 2, dtype=np.float64) / n)
    ang = pos[:, None] * inv[None, :]  # (T, n/2)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (n // 2,)
    c, s = np.cos(ang).reshape(shape), np.sin(ang).reshape(shape)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def mainline_kv_b(kv_b: np.ndarray, n_head: int, qk_nope: int, v_head: int) -> tuple[np.ndarray, np.ndarray]:
    """Derive mainline-style 3-D ``attn_k_b``/``attn_v_b`` from ``attn_kv_b``.

    ``kv_b`` has numpy (= torch) shape ``(n_head*(nope+v), kv_lora)``; per head the
    first ``nope`` rows produce k_nope and the next ``v`` rows produce v (this is
    how the engine's MLA-0 graph and ``llm_prepare_mla`` view it).  Returns ``k_b``
    of numpy shape ``(n_head, kv_lora, nope)`` (GGUF {nope, kv_lora, n_head}) and
    ``v_b`` of shape ``(n_head, v, kv_lora)`` (GGUF {kv_lora, v, n_head}), exactly as
    mainline's convert_hf_to_gguf.py and ik's ``llm_prepare_mla`` build them.
    """
    kv_lora = kv_b.shape[1]
    t = kv_b.reshape(n_head, qk_nope + v_head, kv_lora)
    k_b = t[:, :qk_nope, :].transpose(0, 2, 1)
    v_b = t[:, qk_nope:, :]
    return np.ascontiguousarray(k_b), np.ascontiguousarray(v_b)


def split_kv_b(kv_b: np.ndarray, n_head: int, qk_nope: int, v_head: int) -> tuple[np.ndarray, np.ndarray]:
    """Derive ik-style 2-D ``attn_k_b``/``attn_v_b`` from ``attn_kv_b``.

    The same elements in the same order as `mainline_kv_b`, with the head axis folded
    into the rows: ``k_b`` of shape ``(n_head*kv_lora, nope)`` and ``v_b`` of shape
    ``(n_head*v, kv_lora)``, exactly as ik's convert_hf_to_gguf.py.
    """
    k_b, v_b = mainline_kv_b(kv_b, n_head, qk_nope, v_head)
    return k_b.reshape(-1, qk_nope), v_b.reshape(-1, kv_b.shape[1])


def kv_heads(W: dict, spec: TinySpec, p: str, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-head k_nope (T, H, nope) and v (T, H, v) from the normed kv latent c (T, kv_lora).

    Uses ``attn_kv_b`` when present (as ``-mla 0``), else ``attn_k_b``/``attn_v_b`` (as the
    MLA graph; 2-D ik or 3-D mainline shapes), so a file without ``attn_kv_b`` is checked
    through the tensors it actually holds.
    """
    T, H, nope, vd, r = c.shape[0], spec.n_head, spec.qk_nope, spec.v_head, spec.kv_lora_rank
    if p + "attn_kv_b.weight" in W:
        kv = (c @ W[p + "attn_kv_b.weight"].T).reshape(T, H, nope + vd)
        return kv[:, :, :nope], kv[:, :, nope:]
    k_b = W[p + "attn_k_b.weight"].reshape(H, r, nope)
    v_b = W[p + "attn_v_b.weight"].reshape(H, vd, r)
    return np.einsum("tc,hcn->thn", c, k_b), np.einsum("tc,hdc->thd", c, v_b)


def layer_attn(W: dict, spec: TinySpec, il: int, h: np.ndarray) -> np.ndarray:
    """Attention block output (before the residual add) for one sequence h (T, D)."""
    return attn_heads(W, spec, il, h) @ W[f"blk.{il}.attn_output.weight"].T


def attn_heads(W: dict, spec: TinySpec, il: int, h: np.ndarray) -> np.ndarray:
    """Concatenated per-head attention outputs (T, n_head*v_head), input of attn_output."""
    p = f"blk.{il}."
    T = h.shape[0]
    H, nope, rope, vd = spec.n_head, spec.qk_nope, spec.qk_rope, spec.v_head
    x = rmsnorm(h, W[p + "attn_norm.weight"], spec.rms_eps)
    qa = rmsnorm(x @ W[p + "attn_q_a.weight"].T, W[p + "attn_q_a_norm.weight"], spec.rms_eps)
    q = (qa @ W[p + "attn_q_b.weight"].T).reshape(T, H, nope + rope)
    kva = x @ W[p + "attn_kv_a_mqa.weight"].T
    c = rmsnorm(kva[:, : spec.kv_lora_rank], W[p + "attn_kv_a_norm.weight"], spec.rms_eps)
    k_rope = kva[:, spec.kv_lora_rank :]
    k_nope, v = kv_heads(W, spec, p, c)
    pos = np.arange(T, dtype=np.float64)
    q_rope = rope_norm(q[:, :, nope:], pos, spec.rope_freq_base)
    k_rope = rope_norm(k_rope, pos, spec.rope_freq_base)
    qn = np.ascontiguousarray(q[:, :, :nope].transpose(1, 0, 2))  # (H, T, nope)
    scores = qn @ k_nope.transpose(1, 2, 0) + q_rope.transpose(1, 0, 2) @ k_rope.T[None]  # (H, T, S)
    scores *= 1.0 / np.sqrt(nope + rope)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    a = np.exp(scores)
    a /= a.sum(-1, keepdims=True)
    return (a @ v.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(T, H * vd)


def ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """SwiGLU feed-forward: down(silu(gate x) * up x)."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def moe_route(W: dict, spec: TinySpec, il: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selected experts (T, k) and their weights (T, k), as llm_build_moe_ffn (sigmoid)."""
    p = f"blk.{il}."
    probs = sigmoid(x @ W[p + "ffn_gate_inp.weight"].T)
    sel_probs = probs + W[p + "exp_probs_b.bias"][None, :]
    k = spec.n_expert_used
    # stable descending top-k (ties -> lower index), deterministic
    sel = np.argsort(-sel_probs, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, sel, axis=1)
    w = w / w.sum(1, keepdims=True)  # expert_weights_norm; expert_weights_scale == 1
    return sel, w


def layer_ffn(W: dict, spec: TinySpec, il: int, h: np.ndarray) -> np.ndarray:
    """FFN block output (before the residual add): dense, or shared expert plus routed experts."""
    p = f"blk.{il}."
    x = rmsnorm(h, W[p + "ffn_norm.weight"], spec.rms_eps)
    if il < spec.n_dense:
        return ffn(x, W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"], W[p + "ffn_down.weight"])
    sel, w = moe_route(W, spec, il, x)
    out = ffn(x, W[p + "ffn_gate_shexp.weight"], W[p + "ffn_up_shexp.weight"], W[p + "ffn_down_shexp.weight"])
    ge, ue, de = W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"], W[p + "ffn_down_exps.weight"]
    for e in range(spec.n_expert):
        rows, slot = np.nonzero(sel == e)
        if len(rows):
            out[rows] += w[rows, slot][:, None] * ffn(x[rows], ge[e], ue[e], de[e])
    return out


def _forward_hidden(W: dict, spec: TinySpec, seqs: list[np.ndarray]) -> np.ndarray:
    """Final normed hidden states (sum T, D) for a list of token sequences."""
    outs = []
    for ids in seqs:
        h = W["token_embd.weight"][ids]
        for il in range(spec.n_layer):
            h = h + layer_attn(W, spec, il, h)
            h = h + layer_ffn(W, spec, il, h)
        outs.append(rmsnorm(h, W["output_norm.weight"], spec.rms_eps))
    return np.concatenate(outs, axis=0)


def forward_logits(W: dict, spec: TinySpec, ids: list[int] | np.ndarray) -> np.ndarray:
    """Reference logits (T, V) of one sequence, from float weights in GGUF numpy layout.

    ``W`` maps tensor names to arrays (e.g. read back from the GGUF and
    dequantized).  Matches the engine's MLA math (up to BF16/F32 rounding).
    """
    W = {k: np.asarray(v, dtype=np.float64) for k, v in W.items()}
    X = _forward_hidden(W, spec, [np.asarray(ids, dtype=np.int64)])
    return X @ W["output.weight"].T
