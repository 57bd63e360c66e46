"""Checks of tests/gpu/run.sh's sweeps, from their records (also run on the CPU demo sweep by
tests/test_e2e.py with --cpu, so the checks themselves are tested where there is no GPU).

Every imatrix, perplexity and bench record must say the engine ran the attention mode asked for;
on a GPU every layer must have been offloaded, exps=CPU must have moved tensors, and every bench
must name a GPU. Prints one table of PPL, KLD and speeds per sweep. Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASKED = {"imatrix": {"mla": 1, "std": 0}}  # -mla of each imatrix pass (quantsweep.engine.argv)


def load(p: Path) -> dict:
    return json.loads(p.read_text())


def check_sweep(d: Path, gpu: bool, overridden: bool) -> list[str]:
    """Problems of one sweep's records (empty: all good)."""
    bad = []
    res = d / "results"
    recs = {p: load(p) for p in sorted(res.glob("imatrix/*/*.json")) if not p.name.endswith("manifest.json")}
    recs.update({p: load(p) for p in sorted(res.glob("eval/*/*.json")) if not p.name.endswith("manifest.json")})
    benches = {p: load(p) for p in sorted(res.glob("bench/*/*.json")) if not p.name.endswith("manifest.json")}
    if not recs or not benches:
        return [f"{d}: no records (imatrix/eval {len(recs)}, bench {len(benches)})"]
    for p, r in {**recs, **benches}.items():
        ran = r.get("ran") or {}
        asked = (ASKED["imatrix"][r["mode"]] if "mode" in r else
                 r["bench"]["mla"] if "bench" in r else r["eval"]["mla"])
        if ran.get("mla_attn") != asked:
            bad.append(f"{p}: mla_attn {ran.get('mla_attn')} (asked {asked})")
        if gpu and not (ran.get("gpu_layers") and ran.get("gpu_layers") == ran.get("layers")):
            bad.append(f"{p}: offloaded {ran.get('gpu_layers')}/{ran.get('layers')} layers, not all")
        if not gpu and "gpu_layers" in ran:
            bad.append(f"{p}: a CPU run reports {ran['gpu_layers']} GPU layers")
        if overridden and not ran.get("tensors_overridden"):
            bad.append(f"{p}: exps=CPU moved no tensor")
    for p, r in benches.items():
        if any(s[k]["median"] <= 0 for s in r["speed"] for k in ("pp_tps", "tg_tps")):
            bad.append(f"{p}: a speed <= 0")
        if gpu != bool(r["host"]["gpus"]):
            bad.append(f"{p}: host GPUs {r['host']['gpus']} on a {'GPU' if gpu else 'CPU'} run")
    return bad


def table(d: Path) -> list[str]:
    out = [f"{'quant':22s} {'PPL':>9s} {'mean KLD':>10s} {'PP t/s':>18s} {'TG t/s':>18s}"]
    for p in sorted((d / "results" / "bench").glob("*/*.json")):
        if p.name.endswith("manifest.json"):
            continue
        b, e = load(p), load(d / "results" / "eval" / p.parent.name / p.name)
        s = b["speed"][0]
        sp = " ".join(f"{s[k]['median']:8.1f} ±{(s[k]['max'] - s[k]['min']) / 2:<7.1f}" for k in ("pp_tps", "tg_tps"))
        kld = e.get("kld_mean")
        out.append(f"{p.stem:22s} {e['ppl']:9.4f} {'' if kld is None else f'{kld:10.6f}':>10s} {sp}")
    host = load(next(p for p in sorted((d / "results" / "bench").glob("*/*.json"))))["host"]
    out.append(f"host: {host['cpu']} ({host['cpus']} CPUs); GPUs: "
               + (", ".join(f"{g['name']} (driver {g['driver']})" for g in host["gpus"]) or "none"))
    return out


def check_partial(d: Path) -> tuple[list[str], str]:
    """The partial offload: failed naming both modes (the forced mla 3 caught) or ran as asked."""
    rc = int((d / "rc").read_text())
    err = (d / "stderr.txt").read_text()
    if rc != 0:
        if "mla_attn = 3 (asked 1)" in err:
            return [], "partial offload: the engine forced mla 3 and the step failed naming both modes"
        return [f"partial offload failed otherwise: {err.strip()[-400:]}"], ""
    ran = load(d / "base.json")["ran"]
    if ran.get("mla_attn") != 1:
        return [f"partial offload ran mla {ran.get('mla_attn')} but the step passed"], ""
    return [], f"partial offload: this engine kept mla 1 ({ran.get('gpu_layers')}/{ran.get('layers')} layers on GPU)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", type=Path, required=True, help="work dir of the full-offload (or CPU) sweep")
    ap.add_argument("--exps-cpu", type=Path, help="work dir of the exps=CPU sweep")
    ap.add_argument("--partial", type=Path, help="dir of the partial-offload baseline run")
    ap.add_argument("--cpu", action="store_true", help="the sweeps ran on a CPU engine (no GPU expected)")
    a = ap.parse_args(argv)
    bad = check_sweep(a.full, gpu=not a.cpu, overridden=False)
    print(f"== {a.full.name}", *table(a.full), sep="\n")
    if a.exps_cpu:
        bad += check_sweep(a.exps_cpu, gpu=not a.cpu, overridden=True)
        print(f"== {a.exps_cpu.name}", *table(a.exps_cpu), sep="\n")
    if a.partial:
        more, said = check_partial(a.partial)
        bad += more
        print(said)
    for b in bad:
        print("FAIL:", b)
    print("GPU check:", "FAILED" if bad else "passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
