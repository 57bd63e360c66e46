"""ik_llama.cpp's legacy imatrix (.dat) format, and fitting an imatrix to the model it quantizes.

Layout (ik imatrix.cpp save_imatrix; little-endian, no magic):
    int32 n_entries; n_entries x {int32 name_len; name; int32 ncall; int32 nval; f32 values[nval]}
    [int32 chunks; int32 dataset_len; dataset]          (optional trailer)
values[i] = mean(x_i^2) * ncall, so files add: merging sums values and ncall.

Why a remap is needed (see the project's reference ik_llama.md §1.5, §2.2): an `-mla 1` pass
stores per-head attn_k_b/attn_v_b entries (ne0 * n_head values), names 2-D ik-layout k_b
`... (reshaped)`, and quantize then finds attn_v_b's per-head data through its kv_b<->v_b
fallback for a 2-D attn_kv_b and aborts on the size mismatch.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fileio import GrowBuffer, PipeWriter, partial_path
from .gguf_table import GGUFTable


class ImatrixFormatError(ValueError):
    """Unreadable imatrix; the message names the file and the offset or entry."""


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

    __slots__ = ("ncall", "nval", "_values", "_load", "source")

    def __init__(self, ncall: int, values: np.ndarray | None = None, *, nval: int | None = None,
                 load: Callable[[], np.ndarray] | None = None, source: tuple[_FileReader, int] | None = None):
        self.ncall = ncall
        self.source = source  # (file, offset) where these values lie as .dat bytes, if they do
        self._values = None if values is None else np.asarray(values, dtype=np.float32)
        self._load = load
        self.nval = int(self._values.size if self._values is not None else nval)

    @property
    def values(self) -> np.ndarray:
        return self._values if self._values is not None else self._load()

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
    return im


def _dat_loader(reader: _FileReader, offset: int, nval: int, index: int, name: str) -> Callable[..., np.ndarray]:
    def load(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        vals = reader.read(offset, nval, f"entry {index} ({name})", out)
        if check and not np.isfinite(vals).all():
            bad = int(np.flatnonzero(~np.isfinite(vals))[0])
            raise ImatrixFormatError(f"{reader.path}: entry {index} ({name}) has non-finite value at index {bad}")
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
            e.values  # noqa: B018
        if im.trailer:
            ds = im.dataset.encode()
            w.write(struct.pack("<ii", im.chunks, len(ds)) + ds)


# ---- mainline GGUF imatrix: <name>.in_sum2 {ne0, n_mat} (raw sums) + <name>.counts {n_mat} ----

GGUF_CHUNK_SIZE = 512  # tokens per chunk assumed when a .dat (which has no token counts) becomes GGUF


def read_gguf(path: str | Path) -> Imatrix:
    """Index a mainline GGUF imatrix. Per-matrix means = in_sum2 / counts (1.0 where a count is 0);
    ncall = max(counts) / chunk_size, so a .dat written from it has mean * ncall as ik expects."""
    from .gguf_table import GGUFFormatError, read_table

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
    return im


def _gguf_loader(reader: _FileReader, off_s: int, ne0: int, n_mat: int, counts: np.ndarray, ncall: int,
                 name: str) -> Callable[..., np.ndarray]:
    def load(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        sums = reader.read(off_s, ne0 * n_mat, name, out).reshape(n_mat, ne0)
        if check and not (np.isfinite(sums).all() and np.isfinite(counts).all()):
            raise ImatrixFormatError(f"{reader.path}: entry {name} has non-finite values")
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
    align = 32
    kvs = [("general.type", 8, "imatrix"), ("imatrix.chunk_count", 4, im.chunks),
           ("imatrix.chunk_size", 4, GGUF_CHUNK_SIZE), ("imatrix.datasets", 9, [im.dataset] if im.dataset else [])]
    tensors = []  # (name, shape, nbytes)
    for name in names:
        e = im.entries[name]
        m = n_mat.get(name, 1)
        if e.nval % m:
            raise ValueError(f"imatrix entry {name}: {e.nval} values do not split into {m} matrices")
        tensors.append((name + ".counts", (m,), 4 * m))
        tensors.append((name + ".in_sum2", (e.nval // m, m), 4 * e.nval))
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, vtype, val in kvs:
        head += _gguf_str(key) + struct.pack("<I", vtype)
        if vtype == 8:
            head += _gguf_str(val)
        elif vtype == 4:
            head += struct.pack("<I", val)
        else:
            head += struct.pack("<IQ", 8, len(val)) + b"".join(_gguf_str(v) for v in val)
    offset = 0
    for tname, shape, nbytes in tensors:
        head += _gguf_str(tname) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        head += struct.pack("<IQ", 0, offset)
        offset += (nbytes + align - 1) // align * align
    head += b"\0" * (-len(head) % align)
    with partial_path(path) as tmp, open(tmp, "wb", buffering=0) as f, PipeWriter(f) as w:
        w.write(bytes(head))
        for name in names:
            e = im.entries[name]
            m = n_mat.get(name, 1)
            counts = np.full(m, np.float32(max(e.ncall, 1) * GGUF_CHUNK_SIZE), dtype="<f4")
            w.write(counts.tobytes() + b"\0" * (-counts.nbytes % align))
            # sums = mean * tokens = values / ncall * ncall * 512 = values * 512 (exact in float)
            sums = e.into(w.buffer(e.nval))
            sums *= np.float32(GGUF_CHUNK_SIZE)
            w.commit(sums)
            w.write(b"\0" * (-sums.nbytes % align))


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


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


_SUFFIX = re.compile(r"^(.*?\.weight)(?: \((?:reshaped|view|permuted|transposed)\))+$")


def merge(ims: list[Imatrix], names: list[str] | None = None) -> Imatrix:
    """ncall-weighted merge (values and ncall add); disjoint entries are united. Lazy."""
    names = names or [f"input {i}" for i in range(len(ims))]
    out = Imatrix(chunks=sum(i.chunks for i in ims), dataset=",".join(dict.fromkeys(i.dataset for i in ims if i.dataset)))
    parts: dict[str, list[tuple[str, Entry]]] = {}
    for label, im in zip(names, ims):
        for name, e in im.entries.items():
            have = parts.setdefault(name, [])
            if have and have[0][1].nval != e.nval:
                raise ValueError(
                    f"imatrix entry {name}: {have[0][0]} has {have[0][1].nval} values, {label} has {e.nval}"
                )
            have.append((label, e))
    buf = GrowBuffer()
    for name, es in parts.items():
        if len(es) == 1:
            out.entries[name] = es[0][1]
        else:
            group = [e for _, e in es]
            out.entries[name] = Entry(sum(e.ncall for e in group), nval=group[0].nval, load=_sum_loader(group, buf))
    return out


def _sum_loader(group: list[Entry], buf: GrowBuffer) -> Callable[..., np.ndarray]:
    def load(check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        acc = group[0].into(buf.get(group[0].nval) if out is None else out)  # own buffer: inputs may share a reader's
        for e in group[1:]:
            acc += e.values
        return acc

    return load


def expected_size(shape: tuple[int, ...]) -> int:
    """What quantize checks: ne0 * ne2 (per expert or per head for 3-D tensors)."""
    return shape[0] * (shape[2] if len(shape) > 2 else 1)


def _fit(e: Entry, want: int, ne0: int) -> Entry | None:
    """Collapse per-head data (k * ne0 values) to the ne0 a 2-D tensor needs (mean over heads)."""
    n = e.nval
    if n == want:
        return e
    if want == ne0 and n % ne0 == 0:
        return Entry(e.ncall, nval=ne0, load=lambda check=True, out=None:
                     e.values.reshape(n // ne0, ne0).mean(axis=0, dtype=np.float32, out=out))
    return None


_TWINS = [  # (target, source): the source sees the same activations as the target
    (".attn_kv_b.weight", ".attn_v_b.weight"),
    (".attn_v_b.weight", ".attn_kv_b.weight"),
    (".ffn_gate.weight", ".ffn_up.weight"),
    (".ffn_gate_shexp.weight", ".ffn_up_shexp.weight"),
    (".ffn_gate_exps.weight", ".ffn_up_exps.weight"),
]


def remap(im: Imatrix, model: GGUFTable) -> tuple[Imatrix, list[str]]:
    """Make `im` fit the tensors of `model`; returns the new imatrix and one line per action."""
    actions: list[str] = []
    tensors = {t.name: t for t in model.tensors if len(t.shape) >= 2}
    fixed: dict[str, Entry] = {}
    for name in sorted(im.entries):
        m = _SUFFIX.match(name)
        base = m.group(1) if m else name
        if base != name:
            actions.append(f"rename {name!r} -> {base}")
        if base in fixed:
            actions.append(f"drop {name}: duplicate of {base}")
            continue
        fixed[base] = im.entries[name]
    out: dict[str, Entry] = {}
    for name, t in sorted(tensors.items()):
        want = expected_size(t.shape)
        src_name = name if name in fixed else None
        if src_name is None:
            for tgt, src in _TWINS:
                if name.endswith(tgt) and name[: -len(tgt)] + src in fixed:
                    src_name = name[: -len(tgt)] + src
                    break
        if src_name is None:
            continue
        e = _fit(fixed[src_name], want, t.shape[0])
        if e is None:
            actions.append(f"skip {name}: {src_name} has {fixed[src_name].nval} values, tensor needs {want}")
            continue
        if src_name != name:
            actions.append(f"copy {src_name} -> {name}")
        if e is not fixed[src_name]:
            actions.append(f"collapse {name}: {fixed[src_name].nval} -> {want} values (mean over heads)")
        out[name] = e
    for name in sorted(set(fixed) - set(out)):
        if name not in tensors:
            actions.append(f"drop {name}: no such tensor in the model")
    return Imatrix(out, im.chunks, im.dataset), actions



@dataclass
class EntryStats:
    name: str
    ncall: int
    nval: int
    n_mat: int
    mean: float
    max: float
    zeros: int
    nonfinite: int
    empty_mats: list[int]  # experts/heads with no data (ik stores them as all-1 means)


def stats(im: Imatrix, n_mat: dict[str, int] | None = None) -> list[EntryStats]:
    """Per-entry statistics, one entry in memory at a time. NaN/inf are counted, not raised."""
    out = []
    for name in sorted(im.entries):
        e = im.entries[name]
        v = e.raw()
        m = (n_mat or {}).get(name, 1)
        means = (v / e.ncall if e.ncall > 0 else v).reshape(m, -1)
        finite = np.isfinite(v)
        empty = [i for i in range(m) if m > 1 and np.all(means[i] == 1.0)]
        fv = v[finite]
        out.append(EntryStats(name, e.ncall, e.nval, m,
                              float(fv.mean() / max(e.ncall, 1)) if fv.size else float("nan"),
                              float(fv.max() / max(e.ncall, 1)) if fv.size else float("nan"),
                              int(np.count_nonzero(v == 0)), int(v.size - np.count_nonzero(finite)), empty))
    return out


# Types llama-quantize refuses to make without imatrix data (src/llama-quantize.cpp, the
# "Missing importance matrix ... very low-bit quantization" check); q2_K only under Q2_K_S.
NEEDS_IMATRIX = frozenset({
    "iq2_xxs", "iq2_xxs_r4", "iq2_xs", "iq2_xs_r4", "iq2_s", "iq2_s_r4", "iq1_s", "iq1_s_r4",
    "iq1_m", "iq1_m_r4", "iq1_kt", "iq2_kt",
})


def needs_imatrix(type_name: str, ftype: str) -> bool:
    """Does the engine refuse to quantize a tensor to `type_name` (under `ftype`) without data?"""
    return type_name in NEEDS_IMATRIX or (type_name == "q2_K" and ftype.upper() == "Q2_K_S")


def engine_lookup(names, tensor: str) -> str | None:
    """The imatrix entry llama-quantize uses for `tensor`: exact name, then its fallbacks."""
    if tensor in names:
        return tensor
    for part in ("ffn_up_exps.weight", "ffn_gate_exps.weight"):
        if part in tensor:
            stem = tensor[: tensor.index(part)]
            for alt in (stem + "ffn_gate_up_exps.weight", stem + "ffn_up_exps.weight"):
                if alt in names:
                    return alt
            return None
    if "ffn_gate_up_exps.weight" in tensor:
        alt = tensor.replace("ffn_gate_up_exps.weight", "ffn_up_exps.weight")
        return alt if alt in names else None
    for a, b in ((".attn_v_b.weight", ".attn_kv_b.weight"), (".attn_kv_b.weight", ".attn_v_b.weight")):
        if a in tensor:
            alt = tensor[: tensor.index(a)] + b
            return alt if alt in names else None
    return None


@dataclass
class Problem:
    tensor: str
    type: str
    entry: str
    problem: str


def check(im: Imatrix, model: GGUFTable, plan: dict[str, str | None], ftype: str = "") -> list[Problem]:
    """What would make quantizing `model` with `im` fail or run blind, tensor by tensor.

    plan: the type the engine converts each tensor to (from its --dry-run). A tensor whose
    type needs an imatrix must have an entry of exactly ne0*ne2 finite values with data for
    every expert; any found entry of the wrong size aborts the engine, so it is reported too;
    zero values are reported because the engine's k-quant search divides by them."""
    problems: list[Problem] = []
    names = set(im.entries)
    for t in model.tensors:
        new = plan.get(t.name)
        if new is None:
            continue
        requires = needs_imatrix(new, ftype) and t.name not in (
            "token_embd.weight", "output.weight")
        key = engine_lookup(names, t.name)
        if key is None:
            if requires:
                problems.append(Problem(t.name, new, "-", "no imatrix data (the engine refuses this type without)"))
            continue
        e = im.entries[key]
        n_mat = t.shape[2] if len(t.shape) > 2 else 1
        want = expected_size(t.shape)
        if e.nval != want:
            if t.name != "token_embd.weight":
                problems.append(Problem(t.name, new, key, f"{e.nval} values, tensor needs {want} (the engine aborts)"))
            continue
        v = e.raw()
        if not np.all(np.isfinite(v)):
            problems.append(Problem(t.name, new, key, f"{int(np.count_nonzero(~np.isfinite(v)))} NaN/inf values"))
            continue
        if np.any(v == 0) and not new.startswith(("q8_", "f", "bf")):
            problems.append(Problem(t.name, new, key, f"{int(np.count_nonzero(v == 0))} zero values"))
        if requires and n_mat > 1:
            means = (v / max(e.ncall, 1)).reshape(n_mat, -1)
            empty = [i for i in range(n_mat) if np.all(means[i] == 1.0)]
            if empty:
                problems.append(Problem(t.name, new, key, f"no data for expert(s) {','.join(map(str, empty))}"))
    return problems
