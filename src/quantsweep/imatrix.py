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

import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fileio import partial_path
from .gguf_table import GGUFTable


class ImatrixFormatError(ValueError):
    """Unreadable imatrix; the message names the file and the offset or entry."""


@dataclass
class Entry:
    ncall: int
    values: np.ndarray  # float32, mean-of-squares * ncall

    @property
    def means(self) -> np.ndarray:
        return self.values / self.ncall if self.ncall > 0 else self.values


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    chunks: int = 0
    dataset: str = ""


def read_dat(path: str | Path) -> Imatrix:
    path = Path(path)
    data = path.read_bytes()
    size = len(data)
    if size >= 4 and data[:4] == b"GGUF":
        raise ImatrixFormatError(f"{path}: is a GGUF imatrix, not the legacy .dat format (convert it first)")
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > size:
            raise ImatrixFormatError(f"{path}: truncated at offset {pos} reading {what}")
        b = data[pos:pos + n]
        pos += n
        return b

    (n_entries,) = struct.unpack("<i", take(4, "entry count"))
    if n_entries < 0 or n_entries > size // 16:
        raise ImatrixFormatError(f"{path}: entry count {n_entries} at offset 0 is impossible for a {size}-byte file")
    im = Imatrix()
    for i in range(n_entries):
        (nlen,) = struct.unpack("<i", take(4, f"name length of entry {i}"))
        if nlen <= 0 or nlen > 4096:
            raise ImatrixFormatError(f"{path}: entry {i} at offset {pos - 4} has name length {nlen}")
        name = take(nlen, f"name of entry {i}").decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8, f"ncall/nval of {name}"))
        if nval < 1:
            raise ImatrixFormatError(f"{path}: entry {i} ({name}) at offset {pos - 4} has nval {nval}")
        vals = np.frombuffer(take(4 * nval, f"values of {name}"), dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(vals)):
            bad = int(np.flatnonzero(~np.isfinite(vals))[0])
            raise ImatrixFormatError(f"{path}: entry {i} ({name}) has non-finite value at index {bad}")
        im.entries[name] = Entry(ncall, vals)
    if pos < size:
        (im.chunks,) = struct.unpack("<i", take(4, "chunk count"))
        (dlen,) = struct.unpack("<i", take(4, "dataset length"))
        if dlen < 0:
            raise ImatrixFormatError(f"{path}: dataset length {dlen} at offset {pos - 4}")
        im.dataset = take(dlen, "dataset name").decode("utf-8", errors="replace")
    return im


def write_dat(im: Imatrix, path: str | Path) -> None:
    """Entries in sorted name order so equal data gives equal bytes."""
    with partial_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(im.entries)))
        for name in sorted(im.entries):
            e = im.entries[name]
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", e.ncall, e.values.size))
            f.write(np.ascontiguousarray(e.values, dtype="<f4").tobytes())
        ds = im.dataset.encode()
        f.write(struct.pack("<ii", im.chunks, len(ds)) + ds)


_SUFFIX = re.compile(r"^(.*?\.weight)(?: \((?:reshaped|view|permuted|transposed)\))+$")


def merge(ims: list[Imatrix]) -> Imatrix:
    """ncall-weighted merge (values and ncall add); disjoint entries are united."""
    out = Imatrix(chunks=sum(i.chunks for i in ims), dataset=",".join(dict.fromkeys(i.dataset for i in ims if i.dataset)))
    for im in ims:
        for name, e in im.entries.items():
            if name in out.entries:
                prev = out.entries[name]
                if prev.values.size != e.values.size:
                    raise ValueError(f"imatrix entry {name}: sizes {prev.values.size} and {e.values.size} differ")
                out.entries[name] = Entry(prev.ncall + e.ncall, prev.values + e.values)
            else:
                out.entries[name] = Entry(e.ncall, e.values.copy())
    return out


def _expected_size(shape: tuple[int, ...]) -> int:
    """What quantize checks: ne0 * ne2 (per expert or per head for 3-D tensors)."""
    return shape[0] * (shape[2] if len(shape) > 2 else 1)


def _fit(e: Entry, want: int, ne0: int) -> Entry | None:
    """Collapse per-head data (k * ne0 values) to the ne0 a 2-D tensor needs (mean over heads)."""
    n = e.values.size
    if n == want:
        return e
    if want == ne0 and n % ne0 == 0:
        return Entry(e.ncall, e.values.reshape(n // ne0, ne0).mean(axis=0).astype(np.float32))
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
        want = _expected_size(t.shape)
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
            actions.append(f"skip {name}: {src_name} has {fixed[src_name].values.size} values, tensor needs {want}")
            continue
        if src_name != name:
            actions.append(f"copy {src_name} -> {name}")
        if e is not fixed[src_name]:
            actions.append(f"collapse {name}: {fixed[src_name].values.size} -> {want} values (mean over heads)")
        out[name] = e
    for name in sorted(set(fixed) - set(out)):
        if name not in tensors:
            actions.append(f"drop {name}: no such tensor in the model")
    return Imatrix(out, im.chunks, im.dataset), actions


def is_finite(im: Imatrix) -> bool:
    return all(math.isfinite(float(e.values.sum())) for e in im.entries.values())
