"""A GGUF header reader for tensor tables, ik-only type ids and split models included.

PyPI gguf's GGUFReader raises on ik's type ids (IQ2_KS, IQ4_KS, IQ3_K, ...), which every
quant of this pipeline has, so the tensor table of a quantized file is read here. Only the
header is read; tensor data is never touched, so a 700 GB model is read in milliseconds.

A split model (`name-00001-of-00003.gguf`, as llama-gguf-split writes it) keeps its metadata
in shard 1 only; the other shards carry just `split.*` keys and their tensors. `read_model`
joins the shards into one table in the engine's order (shard by shard), which is what the
planner, the imatrix fit and the resource estimates need.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GGUFFormatError
from .types import TYPES, tensor_nbytes, type_name

GGUF_MAGIC = b"GGUF"
# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_DIM = 1 << 40  # no real tensor has a dimension near this; a larger one is a corrupt header
_SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 first
    type_id: int
    offset: int  # from the start of its file's data section
    shard: int = 0  # index of the file that holds it (split models)

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
    path: Path  # the file (shard 1 of a split model)
    version: int
    kv: dict
    tensors: list[TensorInfo]
    data_offset: int
    files: list[Path] = field(default_factory=list)  # every shard, in order ([] = just `path`)
    # key -> [start, end) byte offsets in `path` of its whole KV record (key, value type, value), in
    # file order: what an assembled GGUF copies verbatim (arrays like the vocabulary included)
    kv_spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def arch_kv(self, key: str, default=None):
        """`<architecture>.<key>`; per-layer arrays (e.g. head_count) give their first value."""
        v = self.kv.get(f"{self.kv.get('general.architecture', '')}.{key}", default)
        return v[0] if isinstance(v, (list, tuple)) and v else v

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

    def tensor_info(self, shard: int) -> TensorInfo:
        name = self.string()
        n_dims = self.scalar("<I")
        if n_dims > 4:
            raise GGUFFormatError(f"{self.path}: tensor {name} has {n_dims} dims at offset {self.f.tell() - 4}")
        shape = tuple(self.scalar("<Q") for _ in range(n_dims))
        type_id, offset = self.scalar("<I"), self.scalar("<Q")
        if any(d < 1 or d > MAX_DIM for d in shape):
            raise GGUFFormatError(f"{self.path}: tensor {name} declares shape {list(shape)} "
                                  f"(every dimension must be 1..2^40)")
        if type_id not in TYPES:
            raise GGUFFormatError(f"{self.path}: tensor {name} has ggml type id {type_id}, "
                                  "which quantsweep's type table does not know")
        return TensorInfo(name, shape, type_id, offset, shard)


def read_table(path: str | Path, keep_arrays: bool = False, shard: int = 0) -> GGUFTable:
    """Read one file's header and tensor infos. Arrays in KVs (the vocabulary) are skipped
    unless asked."""
    path = Path(path)
    if path.is_dir():
        raise GGUFFormatError(f"{path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if r.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (bad magic at offset 0)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        kv, spans = {}, {}
        for _ in range(n_kv):
            start = f.tell()
            key = r.string()
            kv[key] = r.value(r.scalar("<I"), keep_arrays)
            spans[key] = (start, f.tell())
        infos = [r.tensor_info(shard) for _ in range(n_tensors)]
        align = kv.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1 or align & (align - 1):
            raise GGUFFormatError(f"{path}: general.alignment is {align!r} (must be a power of 2)")
        pos = f.tell()
        data_offset = (pos + align - 1) // align * align
    table = GGUFTable(path=path, version=version, kv=kv, tensors=infos, data_offset=data_offset, files=[path],
                      kv_spans=spans)
    _check_data(table, align)
    return table


def _check_data(table: GGUFTable, align: int) -> None:
    """Every tensor aligned and inside the file: a file cut short (a full disk, a killed
    writer) or a header declaring absurd shapes is refused here, before anything trusts it."""
    size = table.path.stat().st_size
    for t in table.tensors:
        if t.offset % align:
            raise GGUFFormatError(f"{table.path}: tensor {t.name} at data offset {t.offset} is not aligned to {align}")
        end = table.data_offset + t.offset + t.nbytes
        if end > size:
            raise GGUFFormatError(f"{table.path}: truncated: tensor {t.name} ends at byte {end}, "
                                  f"the file has {size}")


def data_end(table: GGUFTable) -> int:
    """Where the last tensor's data ends (the file's size, give or take the final padding)."""
    ends = [table.data_offset + t.offset + t.nbytes for t in table.tensors]
    return max(ends, default=table.data_offset)


def verify_complete(path: str | Path) -> GGUFTable:
    """A GGUF an engine tool just wrote: a readable header and tensor table, every tensor's
    data present, and nothing after the last tensor but its alignment padding."""
    table = read_table(path)
    size, end = table.path.stat().st_size, data_end(table)
    align = int(table.kv.get("general.alignment", 32))
    if size > (end + align - 1) // align * align:
        raise GGUFFormatError(f"{table.path}: {size - end} bytes after the last tensor's data (ends at byte {end})")
    if not table.tensors:
        raise GGUFFormatError(f"{table.path}: has no tensors")
    return table


def shards(path: str | Path) -> list[Path]:
    """The files of a model: every shard of a split GGUF (given any one of them), else the file."""
    path = Path(path)
    m = _SHARD.match(path.name)
    if not m:
        return [path]
    n = int(m.group(3))
    return [path.with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def first_shard(path: str | Path) -> Path:
    """What the engine must be given for a split model: shard 1 (it finds the others)."""
    return shards(path)[0]


def read_model(path: str | Path, keep_arrays: bool = False) -> GGUFTable:
    """A model's table: one file, or all shards of a split model joined (metadata from shard 1,
    tensors in shard order), given any shard's path."""
    files = shards(path)
    if Path(path).is_dir():
        raise GGUFFormatError(f"{path}: is a directory, not a GGUF file")
    if not Path(path).exists():
        raise GGUFFormatError(f"{path}: does not exist")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise GGUFFormatError(f"{path}: split model lacks shard(s) {', '.join(missing)}")
    tables = [read_table(f, keep_arrays=keep_arrays and i == 0, shard=i) for i, f in enumerate(files)]
    head = tables[0]
    count = head.kv.get("split.count")
    if len(files) > 1 and count is not None and int(count) != len(files):
        raise GGUFFormatError(f"{head.path}: split.count is {count} but the file name says {len(files)} shards")
    if len(files) == 1:
        return head
    return GGUFTable(path=head.path, version=head.version, kv=head.kv,
                     tensors=[t for table in tables for t in table.tensors], data_offset=head.data_offset,
                     files=files, kv_spans=head.kv_spans)
