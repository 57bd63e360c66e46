"""The engine's own binary outputs that quantsweep reads back: the KLD base logits file of
llama-perplexity (examples/perplexity/perplexity.cpp:494-557, process_logits 193-223)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineOutputError
from ..gguf.reader import GGUFTable

KLD_MAGIC = b"_logits_"


@dataclass(frozen=True)
class KldBase:
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def nbytes(self) -> int:
        """"_logits_", n_ctx, n_vocab, n_chunk, the tokens (int32), then per chunk the scored
        second half of the window: n_ctx - 1 - n_ctx/2 rows of nv uint16 log-probs."""
        nv = 2 * ((self.n_vocab + 1) // 2) + 4
        rows = self.n_ctx - 1 - self.n_ctx // 2
        return 8 + 12 + 4 * self.n_chunk * self.n_ctx + 2 * self.n_chunk * rows * nv


def _header(path: Path) -> KldBase:
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != KLD_MAGIC:
        raise EngineOutputError(f"{path}: not a KLD base logits file (no '_logits_' header)")
    return KldBase(*struct.unpack("<iii", head[8:20]))


def kld_base_header(path: str | Path, ctx: int, chunks: int | None, n_vocab: int) -> KldBase:
    """The base file's header, checked against the evaluation (context, chunks, the model's
    vocabulary) and its size against what that header says it holds."""
    path = Path(path)
    base = _header(path)
    want = {"n_ctx": ctx, "n_vocab": n_vocab, "n_chunk": chunks}
    for key, value in want.items():
        if value is not None and getattr(base, key) != value:
            raise EngineOutputError(f"{path}: {key} is {getattr(base, key)}, the evaluation has {value}")
    if base.n_chunk < 1:
        raise EngineOutputError(f"{path}: holds {base.n_chunk} chunks")
    size = path.stat().st_size
    if size != base.nbytes:
        raise EngineOutputError(f"{path}: {size} bytes, its header ({base.n_chunk} chunks of {base.n_ctx} tokens, "
                                f"vocabulary {base.n_vocab}) says {base.nbytes}")
    return base


def vocab_size(model: GGUFTable) -> int:
    """The vocabulary the engine uses: rows of token_embd (the tokenizer's length)."""
    emb = model.by_name().get("token_embd.weight")
    if emb is None or len(emb.shape) < 2:
        raise EngineOutputError(f"{model.path}: no 2-D token_embd.weight to tell the vocabulary size")
    return emb.shape[1]


def kld_base_tokens(path: str | Path) -> list[int]:
    """The token ids the base run evaluated (as tokenized, before BOS replaces each chunk's
    first): what a reference implementation must be given to compute the same perplexity."""
    import numpy as np

    base = _header(Path(path))
    return np.fromfile(path, dtype="<i4", count=base.n_chunk * base.n_ctx, offset=20).tolist()
