"""Where a sweep stands while it runs (`quantsweep status`): Snakemake's own records of the work
dir, the capacity plan it started with, and each running engine job's progress from its log
(engine.logparse, the one parser of engine output)."""

from .records import WorkDir, parse_run_log
from .show import text
from .sweep import SweepStatus, learned_factors, pending_eta, read_plan, sweep_status

__all__ = ["SweepStatus", "WorkDir", "learned_factors", "parse_run_log", "pending_eta", "read_plan", "sweep_status", "text"]
