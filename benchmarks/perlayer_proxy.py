"""Per-layer allocation at class-level cost, checked where the truth can be measured (issue 26).

    python benchmarks/perlayer_proxy.py [--workdir DIR] [--layers 12] [--chunks 8] [--cores 2]

On a deeper demo model (12 layers, mainline layout: 3-D attn_k_b/attn_v_b; `quantsweep tiny-model`):

1. class level: a sweep with allocate.groups: classes: one full-model KLD run per (class, lower
   type), and four auto recipes (bpw budgets) quantized and measured;
2. the truth: the same sweep with allocate.groups: layers: a run for every (layer group, lower
   type), its auto recipes for the same budgets quantized and measured;
3. the proxy: the same sweep with groups: layers, sensitivity: proxy (what a user runs): the class
   runs of step 1 (kept: their recipes are unchanged), the proxy step (the pool files' rows
   dequantized by the engine vs the source, imatrix-weighted), 3 band runs per class family, the
   predicted table, its auto recipes quantized and measured; then again with bands: 0 (no depth
   correction);
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
from statistics import median_high

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quantsweep.allocator.groups import tensor_class  # noqa: E402
from quantsweep.allocator.proxy import spearman  # noqa: E402
from quantsweep.allocator.sensitivity import planned_runs  # noqa: E402
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


def config(wd: Path, groups: str, chunks: int, **allocate) -> None:
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg = merged(base, {
        "models": {"tiny": None, "deep": {"source": "gguf", "path": str(wd / "deep.gguf")}},
        "quants": ["Q8_0"],
        "eval": {"chunks": chunks},
        "bench": {"enabled": False},
        "allocate": {"ladder": LADDER, "groups": groups, "band_type": BAND_TYPE, **allocate,
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


def proxy_step_s(wd: Path) -> float:
    """The proxy step's wall time (its manifest)."""
    return float(load(wd / "results" / "sensitivity" / "deep" / "errors.manifest.json")["wall_s"])


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


def measure_recipe(wd: Path, recipe: Path, name: str, threads: int,
                   base: tuple[str, int] = ("results/eval/deep/baseline.kld", 0)) -> dict:
    """Assemble a recipe from the pool and measure its mean KLD against the base logits (`base`:
    the file and its chunks; default the sweep's)."""
    out = wd / "proxy" / f"{name}.gguf"
    qs("quantize", "--bin-dir", "resources/engine/bin", "--model", str(wd / "deep.gguf"), "--recipe", str(recipe),
       "--imatrix", "results/imatrix/deep/imatrix.dat", *pools(wd), "-o", str(out),
       "--record", str(out.with_suffix(".quant.json")), "--log", str(wd / "proxy" / f"{name}.log"),
       "--threads", str(threads), cwd=wd)
    rec = out.with_suffix(".json")
    chunks = base[1] or load(wd / "results" / "eval" / "deep" / "baseline.json")["chunks"]
    qs("eval", "kld", "--bin-dir", "resources/engine/bin", "--model", str(out), "--kld-base",
       base[0], "--result", str(rec), "--log", str(wd / "proxy" / f"{name}.log"),
       "--settings", json.dumps({"chunks": chunks}), "--threads", str(threads), cwd=wd)
    r = load(rec)
    size = out.stat().st_size
    out.unlink()
    return {"kld": r["kld_mean"], "bytes": size, "wall_s": r.get("wall_s", 0.0), "chunks": per_chunk(r["chunk_kld"])}


def per_chunk(running: list[float]) -> list[float]:
    """Each chunk's mean KLD from the engine's running means."""
    return [running[0]] + [(i + 1) * running[i] - i * running[i - 1] for i in range(1, len(running))]


def heldout_base(wd: Path, threads: int) -> tuple[str, int]:
    """Base logits of text no table was measured on: the evaluation text after its first half (the
    sweep scored its first chunks), every chunk of it."""
    text = (wd / "resources" / "text" / "evaluation.txt").read_text(encoding="utf-8")
    held = wd / "proxy" / "heldout.txt"
    held.write_text(text[text.index("\n", len(text) // 2) + 1:], encoding="utf-8")
    kld, rec = wd / "proxy" / "heldout.kld", wd / "proxy" / "heldout-base.json"
    if not rec.exists():
        qs("eval", "base", "--bin-dir", "resources/engine/bin", "--model", str(wd / "deep.gguf"), "--text", str(held),
           "--kld-base", str(kld), "--result", str(rec), "--log", str(wd / "proxy" / "heldout.log"), "--chunks", "64",
           "--threads", str(threads), cwd=wd)
    return str(kld), int(load(rec)["chunks"])


def paired_se(a: list[float], b: list[float]) -> float:
    """The standard error of mean(a) - mean(b) over the same chunks."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    return (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def allocate(wd: Path, table: Path, budget: float, name: str) -> Path:
    out = wd / "proxy" / f"{name}.yaml"
    qs("allocate", "--sensitivity", str(table), "--bpw", str(budget), "--name", name, "-o", str(out), cwd=wd)
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


def run_chunks(wd: Path) -> dict[str, list[float]]:
    """Each sensitivity run's per-chunk KLD (the top run's under "top"), for the truth's reliability."""
    d = wd / "results" / "sensitivity" / "deep"
    out = {"top": per_chunk(load(d / "top.json")["chunk_kld"])}
    for p in sorted((d / "runs").glob("*.json")):
        if not p.name.endswith(".manifest.json"):
            out[p.stem] = per_chunk(load(p)["chunk_kld"])
    return out


def reliability(truth: dict, chunks: dict[str, list[float]]) -> dict[str, float]:
    """Split-half reliability of each class x type series of the truth: Spearman between the
    per-layer increases measured on the first and on the second half of the chunks, stepped up to
    full length (Spearman-Brown). No predictor can rank-correlate with the measured truth much above
    sqrt(reliability): the measurement's own noise caps it."""
    top = chunks["top"]
    n = len(top) // 2
    halves = [(sum(top[:n]) / n, sum(top[n:2 * n]) / n)]
    series: dict[str, list[tuple[float, float]]] = {}
    for g in truth["groups"]:
        layer, cls = tensor_class(g["tensors"][0])
        if layer is None or g.get("pinned"):
            continue
        for typ in LADDER[:-1]:
            c = chunks.get(f"{g['name']}@{typ}")
            if c:
                series.setdefault(f"{cls}@{typ}", []).append(
                    (sum(c[:n]) / n - halves[0][0], sum(c[n:2 * n]) / n - halves[0][1]))
    out = {}
    for k, v in series.items():
        if len(v) >= 4:
            r = spearman([a for a, _ in v], [b for _, b in v])
            out[k] = max(0.0, 2 * r / (1 + r)) if r > -1 else 0.0  # halves that disagree: no reliability
    return out


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
    """Runs of DeepSeek-V3 with the shipped config's ladder (the top run aside): per class, per
    layer, and per layer by the proxy (the class runs + the band runs), as groups.json lists them."""
    t = deepseek_v3_table()
    ladder = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["allocate"]["ladder"]
    out = {}
    for key, kw in (("classes", {"groups": "classes"}), ("layers", {"groups": "layers"}),
                    ("proxy", {"groups": "layers", "sensitivity": "proxy"})):
        s = AllocateSettings.from_dict({"ladder": ladder, **kw})
        out[key] = len(planned_runs(t, s, True)[1]["runs"])
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
    class_kld, n_class, s_class, wall_class, top_err = cl["kld"], cl["runs"], cl["run_s"], cl["sweep_s"], cl["top_err"]

    # 2. the truth
    def truth_level():
        config(wd, "layers", a.chunks)
        wall = sweep(wd, a.cores)
        n, secs = sensitivity_wall(wd)
        return {"kld": measured_autos(wd), "runs": n, "run_s": secs, "sweep_s": wall,
                "table": load(wd / "results" / "sensitivity" / "deep.json"), "chunks": run_chunks(wd)}

    tr = phase(wd, "truth-level", truth_level)
    rel = reliability(tr["table"], tr["chunks"])
    truth = tr["table"]
    truth_kld, n_truth, s_truth, wall_truth = tr["kld"], tr["runs"], tr["run_s"], tr["sweep_s"]

    # 3. the proxy, as the workflow runs it (bands: 0: without the depth correction)
    def proxy_level(bands: int):
        config(wd, "layers", a.chunks, sensitivity="proxy", bands=bands)
        wall = sweep(wd, a.cores)
        n, secs = sensitivity_wall(wd)
        return {"kld": measured_autos(wd), "runs": n, "run_s": secs, "sweep_s": wall, "proxy_s": proxy_step_s(wd),
                "table": load(wd / "results" / "sensitivity" / "deep.json")}

    results, levels = {}, {}
    for label, bands in (("proxy", 3), ("proxy-nodepth", 0)):
        levels[label] = lv = phase(wd, label + "-level", lambda: proxy_level(bands))
        rho, within, signal = rank_table(lv["table"], truth, top_err)
        results[label] = {"rho": rho, "within": within, "signal": signal, "kld": lv["kld"]}
    prox = levels["proxy"]
    n_bands = len(prox["table"]["bands"])
    add = additivity(wd, truth, a.cores)

    # 4. the same allocations measured on text none of the tables was measured on
    base = heldout_base(wd, a.cores)
    tables = {"class": cl["table"], "proxy": levels["proxy"]["table"],
              "proxy-nodepth": levels["proxy-nodepth"]["table"], "truth": truth}

    def heldout():
        out = {}
        for label, t in tables.items():
            path = wd / "proxy" / f"{label}-table.json"
            path.write_text(json.dumps(t))
            for b in BUDGETS:
                out[f"{label}-b{b}"] = measure_recipe(wd, allocate(wd, path, b, f"{label}-b{b}"),
                                                      f"heldout-{label}-b{b}", a.cores, base)
        return out

    held = phase(wd, "heldout", heldout)

    print("\nSpearman rho, predicted vs measured per-layer increase (truth: one run per layer group and type)")
    for label, r in results.items():
        w, sig = r["within"], r["signal"]
        print(f"  {label}: overall {r['rho']:.3f}; within a class: median {median_high(w.values()):.3f}, "
              f"min {min(w.values()):.3f} over {len(w)} class x type series; above the noise: median "
              f"{median_high(sig.values()):.3f}, min {min(sig.values()):.3f} over {len(sig)}")
        for k, v in sorted(w.items()):
            ceiling = f"truth's split-half reliability {rel[k]:+.3f}" if k in rel else ""
            print(f"      {k:32s} {v:+.3f}   {ceiling}{'' if k in sig else '   (measured within 3x the noise)'}")
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
    print(f"\nheld out ({base[1]} chunks of the evaluation text's second half, which no table was measured on): "
          "class / proxy / proxy without depth / truth; proxy - truth and class - truth with their paired standard "
          "errors; regret")
    held_regrets, held_wins = [], 0
    for b in BUDGETS:
        k = {lab: held[f"{lab}-b{b}"] for lab in tables}
        c, p, t = k["class"]["kld"], k["proxy"]["kld"], k["truth"]["kld"]
        reg = (p - t) / (c - t) if c != t else float("nan")
        held_regrets.append(reg)
        held_wins += p < c
        print(f"  {b} bpw: class {c:.5f}  proxy {p:.5f}  proxy-nodepth {k['proxy-nodepth']['kld']:.5f}  truth {t:.5f}  "
              f"proxy-truth {p - t:+.5f} ± {paired_se(k['proxy']['chunks'], k['truth']['chunks']):.5f}  "
              f"class-truth {c - t:+.5f} ± {paired_se(k['class']['chunks'], k['truth']['chunks']):.5f}  "
              f"regret {reg:+.2f}")
    print(f"\nnoise floor: the top run's KLD standard error {top_err}")
    print("additivity (sum of measured group increases + top vs the recipe's measured KLD): "
          + ", ".join(f"{w:.5f} vs {g:.5f}" for w, g in add))
    v3 = v3_runs()
    print("\ncost                      runs   wall (s, here)")
    print(f"  class level            {n_class:5d}   {s_class:8.0f}   (sweep {wall_class:.0f} s)")
    print(f"  + proxy + bands        {prox['runs']:5d}   {prox['run_s'] + prox['proxy_s']:8.0f}"
          f"   (proxy step {prox['proxy_s']:.1f} s, {n_bands} band runs; sweep {prox['sweep_s']:.0f} s)")
    print(f"  exhaustive per layer   {n_truth:5d}   {s_truth:8.0f}   (sweep {wall_truth:.0f} s)")
    h = a.v3_kld_run_min / 60
    print(f"  DeepSeek-V3 on paper: class level {v3['classes']} runs ({v3['classes'] * h:.0f} engine-h), + bands "
          f"{v3['proxy']} ({v3['proxy'] * h:.0f} h), per layer {v3['layers']} "
          f"({v3['layers'] * h:.0f} h) at {a.v3_kld_run_min:g} min a run")
    r = results["proxy"]
    print(f"\nperlayer: rho overall {r['rho']:.3f}, within-class median {median_high(r['within'].values()):.3f} "
          f"(above the noise {median_high(r['signal'].values()):.3f}, min {min(r['signal'].values()):.3f}; the truth's "
          f"split-half reliability median {median_high(rel.values()):.3f}); regret "
          + "/".join(f"{x:+.2f}" for x in regrets)
          + f"; proxy beats class level at {wins}/{len(BUDGETS)} budgets (held out: regret "
          + "/".join(f"{x:+.2f}" for x in held_regrets) + f", {held_wins}/{len(BUDGETS)}); runs {prox['runs']} vs "
          f"{n_truth} exhaustive (V3: {v3['proxy']} vs {v3['layers']})")


if __name__ == "__main__":
    main()
