"""Imatrix files: ik_llama.cpp's legacy .dat format and mainline's GGUF imatrix, read lazily.

Layout (ik imatrix.cpp save_imatrix; little-endian, no magic):
    int32 n_entries; n_entries x {int32 name_len; name; int32 ncall; int32 nval; f32 values[nval]}
    [int32 chunks; int32 dataset_len; dataset]          (optional trailer)
values[i] = mean(x_i^2) * ncall, so files add: merging sums values and ncall.
Mainline GGUF imatrix: <name>.in_sum2 {ne0, n_mat} (raw sums) + <name>.counts {n_mat}.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GGUFFormatError, ImatrixFormatError
from ..fileio import GrowBuffer, PipeWriter, partial_path
from ..gguf.reader import read_table
from ..gguf.writer import header, padded


class _FileReader:
    """Reads float32 runs of one file into its own buffer (views valid until the next read)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        self._buf = GrowBuffer()

    def read(self, offset: int, n: int, what: str, out: np.ndarray | None = None) -> np.ndarray:
        """n float32 values at offset, into `out` if given, else into this reader's buffer."""
        out = self._buf.get(n) if out is None else out
        self._f.seek(offset)
        got = self._f.readinto(memoryview(out).cast("B"))
        if got != 4 * n:
            raise ImatrixFormatError(f"{self.path}: truncated at offset {offset + got} in the values of {what}")
        return out

    def fileno(self) -> int:
        return self._f.fileno()

    def __del__(self) -> None:
        self._f.close()


class Entry:
    """One matrix's statistics: ncall and values (= mean of x^2 * ncall, per expert/head slot).

    Values may be lazy (a loader reading them from the file on each access), so converting,
    merging or remapping a 1 GB imatrix holds one entry in memory at a time, not the file.
    A lazy entry's values are a view into a buffer its file reuses: copy them to keep them
    beyond the next read of the same file. A loader is `load(check=True, out=None)`: with
    `out` it fills and returns that array, so a writer's own buffers take the data directly.
    """

    __slots__ = ("ncall", "nval", "_values", "_load", "source", "checked")

    def __init__(self, ncall: int, values: np.ndarray | None = None, *, nval: int | None = None,
                 load: Callable[[], np.ndarray] | None = None, source: tuple[_FileReader, int] | None = None):
        self.ncall = ncall
        self.source = source  # (file, offset) where these values lie as .dat bytes, if they do
        self._values = None if values is None else np.asarray(values, dtype=np.float32)
        self._load = load
        self.nval = int(self._values.size if self._values is not None else nval)
        self.checked = False  # its values were read and checked once (a writer need not again)

    @property
    def values(self) -> np.ndarray:
        if self._values is not None:
            return self._values
        v = self._load()
        self.checked = True
        return v

    @property
    def means(self) -> np.ndarray:
        return self.values / self.ncall if self.ncall > 0 else self.values

    def into(self, out: np.ndarray) -> np.ndarray:
        """The (checked) values, written into `out`."""
        if self._values is not None:
            np.copyto(out, self._values)
            return out
        return self._load(out=out)

    def raw(self) -> np.ndarray:
        """Values without the finiteness check, for reporting on a bad file."""
        return self._values if self._values is not None else self._load(check=False)


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    chunks: int = 0
    dataset: str = ""
    trailer: bool = True  # the optional "chunks + dataset" tail of a .dat


def read_dat(path: str | Path) -> Imatrix:
    """Index a legacy .dat file; values are read (and checked for NaN/inf) when used."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            raise ImatrixFormatError(f"{path}: is a GGUF imatrix, not the legacy .dat format (convert it first)")
        f.seek(0)
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if pos + n > size:
                raise ImatrixFormatError(f"{path}: truncated at offset {pos} reading {what}")
            b = f.read(n)
            pos += n
            return b

        (n_entries,) = struct.unpack("<i", take(4, "entry count"))
        if n_entries < 0 or n_entries > size // 16:
            raise ImatrixFormatError(f"{path}: entry count {n_entries} at offset 0 is impossible for a {size}-byte file")
        im = Imatrix()
        reader = _FileReader(path)
        for i in range(n_entries):
            (nlen,) = struct.unpack("<i", take(4, f"name length of entry {i}"))
            if nlen <= 0 or nlen > 4096:
                raise ImatrixFormatError(f"{path}: entry {i} at offset {pos - 4} has name length {nlen}")
            name = take(nlen, f"name of entry {i}").decode("utf-8", errors="replace")
            ncall, nval = struct.unpack("<ii", take(8, f"ncall/nval of {name}"))
            if nval < 1:
                raise ImatrixFormatError(f"{path}: entry {i} ({name}) at offset {pos - 4} has nval {nval}")
            if ncall < 1:  # the engine stores only entries that saw data
                raise ImatrixFormatError(f"{path}: entry {i} ({name}) at offset {pos - 8} has ncall {ncall}")
            if name in im.entries:
                raise ImatrixFormatError(f"{path}: entry {i} ({name}) appears twice")
            if pos + 4 * nval > size:
                raise ImatrixFormatError(f"{path}: truncated at offset {size} in the values of entry {i} ({name})")
            im.entries[name] = Entry(ncall, nval=nval, load=_dat_loader(reader, pos, nval, i, name),
                                     source=(reader, pos))
            f.seek(4 * nval, 1)
            pos += 4 * nval
        im.trailer = pos < size
        if im.trailer:
            (im.chunks,) = struct.unpack("<i", take(4, "chunk count"))
            (dlen,) = struct.unpack("<i", take(4, "dataset length"))
            if dlen < 0:
                raise ImatrixFormatError(f"{path}: dataset length {dlen} at offset {pos - 4}")
            im.dataset = take(dlen, "dataset name").decode("utf-8", errors="replace")
        if pos != size:
            raise ImatrixFormatError(f"{path}: {size - pos} unexpected bytes at offset {pos}")
    if not im.entries:
        raise ImatrixFormatError(f"{path}: has no imatrix entries")
    return im


def _check_values(vals: np.ndarray, path: Path, what: str) -> None:
    """Sums of squares: finite and not negative, else the file is corrupt."""
    lo = vals.min(initial=0.0)
    if np.isfinite(lo) and lo >= 0 and np.isfinite(vals.max(initial=0.0)):
        return
    bad = int(np.flatnonzero(~np.isfinite(vals) | (vals < 0))[0])
    raise ImatrixFormatError(f"{path}: {what} has value {vals[bad]} at index {bad} "
                             "(sums of squares must be finite and >= 0)")


def _dat_loader(reader: _FileReader, offset: int, nval: int, index: int, name: str) -> Callable[..., np.ndarray]:
    def load(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        vals = reader.read(offset, nval, f"entry {index} ({name})", out)
        if check:
            _check_values(vals, reader.path, f"entry {index} ({name})")
        return vals

    return load


def write_dat(im: Imatrix, path: str | Path) -> None:
    """Entries in the Imatrix's order (a file read and written back is byte-identical)."""
    with partial_path(path) as tmp, open(tmp, "wb", buffering=0) as f, PipeWriter(f) as w:
        w.write(struct.pack("<i", len(im.entries)))
        for name in im.entries:
            e = im.entries[name]
            b = name.encode()
            head = struct.pack("<i", len(b)) + b + struct.pack("<ii", e.ncall, e.nval)
            if e.source is None:
                w.write(head)
                w.commit(e.into(w.buffer(e.nval)))
                continue
            # unchanged .dat values (and their header, when that is unchanged too): the kernel
            # copies them while we read them to check them (NaN/inf raise)
            fd, off = e.source[0].fileno(), e.source[1]
            if off >= len(head) and os.pread(fd, len(head), off - len(head)) == head:
                w.copy(fd, off - len(head), len(head) + 4 * e.nval)
            else:
                w.write(head)
                w.copy(fd, off, 4 * e.nval)
            if not e.checked:  # remap's zero scan may have read (and checked) them already
                e.values  # noqa: B018
        if im.trailer:
            ds = im.dataset.encode()
            w.write(struct.pack("<ii", im.chunks, len(ds)) + ds)


# ---- mainline GGUF imatrix: <name>.in_sum2 {ne0, n_mat} (raw sums) + <name>.counts {n_mat} ----

GGUF_CHUNK_SIZE = 512  # tokens per chunk assumed when a .dat (which has no token counts) becomes GGUF


def read_gguf(path: str | Path) -> Imatrix:
    """Index a mainline GGUF imatrix. Per-matrix means = in_sum2 / counts (1.0 where a count is 0);
    ncall = max(counts) / chunk_size, so a .dat written from it has mean * ncall as ik expects."""
    path = Path(path)
    try:
        table = read_table(path, keep_arrays=True)
    except GGUFFormatError as e:
        raise ImatrixFormatError(str(e)) from None
    kv = table.kv
    chunk_size = int(kv.get("imatrix.chunk_size", GGUF_CHUNK_SIZE)) or GGUF_CHUNK_SIZE
    ds = kv.get("imatrix.datasets") or []
    im = Imatrix(chunks=int(kv.get("imatrix.chunk_count", 0)), dataset=ds[0] if ds else "")
    infos = table.by_name()
    size = path.stat().st_size
    reader = _FileReader(path)
    for t in table.tensors:
        for suffix in (".in_sum2", ".sums"):
            if t.name.endswith(suffix):
                name = t.name[: -len(suffix)]
                break
        else:
            continue
        c = infos.get(name + ".counts")
        if c is None:
            raise ImatrixFormatError(f"{path}: tensor {t.name} has no {name}.counts")
        if t.type_id != 0 or c.type_id != 0:
            raise ImatrixFormatError(f"{path}: {t.name} / {c.name} are not F32")
        ne0 = t.shape[0]
        n_mat = t.n_elements // ne0
        if c.n_elements != n_mat:
            raise ImatrixFormatError(f"{path}: {c.name} has {c.n_elements} counts for {n_mat} matrices")
        off_s, off_c = table.data_offset + t.offset, table.data_offset + c.offset
        if off_s + 4 * t.n_elements > size or off_c + 4 * n_mat > size:
            raise ImatrixFormatError(f"{path}: truncated in the data of {name}")
        counts = np.fromfile(path, dtype="<f4", count=n_mat, offset=off_c)
        ncall = max(1, int(round(float(counts.max()) / chunk_size))) if counts.size else 1
        im.entries[name] = Entry(ncall, nval=t.n_elements,
                                 load=_gguf_loader(reader, off_s, ne0, n_mat, counts, ncall, name))
    if not im.entries:
        kind = kv.get("general.type") or kv.get("general.architecture") or "unknown"
        raise ImatrixFormatError(f"{path}: a GGUF with no imatrix entries (general.type/architecture: {kind}); "
                                 "is it a model rather than an imatrix?")
    return im


def _gguf_loader(reader: _FileReader, off_s: int, ne0: int, n_mat: int, counts: np.ndarray, ncall: int,
                 name: str) -> Callable[..., np.ndarray]:
    def load(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        sums = reader.read(off_s, ne0 * n_mat, name, out).reshape(n_mat, ne0)
        if check:
            _check_values(sums, reader.path, f"entry {name}")
            _check_values(counts, reader.path, f"{name}.counts")
        # mean * ncall, in place: per-matrix scale ncall / count, 1.0 * ncall where a count is 0
        with np.errstate(divide="ignore"):
            scale = np.where(counts > 0, np.float32(ncall) / counts, 0).astype(np.float32)
        sums *= scale[:, None]
        sums[counts <= 0] = ncall
        return sums.reshape(-1)

    return load


def write_gguf(im: Imatrix, path: str | Path, n_mat: dict[str, int] | None = None) -> None:
    """Stream a mainline GGUF imatrix. counts = ncall * chunk_size tokens per matrix, so
    in_sum2 / counts gives back the means; n_mat splits per-expert entries when known."""
    n_mat = n_mat or {}
    names = sorted(im.entries)
    kvs = [("general.type", "imatrix"), ("imatrix.chunk_count", im.chunks), ("imatrix.chunk_size", GGUF_CHUNK_SIZE),
           ("imatrix.datasets", [im.dataset] if im.dataset else [])]
    infos, offset = [], 0  # F32 (type 0) counts and sums per entry
    for name in names:
        e = im.entries[name]
        m = n_mat.get(name, 1)
        if e.nval % m:
            raise ImatrixFormatError(f"imatrix entry {name}: {e.nval} values do not split into {m} matrices")
        for tname, shape in ((name + ".counts", (m,)), (name + ".in_sum2", (e.nval // m, m))):
            infos.append((tname, shape, 0, offset))
            offset += padded(4 * shape[0] * (shape[1] if len(shape) > 1 else 1))
    with partial_path(path) as tmp, open(tmp, "wb", buffering=0) as f, PipeWriter(f) as w:
        w.write(header(kvs, infos))
        for name in names:
            e = im.entries[name]
            m = n_mat.get(name, 1)
            counts = np.full(m, np.float32(max(e.ncall, 1) * GGUF_CHUNK_SIZE), dtype="<f4")
            w.write(counts.tobytes() + b"\0" * (-counts.nbytes % 32))
            # sums = mean * tokens = values / ncall * ncall * 512 = values * 512 (exact in float)
            sums = e.into(w.buffer(e.nval))
            sums *= np.float32(GGUF_CHUNK_SIZE)
            w.commit(sums)
            w.write(b"\0" * (-sums.nbytes % 32))


def read_any(path: str | Path) -> Imatrix:
    """Legacy .dat or mainline GGUF, told apart by content (the GGUF magic), not the extension."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return read_gguf(path) if magic == b"GGUF" else read_dat(path)


def write_any(im: Imatrix, path: str | Path, n_mat: dict[str, int] | None = None) -> None:
    """By extension: .gguf writes mainline GGUF, anything else the legacy .dat."""
    if str(path).endswith(".gguf"):
        write_gguf(im, path, n_mat)
    else:
        write_dat(im, path)
