"""Where a running (or stopped) sweep stands: every job of its capacity plan done, running or
left, each running engine job's progress from its own log, and estimates that learn the
machine: a finished job's measured time against the plan's first estimate gives a factor per
rule (an engine rule with none yet takes all engine jobs'), and the jobs left are the plan's
estimate times it (capacity.jobs.factor_of).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..capacity.jobs import factor_of, item_of, plan_paths
from ..engine.logparse import Progress, parse_progress
from ..errors import QuantsweepError
from .records import SmkJob, WorkDir

STALL_MIN_S = 120.0     # never call a job stalled sooner
STALL_UNITS = 10.0      # ... nor before it has been silent this many of its own units' time


@dataclass
class PlanJob:
    """A job of the plan.json the sweep started with (sensitivity runs: one entry, count N)."""

    rule: str
    model: str
    item: str
    seconds: float
    count: int
    engine: bool


@dataclass
class Running:
    name: str
    log: str
    elapsed_s: float
    progress: dict | None         # Progress as a dict
    rate: str                     # "3.2 chunks/s"
    eta_s: float
    silent_s: float               # since the log last grew
    stalled: bool
    external_id: str = ""
    engine: bool = True


@dataclass
class Finished:
    rule: str
    name: str
    planned_s: float              # the plan's first estimate
    measured_s: float
    rate: str = ""                # what its record says it got through per second
    ended: float = 0.0            # epoch seconds
    engine: bool = True           # an engine job (not the engine build, a conversion, the demo model)


@dataclass
class SweepStatus:
    workdir: str
    snakemake_running: bool
    done: int
    running: list[Running]
    failed: list[str]
    left: int
    finished: list[Finished] = field(default_factory=list)
    factors: dict[str, float] = field(default_factory=dict)   # rule -> measured / planned
    engine_hours_spent: float = 0.0
    engine_hours_left: float = 0.0
    eta_s: float = 0.0
    parallel: int = 1
    now: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"


def read_plan(workdir: Path) -> tuple[list[PlanJob], int]:
    """The plan the sweep wrote at its start (results/plan/plan.json) and its parallelism."""
    _, path = plan_paths(workdir)
    try:
        doc = json.loads(path.read_text())
    except OSError:
        raise QuantsweepError(f"{path}: no capacity plan (has a sweep started in {workdir}?)") from None
    except ValueError as e:
        raise QuantsweepError(f"{path}: not valid JSON ({e})") from None
    jobs = [PlanJob(j["rule"], j["model"], j["item"], float(j["seconds"]), int(j["count"]), bool(j["engine"]))
            for j in doc["jobs"]]
    return jobs, int(doc["totals"].get("parallel", 1))


def _plan_key(j: SmkJob) -> tuple[str, str, str]:
    item = item_of(j.wildcards)
    if j.rule == "sensitivity_run":
        item = ""  # one plan entry for all of them
    return (j.rule, j.wildcards.get("model", ""), item)


def job_name(j: SmkJob) -> str:
    """rule model/item, as the plan names it (a sensitivity run: its group@type)."""
    item = item_of(j.wildcards)
    if j.rule == "sensitivity_run":
        item = f"{j.wildcards.get('group', '')}@{j.wildcards.get('stype', '')}"
    return f"{j.rule} " + "/".join(x for x in (j.wildcards.get("model", ""), item) if x)


def learned_factors(finished: list[Finished]) -> dict[str, float]:
    """measured / planned per rule (median over its finished jobs), and "*" over all engine
    jobs: the engine rules with none finished yet borrow it (capacity.jobs.factor_of)."""
    by: dict[str, list[float]] = {}
    for f in finished:
        if f.planned_s > 0:
            by.setdefault(f.rule, []).append(f.measured_s / f.planned_s)
    out = {r: statistics.median(v) for r, v in by.items()}
    engine = [f.measured_s / f.planned_s for f in finished if f.engine and f.planned_s > 0]
    if engine:
        out["*"] = statistics.median(engine)
    return out


def _recorded_rate(root: Path, outputs: list[str]) -> str:
    """The measured rate in a finished job's record (engine.run.measured_rate), for people."""
    for out in outputs:
        if out.endswith(".json") and not out.endswith(".manifest.json"):
            try:
                rate = json.loads((root / out).read_text()).get("rate") or {}
            except (OSError, ValueError, AttributeError):
                continue
            if (v := rate.get("tokens_per_s")) is not None:
                return f"{v:,.0f} tokens/s"
            if (v := rate.get("bytes_per_s")) is not None:
                return f"{v / 1e6:,.0f} MB/s"
    return ""


def _rate(p: Progress, elapsed: float) -> str:
    if not p.done or elapsed <= 0:
        return ""
    r = p.done / elapsed
    return f"{r:.2f} {p.unit}/s" if r >= 0.1 else f"{elapsed / p.done:.0f} s per {p.unit.rstrip('s')}"


def sweep_status(workdir: str | Path, now: float | None = None) -> SweepStatus:
    """The status of the sweep in `workdir` from its plan, Snakemake's records and the running
    jobs' logs."""
    root = Path(workdir)
    now = time.time() if now is None else now
    plan, parallel = read_plan(root)
    wd = WorkDir.read(root)
    by_key: dict[tuple, list[SmkJob]] = {}
    for j in wd.jobs.values():
        by_key.setdefault(_plan_key(j), []).append(j)
    finished: list[Finished] = []
    running_jobs: list[tuple[PlanJob, SmkJob]] = []
    failed: list[str] = []
    done = 0
    left_jobs: list[PlanJob] = []
    for pj in plan:
        seen = 0  # done, running or failed: the plan's jobs not left
        for j in by_key.get((pj.rule, pj.model, pj.item), []):
            state = wd.state(j)
            seen += state in ("finished", "running", "failed")
            if state == "finished":
                done += 1
                if (times := wd.times(j)) is not None:
                    finished.append(Finished(pj.rule, job_name(j), pj.seconds, times[1] - times[0],
                                             _recorded_rate(wd.root, j.outputs), times[1], pj.engine))
            elif state == "running":
                running_jobs.append((pj, j))
            elif state == "failed":
                failed.append(job_name(j))
        left_jobs += [pj] * max(0, pj.count - seen)
    factors = learned_factors(finished)
    running = [_running(wd, pj, j, now, factor_of(factors, pj.rule, pj.engine)) for pj, j in running_jobs]
    left_s = sum(pj.seconds * factor_of(factors, pj.rule, pj.engine) for pj in left_jobs)
    run_s = sum(r.eta_s for r in running)
    spent = sum(f.measured_s for f in finished if f.engine) + sum(r.elapsed_s for r in running if r.engine)
    eta = max(max((r.eta_s for r in running), default=0.0), (left_s + run_s) / max(parallel, 1))
    return SweepStatus(str(root), wd.locked, done, running, failed, len(left_jobs), finished, factors, spent / 3600,
                       (left_s + run_s) / 3600, eta, parallel, now)


def _running(wd: WorkDir, pj: PlanJob, j: SmkJob, now: float, factor: float) -> Running:
    started = wd.started_at(j)
    elapsed = max(0.0, now - started)
    log = next(iter(j.logs), "")
    text, silent = "", elapsed
    if log:
        path = wd.root / log
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            silent = max(0.0, now - path.stat().st_mtime)
        except OSError:
            pass
    p = parse_progress(text) if text else None
    expected = pj.seconds * factor
    if p is not None and p.done and p.total:
        eta = elapsed / p.done * (p.total - p.done)
        per_unit = elapsed / p.done
    else:
        eta = max(0.0, expected - elapsed)
        per_unit = expected
    stalled = silent > max(STALL_MIN_S, STALL_UNITS * per_unit)
    return Running(job_name(j), log, elapsed, asdict(p) if p else None, _rate(p, elapsed) if p else "", eta, silent,
                   stalled, j.external_id, pj.engine)


def pending_eta(st: SweepStatus | None, model: str, quant: str) -> str:
    """What a quant not measured yet waits for, for the partial report."""
    if st is None:
        return "no status"
    for r in st.running:
        rule, _, name = r.name.partition(" ")
        if name == f"{model}/{quant}":
            return f"{rule} running, ETA {duration(r.eta_s)}"
    if not st.snakemake_running:
        return "not running"
    return f"waiting; the sweep ends in about {duration(st.eta_s)}"


def duration(s: float) -> str:
    s = max(0.0, s)
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
