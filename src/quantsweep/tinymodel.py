"""Deterministic generator of a tiny DeepSeek2 (MLA attention + MoE) GGUF.

The model is small (~17 M parameters, ~36 MB in BF16) but has the real DeepSeek
MLA geometry (q/kv LoRA, 128+64 / 128 head dims, kv_lora 512), a leading dense
layer, routed experts with a sigmoid gate and selection bias, and a shared
expert, so every DeepSeek code path of ik_llama.cpp is exercised (MLA,
``llm_prepare_mla``, per-head ``attn_k_b``/``attn_v_b`` imatrix entries, MoE
imatrix entries, the quantize heuristics for n_expert >= 8).

Random weights give a useless test model (PPL ~ vocab size, every quant type
about equally bad).  This one behaves like an LLM in the ways quantization
cares about:

* **Predictive.**  Its knowledge is a byte-bigram model of ``train_text``.  The
  leading dense FFN is a key-value memory: hidden unit j fires only for token j
  and writes token j's value, the rank-``bigram_rank`` factor of its
  log-bigram row.  The output matrix is fitted (ridge regression, in numpy) so
  that the *whole* network, run on a sample of ``train_text``, reproduces the
  bigram logits.  Baseline PPL is that of the bigram (~12 on the bundled
  texts; vocab 354).
* **Knowledge lives in the weights.**  Quantization noise in ``ffn_down`` of the
  memory, in the experts (which read the memory's values) and in attention
  reaches the predictions; noise in ``token_embd`` mostly does not (the memory
  cleans it up, as in real models where 2-bit embeddings are tolerable).
* **Uneven channel importance.**  RMSNorm gains are heavy tailed (log-normal plus
  shared outlier channels), FFN hidden channels have log-normal scales, and the
  memory's hidden units are used with Zipfian token frequencies, so an imatrix
  clearly helps at 2 bits.
* **No dead channels, balanced experts.**  Every matmul input column is non-zero
  on text (q4_K's quantizer aborts on an all-zero imatrix column), and the
  expert selection bias (``exp_probs_b``) is tuned so all experts get tokens.
* **Engine-friendly activations.**  ik's CPU kernels for IQ-K types requantize
  activations to 8 bits per 256 values; the memory's "off" units sit deep in
  SiLU's negative tail so that this does not distort the predictions.

Everything is deterministic: weights come from ``numpy.random.default_rng``
seeded by ``(seed, crc32(name))``, linear algebra is float64, no dict-order or
time dependence, and the file is written to ``path + '.tmp'`` then renamed.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MODEL_NAME",
    "N_VOCAB",
    "TinySpec",
    "build_tensors",
    "forward_logits",
    "split_kv_b",
    "tokenize",
    "vocab",
    "write_tiny_model",
]

MODEL_NAME = "quantsweep-tiny-deepseek"
ARCH = "deepseek2"

# ---------------------------------------------------------------------------
# vocabulary / tokenizer
# ---------------------------------------------------------------------------

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE0_ID = 3  # <0x00> .. <0xFF> are ids 3..258
SPACE_PIECE = "\u2581"  # '▁', the SentencePiece whitespace escape

# gguf / llama.cpp token types
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_BYTE = 1, 2, 3, 6


def _build_vocab() -> tuple[list[str], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_TT_UNKNOWN, _TT_CONTROL, _TT_CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(_TT_BYTE)
    tokens.append(SPACE_PIECE)
    types.append(_TT_NORMAL)
    for c in range(0x21, 0x7F):
        tokens.append(chr(c))
        types.append(_TT_NORMAL)
    return tokens, types


_TOKENS, _TOKEN_TYPES = _build_vocab()
_PIECE_TO_ID = {t: i for i, t in enumerate(_TOKENS) if _TOKEN_TYPES[i] == _TT_NORMAL}
N_VOCAB = len(_TOKENS)  # 354


def vocab() -> list[str]:
    """The token strings, in id order (a copy)."""
    return list(_TOKENS)


def tokenize(text: str) -> list[int]:
    """Tokenize ``text`` exactly as ik_llama.cpp's SPM tokenizer does with our vocab.

    The GGUF sets ``tokenizer.ggml.add_space_prefix = false``.  The engine then
    escapes every ' ' as '▁', splits the text into UTF-8 characters and, since
    the vocab has no multi-character pieces, never merges: each character that
    is a piece ('▁' and printable ASCII 0x21..0x7E) becomes its token, every
    other character falls back to one ``<0xXX>`` token per UTF-8 byte
    (newline -> ``<0x0A>``).  Control-token text such as ``<s>`` is not parsed
    (the tools tokenize with parse_special = false).  BOS is not included.

    The engine reads files as bytes: to mirror it on a file, read it without
    newline translation (``open(path, encoding="utf-8", newline="")``).
    """
    out: list[int] = []
    for ch in text.replace(" ", SPACE_PIECE):
        tid = _PIECE_TO_ID.get(ch)
        if tid is not None:
            out.append(tid)
        else:
            out.extend(BYTE0_ID + b for b in ch.encode("utf-8"))
    return out


# ---------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    """Geometry and behaviour knobs of the tiny DeepSeek2 model.

    Geometry (why each value):

    * ``n_layer=4, n_dense=1``: one leading dense layer (``ffn_gate/up/down``) and
      three MoE layers, the smallest layout with both FFN kinds and more than one
      MoE layer.  ``n_layer`` must not be 26/27 (the engine would treat the model
      as "lite", without ``q_lora``).
    * ``n_embd=512``: >= the 354-token vocab (the bigram fits) and a multiple of
      256, so 256-block quant types (IQ2_KS, Q4_K, ...) apply without fallback.
    * ``n_head=4``: few heads keep it small; ``head_count_kv`` is written equal to
      it (1 would select the mainline-MLA loader path, which needs 576/512 dims).
    * ``q_lora_rank=256, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128``:
      the real DeepSeek MLA dims (kv_lora 512, key 192, value 128, rope 64), so
      ``attn_k_b`` has 128 columns (not a multiple of 256 -> quantize fallback) and
      the per-head imatrix entries have the real sizes.
    * ``n_ff=768``: dense FFN width (multiple of 256 for ``ffn_down``).
    * ``n_expert=8, n_expert_used=2, n_ff_exp=256, n_shared=1``: a real MoE
      (n_expert >= 8 triggers the same quantize heuristics as DeepSeek-V3).
    * ``seed``: all randomness derives from it.
    * ``split_kv_b``: also write ik-style 2-D ``attn_k_b``/``attn_v_b`` derived from
      ``attn_kv_b`` (as ik's convert_hf_to_gguf.py does).

    Behaviour knobs (defaults tuned against the engine; see the module docstring):

    * ``bigram_rank``: rank of the log-bigram factors stored as memory values
      (64 costs ~2 % bigram PPL on the bundled texts; 96+ is exact).
    * ``smoothing``: Dirichlet prior weight (in counts) towards the unigram
      distribution in the bigram estimate.
    * ``embd_mean``: fraction (of the norm) of every token embedding that is a
      shared mean vector; the memory uses it as its bias input (0 < x < 1).
    * ``memory_scale``: RMS of the memory's (layer 0 ``ffn_down``) value output,
      relative to a token embedding's RMS (1.0).
    * ``memory_sharpness`` / ``memory_threshold``: memory gate = sharpness *
      (cos(code, h) - threshold): the own token's unit fires, other units sit
      deep in SiLU's negative tail (robust to 2-bit embeddings and to 8-bit
      activation requantization in the engine's kernels).
    * ``generic_scale``: RMS of the memory layer's other (random) hidden units.
    * ``attn_scale``: RMS of each attention block's output.
    * ``ffn_scale``: RMS of each MoE layer's output (routed + shared halves).
      Larger -> the experts matter more for the predictions.
    * ``value_read``: fraction of the energy of the MoE ``gate``/``up`` rows that
      reads the memory's value subspace (the experts process the cleaned-up
      knowledge rather than the raw embedding).
    * ``norm_sigma``: log-normal sigma of RMSNorm gains.
    * ``outlier_channels`` / ``outlier_gain``: residual channels whose norm gains
      are multiplied by ``outlier_gain`` in every layer (activation outliers).
    * ``hidden_sigma``: log-normal sigma of random FFN hidden-channel scales
      (uneven ``ffn_down`` input importance).
    * ``router_scale``: std of the MoE router logits.
    * ``fit_tokens``: ``train_text`` tokens of the numpy forward pass that
      calibrates block scales, balances the experts and fits the output.
    * ``ridge``: ridge strength (relative to mean feature energy) of that fit.
    * ``embd_noise``: relative token_embd noise the output fit is made robust to.
    """

    n_layer: int = 4
    n_dense: int = 1
    n_embd: int = 512
    n_head: int = 4
    q_lora_rank: int = 256
    kv_lora_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    n_ff: int = 768
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 256
    n_shared: int = 1
    seed: int = 0
    split_kv_b: bool = False
    # behaviour knobs
    bigram_rank: int = 64
    smoothing: float = 2.0
    embd_mean: float = 0.4
    memory_scale: float = 4.0
    memory_sharpness: float = 30.0
    memory_threshold: float = 0.6
    generic_scale: float = 0.3
    attn_scale: float = 0.3
    ffn_scale: float = 3.0
    value_read: float = 0.95
    norm_sigma: float = 0.5
    outlier_channels: int = 6
    outlier_gain: float = 8.0
    hidden_sigma: float = 0.7
    router_scale: float = 2.0
    fit_tokens: int = 4096
    ridge: float = 1e-3
    embd_noise: float = 0.3
    context_length: int = 4096
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-6

    @property
    def n_vocab(self) -> int:
        return N_VOCAB

    @property
    def key_length(self) -> int:
        return self.qk_nope + self.qk_rope


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _rng(spec: TinySpec, name: str) -> np.random.Generator:
    """Independent generator per tensor name (order-independent, deterministic)."""
    return np.random.default_rng([spec.seed, zlib.crc32(name.encode())])


def _bf16_round(a: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest-even, as gguf/ggml) and return float64."""
    f = np.ascontiguousarray(a, dtype=np.float32)
    n = f.view(np.uint32).astype(np.uint64)
    n = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint32) << 16
    return n.astype(np.uint32).view(np.float32).astype(np.float64)


def _rmsnorm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _rope_norm(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
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


def split_kv_b(kv_b: np.ndarray, n_head: int, qk_nope: int, v_head: int) -> tuple[np.ndarray, np.ndarray]:
    """Derive ik-style 2-D ``attn_k_b``/``attn_v_b`` from ``attn_kv_b``.

    ``kv_b`` has numpy (= torch) shape ``(n_head*(nope+v), kv_lora)``; per head the
    first ``nope`` rows produce k_nope and the next ``v`` rows produce v (this is
    how the engine's MLA-0 graph and ``llm_prepare_mla`` view it).  Returns
    ``k_b`` of shape ``(n_head*kv_lora, nope)`` and ``v_b`` of shape
    ``(n_head*v, kv_lora)``, exactly as ik's convert_hf_to_gguf.py.
    """
    kv_lora = kv_b.shape[1]
    t = kv_b.reshape(n_head, qk_nope + v_head, kv_lora)
    k_b = t[:, :qk_nope, :].transpose(0, 2, 1).reshape(n_head * kv_lora, qk_nope)
    v_b = t[:, qk_nope:, :].reshape(n_head * v_head, kv_lora)
    return np.ascontiguousarray(k_b), np.ascontiguousarray(v_b)


# ---------------------------------------------------------------------------
# bigram
# ---------------------------------------------------------------------------


def _log_bigram(ids: list[int], smoothing: float) -> np.ndarray:
    """log P(next | cur) as a (V, V) float64 matrix, BOS counted as a predecessor."""
    V = N_VOCAB
    seq = np.asarray(ids, dtype=np.int64)
    prev = np.concatenate([[BOS_ID], seq[:-1]]) if len(seq) else np.zeros(0, np.int64)
    counts = np.zeros((V, V), dtype=np.float64)
    np.add.at(counts, (prev, seq), 1.0)
    uni = np.bincount(seq, minlength=V).astype(np.float64) + 0.1
    uni /= uni.sum()
    p = (counts + smoothing * uni[None, :]) / (counts.sum(1, keepdims=True) + smoothing)
    return np.log(p)


# ---------------------------------------------------------------------------
# numpy reference forward pass
# ---------------------------------------------------------------------------


def _layer_attn(W: dict, spec: TinySpec, il: int, h: np.ndarray) -> np.ndarray:
    """Attention block output (before the residual add) for one sequence h (T, D)."""
    return _attn_heads(W, spec, il, h) @ W[f"blk.{il}.attn_output.weight"].T


def _attn_heads(W: dict, spec: TinySpec, il: int, h: np.ndarray) -> np.ndarray:
    """Concatenated per-head attention outputs (T, n_head*v_head), input of attn_output."""
    p = f"blk.{il}."
    T = h.shape[0]
    H, nope, rope, vd = spec.n_head, spec.qk_nope, spec.qk_rope, spec.v_head
    x = _rmsnorm(h, W[p + "attn_norm.weight"], spec.rms_eps)
    qa = _rmsnorm(x @ W[p + "attn_q_a.weight"].T, W[p + "attn_q_a_norm.weight"], spec.rms_eps)
    q = (qa @ W[p + "attn_q_b.weight"].T).reshape(T, H, nope + rope)
    kva = x @ W[p + "attn_kv_a_mqa.weight"].T
    c = _rmsnorm(kva[:, : spec.kv_lora_rank], W[p + "attn_kv_a_norm.weight"], spec.rms_eps)
    k_rope = kva[:, spec.kv_lora_rank :]
    kv = (c @ W[p + "attn_kv_b.weight"].T).reshape(T, H, nope + vd)
    k_nope, v = kv[:, :, :nope], kv[:, :, nope:]
    pos = np.arange(T, dtype=np.float64)
    q_rope = _rope_norm(q[:, :, nope:], pos, spec.rope_freq_base)
    k_rope = _rope_norm(k_rope, pos, spec.rope_freq_base)
    qn = np.ascontiguousarray(q[:, :, :nope].transpose(1, 0, 2))  # (H, T, nope)
    scores = qn @ k_nope.transpose(1, 2, 0) + q_rope.transpose(1, 0, 2) @ k_rope.T[None]  # (H, T, S)
    scores *= 1.0 / np.sqrt(nope + rope)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    a = np.exp(scores)
    a /= a.sum(-1, keepdims=True)
    return (a @ v.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(T, H * vd)


def _ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return (_silu(x @ gate.T) * (x @ up.T)) @ down.T


def _moe_route(W: dict, spec: TinySpec, il: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selected experts (T, k) and their weights (T, k), as llm_build_moe_ffn (sigmoid)."""
    p = f"blk.{il}."
    probs = _sigmoid(x @ W[p + "ffn_gate_inp.weight"].T)
    sel_probs = probs + W[p + "exp_probs_b.bias"][None, :]
    k = spec.n_expert_used
    # stable descending top-k (ties -> lower index), deterministic
    sel = np.argsort(-sel_probs, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, sel, axis=1)
    w = w / w.sum(1, keepdims=True)  # expert_weights_norm; expert_weights_scale == 1
    return sel, w


def _layer_ffn(W: dict, spec: TinySpec, il: int, h: np.ndarray) -> np.ndarray:
    p = f"blk.{il}."
    x = _rmsnorm(h, W[p + "ffn_norm.weight"], spec.rms_eps)
    if il < spec.n_dense:
        return _ffn(x, W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"], W[p + "ffn_down.weight"])
    sel, w = _moe_route(W, spec, il, x)
    out = _ffn(x, W[p + "ffn_gate_shexp.weight"], W[p + "ffn_up_shexp.weight"], W[p + "ffn_down_shexp.weight"])
    ge, ue, de = W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"], W[p + "ffn_down_exps.weight"]
    for e in range(spec.n_expert):
        rows, slot = np.nonzero(sel == e)
        if len(rows):
            out[rows] += w[rows, slot][:, None] * _ffn(x[rows], ge[e], ue[e], de[e])
    return out


def _forward_hidden(W: dict, spec: TinySpec, seqs: list[np.ndarray]) -> np.ndarray:
    """Final normed hidden states (sum T, D) for a list of token sequences."""
    outs = []
    for ids in seqs:
        h = W["token_embd.weight"][ids]
        for il in range(spec.n_layer):
            h = h + _layer_attn(W, spec, il, h)
            h = h + _layer_ffn(W, spec, il, h)
        outs.append(_rmsnorm(h, W["output_norm.weight"], spec.rms_eps))
    return np.concatenate(outs, axis=0)


def forward_logits(W: dict, spec: TinySpec, ids: list[int] | np.ndarray) -> np.ndarray:
    """Reference logits (T, V) of one sequence, from float weights in GGUF numpy layout.

    ``W`` maps tensor names to arrays (e.g. read back from the GGUF and
    dequantized).  Matches the engine's MLA math (up to BF16/F32 rounding).
    """
    W = {k: np.asarray(v, dtype=np.float64) for k, v in W.items()}
    X = _forward_hidden(W, spec, [np.asarray(ids, dtype=np.int64)])
    return X @ W["output.weight"].T


# ---------------------------------------------------------------------------
# weight construction
# ---------------------------------------------------------------------------


def _fit_sequences(ids: list[int], spec: TinySpec, chunk: int = 512) -> list[np.ndarray]:
    """Chunks of the training tokens laid out as the perplexity tool does (BOS first)."""
    n = min(max(spec.fit_tokens, 64), len(ids))
    seqs = []
    for s in range(0, n, chunk):
        seg = np.asarray(ids[s : s + chunk], dtype=np.int64)
        if len(seg) < 16:
            break
        seg = seg.copy()
        seg[0] = BOS_ID
        seqs.append(seg)
    return seqs


def _norm_gain(spec: TinySpec, name: str, n: int, outliers: np.ndarray | None) -> np.ndarray:
    """Heavy-tailed RMSNorm gain: log-normal, times `outlier_gain` on `outliers`; RMS 1."""
    g = np.exp(spec.norm_sigma * _rng(spec, name).standard_normal(n))
    if outliers is not None:
        g[outliers] *= spec.outlier_gain
    return _bf16_round(g / np.sqrt(np.mean(g * g)))


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a * a)))


def _build_weights(train_ids: list[int], spec: TinySpec) -> dict[str, np.ndarray]:
    """Construct all tensors (float64 arrays, BF16-representable where stored as BF16).

    * ``token_embd``: e_c = sqrt(1-mu²)·code_c + mu·m, random unit codes plus a
      shared mean direction (equal row norms, RMS 1).
    * layer 0 dense FFN: key-value memory.  Unit j (at a random hidden position)
      has ``gate`` row ∝ sharpness·(code_j - threshold·m-part) and ``up`` row ∝
      code_j, so it fires (~+7) only when the current token is j; its
      ``ffn_down`` column is token j's value, the bigram factor embedded in the
      residual stream by a random orthonormal map Q.  Remaining hidden units are
      random with a small output.
    * attention, further dense layers and MoE layers: random maps (MoE rows read
      mostly the value subspace Q) with heavy-tailed inputs; output RMS
      calibrated on the fit sample; router bias balances the expert load.
    * ``output``: ridge regression of the centred log-bigram row of the current
      token on the final normed hidden states of the fit sample, so the network
      as a whole predicts the bigram.
    """
    D, V = spec.n_embd, N_VOCAB
    r = spec.bigram_rank
    if not 1 <= r <= min(D, V):
        raise ValueError("bigram_rank must be in [1, min(n_embd, vocab)]")
    if spec.n_dense < 1 or spec.n_dense >= spec.n_layer:
        raise ValueError("need 1 <= n_dense < n_layer (a memory layer and at least one MoE layer)")
    if not 0.0 < spec.embd_mean < 1.0:
        raise ValueError("embd_mean must be in (0, 1)")
    if spec.n_layer in (26, 27):
        raise ValueError("n_layer 26/27 makes the engine treat the model as DeepSeek-Lite")
    if len(train_ids) < 64:
        raise ValueError("train_text is too short (need at least 64 tokens)")
    H, nope, rope, vd = spec.n_head, spec.qk_nope, spec.qk_rope, spec.v_head
    W: dict[str, np.ndarray] = {}

    def normal(name: str, shape: tuple[int, ...], std: float = 1.0) -> np.ndarray:
        return _rng(spec, name).standard_normal(shape) * std

    # --- bigram factors (the values of the memory) ----------------------------------
    L = _log_bigram(train_ids, spec.smoothing)  # (V cur, V next)
    Lc = L - L.mean(axis=1, keepdims=True)
    freq = np.bincount(np.concatenate([[BOS_ID], train_ids]), minlength=V).astype(np.float64)
    wrow = np.sqrt(freq + 1.0)  # weight frequent contexts in the low-rank fit
    U, S, _ = np.linalg.svd(Lc * wrow[:, None], full_matrices=False)
    F = (U[:, :r] * np.sqrt(S[:r])[None, :]) / wrow[:, None]  # (V, r)
    F *= np.where(F[np.argmax(np.abs(F), axis=0), np.arange(r)] < 0, -1.0, 1.0)[None, :]  # fix SVD signs
    Q, _ = np.linalg.qr(normal("value_basis", (D, r)))  # (D, r) orthonormal columns
    values = F @ Q.T  # (V, D)

    # --- token embeddings: random codes + shared mean direction ----------------------
    codes = normal("token_embd.weight", (V, D))
    codes -= codes.mean(axis=0, keepdims=True)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)  # unit codes
    m_hat = normal("embd_mean", (D,))
    m_hat -= codes.T @ (codes @ m_hat) / V  # roughly orthogonal to the codes
    m_hat /= np.linalg.norm(m_hat)
    mu = spec.embd_mean
    E = np.sqrt(1 - mu * mu) * codes + mu * m_hat[None, :]
    E *= np.sqrt(D) / np.linalg.norm(E, axis=1, keepdims=True)  # equal row norms, RMS 1
    W["token_embd.weight"] = _bf16_round(E)

    outl = np.sort(_rng(spec, "outliers").choice(D, size=min(spec.outlier_channels, D), replace=False))
    seqs = _fit_sequences(train_ids, spec)
    hs = [W["token_embd.weight"][s] for s in seqs]  # running hidden states of the fit sample

    def read_mat(name: str, shape: tuple[int, ...], f: float) -> np.ndarray:
        """Random input matrix (..., D) reading a fraction f of its energy from the value subspace."""
        full = normal(name, shape, 1 / np.sqrt(D))
        if f <= 0:
            return full
        sub = normal(name + ".sub", shape[:-1] + (r,), 1 / np.sqrt(r)) @ Q.T
        return np.sqrt(f) * sub + np.sqrt(1 - f) * full

    def ffn_mats(name: str, n_hidden: int, lead: tuple[int, ...] = (), f: float = 0.0):
        hsc = np.exp(spec.hidden_sigma * normal(name.format("hscale"), lead + (n_hidden, 1)))
        g = read_mat(name.format("gate"), lead + (n_hidden, D), f)
        u = read_mat(name.format("up"), lead + (n_hidden, D), f) * hsc
        d = normal(name.format("down"), lead + (D, n_hidden), 1 / np.sqrt(n_hidden))
        return _bf16_round(g), _bf16_round(u), d

    for il in range(spec.n_layer):
        p = f"blk.{il}."
        # ---------------- attention (random, calibrated) ----------------
        W[p + "attn_norm.weight"] = _norm_gain(spec, p + "attn_norm.weight", D, outl)
        W[p + "attn_q_a.weight"] = _bf16_round(normal(p + "attn_q_a.weight", (spec.q_lora_rank, D), D**-0.5))
        W[p + "attn_q_a_norm.weight"] = _norm_gain(spec, p + "attn_q_a_norm.weight", spec.q_lora_rank, None)
        W[p + "attn_q_b.weight"] = _bf16_round(
            normal(p + "attn_q_b.weight", (H * (nope + rope), spec.q_lora_rank), spec.q_lora_rank**-0.5)
        )
        W[p + "attn_kv_a_mqa.weight"] = _bf16_round(
            normal(p + "attn_kv_a_mqa.weight", (spec.kv_lora_rank + rope, D), D**-0.5)
        )
        W[p + "attn_kv_a_norm.weight"] = _norm_gain(spec, p + "attn_kv_a_norm.weight", spec.kv_lora_rank, None)
        W[p + "attn_kv_b.weight"] = _bf16_round(
            normal(p + "attn_kv_b.weight", (H * (nope + vd), spec.kv_lora_rank), spec.kv_lora_rank**-0.5)
        )
        os_ = [_attn_heads(W, spec, il, h) for h in hs]
        wo = normal(p + "attn_output.weight", (D, H * vd), (H * vd) ** -0.5)
        s = spec.attn_scale / _rms(np.concatenate([o @ wo.T for o in os_]))
        W[p + "attn_output.weight"] = wo = _bf16_round(wo * s)
        hs = [h + o @ wo.T for h, o in zip(hs, os_)]

        # ---------------- FFN ----------------
        W[p + "ffn_norm.weight"] = gf = _norm_gain(spec, p + "ffn_norm.weight", D, outl)
        xs = [_rmsnorm(h, gf, spec.rms_eps) for h in hs]
        if il == 0:
            # key-value memory, keyed on the embeddings (most frequent tokens first if n_ff < V)
            g, u, d = ffn_mats(p + "ffn_{}.weight", spec.n_ff)
            order = np.argsort(-freq, kind="stable")[: min(spec.n_ff, V)]
            # gate_j(x) ~ sharpness * (cos(code_j, h) - threshold): the m component of h
            # supplies the (negative) bias, so only the own token's unit fires and the
            # others sit deep in SiLU's negative tail (no coherent cross-talk).
            # up_j(x) ~ cos(code_j, h) (zero-mean for other tokens).
            ratio = np.sqrt(1 - mu * mu) / mu
            keys = codes[order] / np.sqrt(D)
            bias = spec.memory_threshold * ratio * m_hat[None, :] / np.sqrt(D)
            # memory units sit at random positions among the hidden units
            slots = _rng(spec, p + "memory_slots").permutation(spec.n_ff)[: len(order)]
            is_mem = np.zeros(spec.n_ff, dtype=bool)
            is_mem[slots] = True
            g[slots] = spec.memory_sharpness * (keys - bias)
            u[slots] = keys
            dm = np.zeros_like(d)
            dm[:, slots] = values[order].T
            dg = np.where(is_mem[None, :], 0.0, d)
            g, u = _bf16_round(g), _bf16_round(u)
            hid = [_silu(x @ g.T) * (x @ u.T) for x in xs]
            # calibrate the memory (values) and the generic units separately
            sm = spec.memory_scale / _rms(np.concatenate([h_ @ dm.T for h_ in hid]))
            sg = spec.generic_scale / _rms(np.concatenate([h_ @ dg.T for h_ in hid])) if not is_mem.all() else 0.0
            W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"] = g, u
            W[p + "ffn_down.weight"] = _bf16_round(dm * sm + dg * sg)
        elif il < spec.n_dense:
            g, u, d = ffn_mats(p + "ffn_{}.weight", spec.n_ff)
            hid = [_silu(x @ g.T) * (x @ u.T) for x in xs]
            s = spec.ffn_scale / _rms(np.concatenate([h_ @ d.T for h_ in hid]))
            W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"] = g, u
            W[p + "ffn_down.weight"] = _bf16_round(d * s)
        else:
            nE = spec.n_expert
            W[p + "ffn_gate_inp.weight"] = _bf16_round(
                normal(p + "ffn_gate_inp.weight", (nE, D), spec.router_scale / np.sqrt(D))
            )
            # balance the expert load with the selection bias (DeepSeek-V3 aux-loss-free style)
            xall = np.concatenate(xs, axis=0)
            target = len(xall) * spec.n_expert_used / nE
            bias = np.zeros(nE)
            for _ in range(300):
                W[p + "exp_probs_b.bias"] = bias
                sel, _w = _moe_route(W, spec, il, xall)
                load = np.bincount(sel.ravel(), minlength=nE)
                if load.min() >= 0.85 * target and load.max() <= 1.15 * target:
                    break
                bias = bias - 0.01 * (load - target) / target
            W[p + "exp_probs_b.bias"] = np.float32(bias).astype(np.float64)
            f = spec.value_read
            ge, ue, de = ffn_mats(p + "ffn_{}_exps.weight", spec.n_ff_exp, (nE,), f)
            gs, us, ds = ffn_mats(p + "ffn_{}_shexp.weight", spec.n_ff_exp * spec.n_shared, (), f)
            W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"] = ge, ue
            W[p + "ffn_gate_shexp.weight"], W[p + "ffn_up_shexp.weight"] = gs, us
            # routed experts and shared expert each get half of the target output power
            W[p + "ffn_down_exps.weight"], W[p + "ffn_down_shexp.weight"] = de, np.zeros_like(ds)
            s_e = spec.ffn_scale / np.sqrt(2) / _rms(np.concatenate([_layer_ffn(W, spec, il, h) for h in hs]))
            s_s = spec.ffn_scale / np.sqrt(2) / _rms(np.concatenate([_ffn(x, gs, us, ds) for x in xs]))
            W[p + "ffn_down_exps.weight"] = _bf16_round(de * s_e)
            W[p + "ffn_down_shexp.weight"] = _bf16_round(ds * s_s)
        hs = [h + _layer_ffn(W, spec, il, h) for h in hs]

    # --- output norm + fitted output matrix --------------------------------------------
    W["output_norm.weight"] = go = _norm_gain(spec, "output_norm.weight", D, outl)
    X = np.concatenate([_rmsnorm(h, go, spec.rms_eps) for h in hs], axis=0)
    cur = np.concatenate(seqs)
    Y = Lc[cur]  # target: centred log P(. | current token)
    G = X.T @ X
    # + expected covariance of token_embd noise (relative `embd_noise`) reaching the
    #   output through the residual stream and the final norm, + ridge
    inv_rms2 = np.mean(1.0 / np.concatenate([np.mean(h * h, axis=1) for h in hs]))
    G += len(X) * spec.embd_noise**2 * inv_rms2 * np.diag(go * go)
    G += spec.ridge * np.trace(G) / D * np.eye(D)
    O = np.linalg.solve(G, X.T @ Y).T  # (V, D)
    W["output.weight"] = _bf16_round(O)
    return W


# ---------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------

_F32_SUFFIXES = ("_norm.weight", ".bias")


def _tensor_order(spec: TinySpec) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        names += [
            p + n
            for n in (
                "attn_norm.weight",
                "attn_q_a.weight",
                "attn_q_a_norm.weight",
                "attn_q_b.weight",
                "attn_kv_a_mqa.weight",
                "attn_kv_a_norm.weight",
                "attn_kv_b.weight",
            )
        ]
        if spec.split_kv_b:
            names += [p + "attn_k_b.weight", p + "attn_v_b.weight"]
        names += [p + "attn_output.weight", p + "ffn_norm.weight"]
        if il < spec.n_dense:
            names += [p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight"]
        else:
            names += [
                p + n
                for n in (
                    "ffn_gate_inp.weight",
                    "exp_probs_b.bias",
                    "ffn_gate_exps.weight",
                    "ffn_up_exps.weight",
                    "ffn_down_exps.weight",
                    "ffn_gate_shexp.weight",
                    "ffn_up_shexp.weight",
                    "ffn_down_shexp.weight",
                )
            ]
    return names


def build_tensors(train_text: str, spec: TinySpec = TinySpec()) -> dict[str, np.ndarray]:
    """All tensors (float64, GGUF numpy layout, BF16-representable for matrices)."""
    W = _build_weights(tokenize(train_text), spec)
    if spec.split_kv_b:
        for il in range(spec.n_layer):
            p = f"blk.{il}."
            k_b, v_b = split_kv_b(W[p + "attn_kv_b.weight"], spec.n_head, spec.qk_nope, spec.v_head)
            W[p + "attn_k_b.weight"], W[p + "attn_v_b.weight"] = k_b, v_b
    return W


def write_tiny_model(path: str | Path, train_text: str, spec: TinySpec = TinySpec()) -> None:
    """Write the tiny DeepSeek2 GGUF for ``train_text`` to ``path``.

    Written atomically: to ``path + '.tmp'``, then ``os.replace``.  The output is
    byte-identical for identical inputs.
    """
    import gguf  # local import keeps `tokenize` usable without gguf

    path = Path(path)
    tmp = Path(str(path) + ".tmp")
    W = build_tensors(train_text, spec)

    w = gguf.GGUFWriter(tmp, ARCH)
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
    w.add_array("tokenizer.ggml.tokens", list(_TOKENS))
    w.add_array("tokenizer.ggml.scores", [0.0] * N_VOCAB)
    w.add_array("tokenizer.ggml.token_type", list(_TOKEN_TYPES))
    w.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    w.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    w.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)

    bf16 = gguf.GGMLQuantizationType.BF16
    for name in _tensor_order(spec):
        arr = W[name]
        if name.endswith(_F32_SUFFIXES):
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), bf16)
            w.add_tensor(name, q, raw_dtype=bf16)

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if tmp.exists():
            tmp.unlink()
        raise
