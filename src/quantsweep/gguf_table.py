"""A GGUF header reader for tensor tables, ik-only type ids included.

PyPI gguf's GGUFReader raises on ik's type ids (IQ2_KS, IQ4_KS, IQ3_K, ...), which every
quant of this pipeline has, so the tensor table of a quantized file is read here. Only the
header is read; tensor data is never touched, so a 700 GB model is read in milliseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .ggml_types import tensor_nbytes, type_name

GGUF_MAGIC = b"GGUF"
# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF; the message names the file and the offset."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 first
    type_id: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def type(self) -> str:
        return type_name(self.type_id)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type_id, self.shape)


@dataclass
class GGUFTable:
    path: Path
    version: int
    kv: dict
    tensors: list[TensorInfo]
    data_offset: int

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bpw(self) -> float:
        return 8.0 * self.total_bytes / self.n_elements if self.n_elements else 0.0


class _Reader:
    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        pos = self.f.tell()
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFFormatError(f"{self.path}: truncated at offset {pos} (wanted {n} bytes)")
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 30:
            raise GGUFFormatError(f"{self.path}: string length {n} at offset {self.f.tell() - 8} is implausible")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALAR and not keep:
                self.f.seek(struct.calcsize(_SCALAR[etype]) * n, 1)
                return None
            items = [self.value(etype, keep) for _ in range(n)]
            return items if keep else None
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype} at offset {self.f.tell() - 4}")


def read_table(path: str | Path, keep_arrays: bool = False) -> GGUFTable:
    """Read the header and tensor infos. Arrays in KVs (the vocabulary) are skipped unless asked."""
    path = Path(path)
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if r.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (bad magic at offset 0)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        kv = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.scalar("<I"), keep_arrays)
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > 4:
                raise GGUFFormatError(f"{path}: tensor {name} has {n_dims} dims at offset {f.tell() - 4}")
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            type_id, offset = r.scalar("<I"), r.scalar("<Q")
            infos.append(TensorInfo(name, shape, type_id, offset))
        align = int(kv.get("general.alignment", 32))
        pos = f.tell()
        data_offset = (pos + align - 1) // align * align
    return GGUFTable(path=path, version=version, kv=kv, tensors=infos, data_offset=data_offset)
