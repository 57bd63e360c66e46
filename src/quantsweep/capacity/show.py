"""The capacity plan as a table a person reads at a glance, and as JSON for tools."""

from __future__ import annotations

import json

from ..settings import Sweep
from .fit import shortfalls
from .jobs import GiB, CapacityPlan


def _gib(b: float) -> str:
    return f"{b / GiB:,.1f}" if b else "-"


def _hours(s: float) -> str:
    return f"{s / 3600:,.1f} h" if s >= 360 else f"{s / 60:,.0f} min"


def text(p: CapacityPlan, sweep: Sweep) -> str:
    head = ("job", "reads", "RAM GiB", "GPU GiB", "writes GiB", "keeps GiB", "time")
    rows = []
    for j in p.jobs:
        name = f"{j.rule} {j.name}".strip() + (f" x{j.count}" if j.count > 1 else "")
        each = " each" if j.count > 1 else ""
        rows.append((name, j.reads, _gib(j.ram_bytes), _gib(j.vram_bytes) if j.gpus else "-",
                     _gib(j.written_bytes) + each * bool(j.written_bytes), _gib(j.kept_bytes),
                     _hours(j.seconds) + each))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [f"capacity plan: {', '.join(sorted(sweep.models))} on {p.machine.describe()}"]
    lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines.append("")
    for label, b in p.inputs.items():
        lines.append(f"already on disk: {label} {b / GiB:,.1f} GiB")
    lines.append(f"peak disk (written by the sweep): {p.peak_disk_bytes / GiB:,.1f} GiB"
                 f"{f' of {p.machine.disk_gib:g} GiB free' if p.machine.disk_gib else ''}")
    lines.append(f"engine-hours: {p.engine_hours:,.1f}; wall time at {p.parallel} job(s) at once: "
                 f"{p.wall_hours:,.1f} h")
    lines.append("rates: " + ", ".join(f"{k} {v:g}" for k, v in p.machine.throughput.to_dict().items())
                 + " (machine.throughput)")
    problems = shortfalls(p, sweep)
    if problems:
        lines.append(f"DOES NOT FIT ({len(problems)}):")
        lines += [f"  {s.line()}" for s in problems]
    elif p.machine.given:
        lines.append("fits the machine")
    return "\n".join(lines) + "\n"


def to_json(p: CapacityPlan, sweep: Sweep) -> str:
    problems = shortfalls(p, sweep)
    doc = {
        "models": sorted(sweep.models),
        "machine": p.machine.to_dict(),
        "jobs": [j.to_dict() for j in p.jobs],
        "inputs_bytes": p.inputs,
        "totals": {"peak_disk_bytes": p.peak_disk_bytes, "written_bytes": p.written_bytes,
                   "engine_hours": p.engine_hours, "wall_hours": p.wall_hours, "parallel": p.parallel},
        "fits": not problems,
        "shortfalls": [s.line() for s in problems],
        "notes": list(p.notes),
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"
