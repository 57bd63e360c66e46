"""Is a file the engine wrote a whole, sound imatrix? Read back before it is renamed into
place, because llama-imatrix says "stored collected data" and exits 0 even when a full disk
cut the file short."""

from __future__ import annotations

from pathlib import Path

from ..errors import ImatrixFormatError
from ..gguf.reader import GGUFTable
from .fit import PER_HEAD, base_name
from .formats import Imatrix, read_any


def verify_collected(path: str | Path, model: GGUFTable, chunks: int) -> Imatrix:
    """Every value read (finite, >= 0), at least one entry, each named after a matrix of the
    model (or one the engine builds at load: attn_k_b/attn_v_b/attn_kv_b) with a whole number
    of its rows, and the chunk count the engine's log reported."""
    im = read_any(path)
    tensors = model.by_name()
    for name, e in im.entries.items():
        base = base_name(name)
        t = tensors.get(base)
        if t is None and not (base.startswith("blk.") and base.endswith(PER_HEAD)):
            raise ImatrixFormatError(f"{path}: entry {name} names no matrix of {model.path}")
        if t is not None and e.nval % t.shape[0]:
            raise ImatrixFormatError(f"{path}: entry {name} has {e.nval} values, not a multiple of "
                                     f"the tensor's row length {t.shape[0]}")
        e.values  # noqa: B018 - reads and checks them
    if im.chunks != chunks:
        raise ImatrixFormatError(f"{path}: says {im.chunks} chunks, the engine's log says {chunks}")
    return im
