"""Predicted quant sizes against the engine and the files, for every quant of a finished sweep.

    python benchmarks/size_prediction.py WORKDIR [--model tiny]

WORKDIR is a work dir where `snakemake --cores all` finished (e.g. the demo). For each quant:
our plan (quantsweep.planner, from the source GGUF header alone), the engine's `--dry-run` figure,
the engine's `quant size` line of the real run, the tensor data of the written file and the
file size, with the plan's error against each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from quantsweep.config import parse_quants, resolve_recipe_paths
from quantsweep.engine.run import dry_run
from quantsweep.steps import quant_args, quant_spec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir")
    ap.add_argument("--model", default="tiny")
    a = ap.parse_args()
    wd = Path(a.workdir)
    cfg = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    quants = parse_quants(resolve_recipe_paths(cfg["quants"], str(ROOT)))
    bin_dir = wd / "resources" / "engine" / "bin"
    model = wd / "resources" / "models" / f"{a.model}.gguf"
    imatrix = wd / "results" / "imatrix" / a.model / "imatrix.dat"
    print("| quant | plan bytes | engine --dry-run MiB | engine quant size MiB | file tensor bytes | file bytes "
          "| plan vs dry-run | plan vs quant size | plan vs file |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q in quants:
        rec = json.loads((wd / "results" / "quants" / a.model / f"{a.model}-{q.name}.json").read_text())
        ftype, extra = quant_args(quant_spec(q.recipe, q.ftype))
        dry = dry_run(bin_dir, model, ftype, extra, imatrix if q.imatrix else None, check_imatrix=True).quant_mib
        p = rec["predicted_bytes"]
        mib = 2**20
        print(f"| {q.name} | {p} | {dry:.2f} | {rec['quant_mib']:.2f} | {rec['tensor_bytes']} | {rec['file_bytes']} "
              f"| {100 * (p / mib - dry) / dry:+.3f} % | {100 * (p / mib - rec['quant_mib']) / rec['quant_mib']:+.3f} % "
              f"| {100 * (p - rec['file_bytes']) / rec['file_bytes']:+.3f} % |")


if __name__ == "__main__":
    sys.exit(main())
