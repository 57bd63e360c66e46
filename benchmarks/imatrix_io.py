"""Benchmark: convert, merge and remap of a DeepSeek-V3-sized imatrix against `cp`.

Writes a DeepSeek-V3-shaped legacy imatrix (61 layers, 3 dense + 58 MoE with 256 experts,
n_embd 7168, 128 heads with per-head attn_k_b/attn_v_b entries as an `-mla 1` pass stores
them, plus attn_kv_b as a `-mla 0` pass does; about 1 GB) and a header-only (sparse) DeepSeek-V3 GGUF
(tensor table, no weights) for remap, then times each operation in its own process and
reports wall time relative to `cp` of the same file and peak RSS relative to the input.

Goal: each operation <= 1.5x the time of cp, peak RSS <= 1.2x the largest input.

    python benchmarks/imatrix_io.py [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_LAYER, N_DENSE, N_EMBD, N_HEAD, N_EXPERT = 61, 3, 7168, 128, 256
Q_LORA, KV_LORA, NOPE, V_HEAD, N_FF, N_FF_EXP = 1536, 512, 128, 128, 18432, 2048


def imatrix_entries() -> list[tuple[str, int]]:
    """(name, nval) as the engine's -mla 1 pass stores them (+ attn_kv_b from a -mla 0 pass)."""
    out = []
    for i in range(N_LAYER):
        p = f"blk.{i}."
        out += [(p + "attn_q_a.weight", N_EMBD), (p + "attn_q_b.weight", Q_LORA), (p + "attn_kv_a_mqa.weight", N_EMBD),
                (p + "attn_k_b.weight (reshaped)", NOPE * N_HEAD), (p + "attn_v_b.weight", KV_LORA * N_HEAD),
                (p + "attn_kv_b.weight", KV_LORA), (p + "attn_output.weight", N_HEAD * V_HEAD)]
        if i < N_DENSE:
            out += [(p + "ffn_gate.weight", N_EMBD), (p + "ffn_up.weight", N_EMBD), (p + "ffn_down.weight", N_FF)]
        else:  # fused ops off while collecting, so gate and up each get an entry
            out += [(p + "ffn_gate_inp.weight", N_EMBD), (p + "ffn_gate_exps.weight", N_EMBD * N_EXPERT),
                    (p + "ffn_up_exps.weight", N_EMBD * N_EXPERT), (p + "ffn_down_exps.weight", N_FF_EXP * N_EXPERT),
                    (p + "ffn_gate_shexp.weight", N_EMBD), (p + "ffn_up_shexp.weight", N_EMBD),
                    (p + "ffn_down_shexp.weight", N_FF_EXP)]
    return out


def write_dat(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    entries = imatrix_entries()
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, nval in entries:
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", 100, nval))
            f.write((rng.random(nval, dtype=np.float32) * 100 + 1).astype("<f4").tobytes())
        f.write(struct.pack("<ii", 100, 12) + b"calibration1")


def write_header_only_gguf(path: Path) -> None:
    """DeepSeek-V3's header (tensors in bf16, the KVs the engine reads) over all-zero data: a
    sparse file of the full size, so it reads as a complete GGUF and occupies a few KB."""
    from quantsweep.gguf.deepseek2 import deepseek_v3_table
    from quantsweep.gguf.writer import write_shape_gguf

    write_shape_gguf(deepseek_v3_table(), path)


def timed(cmd: list[str], output: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, by GNU time (ru_maxrss of a child
    forked from this process would count this process's memory before the exec). The output
    is removed first, so cp and quantsweep both write a fresh file (quantsweep writes a temp
    name and renames it; replacing an existing 1 GB file would add the cost of freeing it).
    This machine's timings of a 1 GB write vary up to 5x from run to run (page reclaim,
    writeback): compare best against best."""
    output.unlink(missing_ok=True)
    # write back what earlier steps wrote (inputs, the last output) outside the timed span,
    # else that writeback competes with whichever command runs next
    os.sync()
    time.sleep(0.5)
    t0 = time.monotonic()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return wall, int(r.stderr.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best of each operation is compared")
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="qs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        dat, model = work / "v3.dat", work / "v3-header.gguf"
        write_dat(dat)
        write_header_only_gguf(model)
        size = dat.stat().st_size
        qs = [sys.executable, "-m", "quantsweep.cli", "imatrix"]
        ops = {
            "cp": ["cp", str(dat), str(work / "copy.dat")],
            "python startup": [sys.executable, "-c", "import quantsweep.cli, numpy", str(work / "none")],
            "convert dat->gguf": qs + ["convert", str(dat), "-o", str(work / "v3.gguf"), "--model", str(model)],
            "convert gguf->dat": qs + ["convert", str(work / "v3.gguf"), "-o", str(work / "back.dat")],
            "merge (2 inputs)": qs + ["merge", "-o", str(work / "merged.dat"), str(dat), str(work / "copy.dat")],
            "remap": qs + ["remap", "--model", str(model), "-o", str(work / "remapped.dat"), str(dat)],
        }
        print(f"imatrix: {size / 1e9:.3f} GB, {len(imatrix_entries())} entries; machine: {os.cpu_count()} cores")
        print(f"{'operation':20s} {'best s':>8s} {'median':>8s} {'x cp':>6s} {'peak RSS MB':>12s} {'x input':>8s}")
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in ops}
        # rounds of every operation in turn, so a slow spell of the machine (page reclaim, a
        # neighbour) hits all of them alike; the best of each is compared
        for _ in range(a.repeat):
            for name, cmd in ops.items():
                out = Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else Path(cmd[-1])
                runs[name].append(timed(cmd, out))
        base = min(w for w, _ in runs["cp"])
        for name, rs in runs.items():
            best, median = min(w for w, _ in rs), sorted(w for w, _ in rs)[len(rs) // 2]
            rss = max(m for _, m in rs)
            # merge reads two 1 GB inputs: its fair baseline is cp of both (2x cp)
            ratio = best / (2 * base if name.startswith("merge") else base)
            print(f"{name:20s} {best:8.2f} {median:8.2f} {ratio:6.2f} {rss / 2**20:12.1f} {rss / size:8.3f}")
        print("wall s: best and median of the rounds; x cp: best over cp's best for the same bytes"
              " (merge: over cp of both inputs); x input: peak RSS (worst round) over the largest input")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
