"""Measurement: do the demo's speeds order sensibly? PP and TG tokens/s of the tiny model's
bf16 file, Q8_0 and IQ2_KS (no imatrix needed for speed), measured as the `bench` step does
(llama-sweep-bench, -mla 3 -fa on, fresh process per run), interleaved so drift in the machine's
load hits every file alike, many runs each.

    python benchmarks/demo_speed.py [--bin-dir DIR] [--runs 15] [--depths 0,512] [--tg 128]

Prints per file and depth the median and min..max of the runs, and whether IQ2_KS generates
faster than Q8_0 (it should, where TG is bound by reading the weights).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantsweep.cli import bundled_text  # noqa: E402
from quantsweep.engine import run  # noqa: E402
from quantsweep.engine.build import install_engine
from quantsweep.settings import BenchSettings, EngineSpec  # noqa: E402
from quantsweep.engine.hardware import describe_host  # noqa: E402
from quantsweep.steps import bench  # noqa: E402
from quantsweep.tinymodel import TinySpec, write_tiny_model  # noqa: E402

QUANTS = ("Q8_0", "IQ2_KS")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default="", help="engine tools (default: the default engine, built or cached)")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--depths", default="0,512")
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bin_dir = Path(a.bin_dir) if a.bin_dir else d / "engine" / "bin"
        if not a.bin_dir:
            install_engine(EngineSpec(), bin_dir.parent, log=io.StringIO())
        files = {"bf16": d / "tiny.gguf"}
        write_tiny_model(files["bf16"], bundled_text("train"), TinySpec())
        for q in QUANTS:
            files[q] = d / f"tiny-{q}.gguf"
            run.quantize(bin_dir, files["bf16"], files[q], d / f"{q}.log", q, a.threads)
        b = BenchSettings(depths=tuple(int(x) for x in a.depths.split(",")), tg=a.tg, repeats=1)
        speeds: dict[str, dict[int, dict[str, list[float]]]] = {k: {} for k in files}
        for _ in range(a.runs):  # interleaved: one run of each file per round
            for name, path in files.items():
                rec = bench(bin_dir, path, d / f"{name}.bench.log", b, a.threads)
                for s in rec["speed"]:
                    per = speeds[name].setdefault(s["depth"], {"pp_tps": [], "tg_tps": []})
                    for key in per:
                        per[key] += s[key]["runs"]
    host = describe_host()
    print(f"host: {host['cpu']}, {host['cpus']} CPUs; {a.runs} runs per file, TG {a.tg} tokens, {a.threads} threads")
    med = {}
    for name, by_depth in speeds.items():
        for depth, v in by_depth.items():
            cells = []
            for key in ("pp_tps", "tg_tps"):
                m = statistics.median(v[key])
                med[(name, depth, key)] = m
                cells.append(f"{key} {m:8.0f} ({min(v[key]):.0f}..{max(v[key]):.0f})")
            print(f"{name:7s} depth {depth:5d}: " + "   ".join(cells))
    for depth in speeds["Q8_0"]:
        for key in ("pp_tps", "tg_tps"):
            ratio = med[("IQ2_KS", depth, key)] / med[("Q8_0", depth, key)]
            faster = "IQ2_KS" if ratio > 1 else "Q8_0"
            print(f"depth {depth} {key}: IQ2_KS / Q8_0 = {ratio:.3f} ({faster} faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
