"""The capacity plan of the README's DeepSeek-V3 configs (config/examples/), from deepseek-ai's
FP8 checkpoint on paper (benchmarks/convert_resources.py's headers: no files), on the machines they
describe: a 512 GiB / 24 GB workstation and a cluster of 1 TiB / 4 x 80 GB nodes; then the
workstation config on a 256 GiB machine, refused in one line; and the eval/bench requests before
(the bf16 source resident, as the workflow asked until the plan) and after.

    python benchmarks/capacity_plan.py [--json DIR]

The converted model's table is the mainline converter's layout at bf16 from the checkpoint's
config.json (what quantsweep.hf.checkpoint predicts); rates are machine.throughput's defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_resources import v3_checkpoint  # noqa: E402

from quantsweep import capacity, config  # noqa: E402
from quantsweep.gguf.deepseek2 import deepseek2_table  # noqa: E402

GiB = 2**30


def sweep_of(example: str, machine: dict | None = None):
    cfg = yaml.safe_load((ROOT / "config" / "examples" / example).read_text())
    cfg["texts"] = {"calibration": "builtin", "evaluation": "builtin"}
    cfg["models"] = {"tiny": None, "dsv3": {"source": "tiny"}}  # its table and checkpoint are given below
    if machine:
        cfg["machine"] = {**cfg.get("machine", {}), **machine}
    return config.load(config.merged(config.load_yaml(ROOT / "config" / "config.yaml"), cfg), ROOT)


def plan_of(sweep):
    ck = v3_checkpoint()
    table = deepseek2_table(layout="mainline", source_type="bf16")
    return capacity.capacity_plan(sweep, {"dsv3": table}, {"dsv3": ck})


def before_after(p, sweep) -> None:
    """What eval/bench asked before the plan: the bf16 source resident (1.05 x bytes + 2 GiB +
    logits) for 30 + 1 min/GB x (1 + tokens/32768), whatever file they read."""
    src = p.jobs[[j.rule for j in p.jobs].index("convert")].written_bytes
    ev, b = sweep.eval, sweep.bench
    old_mem = int(src * 1.05 / 2**20 + 2048 + 4 * 129280 * 512 / 2**20)
    old_eval = int(30 + src / 1e9 * (1 + ev.ctx * ev.chunks / 32768))
    old_bench = int(30 + src / 1e9 * (1 + b.ctx * 2 * b.repeats / 32768))
    rates = sweep.machine.throughput
    print(f"{'job':<28} {'before mem_mb':>14} {'after mem_mb':>13} {'before runtime':>15} {'after runtime':>14}")
    for j in p.jobs:
        if j.rule in ("eval_quant", "bench_quant") and not j.item.startswith("auto"):
            old_rt = old_eval if j.rule == "eval_quant" else old_bench
            print(f"{j.rule + ' ' + j.item:<28} {old_mem:>14,} {capacity.mem_mb(j):>13,} {old_rt:>15,} "
                  f"{capacity.runtime_min(j, rates):>14,}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="", help="also write each plan's JSON into this directory")
    a = ap.parse_args()
    lines = []
    for title, example, machine in (("workstation", "v3-workstation.yaml", None),
                                    ("cluster", "v3-slurm.yaml", None),
                                    ("workstation config on 256 GiB", "v3-workstation.yaml", {"ram_gib": 256})):
        sweep = sweep_of(example, machine)
        p = plan_of(sweep)
        print(f"== {title}: config/examples/{example}\n")
        print(capacity.text(p, sweep))
        if a.json:
            Path(a.json).mkdir(parents=True, exist_ok=True)
            (Path(a.json) / f"{title.split()[0]}-{Path(example).stem}.json").write_text(capacity.to_json(p, sweep))
        refused = capacity.refusal(p, sweep)
        lines.append(f"{title}: peak disk {p.peak_disk_bytes / GiB:,.0f} GiB, {p.engine_hours:,.1f} engine-hours, "
                     f"wall {p.wall_hours:,.1f} h, " + (f"refused: {refused}" if refused else "fits"))
        if title == "workstation":
            print("eval/bench requests, before the plan (sized from the bf16 source) and now:\n")
            before_after(p, sweep)
            print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
