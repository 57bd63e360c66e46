"""Per-layer allocation at class-level cost, checked where the truth can be measured (issue 26).

    python benchmarks/perlayer_proxy.py [--workdir DIR] [--layers 12] [--chunks 8] [--cores 2]

On a deeper demo model (12 layers, mainline layout: 3-D attn_k_b/attn_v_b; `quantsweep tiny-model`):

1. class level: a sweep with allocate.groups: classes: one full-model KLD run per (class, lower
   type), and four auto recipes (bpw budgets) quantized and measured;
2. the truth: the same sweep with allocate.groups: layers: a run for every (layer group, lower
   type), its auto recipes for the same budgets quantized and measured;
3. the proxy: `quantsweep sensitivity proxy` (the pool files' rows dequantized by the engine vs the
   source, imatrix-weighted), band runs (a few per class family, at one type), `quantsweep
   sensitivity predict` -> the layer groups' predicted table, allocated for the same budgets,
   quantized and measured (also without the band runs' depth correction);
4. Spearman rho between predicted and measured per-layer increases (within each class, overall),
   regret = (proxy - truth) / (class - truth) of the measured mean KLD per budget, the noise floor
   (the top run's KLD standard error), additivity (random multi-group recipes: the sum of the
   groups' measured increases vs the run), and the cost (runs and wall time here; DeepSeek-V3 on
   paper: class level, class level + bands, exhaustive per layer).

Everything runs in WORKDIR (default: a temp dir) with this checkout's Snakefile; about 40 min on 2 cores.
The last line sums it up.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quantsweep.allocator.groups import make_groups, runs, tensor_class  # noqa: E402
from quantsweep.allocator.proxy import FAMILIES, bands_of, spearman  # noqa: E402
from quantsweep.config import merged  # noqa: E402
from quantsweep.gguf.deepseek2 import deepseek_v3_table  # noqa: E402
from quantsweep.settings import AllocateSettings  # noqa: E402

LADDER = ["iq2_ks", "iq3_ks", "iq4_ks", "q8_0"]
BUDGETS = [3.4, 4.0, 4.6, 5.4]  # bits per weight of the whole file
BAND_TYPE = "iq2_ks"


def sh(cmd: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{(r.stdout + r.stderr)[-4000:]}")
    return r.stdout


def qs(*args: str, cwd: Path) -> str:
    return sh(["quantsweep", *args], cwd)


def load(p: Path) -> dict:
    return json.loads(p.read_text())


def config(wd: Path, groups: str, chunks: int) -> None:
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg = merged(base, {
        "models": {"tiny": None, "deep": {"source": "gguf", "path": str(wd / "deep.gguf")}},
        "quants": ["Q8_0"],
        "eval": {"chunks": chunks},
        "bench": {"enabled": False},
        "allocate": {"ladder": LADDER, "groups": groups,
                     "budgets": [{"bpw": b, "name": f"b{b}"} for b in BUDGETS]},
    })
    cfg["models"].pop("tiny", None)
    (wd / "config").mkdir(exist_ok=True)
    (wd / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def sweep(wd: Path, cores: int) -> float:
    t0 = time.monotonic()
    sh([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wd),
        "--cores", str(cores)], wd)
    return time.monotonic() - t0


def measured_autos(wd: Path) -> dict[str, float]:
    return {f"b{b}": load(wd / "results" / "eval" / "deep" / f"b{b}.json")["kld_mean"] for b in BUDGETS}


def sensitivity_wall(wd: Path) -> tuple[int, float]:
    """The sensitivity runs of the sweep's current table (the top run included) and their engine time."""
    table = load(wd / "results" / "sensitivity" / "deep.json")
    base = wd / "results" / "sensitivity" / "deep"
    recs = [load(base / "top.json")] + [load(base / "runs" / f"{g}@{t}.json") for g, t in table["runs"]]
    return len(recs), sum(r.get("wall_s", 0.0) for r in recs)


def phase(wd: Path, name: str, make):
    """A phase's results, kept in proxy/NAME.json: a rerun of the benchmark skips what it has."""
    path = wd / "proxy" / f"{name}.json"
    if not path.exists():
        path.write_text(json.dumps(make()))
    return load(path)


def increases(table: dict) -> dict[tuple[str, str], float]:
    return {(g["name"], t): v for g in table["groups"] if not g.get("pinned") for t, v in g["increase"].items()
            if t != LADDER[-1]}


def pools(wd: Path) -> list[str]:
    return [f"--pool={t}={wd / 'results' / 'pool' / 'deep' / 'imatrix' / f'{t}.gguf'}" for t in LADDER]


def measure_recipe(wd: Path, recipe: Path, name: str, threads: int) -> dict:
    """Assemble a recipe from the pool and measure its mean KLD against the base logits."""
    out = wd / "proxy" / f"{name}.gguf"
    qs("quantize", "--bin-dir", "resources/engine/bin", "--model", str(wd / "deep.gguf"), "--recipe", str(recipe),
       "--imatrix", "results/imatrix/deep/imatrix.dat", *pools(wd), "-o", str(out),
       "--record", str(out.with_suffix(".quant.json")), "--log", str(wd / "proxy" / f"{name}.log"),
       "--threads", str(threads), cwd=wd)
    rec = out.with_suffix(".json")
    qs("eval", "kld", "--bin-dir", "resources/engine/bin", "--model", str(out), "--kld-base",
       "results/eval/deep/baseline.kld", "--result", str(rec), "--log", str(wd / "proxy" / f"{name}.log"),
       "--settings", json.dumps({"chunks": load(wd / "results" / "eval" / "deep" / "baseline.json")["chunks"]}),
       "--threads", str(threads), cwd=wd)
    r = load(rec)
    size = out.stat().st_size
    out.unlink()
    return {"kld": r["kld_mean"], "bytes": size, "wall_s": r.get("wall_s", 0.0)}


def allocate(wd: Path, table: Path, budget: float, name: str) -> Path:
    out = wd / "proxy" / f"{name}.yaml"
    qs("allocate", "--sensitivity", str(table), "--bpw", str(budget), "--name", name, "-o", str(out), cwd=wd)
    return out


def band_runs(wd: Path, threads: int) -> list[dict]:
    """The depth correction's runs (allocator.proxy.bands_of: three contiguous bands of layers per
    family), each band lowered to BAND_TYPE with the rest at the top; measured = its KLD - the top
    run's."""
    top = load(wd / "results" / "sensitivity" / "deep" / "top.json")["kld_mean"]
    errors = load(wd / "proxy" / "errors.json")["tensors"]
    doc = load(wd / "results" / "sensitivity" / "deep" / "groups.json")  # the class groups
    out = []
    for band in bands_of(sorted(errors), 3):
        name = f"band-{band['family']}-{band['layers'][0]}-{band['layers'][1]}"
        # a run lowers only its group and keeps everything else at the top: the band, one more group
        grp = {"name": name, "match": band["match"], "tensors": band["tensors"], "budget": "total",
               "bytes": {BAND_TYPE: 0, LADDER[-1]: 0}, "pinned": None}
        g = wd / "proxy" / f"{name}.groups.json"
        g.write_text(json.dumps({**doc, "groups": doc["groups"] + [grp]}))
        res = wd / "proxy" / f"{name}.json"
        qs("sensitivity", "run", "--bin-dir", "resources/engine/bin", "--model", str(wd / "deep.gguf"),
           "--groups", str(g), "--group", name, "--type", BAND_TYPE, *pools(wd), "--kld-base",
           "results/eval/deep/baseline.kld", "--result", str(res), "--log", str(wd / "proxy" / "bands.log"),
           "--settings", json.dumps({"chunks": load(wd / "results" / "eval" / "deep" / "baseline.json")["chunks"]}),
           "--threads", str(threads), cwd=wd)
        r = load(res)
        out.append({"family": band["family"], "layers": band["layers"], "type": BAND_TYPE,
                    "measured": r["kld_mean"] - top, "wall_s": r.get("wall_s", 0.0)})
    return out


def rank_table(pred: dict, truth: dict, floor: float) -> tuple[float, dict[str, float], dict[str, float]]:
    """Spearman of predicted vs measured per-layer increases: overall, within each class (per type),
    and within the class series whose measured increases rise above the noise (largest > 3 x the
    top run's KLD standard error: below it the truth's ranking is noise)."""
    p, t = increases(pred), increases(truth)
    keys = sorted(set(p) & set(t))
    overall = spearman([p[k] for k in keys], [t[k] for k in keys])
    by_class: dict[str, list] = {}
    for g in truth["groups"]:
        layer, cls = tensor_class(g["tensors"][0])
        if layer is None or g.get("pinned"):
            continue
        for typ in LADDER[:-1]:
            if (g["name"], typ) in p and (g["name"], typ) in t:
                by_class.setdefault(f"{cls}@{typ}", []).append((p[(g["name"], typ)], t[(g["name"], typ)]))
    within = {k: spearman([a for a, _ in v], [b for _, b in v]) for k, v in by_class.items() if len(v) >= 4}
    signal = {k: r for k, r in within.items() if max(b for _, b in by_class[k]) > 3 * floor}
    return overall, within, signal


def median(xs) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def additivity(wd: Path, truth: dict, threads: int, n: int = 3) -> list[tuple[float, float]]:
    """Random recipes lowering several layer groups at once: the sum of their measured increases
    (+ the top run) vs the recipe's measured KLD."""
    rng = random.Random(0)
    groups = [g for g in truth["groups"] if not g.get("pinned")]
    out = []
    for i in range(n):
        picks = rng.sample(groups, 6)
        rules = [{"match": g["match"], "type": rng.choice(LADDER[:-1])} for g in picks]
        recipe = {"name": f"additive-{i}", "base": "Q8_0", "rules": rules}
        path = wd / "proxy" / f"additive-{i}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        got = measure_recipe(wd, path, f"additive-{i}", threads)
        want = truth["top_kld"] + sum(g["increase"][r["type"]] for g, r in zip(picks, rules))
        out.append((want, got["kld"]))
    return out


def v3_runs() -> dict[str, int]:
    """Runs of DeepSeek-V3 with the shipped config's ladder: per class, per layer."""
    t = deepseek_v3_table()
    ladder = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["allocate"]["ladder"]
    out = {}
    for g in ("classes", "layers"):
        s = AllocateSettings.from_dict({"groups": g, "ladder": ladder})
        out[g] = len(runs(make_groups(t, s), s))
    out["bands"] = 3 * len(FAMILIES)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--v3-kld-run-min", type=float, default=79.0, help="one V3 KLD run (61 runs = 80 h)")
    a = ap.parse_args()
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="perlayer-")).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "proxy").mkdir(exist_ok=True)
    print(f"work dir: {wd}")
    if not (wd / "deep.gguf").exists():
        qs("tiny-model", "-o", str(wd / "deep.gguf"), "--settings",
           json.dumps({"n_layer": a.layers, "layout": "mainline"}), cwd=wd)

    # 1. class level
    def class_level():
        config(wd, "classes", a.chunks)
        wall = sweep(wd, a.cores)
        n, secs = sensitivity_wall(wd)
        return {"table": load(wd / "results" / "sensitivity" / "deep.json"), "kld": measured_autos(wd),
                "runs": n, "run_s": secs, "sweep_s": wall,
                "top_err": load(wd / "results" / "sensitivity" / "deep" / "top.json").get("kld_err")}

    cl = phase(wd, "class-level", class_level)
    (wd / "proxy" / "class.json").write_text(json.dumps(cl["table"]))
    class_kld, n_class, s_class, wall_class, top_err = cl["kld"], cl["runs"], cl["run_s"], cl["sweep_s"], cl["top_err"]

    # 3. the proxy (before the layer sweep, which rewrites the auto recipes)
    def proxy_errors():
        t0 = time.monotonic()
        qs("sensitivity", "proxy", "--bin-dir", "resources/engine/bin", "--model", str(wd / "deep.gguf"), "--imatrix",
           "results/imatrix/deep/imatrix.dat", *pools(wd), "--top", LADDER[-1], "-o",
           str(wd / "proxy" / "errors.json"), cwd=wd)
        return {"seconds": time.monotonic() - t0}

    proxy_s = phase(wd, "proxy-time", proxy_errors)["seconds"]
    bands = phase(wd, "bands", lambda: band_runs(wd, a.cores))

    # 2. the truth
    def truth_level():
        config(wd, "layers", a.chunks)
        wall = sweep(wd, a.cores)
        n, secs = sensitivity_wall(wd)
        return {"kld": measured_autos(wd), "runs": n, "run_s": secs, "sweep_s": wall}

    tr = phase(wd, "truth-level", truth_level)
    truth = load(wd / "results" / "sensitivity" / "deep.json")
    truth_kld, n_truth, s_truth, wall_truth = tr["kld"], tr["runs"], tr["run_s"], tr["sweep_s"]
    layer_groups = wd / "results" / "sensitivity" / "deep" / "groups.json"

    results = {}
    for label, band_arg in (("proxy", str(wd / "proxy" / "bands.json")), ("proxy-nodepth", "")):
        pred = wd / "proxy" / f"{label}.json"
        qs("sensitivity", "predict", "--class-table", str(wd / "proxy" / "class.json"), "--groups", str(layer_groups),
           "--errors", str(wd / "proxy" / "errors.json"), *(["--bands", band_arg] if band_arg else []),
           "-o", str(pred), cwd=wd)
        table = load(pred)
        rho, within, signal = rank_table(table, truth, top_err)
        klds = {}
        for b in BUDGETS:
            rec = allocate(wd, pred, b, f"{label}-b{b}")
            klds[f"b{b}"] = measure_recipe(wd, rec, f"{label}-b{b}", a.cores)["kld"]
        results[label] = {"rho": rho, "within": within, "signal": signal, "kld": klds}
    add = additivity(wd, truth, a.cores)

    print("\nSpearman rho, predicted vs measured per-layer increase (truth: one run per layer group and type)")
    for label, r in results.items():
        w, sig = r["within"], r["signal"]
        print(f"  {label}: overall {r['rho']:.3f}; within a class: median {median(w.values()):.3f}, "
              f"min {min(w.values()):.3f} over {len(w)} class x type series; above the noise: median "
              f"{median(sig.values()):.3f}, min {min(sig.values()):.3f} over {len(sig)}")
        for k, v in sorted(w.items()):
            print(f"      {k:32s} {v:+.3f}{'' if k in sig else '   (measured within 3x the noise)'}")
    print("\nmeasured mean KLD of the auto recipes (bpw budget): class level / proxy / proxy without depth / truth; "
          "regret = (proxy - truth) / (class - truth)")
    regrets, wins = [], 0
    for b in BUDGETS:
        k = f"b{b}"
        c, p, p0, t = class_kld[k], results["proxy"]["kld"][k], results["proxy-nodepth"]["kld"][k], truth_kld[k]
        reg = (p - t) / (c - t) if c != t else float("nan")
        regrets.append(reg)
        wins += p < c
        why = "" if t <= min(c, p) else "   (the truth's allocation is not the best measured: the formula misleads)"
        print(f"  {b} bpw: class {c:.5f}  proxy {p:.5f}  proxy-nodepth {p0:.5f}  truth {t:.5f}  regret {reg:+.2f}{why}")
    print(f"\nnoise floor: the top run's KLD standard error {top_err}")
    print("additivity (sum of measured group increases + top vs the recipe's measured KLD): "
          + ", ".join(f"{w:.5f} vs {g:.5f}" for w, g in add))
    v3 = v3_runs()
    print("\ncost                      runs   wall (s, here)")
    print(f"  class level            {n_class:5d}   {s_class:8.0f}   (sweep {wall_class:.0f} s)")
    print(f"  + proxy + bands        {n_class + len(bands):5d}   {s_class + proxy_s + sum(b['wall_s'] for b in bands):8.0f}"
          f"   (proxy {proxy_s:.1f} s, {len(bands)} band runs)")
    print(f"  exhaustive per layer   {n_truth:5d}   {s_truth:8.0f}   (sweep {wall_truth:.0f} s)")
    h = a.v3_kld_run_min / 60
    print(f"  DeepSeek-V3 on paper: class level {v3['classes']} runs ({v3['classes'] * h:.0f} engine-h), + bands "
          f"{v3['classes'] + v3['bands']} ({(v3['classes'] + v3['bands']) * h:.0f} h), per layer {v3['layers']} "
          f"({v3['layers'] * h:.0f} h) at {a.v3_kld_run_min:g} min a run")
    r = results["proxy"]
    print(f"\nperlayer: rho overall {r['rho']:.3f}, within-class median {median(r['within'].values()):.3f} "
          f"(above the noise {median(r['signal'].values()):.3f}, min {min(r['signal'].values()):.3f}); regret "
          + "/".join(f"{x:+.2f}" for x in regrets)
          + f"; proxy beats class level at {wins}/{len(BUDGETS)} budgets; runs {n_class + len(bands)} vs "
          f"{n_truth} exhaustive (V3: {v3['classes'] + v3['bands']} vs {v3['layers']})")


if __name__ == "__main__":
    main()
