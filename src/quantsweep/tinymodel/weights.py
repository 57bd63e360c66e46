"""Construction of all tensors of the tiny model, stage by stage along the layers.

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
  With ``dead_channels`` N, layer 0's ``attn_norm`` gain is zero on [0, N)
  (the rest rescaled to RMS 1); the calibration runs through that gain, so
  the fit sees the dead inputs exactly as the engine does.
* ``output``: ridge regression of the centred log-bigram row of the current
  token on the final normed hidden states of the fit sample, so the network
  as a whole predicts the bigram.

Each stage calibrates on the running hidden states of the fit sample, so the stages run in
layer order and hand that state on in `_Build`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TinyModelError
from .bigram import BigramMemory, bigram_memory, fit_sequences
from .draws import bf16_round, norm_gain, normal, rng
from .forward import attn_heads, ffn, layer_ffn, moe_route, rmsnorm, silu
from ..settings.tiny import TinySpec
from .tokenizer import N_VOCAB

MIN_TRAIN_TOKENS = 64


@dataclass
class _Build:
    """State the construction stages share."""

    spec: TinySpec
    W: dict[str, np.ndarray]  # the tensors built so far
    memory: BigramMemory
    codes: np.ndarray  # (V, D) unit token codes (the memory's keys)
    m_hat: np.ndarray  # (D,) shared mean direction of the embeddings (the memory's bias input)
    outliers: np.ndarray  # residual channels whose norm gains are outliers in every layer
    seqs: list[np.ndarray]  # the fit sample
    hs: list[np.ndarray]  # running hidden states of the fit sample


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a * a)))


def _read_mat(spec: TinySpec, Q: np.ndarray, name: str, shape: tuple[int, ...], f: float) -> np.ndarray:
    """Random input matrix (..., D) reading a fraction f of its energy from the value subspace."""
    D, r = spec.n_embd, spec.bigram_rank
    full = normal(spec, name, shape, 1 / np.sqrt(D))
    if f <= 0:
        return full
    sub = normal(spec, name + ".sub", shape[:-1] + (r,), 1 / np.sqrt(r)) @ Q.T
    return np.sqrt(f) * sub + np.sqrt(1 - f) * full


def _ffn_mats(
    spec: TinySpec, Q: np.ndarray, name: str, n_hidden: int, lead: tuple[int, ...] = (), f: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random gate/up (BF16, log-normal hidden-channel scales on up) and unscaled down."""
    D = spec.n_embd
    hsc = np.exp(spec.hidden_sigma * normal(spec, name.format("hscale"), lead + (n_hidden, 1)))
    g = _read_mat(spec, Q, name.format("gate"), lead + (n_hidden, D), f)
    u = _read_mat(spec, Q, name.format("up"), lead + (n_hidden, D), f) * hsc
    d = normal(spec, name.format("down"), lead + (D, n_hidden), 1 / np.sqrt(n_hidden))
    return bf16_round(g), bf16_round(u), d


def _token_embeddings(spec: TinySpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """token_embd (BF16), the unit codes and the mean direction: random codes + shared mean."""
    D, V = spec.n_embd, N_VOCAB
    codes = normal(spec, "token_embd.weight", (V, D))
    codes -= codes.mean(axis=0, keepdims=True)
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)  # unit codes
    m_hat = normal(spec, "embd_mean", (D,))
    m_hat -= codes.T @ (codes @ m_hat) / V  # roughly orthogonal to the codes
    m_hat /= np.linalg.norm(m_hat)
    mu = spec.embd_mean
    E = np.sqrt(1 - mu * mu) * codes + mu * m_hat[None, :]
    E *= np.sqrt(D) / np.linalg.norm(E, axis=1, keepdims=True)  # equal row norms, RMS 1
    return bf16_round(E), codes, m_hat


def _dead_gain(g: np.ndarray, n: int) -> np.ndarray:
    """Gain zero on channels [0, n) (dead inputs of the block), the others rescaled so the
    gain keeps RMS 1 and the block's input power stays that of the other layers."""
    g = g.copy()
    g[:n] = 0.0
    return bf16_round(g / np.sqrt(np.mean(g * g)))


def _attention_block(st: _Build, il: int) -> None:
    """Random MLA attention of layer il, its output calibrated to RMS ``attn_scale``."""
    spec, W, p = st.spec, st.W, f"blk.{il}."
    D, H, nope, rope, vd = spec.n_embd, spec.n_head, spec.qk_nope, spec.qk_rope, spec.v_head
    W[p + "attn_norm.weight"] = norm_gain(spec, p + "attn_norm.weight", D, st.outliers)
    if il == 0 and spec.dead_channels:
        W[p + "attn_norm.weight"] = _dead_gain(W[p + "attn_norm.weight"], spec.dead_channels)
    W[p + "attn_q_a.weight"] = bf16_round(normal(spec, p + "attn_q_a.weight", (spec.q_lora_rank, D), D**-0.5))
    W[p + "attn_q_a_norm.weight"] = norm_gain(spec, p + "attn_q_a_norm.weight", spec.q_lora_rank, None)
    W[p + "attn_q_b.weight"] = bf16_round(
        normal(spec, p + "attn_q_b.weight", (H * (nope + rope), spec.q_lora_rank), spec.q_lora_rank**-0.5)
    )
    W[p + "attn_kv_a_mqa.weight"] = bf16_round(
        normal(spec, p + "attn_kv_a_mqa.weight", (spec.kv_lora_rank + rope, D), D**-0.5)
    )
    W[p + "attn_kv_a_norm.weight"] = norm_gain(spec, p + "attn_kv_a_norm.weight", spec.kv_lora_rank, None)
    W[p + "attn_kv_b.weight"] = bf16_round(
        normal(spec, p + "attn_kv_b.weight", (H * (nope + vd), spec.kv_lora_rank), spec.kv_lora_rank**-0.5)
    )
    os_ = [attn_heads(W, spec, il, h) for h in st.hs]
    wo = normal(spec, p + "attn_output.weight", (D, H * vd), (H * vd) ** -0.5)
    s = spec.attn_scale / _rms(np.concatenate([o @ wo.T for o in os_]))
    W[p + "attn_output.weight"] = wo = bf16_round(wo * s)
    st.hs = [h + o @ wo.T for h, o in zip(st.hs, os_)]


def _memory_ffn(st: _Build, p: str, xs: list[np.ndarray]) -> None:
    """Layer 0 FFN: the key-value memory, keyed on the embeddings (most frequent tokens first
    if n_ff < V), plus random generic units with a small output."""
    spec, W, mem = st.spec, st.W, st.memory
    D, V, mu = spec.n_embd, N_VOCAB, spec.embd_mean
    g, u, d = _ffn_mats(spec, mem.Q, p + "ffn_{}.weight", spec.n_ff)
    order = np.argsort(-mem.freq, kind="stable")[: min(spec.n_ff, V)]
    # gate_j(x) ~ sharpness * (cos(code_j, h) - threshold): the m component of h
    # supplies the (negative) bias, so only the own token's unit fires and the
    # others sit deep in SiLU's negative tail (no coherent cross-talk).
    # up_j(x) ~ cos(code_j, h) (zero-mean for other tokens).
    ratio = np.sqrt(1 - mu * mu) / mu
    keys = st.codes[order] / np.sqrt(D)
    bias = spec.memory_threshold * ratio * st.m_hat[None, :] / np.sqrt(D)
    # memory units sit at random positions among the hidden units
    slots = rng(spec, p + "memory_slots").permutation(spec.n_ff)[: len(order)]
    is_mem = np.zeros(spec.n_ff, dtype=bool)
    is_mem[slots] = True
    g[slots] = spec.memory_sharpness * (keys - bias)
    u[slots] = keys
    dm = np.zeros_like(d)
    dm[:, slots] = mem.values[order].T
    dg = np.where(is_mem[None, :], 0.0, d)
    g, u = bf16_round(g), bf16_round(u)
    hid = [silu(x @ g.T) * (x @ u.T) for x in xs]
    # calibrate the memory (values) and the generic units separately
    sm = spec.memory_scale / _rms(np.concatenate([h_ @ dm.T for h_ in hid]))
    sg = spec.generic_scale / _rms(np.concatenate([h_ @ dg.T for h_ in hid])) if not is_mem.all() else 0.0
    W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"] = g, u
    W[p + "ffn_down.weight"] = bf16_round(dm * sm + dg * sg)


def _dense_ffn(st: _Build, p: str, xs: list[np.ndarray]) -> None:
    """A further dense FFN: random, output calibrated to RMS ``ffn_scale``."""
    spec, W = st.spec, st.W
    g, u, d = _ffn_mats(spec, st.memory.Q, p + "ffn_{}.weight", spec.n_ff)
    hid = [silu(x @ g.T) * (x @ u.T) for x in xs]
    s = spec.ffn_scale / _rms(np.concatenate([h_ @ d.T for h_ in hid]))
    W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"] = g, u
    W[p + "ffn_down.weight"] = bf16_round(d * s)


def _balance_experts(st: _Build, il: int, xs: list[np.ndarray]) -> None:
    """Tune the selection bias until every expert gets 85..115 % of an even share of the
    fit sample's tokens (DeepSeek-V3 aux-loss-free style)."""
    spec, W, p = st.spec, st.W, f"blk.{il}."
    nE = spec.n_expert
    xall = np.concatenate(xs, axis=0)
    target = len(xall) * spec.n_expert_used / nE
    bias = np.zeros(nE)
    for _ in range(300):
        W[p + "exp_probs_b.bias"] = bias
        sel, _w = moe_route(W, spec, il, xall)
        load = np.bincount(sel.ravel(), minlength=nE)
        if load.min() >= 0.85 * target and load.max() <= 1.15 * target:
            break
        bias = bias - 0.01 * (load - target) / target
    W[p + "exp_probs_b.bias"] = np.float32(bias).astype(np.float64)


def _moe_ffn(st: _Build, il: int, xs: list[np.ndarray]) -> None:
    """A MoE FFN: random router with balanced load, experts reading mostly the value subspace;
    routed and shared experts each get half of the target output power."""
    spec, W, p, Q = st.spec, st.W, f"blk.{il}.", st.memory.Q
    nE = spec.n_expert
    W[p + "ffn_gate_inp.weight"] = bf16_round(
        normal(spec, p + "ffn_gate_inp.weight", (nE, spec.n_embd), spec.router_scale / np.sqrt(spec.n_embd))
    )
    _balance_experts(st, il, xs)
    f = spec.value_read
    ge, ue, de = _ffn_mats(spec, Q, p + "ffn_{}_exps.weight", spec.n_ff_exp, (nE,), f)
    gs, us, ds = _ffn_mats(spec, Q, p + "ffn_{}_shexp.weight", spec.n_ff_exp * spec.n_shared, (), f)
    W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"] = ge, ue
    W[p + "ffn_gate_shexp.weight"], W[p + "ffn_up_shexp.weight"] = gs, us
    W[p + "ffn_down_exps.weight"], W[p + "ffn_down_shexp.weight"] = de, np.zeros_like(ds)
    s_e = spec.ffn_scale / np.sqrt(2) / _rms(np.concatenate([layer_ffn(W, spec, il, h) for h in st.hs]))
    s_s = spec.ffn_scale / np.sqrt(2) / _rms(np.concatenate([ffn(x, gs, us, ds) for x in xs]))
    W[p + "ffn_down_exps.weight"] = bf16_round(de * s_e)
    W[p + "ffn_down_shexp.weight"] = bf16_round(ds * s_s)


def _ffn_block(st: _Build, il: int) -> None:
    """The FFN of layer il (memory, dense or MoE), then the residual add on the fit sample."""
    spec, p = st.spec, f"blk.{il}."
    st.W[p + "ffn_norm.weight"] = gf = norm_gain(spec, p + "ffn_norm.weight", spec.n_embd, st.outliers)
    xs = [rmsnorm(h, gf, spec.rms_eps) for h in st.hs]
    if il == 0:
        _memory_ffn(st, p, xs)
    elif il < spec.n_dense:
        _dense_ffn(st, p, xs)
    else:
        _moe_ffn(st, il, xs)
    st.hs = [h + layer_ffn(st.W, spec, il, h) for h in st.hs]


def _fit_output(st: _Build) -> None:
    """Output norm and the output matrix, ridge-fitted so the network predicts the bigram."""
    spec, W, hs, D = st.spec, st.W, st.hs, st.spec.n_embd
    W["output_norm.weight"] = go = norm_gain(spec, "output_norm.weight", D, st.outliers)
    X = np.concatenate([rmsnorm(h, go, spec.rms_eps) for h in hs], axis=0)
    cur = np.concatenate(st.seqs)
    Y = st.memory.Lc[cur]  # target: centred log P(. | current token)
    G = X.T @ X
    # + expected covariance of token_embd noise (relative `embd_noise`) reaching the
    #   output through the residual stream and the final norm, + ridge
    inv_rms2 = np.mean(1.0 / np.concatenate([np.mean(h * h, axis=1) for h in hs]))
    G += len(X) * spec.embd_noise**2 * inv_rms2 * np.diag(go * go)
    G += spec.ridge * np.trace(G) / D * np.eye(D)
    O = np.linalg.solve(G, X.T @ Y).T  # (V, D)
    W["output.weight"] = bf16_round(O)


def build_weights(train_ids: list[int], spec: TinySpec) -> dict[str, np.ndarray]:
    """Construct all tensors (float64 arrays, BF16-representable where stored as BF16)."""
    spec.validate(N_VOCAB)
    if len(train_ids) < MIN_TRAIN_TOKENS:
        n = len(train_ids)
        raise TinyModelError(f"train_text: {n} tokens is too short (need at least {MIN_TRAIN_TOKENS})")
    D = spec.n_embd
    memory = bigram_memory(train_ids, spec)
    W: dict[str, np.ndarray] = {}
    W["token_embd.weight"], codes, m_hat = _token_embeddings(spec)
    outl = np.sort(rng(spec, "outliers").choice(D, size=min(spec.outlier_channels, D), replace=False))
    seqs = fit_sequences(train_ids, spec)
    hs = [W["token_embd.weight"][s] for s in seqs]  # running hidden states of the fit sample
    st = _Build(spec=spec, W=W, memory=memory, codes=codes, m_hat=m_hat, outliers=outl, seqs=seqs, hs=hs)
    for il in range(spec.n_layer):
        _attention_block(st, il)
        _ffn_block(st, il)
    _fit_output(st)
    return st.W
