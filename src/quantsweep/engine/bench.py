"""Speed: llama-sweep-bench, repeated, summarised per depth as median and range.

One run gives PP and TG tokens/s at every KV depth below its context; benchmarks are noisy,
so the step runs the tool `repeats` times in fresh processes and keeps each run's numbers,
their median, min and max, the run settings, the attention mode the engine really used and
the host it ran on. The workflow makes sure no other engine job shares the machine meanwhile.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from ..errors import StepError
from ..gguf.reader import shards
from ..settings import BenchSettings
from . import argv, logparse
from .hardware import describe_host
from .run import checked, note, ran_as_asked, run_logged
from .spec import installed_meta


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _engine(bin_dir: Path) -> dict:
    """Which engine build measured it: its cache key and CUDA flag."""
    meta = installed_meta(bin_dir) or {}
    return {k: meta[k] for k in ("key", "cuda", "source") if k in meta}


def sweep_bench(bin_dir: Path, model: Path, log: Path, b: BenchSettings, threads: int,
                timeout_s: float | None = None) -> dict:
    """`b.repeats` runs of llama-sweep-bench on `model`; returns the bench record (the report's
    speed columns read `speed`, its first element the headline depth). The tool's own log file
    lands beside `log` (<log stem>.engine.log)."""
    b.check("bench")  # depths the tool measures (settings built by hand were not checked)
    per_depth: dict[int, dict[str, list[float]]] = {d: {"pp_tps": [], "tg_tps": []} for d in b.depths}
    runs, ran = [], {}
    for i in range(b.repeats):
        what = f"sweep-bench of {model.name} (run {i + 1} of {b.repeats})"
        note(log, logparse.BENCH_RUN_NOTE.format(k=i + 1, n=b.repeats))  # the status reads it
        res = run_logged(argv.sweep_bench_cmd(bin_dir, model, b, threads, Path(log).with_suffix(".engine")), log,
                         timeout_s=timeout_s)
        rows = checked(res, logparse.parse_sweep_bench, log, what, timeout_s)
        ran = ran_as_asked(res, what, log)
        by_depth = {r.n_kv: r for r in rows}
        if missing := [d for d in b.depths if d not in by_depth]:
            raise StepError(f"{what} measured no depth {missing[0]} (it measured {sorted(by_depth)}); see {log}")
        for d in b.depths:
            per_depth[d]["pp_tps"].append(by_depth[d].pp_tps)
            per_depth[d]["tg_tps"].append(by_depth[d].tg_tps)
        runs.append({"wall_s": round(res.wall_s, 2), **res.times()})
    return {
        "model_file": str(model),
        "size_bytes": sum(os.path.getsize(f) for f in shards(model)),
        "bench": {"depths": list(b.depths), "pp": b.pp, "tg": b.tg, "ctx": b.ctx, "repeats": b.repeats,
                  "mla": b.mla, "fa": b.fa, "threads": threads},
        "run": b.run.to_dict(),
        "speed": [{"depth": d, "pp_tps": _spread(v["pp_tps"]), "tg_tps": _spread(v["tg_tps"])}
                  for d, v in per_depth.items()],
        "host": describe_host(),
        "engine": _engine(bin_dir),
        "ran": ran,
        "cmd": res.cmd,
        "runs": runs,
        "wall_s": round(sum(r["wall_s"] for r in runs), 2),
        "started_at": runs[0]["started_at"],
        "ended_at": runs[-1]["ended_at"],
    }
