"""Measurement: which quant types make llama-quantize fail on all-zero imatrix values, and on
what group of them: the source of the type table's `zero` column (quantsweep.gguf.types).

For every quantized storage type of the table, quantize one [512, 256] tensor of the tiny demo
model (--custom-q, everything else Q8_0) with an imatrix whose entry for it is positive except
for one zero pattern: an aligned group of 16, 32, 128 or 256 values, 132 scattered zeros, the
whole row. A run fails when llama-quantize exits non-zero or dies of a signal (q4_K: SIGABRT
on a NaN scale; q5_K/q2_K/iq4_nl: "quantized data validation failed"; iq2_xxs/iq1_s: asserts;
iq3_xxs/iq2_xs read an uninitialised array, so they fail only on some runs: --repeat).
Prints per type the patterns that failed and the smallest failing group, next to the table's.

    python benchmarks/zero_imatrix.py [--bin-dir DIR] [--types q4_K,iq4_nl] [--repeat 3] [--jobs 2]

Measured (engine of the default config, CPU, 1 thread): q2_K, q4_K, q5_K fail on a zero
256-group; iq4_nl, iq2_xxs, iq1_s on a zero 32-group; iq3_xxs and iq2_xs read an uninitialised
array and fail at random (seen down to a 32-group and a 16-group, over repeats); q4_0_4x4/4x8/8x8
abort with any imatrix (not zero-related: "any"); the other 61 types never fail.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantsweep.cli import bundled_text  # noqa: E402
from quantsweep.engine.build import install_engine
from quantsweep.settings import EngineSpec  # noqa: E402
from quantsweep.gguf.types import TYPES  # noqa: E402
from quantsweep.imatrix import Entry, Imatrix, write_dat  # noqa: E402
from quantsweep.tinymodel import TinySpec, write_tiny_model  # noqa: E402

TENSOR, NE0 = "blk.0.attn_q_a.weight", 512
PATTERNS = {  # name -> (zeroed indices, the smallest aligned all-zero group it contains)
    "g16": (np.arange(16, 32), 16), "g32": (np.arange(32, 64), 32), "g128": (np.arange(0, 128), 128),
    "g256": (np.arange(0, 256), 256), "scattered": (np.arange(0, 256, 2), 0), "row": (np.arange(NE0), NE0),
}


def fails(bin_dir: Path, model: Path, dat: Path, typ: str) -> bool:
    with tempfile.TemporaryDirectory() as td:
        p = subprocess.run([str(bin_dir / "llama-quantize"), "--imatrix", str(dat), "--custom-q",
                            f"{TENSOR.replace('.', chr(92) + '.')}={typ}", str(model), str(Path(td) / "o.gguf"),
                            "Q8_0", "1"], capture_output=True, text=True, errors="replace")
    return p.returncode != 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default="")
    ap.add_argument("--types", default="")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zero-imatrix-"))
    bin_dir = Path(a.bin_dir) if a.bin_dir else None
    if bin_dir is None:
        install_engine(EngineSpec(), work / "engine", log=io.StringIO())
        bin_dir = work / "engine" / "bin"
    model = work / "tiny.gguf"
    write_tiny_model(model, bundled_text("train"), TinySpec())
    rng = np.random.default_rng(0)
    dats = {}
    for name, (idx, _) in [("none", (np.array([], int), 0)), *PATTERNS.items()]:
        v = (rng.random(NE0, dtype=np.float32) + 0.5) * 8
        v[idx] = 0
        dats[name] = work / f"{name}.dat"
        write_dat(Imatrix({TENSOR: Entry(8, v)}, chunks=8), dats[name])
    types = a.types.split(",") if a.types else [t.name for t in TYPES.values() if t.quantized and t.storage]
    jobs = [(t, p) for t in types for p in dats for _ in range(a.repeat)]
    with ThreadPoolExecutor(a.jobs) as ex:
        out = list(ex.map(lambda j: (j, fails(bin_dir, model, dats[j[1]], j[0])), jobs))
    failed = {}
    for (t, p), f in out:
        failed.setdefault(t, set())
        if f:
            failed[t].add(p)
    by_name = {t.name: t for t in TYPES.values()}
    print(f"{'type':12s} {'failing patterns':40s} measured  table")
    for t in types:
        f = failed[t]
        groups = [PATTERNS[p][1] for p in f if p in PATTERNS and PATTERNS[p][1]]
        measured = "any" if "none" in f else (str(min(groups)) if groups else "-")
        z = by_name[t].zero_group
        table = "-" if z is None else str(z)
        # the table may be finer than one measurement (iq3_xxs, iq2_xs fail at random), never coarser
        coarser = measured == "any" or (measured != "-" and (z is None or int(measured) < z))
        mark = "  <- the table misses this" if coarser else ("" if measured == table else "  (table: finer)")
        print(f"{t:12s} {','.join(sorted(f)) or '-':40s} {measured:9s} {table}{mark}")


if __name__ == "__main__":
    main()
