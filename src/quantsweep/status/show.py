"""The sweep's status as a person reads it at a glance (`quantsweep status`)."""

from __future__ import annotations

import time

from .sweep import SweepStatus, duration


def text(st: SweepStatus, finished_rows: int = 10) -> str:
    state = "running" if st.snakemake_running else "not running (no Snakemake holds the work dir)"
    lines = [f"sweep in {st.workdir}: {state}",
             f"jobs: {st.done} done, {len(st.running)} running, {len(st.failed)} failed, {st.left} left"]
    if st.running:
        lines.append("")
        lines.append(f"{'running':<44} {'progress':<18} {'elapsed':>8} {'rate':<18} {'ETA':>8}")
        for r in st.running:
            p = r.progress
            prog = f"{p['done']}/{p['total'] or '?'} {p['unit']}" if p else "starting"
            flag = f"  STALLED: log silent for {duration(r.silent_s)}" if r.stalled else ""
            ext = f" [SLURM {r.external_id}]" if r.external_id else ""
            lines.append(f"{r.name + ext:<44} {prog:<18} {duration(r.elapsed_s):>8} {r.rate:<18} "
                         f"{duration(r.eta_s):>8}{flag}")
    for name in st.failed:
        lines.append(f"FAILED: {name}")
    if st.finished:
        lines.append("")
        lines.append(f"{'finished (latest)':<44} {'planned':>8} {'measured':>9} {'ratio':>7}  rate")
        for f in sorted(st.finished, key=lambda f: f.ended)[-finished_rows:]:
            ratio = f"{f.measured_s / f.planned_s:.2f}" if f.planned_s > 0 else "-"
            lines.append(f"{f.name:<44} {duration(f.planned_s):>8} {duration(f.measured_s):>9} {ratio:>7}  {f.rate}")
    learned = ", ".join(f"{k} x{v:.3g}" for k, v in sorted(st.factors.items()) if k != "*")
    lines.append("")
    lines.append("estimates: " + (f"the plan's times x measured/planned per rule ({learned}; other engine rules "
                                  f"x{st.factors['*']:.3g})" if st.factors else "the plan's first estimates "
                                  "(nothing measured yet)"))
    lines.append(f"engine-hours: {st.engine_hours_spent:.2f} spent, {st.engine_hours_left:.2f} left; ETA "
                 f"{duration(st.eta_s)} at {st.parallel} job(s) at once (ends about "
                 f"{time.strftime('%a %H:%M', time.localtime(st.now + st.eta_s))})")
    return "\n".join(lines) + "\n"
