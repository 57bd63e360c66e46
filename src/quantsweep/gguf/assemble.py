"""Assembling a GGUF out of the tensor data of other GGUFs.

llama-quantize quantizes each tensor on its own, so a recipe's model (each tensor at its own
type) holds the same bytes per tensor as a pool of files quantized with every tensor at one
type. Copying those bytes, under a template's metadata, gives the recipe's model without
quantizing again; tensor_data_diff proves an assembled file equal to what the engine wrote.

The layout is the one llama-quantize writes (src/llama-quantize.cpp): the header (KVs, tensor
infos) padded to the alignment, then each tensor's data followed by zeros up to the alignment,
the last tensor included, with each offset the previous one plus its padded size.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import GGUFFormatError
from ..fileio import partial_path
from .reader import _SCALAR, GGUF_MAGIC, GGUFTable, TensorInfo, read_model, read_table
from .writer import _STRING, DEFAULT_ALIGNMENT, encode_kv, encode_kv_as, padded, tensor_info

_COPY_STEP = 64 << 20  # bytes per kernel copy call (no user-space buffer)
_READ_STEP = 16 << 20  # bytes per read where the kernel cannot copy, and per compared chunk


@dataclass(frozen=True)
class Piece:
    """Where one output tensor's bytes come from: tensor `info` of the single GGUF file `path`,
    whose data section starts at byte `data_offset` (a shard's own, for split models)."""

    name: str
    path: Path
    info: TensorInfo
    data_offset: int

    @property
    def start(self) -> int:
        return self.data_offset + self.info.offset

    @property
    def nbytes(self) -> int:
        return self.info.nbytes


def pieces(table: GGUFTable) -> dict[str, Piece]:
    """Every tensor of a table from read_table or read_model. Split models are supported: a
    tensor's offset counts from its own shard's data section, so each shard's header is read
    (headers only: milliseconds) for its data offset."""
    files = table.files or [table.path]
    offsets = [table.data_offset] + [read_table(f, shard=i).data_offset for i, f in enumerate(files) if i]
    return {t.name: Piece(t.name, files[t.shard], t, offsets[t.shard]) for t in table.tensors}


def _kv_records(template: GGUFTable, set_kv: Mapping[str, object], drop: set[str]) -> list[bytes]:
    """The output's KV records: the template's, raw and in its order, less `drop`, with `set_kv`
    re-encoded in place (keeping the template's type where it is a scalar or string) and new
    keys appended in set_kv's order."""
    spans = template.kv_spans
    if template.kv and not spans:
        raise GGUFFormatError(f"{template.path}: template table has no KV byte spans "
                              "(read it with read_table or read_model)")
    records = []
    if spans:
        first, last = min(s for s, _ in spans.values()), max(e for _, e in spans.values())
        with open(template.path, "rb") as f:
            f.seek(first)
            raw = f.read(last - first)
        if len(raw) != last - first:
            raise GGUFFormatError(f"{template.path}: truncated: its KVs end at byte {last}, the file is shorter")
        for key, (start, end) in spans.items():
            if key in drop:
                continue
            record = raw[start - first:end - first]
            if key in set_kv:
                n = struct.unpack_from("<Q", record)[0]
                vtype = struct.unpack_from("<I", record, 8 + n)[0]
                keep = vtype in _SCALAR or vtype == _STRING
                record = encode_kv_as(key, vtype, set_kv[key]) if keep else encode_kv(key, set_kv[key])
            records.append(record)
    records += [encode_kv(k, v) for k, v in set_kv.items() if k not in spans]
    return records


def _alignment(template: GGUFTable, set_kv: Mapping[str, object], drop: set[str]) -> int:
    if "general.alignment" in set_kv:
        align = set_kv["general.alignment"]
    elif "general.alignment" in drop:
        align = DEFAULT_ALIGNMENT
    else:
        align = template.kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1):
        raise GGUFFormatError(f"{template.path}: general.alignment would be {align!r} (must be a power of 2)")
    return align


def _write_all(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _copy(src: int, f: BinaryIO, piece: Piece) -> None:
    """piece.nbytes bytes of open file `src` to f's position, in bounded steps: a kernel copy
    (copy_file_range, as cp does) where it works, else reads of _READ_STEP bytes."""
    pos, end = piece.start, piece.start + piece.nbytes
    kernel = hasattr(os, "copy_file_range")
    while pos < end:
        got = -1
        if kernel:
            try:
                got = os.copy_file_range(src, f.fileno(), min(end - pos, _COPY_STEP), pos)
            except OSError:  # not this filesystem pair (or kernel): copy through user space
                kernel = False
        if got < 0:
            chunk = os.pread(src, min(end - pos, _READ_STEP), pos)
            _write_all(f, chunk)
            got = len(chunk)
        if got == 0:
            raise GGUFFormatError(f"{piece.path}: truncated: tensor {piece.name} ends at byte {end}, "
                                  f"the file ends at {pos}")
        pos += got


def assemble(template: GGUFTable, sources: Mapping[str, Piece], out: str | Path,
             set_kv: Mapping[str, object] = {}, drop_kv: Iterable[str] = ()) -> int:
    """Write `out`: the template's KVs (raw, see _kv_records) and tensors (names, shapes, order),
    each tensor's type and bytes from sources[name], laid out as llama-quantize does (module
    docstring) at the output's general.alignment (32 unless set). Written to a temp name and
    renamed, so an error leaves nothing behind. Returns the file size."""
    drop = set(drop_kv)
    if both := sorted(drop & set(set_kv)):
        raise ValueError(f"KV(s) {', '.join(both)} both set and dropped")
    records = _kv_records(template, set_kv, drop)
    align = _alignment(template, set_kv, drop)
    head = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(template.tensors), len(records)))
    head += b"".join(records)
    plan, offset = [], 0
    for t in template.tensors:
        p = sources.get(t.name)
        if p is None:
            raise GGUFFormatError(f"tensor {t.name} of {template.path}: no source has it")
        if p.info.shape != t.shape:
            raise GGUFFormatError(f"tensor {t.name}: shape {list(p.info.shape)} in {p.path}, "
                                  f"{list(t.shape)} in template {template.path}")
        head += tensor_info(t.name, t.shape, p.info.type_id, offset)
        plan.append(p)
        offset += padded(p.nbytes, align)
    head += b"\0" * (-len(head) % align)
    with contextlib.ExitStack() as stack:
        fds: dict[Path, int] = {}
        for p in plan:
            if p.path not in fds:
                fds[p.path] = os.open(p.path, os.O_RDONLY)
                stack.callback(os.close, fds[p.path])
        with partial_path(out) as tmp, open(tmp, "wb", buffering=0) as f:  # unbuffered: one position
            _write_all(f, head)
            for p in plan:
                _copy(fds[p.path], f, p)
                _write_all(f, b"\0" * (padded(p.nbytes, align) - p.nbytes))
    return len(head) + offset


def _first_difference(a: Piece, b: Piece, fds: dict[Path, int]) -> int | None:
    """The first byte at which two tensors' data (of equal size) differ; None if they do not."""
    for pos in range(0, a.nbytes, _READ_STEP):
        n = min(_READ_STEP, a.nbytes - pos)
        x, y = (os.pread(fds[p.path], n, p.start + pos) for p in (a, b))
        for p, chunk in ((a, x), (b, y)):
            if len(chunk) != n:
                raise GGUFFormatError(f"{p.path}: truncated: tensor {p.name} ends at byte {p.start + p.nbytes}")
        if x != y:
            return pos + int(np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8))[0])
    return None


def tensor_data_diff(a: str | Path, b: str | Path) -> list[str]:
    """How the tensors of GGUF models a and b (single files or split) differ: names, order,
    shapes, type ids and data bytes, one line per difference; [] means identical tensor data
    (metadata and padding are not compared). This is the proof that an assembled file holds what
    llama-quantize wrote."""
    pa, pb = pieces(read_model(a)), pieces(read_model(b))
    lines = [f"tensor {n}: in {a}, not in {b}" for n in pa if n not in pb]
    lines += [f"tensor {n}: in {b}, not in {a}" for n in pb if n not in pa]
    order_a, order_b = [n for n in pa if n in pb], [n for n in pb if n in pa]
    if order_a != order_b:
        i = next(i for i, (x, y) in enumerate(zip(order_a, order_b)) if x != y)
        lines.append(f"tensor order differs from position {i}: {order_a[i]} in {a}, {order_b[i]} in {b}")
    with contextlib.ExitStack() as stack:
        fds: dict[Path, int] = {}
        for p in [*pa.values(), *pb.values()]:
            if p.path not in fds:
                fds[p.path] = os.open(p.path, os.O_RDONLY)
                stack.callback(os.close, fds[p.path])
        for name in order_a:
            x, y = pa[name], pb[name]
            if x.info.shape != y.info.shape:
                lines.append(f"tensor {name}: shape {list(x.info.shape)} in {a}, {list(y.info.shape)} in {b}")
            elif x.info.type_id != y.info.type_id:
                lines.append(f"tensor {name}: type {x.info.type} ({x.info.type_id}) in {a}, "
                             f"{y.info.type} ({y.info.type_id}) in {b}")
            elif (at := _first_difference(x, y, fds)) is not None:
                lines.append(f"tensor {name}: data differs from byte {at} of {x.nbytes} ({a} vs {b})")
    return lines
