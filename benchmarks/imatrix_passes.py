"""Measure what each imatrix pass buys: run the workflow on the demo model with imatrix
passes [mla], [std] and [mla, std] (merged + remapped) and print PPL/KLD of one
imatrix-requiring quant for each, next to the quant made without an imatrix where allowed.

    python benchmarks/imatrix_passes.py [--quant IQ2_XS] [--split-kv-b] [--dir DIR]

Each variant runs in its own work dir (the engine comes from the shared build cache).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_variant(work: Path, passes: list[str], quants: list, split: bool) -> list[dict]:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["imatrix"]["passes"] = passes
    cfg["quants"] = quants
    cfg["models"]["tiny"]["split_kv_b"] = split
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                        "--directory", str(work), "--cores", "all"], capture_output=True, text=True)
    if r.returncode != 0:
        why = [ln for log in sorted((work / "logs").rglob("*.log")) for ln in log.read_text().splitlines()
               if ln.startswith(("FAIL:", "quantsweep: error:"))]
        return [{"quant": "FAILED", "error": " | ".join(why[:2]) or "see the work dir's logs"}]
    from quantsweep.report import read_csv

    return read_csv(work / "results" / "summary.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", default="IQ2_XS")
    ap.add_argument("--split-kv-b", action="store_true", help="use the 2-D attn_k_b/attn_v_b layout")
    ap.add_argument("--dir", default="")
    a = ap.parse_args()
    base = Path(a.dir or tempfile.mkdtemp(prefix="qs-passes-"))
    print("| imatrix | quant | ppl | dppl_pct | kld_mean | same_top_p |\n|---|---|---|---|---|---|")
    for passes in (["mla"], ["std"], ["mla", "std"]):
        label = "+".join(passes) + (" (merged, remapped)" if len(passes) > 1 else " (remapped)")
        for row in run_variant(base / "_".join(passes), passes, [a.quant], a.split_kv_b):
            if row["quant"] == "FAILED":
                print(f"| {label} | {a.quant} | failed: {row['error'][-300:]} | | | |")
            elif row["quant"] != "baseline":
                print(f"| {label} | {row['quant']} | {float(row['ppl']):.4f} | {float(row['dppl_pct']):.2f} "
                      f"| {float(row['kld_mean']):.6f} | {float(row['same_top_p']):.2f} |")


if __name__ == "__main__":
    main()
