"""A quant as the Hub gets it: split by the engine's llama-gguf-split into shards no larger than
the limit, shard 1 carrying the published metadata (general.* keys, no machine path), and the
checks that the shards are that quant: sizes, joined bytes, and the engine's own load and PPL.

llama-gguf-split counts only tensor data against --split-max-size; the header comes on top, so
the engine is asked for the limit less shard 1's header (the quant's, plus what is added here)
and each shard's file size is then checked against the limit itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..engine import run
from ..errors import PublishError
from ..gguf.assemble import assemble, pieces, tensor_data_diff
from ..gguf.reader import GGUFTable, read_model, read_table, shards
from ..gguf.writer import padded

HEADER_SLACK = 64 << 10  # room in shard 1 for the keys set here and the split.* keys
# A string value that reads as a path of the machine that made it (absolute, home-relative or a
# Windows drive); tokenizer arrays are not looked at (a token may well be "/").
MACHINE_PATH = re.compile(r"^(?:/|~/|[A-Za-z]:[\\/])")


def shard_prefix(out_dir: Path, name: str, quant: str) -> Path:
    """<out_dir>/<Name>-<QUANT>: the engine appends -0000K-of-0000N.gguf."""
    return out_dir / f"{name}-{quant}"


def engine_limit_mb(table: GGUFTable, max_bytes: int, what: str) -> int:
    """The --split-max-size (in M) that keeps every shard file within `max_bytes`; PublishError
    when a single tensor (or shard 1's header) is already larger."""
    room = max_bytes - table.data_offset - HEADER_SLACK
    mb = room // 10**6
    big = max(table.tensors, key=lambda t: t.nbytes)
    if mb < 1 or padded(big.nbytes) > mb * 10**6:
        raise PublishError(f"publish.split_max_size: {max_bytes} bytes cannot hold {what}: its tensor {big.name} "
                           f"is {big.nbytes} bytes and shard 1's header {table.data_offset} (raise the limit)")
    return mb


def split(bin_dir: Path, gguf: Path, work: Path, out_dir: Path, name: str, quant: str, max_bytes: int,
          set_kv: dict, log: Path) -> list[Path]:
    """The quant's shards in out_dir: split in `work` by the engine, shard 1 rewritten there with
    `set_kv` over its metadata (tensor bytes as written), the others moved; returns the shards."""
    table = read_table(gguf)
    mb = engine_limit_mb(table, max_bytes, f"{gguf.name}")
    work.mkdir(parents=True, exist_ok=True)
    made = run.gguf_split(bin_dir, gguf, shard_prefix(work, name, quant), log=log, max_mb=mb)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = read_table(made[0])
    assemble(first, pieces(first), out_dir / made[0].name, set_kv=set_kv)
    made[0].unlink()
    for f in made[1:]:
        os.replace(f, out_dir / f.name)
    return [out_dir / f.name for f in made]


def machine_paths(table: GGUFTable) -> list[str]:
    """The metadata keys whose string value is a path of the machine (`key = value`)."""
    return [f"{k} = {v}" for k, v in table.kv.items() if isinstance(v, str) and MACHINE_PATH.match(v)]


def check_shards(files: list[Path], max_bytes: int, unsplit: Path, work: Path, bin_dir: Path, log: Path) -> str:
    """Every shard within the limit and named as the engine finds them; the shards joined by
    llama-gguf-split --merge hold the unsplit quant's tensors byte for byte; no key names a
    machine path. Returns the one line it logs; PublishError naming the file otherwise."""
    if files != shards(files[0]):
        raise PublishError(f"{files[0]}: the shards are not {len(shards(files[0]))} files named -0000K-of-0000N")
    for f in files:
        size = f.stat().st_size
        if size > max_bytes:
            raise PublishError(f"{f}: {size} bytes, more than publish.split_max_size ({max_bytes})")
    table = read_model(files[0])
    if bad := machine_paths(table):
        raise PublishError(f"{files[0]}: metadata names a machine path: {bad[0]}")
    if int(table.kv.get("split.count", 0)) != len(files):
        raise PublishError(f"{files[0]}: split.count is {table.kv.get('split.count')}, {len(files)} shards exist")
    merged = work / "merged.gguf"
    try:
        run.gguf_merge(bin_dir, files[0], merged, log)
        if diff := tensor_data_diff(merged, unsplit):
            raise PublishError(f"{files[0]}: joined, the shards differ from {unsplit.name}: {diff[0]}")
    finally:
        merged.unlink(missing_ok=True)
    return (f"{files[0].name}: {len(files)} shards, largest {max(f.stat().st_size for f in files)} bytes "
            f"<= {max_bytes}; joined = {unsplit.name}'s {len(table.tensors)} tensors byte for byte")


def check_loads(bin_dir: Path, first: Path, unsplit: Path, text: Path, ev, threads: int, log: Path) -> dict:
    """The engine loads shard 1 (and so every shard) and scores the first ev.chunks chunks of the
    evaluation text exactly as it scores the unsplit quant: same per-chunk and final PPL.
    Returns the numbers."""
    got = [run.perplexity(bin_dir, f, text, log, ev, threads) for f in (unsplit, first)]
    a, b = ({k: g[k] for k in ("chunk_ppl", "ppl", "ppl_err")} for g in got)
    if a != b:
        raise PublishError(f"{first}: the engine scores the shards {b} but the unsplit {unsplit.name} {a} "
                           f"on {ev.chunks} chunks; see {log}")
    return {"chunks": len(a["chunk_ppl"]), "ppl": a["ppl"], "ppl_err": a["ppl_err"]}
