"""Whether a sweep fits its machine, and if not, what would make it fit: checked before any
job starts, so a 256 GB machine is told in one line that the 1.3 TB reference run cannot
happen, instead of the job dying of OOM two days in.

A suggestion is only made once it is tried: each candidate change (the imatrix on a quant, a
smaller reference, the experts in RAM and the rest on the GPU, a quant or pool types fewer) is
planned again, and the first one under which the job fits is named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from ..gguf.types import SWEEP_LADDER
from ..settings import MachineSettings, Quant, RunSettings, Sweep
from .jobs import GiB, CapacityPlan, Job

EXPERTS_IN_RAM = RunSettings(gpu_layers=99, override_tensors=("exps=CPU",))
# tried for imatrix.model (made without an imatrix), most bits first: the whole ladder, since a
# 256 GiB machine holds V3 only at ~2-3 bpw (a coarser imatrix beats none; the plan says which)
IMATRIX_MODELS = SWEEP_LADDER


@dataclass(frozen=True)
class Shortfall:
    job: Job | None  # None: the sweep's disk total
    what: str        # "RAM", "GPU memory", "GPUs", "disk"
    need: float      # GiB (GPUs: a count)
    have: float
    fix: str = ""

    def line(self) -> str:
        unit = "" if self.what == "GPUs" else " GiB"
        who = f"{self.job.rule} {self.job.name}".strip() if self.job else "the sweep"
        out = (f"machine: {who} needs {self.need:,.0f}{unit} {self.what}, the machine has {self.have:,.0f}{unit} "
               f"(short {self.need - self.have:,.0f}{unit})")
        return out + (f"; would fit with {self.fix}" if self.fix else "")


def _raw(p: CapacityPlan) -> list[Shortfall]:
    m, out = p.machine, []
    for j in p.jobs:
        if m.ram_gib and j.ram_bytes > m.ram_gib * GiB:
            out.append(Shortfall(j, "RAM", j.ram_bytes / GiB, m.ram_gib))
        if j.gpus and m.given and m.gpus < j.gpus:
            out.append(Shortfall(j, "GPUs", j.gpus, m.gpus))
        if m.vram_gib and j.vram_bytes > m.vram_gib * GiB:
            out.append(Shortfall(j, "GPU memory", j.vram_bytes / GiB, m.vram_gib))
    if m.disk_gib and p.peak_disk_bytes > m.disk_gib * GiB:
        out.append(Shortfall(None, "disk", p.peak_disk_bytes / GiB, m.disk_gib))
    return out


def _family(j: Job | None) -> tuple:
    """What a fix must clear: the reference's run whichever rule makes it, the imatrix passes."""
    if j is None:
        return ("disk",)
    if j.rule in ("eval_baseline", "eval_reference"):
        return ("reference", j.model)
    if j.rule == "imatrix_collect":
        return ("imatrix", j.model)
    if j.rule in ("sensitivity_run", "sensitivity_top"):
        return ("sensitivity", j.model)
    return (j.rule, j.model, j.item)


def _step(rule: str) -> str:
    if rule.startswith("imatrix"):
        return "imatrix"
    return "bench" if rule.startswith("bench") else "eval"


def _ordered_quants(p: CapacityPlan, sweep: Sweep, model: str) -> list[Quant]:
    """The sweep's own quants, largest file first."""
    size = {j.item: j.read_bytes for j in p.jobs if j.model == model and j.rule == "bench_quant"} or \
        {j.item: j.written_bytes for j in p.jobs if j.model == model and j.rule == "quantize"}
    return sorted((q for q in sweep.quants if not q.auto), key=lambda q: -size.get(q.name, 0))


def _candidates(p: CapacityPlan, sweep: Sweep, s: Shortfall) -> list[tuple[str, Sweep, MachineSettings | None]]:
    """(what to write in the config, the sweep with it, the machine if that changes) in the order
    they are tried."""
    rep = dataclasses.replace
    out: list[tuple[str, Sweep, MachineSettings | None]] = []
    j = s.job
    if j is None:
        a = sweep.allocate
        temp = max(((x.written_bytes - x.kept_bytes) for x in p.jobs if x.count > 1), default=0)
        for k in (16, 8, 4, 2, 1):
            if temp and k < p.parallel:
                out.append((f"machine.jobs: {k} (and snakemake --jobs {k}: fewer sensitivity runs' assembled models "
                            "on disk at once)", sweep, p.machine.updated({"jobs": k})))
        if a.pool and any(q.recipe or q.auto for q in sweep.quants):
            out.append(("allocate.pool: false (recipes quantized one by one, no pool files)",
                        rep(sweep, allocate=a.updated({"pool": False})), None))
        dropped: list[str] = []  # the largest first, then the next with it, ...
        for q in _ordered_quants(p, sweep, next(iter(sweep.models))):
            if q.name != sweep.eval.reference and q.name != sweep.imatrix.model:
                dropped.append(q.name)
                out.append((f"{' and '.join(dropped)} dropped from quants",
                            rep(sweep, quants=tuple(x for x in sweep.quants if x.name not in dropped)), None))
        return out
    step = _step(j.rule)
    if s.what in ("RAM", "GPU memory") and sweep.machine.gpus:
        run = getattr(sweep, step).run
        if run.override_tensors != EXPERTS_IN_RAM.override_tensors or not run.gpu_layers:
            fixed = run.updated({"gpu_layers": 99, "override_tensors": ["exps=CPU"]})
            steps = ("eval",) if step == "eval" else (step,)
            out.append((f"run.{step}: {{gpu_layers: 99, override_tensors: [exps=CPU]}} (experts in RAM, the rest "
                        "on the GPU)", rep(sweep, **{st: getattr(sweep, st).updated({"run": fixed.to_dict()})
                                                     for st in steps}), None))
    if j.rule == "imatrix_collect" and s.what == "RAM":
        free = [q for q in _ordered_quants(p, sweep, j.model) if not q.imatrix and not q.recipe]
        for q in free:
            out.append((f"imatrix.model: {q.name}", rep(sweep, imatrix=sweep.imatrix.updated({"model": q.name})),
                        None))
        names = {q.name for q in sweep.quants}
        for t in IMATRIX_MODELS:
            name = f"{t}-noimatrix"
            if name not in names:
                q = Quant(name, t, False)
                out.append((f"imatrix.model: {name} and {{name: {name}, ftype: {t}, imatrix: false}} in quants",
                            rep(sweep, quants=(q, *sweep.quants), imatrix=sweep.imatrix.updated({"model": name})),
                            None))
    if j.rule in ("eval_baseline", "eval_reference", "bench_base") and s.what == "RAM":
        for q in _ordered_quants(p, sweep, j.model):
            if q.name != sweep.eval.reference:
                out.append((f"eval.reference: {q.name}", rep(sweep, eval=sweep.eval.updated({"reference": q.name})),
                            None))
    if j.rule in ("eval_quant", "bench_quant", "quantize") and j.item and not sweep.quant(j.item).auto:
        if j.item not in (sweep.eval.reference, sweep.imatrix.model):
            out.append((f"{j.item} dropped from quants",
                        rep(sweep, quants=tuple(q for q in sweep.quants if q.name != j.item)), None))
    if j.rule.startswith("sensitivity") and len(sweep.allocate.ladder) > 2:
        a = sweep.allocate
        for k in range(len(a.ladder) - 1, 1, -1):
            ladder = list(a.ladder[:k])
            out.append((f"allocate.ladder: [{', '.join(ladder)}] (a smaller top: every sensitivity run holds it)",
                        rep(sweep, allocate=a.updated({"ladder": ladder})), None))
    return out


def _fix(p: CapacityPlan, sweep: Sweep, s: Shortfall) -> str:
    want = _family(s.job)
    for text, patched, machine in _candidates(p, sweep, s):
        try:
            q = p.replanned(patched, machine)
        except (ConfigError, KeyError):  # a candidate the settings refuse (a budget's size_of quant dropped)
            continue
        if not any(_family(r.job) == want and r.what == s.what for r in _raw(q)):
            return text
    return ""


def shortfalls(p: CapacityPlan, sweep: Sweep, fixes: bool = True) -> list[Shortfall]:
    """Every job (and the disk total) that exceeds the machine, each with the first tried change
    under which it fits (jobs of one family, the two imatrix passes, share theirs)."""
    out, seen = [], {}
    for s in _raw(p):
        if fixes:
            key = (_family(s.job), s.what)
            if key not in seen:
                seen[key] = _fix(p, sweep, s)
            s = dataclasses.replace(s, fix=seen[key])
        out.append(s)
    return out


def refusal(p: CapacityPlan, sweep: Sweep) -> str | None:
    """The one line that stops a sweep that cannot fit (the first shortfall, with its fix;
    `quantsweep plan` lists them all), or None."""
    raw = _raw(p)
    if not raw:
        return None
    first = shortfalls(p, sweep)[0]
    more = f" (and {len(raw) - 1} more: quantsweep plan)" if len(raw) > 1 else ""
    return first.line() + more

