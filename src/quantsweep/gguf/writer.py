"""Writing GGUF headers: the KV and tensor-info encoding shared by every GGUF quantsweep
writes itself (mainline imatrix files, shape-only models for llama-quantize --dry-run).

gguf-py's GGUFWriter cannot write ik-only type ids and buffers whole tensors; these writers
stream, so the header is built here and the data is appended by the caller.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..fileio import partial_path
from .reader import _SCALAR, GGUF_MAGIC, GGUFTable

DEFAULT_ALIGNMENT = 32
_UINT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _INT64 = 4, 6, 7, 8, 9, 11


def gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, value) -> bytes:
    """One KV: bool, int (uint32, or int64 outside its range), float (f32), str, or a list of str."""
    if isinstance(value, bool):
        body = struct.pack("<I?", _BOOL, value)
    elif isinstance(value, int):
        body = struct.pack("<II", _UINT32, value) if 0 <= value < 2**32 else struct.pack("<Iq", _INT64, value)
    elif isinstance(value, float):
        body = struct.pack("<If", _FLOAT32, value)
    elif isinstance(value, str):
        body = struct.pack("<I", _STRING) + gguf_string(value)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        body = struct.pack("<IIQ", _ARRAY, _STRING, len(value)) + b"".join(gguf_string(v) for v in value)
    else:
        raise TypeError(f"KV {key}: cannot encode a {type(value).__name__}")
    return gguf_string(key) + body


def encode_kv_as(key: str, vtype: int, value) -> bytes:
    """One KV of a given GGUF value type (a scalar type or string). A value replaced in a file
    keeps the type it had: the engine's loader refuses a key of the wrong type (general.file_type
    is a uint32 in the files it writes), so encode_kv's choice of type is not enough there."""
    if vtype == _STRING:
        ok = isinstance(value, str)
    elif vtype == _BOOL:
        ok = isinstance(value, bool)
    elif _SCALAR.get(vtype) in ("<f", "<d"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = vtype in _SCALAR and isinstance(value, int) and not isinstance(value, bool)
    try:
        if ok:
            body = gguf_string(value) if vtype == _STRING else struct.pack(_SCALAR[vtype], value)
            return gguf_string(key) + struct.pack("<I", vtype) + body
    except (struct.error, OverflowError):
        pass
    raise TypeError(f"KV {key}: cannot encode {value!r} as GGUF value type {vtype}")


def tensor_info(name: str, shape: tuple[int, ...], type_id: int, offset: int) -> bytes:
    """One tensor info record: name, dims, shape (ne0 first), type id, offset in the data section."""
    return gguf_string(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, type_id, offset)


def padded(n: int, alignment: int = DEFAULT_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def header(kvs: list[tuple[str, object]], tensors: list[tuple[str, tuple[int, ...], int, int]],
           alignment: int = DEFAULT_ALIGNMENT) -> bytes:
    """A GGUF v3 header: KVs, tensor infos (name, shape, type id, offset), padded to alignment."""
    out = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, value in kvs:
        out += encode_kv(key, value)
    for name, shape, type_id, offset in tensors:
        out += tensor_info(name, shape, type_id, offset)
    out += b"\0" * (-len(out) % alignment)
    return bytes(out)


def write_shape_gguf(table: GGUFTable, path: str | Path, alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Write a GGUF with `table`'s KVs and tensor infos and all-zero tensor data (a sparse file).

    llama-quantize --dry-run reads only headers and (zero) data pages, so this lets the engine
    select types for a model shape without its weights. Scalar KVs only (arrays are dropped).
    Returns the file size."""
    kvs = [(k, v) for k, v in table.kv.items()
           if k != "general.alignment" and v is not None and not isinstance(v, (list, tuple))]
    infos, offset = [], 0
    for t in table.tensors:
        infos.append((t.name, t.shape, t.type_id, offset))
        offset += padded(t.nbytes, alignment)
    head = header(kvs, infos, alignment)
    with partial_path(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        f.truncate(len(head) + offset)
    return len(head) + offset
