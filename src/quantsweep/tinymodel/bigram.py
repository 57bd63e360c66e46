"""The knowledge of the tiny model: a smoothed byte-bigram of the training text, its
low-rank factors (the values the layer-0 memory writes) and the fit sample of the text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .draws import normal
from ..settings.tiny import TinySpec
from .tokenizer import BOS_ID, N_VOCAB


def log_bigram(ids: list[int], smoothing: float) -> np.ndarray:
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


@dataclass(frozen=True)
class BigramMemory:
    """What the memory stores and the output fit targets."""

    Lc: np.ndarray  # (V cur, V next) centred log-bigram rows: the target logits
    freq: np.ndarray  # (V,) token counts of the text, BOS included
    Q: np.ndarray  # (D, r) orthonormal basis of the value subspace of the residual stream
    values: np.ndarray  # (V, D) per-token value: its rank-r bigram factor embedded by Q


def bigram_memory(train_ids: list[int], spec: TinySpec) -> BigramMemory:
    """Rank-``bigram_rank`` factors of the log-bigram, weighted towards frequent contexts."""
    D, V, r = spec.n_embd, N_VOCAB, spec.bigram_rank
    L = log_bigram(train_ids, spec.smoothing)  # (V cur, V next)
    Lc = L - L.mean(axis=1, keepdims=True)
    freq = np.bincount(np.concatenate([[BOS_ID], train_ids]), minlength=V).astype(np.float64)
    wrow = np.sqrt(freq + 1.0)  # weight frequent contexts in the low-rank fit
    U, S, _ = np.linalg.svd(Lc * wrow[:, None], full_matrices=False)
    F = (U[:, :r] * np.sqrt(S[:r])[None, :]) / wrow[:, None]  # (V, r)
    F *= np.where(F[np.argmax(np.abs(F), axis=0), np.arange(r)] < 0, -1.0, 1.0)[None, :]  # fix SVD signs
    Q, _ = np.linalg.qr(normal(spec, "value_basis", (D, r)))  # (D, r) orthonormal columns
    return BigramMemory(Lc=Lc, freq=freq, Q=Q, values=F @ Q.T)


def fit_sequences(ids: list[int], spec: TinySpec, chunk: int = 512) -> list[np.ndarray]:
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
