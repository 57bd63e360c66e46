"""What each engine job needs from a scheduler (RAM, disk, time), from the model's GGUF header.

The demo model is a few MB; DeepSeek-V3/R1 at bf16 is 1.34 TB. imatrix and perplexity hold
the whole model in memory (mmap'd, resident while they run); quantize streams it tensor by
tensor, needs the largest tensor as f32 a few times over, and writes its output to disk.
Every figure grows on a retry (Snakemake's `attempt`), so a job killed for memory or time
gets more the next time. The figures are estimates: profiles may override them per rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .hf.checkpoint import Checkpoint
from .gguf.reader import GGUFTable, read_model, shards
from .imatrix.fit import expected_size
from .planner.plan import plan
from .planner.pool import pool_recipe
from .planner.recipes import recipe_or_ftype

MiB = 2**20


@dataclass(frozen=True)
class ModelSize:
    """What the estimates need to know about a model."""

    bytes: int              # tensor data, all shards
    largest_elements: int   # elements of the largest tensor
    imatrix_values: int     # floats in a full imatrix (sum of ne0 * ne2 over matrices)
    n_vocab: int

    @classmethod
    def of_table(cls, table: GGUFTable) -> ModelSize:
        """From a model's table (all shards of a split model: gguf.reader.read_model)."""
        ts, kv = table.tensors, table.kv
        toks = kv.get("tokenizer.ggml.tokens")
        vocab = int(kv.get(f"{kv.get('general.architecture')}.vocab_size", 0)) or (
            len(toks) if isinstance(toks, list) else 0)
        return cls(
            bytes=sum(t.nbytes for t in ts),
            largest_elements=max((t.n_elements for t in ts), default=0),
            imatrix_values=sum(expected_size(t.shape) for t in ts if len(t.shape) >= 2),
            n_vocab=vocab,
        )


# Before the model exists (the demo generates it), Snakemake still asks: assume 1 GiB.
UNKNOWN = ModelSize(bytes=2**30, largest_elements=2**28, imatrix_values=2**22, n_vocab=2**17)


def model_size(path: str | Path) -> ModelSize:
    """From the headers of every shard (no tensor data is read); UNKNOWN while it is missing."""
    if not all(f.exists() for f in shards(path)):
        return UNKNOWN
    return ModelSize.of_table(read_model(path, keep_arrays=True))


def growth(attempt: int) -> float:
    """1x, 1.5x, 2x ... on retries: enough to clear an OOM or timeout without asking a 1.3 TB
    job for 2.6 TB on its second try."""
    return 1.0 + 0.5 * (max(attempt, 1) - 1)


def mem_mb_resident(m: ModelSize, attempt: int = 1) -> int:
    """imatrix / perplexity: the model resident plus compute buffers and logits."""
    return int((m.bytes * 1.05 / MiB + 2048 + 4 * m.n_vocab * 512 / MiB) * growth(attempt))


def mem_mb_quantize(m: ModelSize, attempt: int = 1) -> int:
    """quantize: the source is mmap'd page cache (reclaimable), not resident; what must fit is
    the largest tensor as f32 plus its quantized copy and the threads' work buffers (~3x)."""
    return int((3 * 4 * m.largest_elements / MiB + 4096) * growth(attempt))


def disk_mb_quantize(predicted_bytes: int, attempt: int = 1) -> int:
    """The output file (predicted from the header and the recipe) plus slack."""
    return int((predicted_bytes * 1.05 / MiB + 1024) * growth(attempt))


def disk_mb_imatrix(m: ModelSize, attempt: int = 1) -> int:
    """One .dat: 4 bytes per value plus names."""
    return int((4 * m.imatrix_values / MiB + 64) * growth(attempt))


def disk_mb_kld_base(m: ModelSize, ctx: int, chunks: int, attempt: int = 1) -> int:
    """The KLD base logits: per chunk, the second half of the context's tokens, each a
    uint16 per vocabulary entry (ik perplexity --kl-divergence-base)."""
    return int((chunks * (ctx // 2) * (m.n_vocab + 5) * 2 / MiB + 64) * growth(attempt))


def runtime_min(m: ModelSize, tokens: int = 0, attempt: int = 1) -> int:
    """Minutes: 30 plus ~1 min per GB of model, more when many tokens go through it (imatrix,
    perplexity): a rough CPU figure that a GPU beats; a site profile sets its own."""
    gb = m.bytes / 1e9
    return int((30 + gb * (1 + tokens / 32768)) * growth(attempt))


def predicted_bytes(model: str | Path, recipe_or_ftype_name: str, has_imatrix: bool) -> int:
    """The quantized file's size from the model's header (every shard) and the recipe: the
    size plan. Until the model exists (the demo generates it), UNKNOWN's size."""
    return _planned_bytes(model, lambda: recipe_or_ftype(recipe_or_ftype_name), has_imatrix)


def predicted_pool_bytes(model: str | Path, typ: str) -> int:
    """A pool file's size (every tensor asked for `typ`), as predicted_bytes."""
    return _planned_bytes(model, lambda: pool_recipe(typ), True)


def _planned_bytes(model: str | Path, spec, has_imatrix: bool) -> int:
    if not all(f.exists() for f in shards(model)):
        return UNKNOWN.bytes
    return plan(read_model(model), spec(), has_imatrix=has_imatrix, strict=False).total_bytes


def mem_mb_convert(ck: Checkpoint, attempt: int = 1) -> int:
    """convert: the converter is lazy (tensors are read and written one at a time); the most it
    holds is one layer's merged routed-expert stack, computed in float32 (FP8 dequantized), plus
    its converted copy and the stacking's temporaries (~3x)."""
    return int((3 * 4 * ck.largest_output_elements() / MiB + 4096) * growth(attempt))


def disk_mb_convert(ck: Checkpoint, outtype: str, attempt: int = 1) -> int:
    """The GGUF (predicted from the checkpoint's headers and the outtype) plus slack: it is written
    once, under a temp name that is then renamed."""
    return int((ck.output_bytes(outtype) * 1.05 / MiB + 1024) * growth(attempt))


def runtime_min_convert(ck: Checkpoint, outtype: str, attempt: int = 1) -> int:
    """Minutes: 30 plus the checkpoint read and the GGUF written at ~100 MB/s (the converter is
    single-threaded): GB / 6. A rough figure that a site profile overrides."""
    gb = (ck.total_bytes() + ck.output_bytes(outtype)) / 1e9
    return int((30 + gb / 6) * growth(attempt))
