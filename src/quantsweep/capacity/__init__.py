"""The capacity plan: every job of a sweep with the file it reads, its RAM, GPU memory, disk and
runtime, the totals (peak disk, engine-hours, wall time), and whether the sweep fits its
machine. `quantsweep plan` prints it; the workflow checks it before any job starts, writes it
to results/plan/ and asks the scheduler for each job's figures from it."""

from .files import ModelFile, Placement, detected, source_table, tiny_table
from .fit import Shortfall, refusal, shortfalls
from .jobs import (CapacityPlan, Job, all_pool_types, capacity_plan, convert_job, disk_mb, growth, item_of, mem_mb, plan_sweep,
                   pool_types, runtime_min)
from .show import text, to_json

__all__ = ["CapacityPlan", "Job", "ModelFile", "Placement", "Shortfall", "all_pool_types", "capacity_plan", "convert_job", "detected", "disk_mb",
           "growth", "item_of", "mem_mb", "plan_sweep", "pool_types", "refusal", "runtime_min", "shortfalls", "source_table", "text",
           "tiny_table", "to_json"]
