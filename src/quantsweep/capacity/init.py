"""`quantsweep init`: a work dir with its own config for one model, sized from the model's header
and the machine, so that a user's first sweep of a 671B model is one that fits.

The shipped config/config.yaml is the demo's; a work dir's config/config.yaml replaces it
(`snakemake --directory DIR` reads DIR/config/config.yaml only). What is chosen, and why:

- quants: a ladder from Q8_0 (made without an imatrix: it is also the imatrix's model or the
  reference when they fit) down to IQ2_KS, keeping those whose evaluation fits the machine;
- eval.reference: the unquantized model when its run fits, else the largest quant that does;
- imatrix.model: the source when it fits, else the largest imatrix-free quant that does;
- run settings: with a GPU, every layer offloaded and the routed experts in RAM (-ot exps=CPU)
  unless the whole model fits in VRAM;
- allocate: a ladder whose top fits (every sensitivity run holds it), and three GiB budgets
  between the smallest quant and the largest that fits.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from ..errors import ConfigError
from ..gguf.types import ALLOCATION_LADDER, SWEEP_LADDER
from ..settings.machine import MachineSettings
from .jobs import GiB, plan_sweep

LADDER, ALLOC_LADDER = SWEEP_LADDER, ALLOCATION_LADDER  # most bits first / fewest bits first
PRESETS = {"workstation": {"jobs": 1}, "slurm": {"jobs": 16}}  # engine jobs at once


def model_name(path: str | Path) -> str:
    """A config name from a model's file or directory name (shard suffix and extension dropped)."""
    stem = re.sub(r"(-\d{5}-of-\d{5})?\.gguf$", "", Path(path).name)
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem).strip("-.") or "model"
    return name if name[0].isalnum() else f"m{name}"


def init_config(base: dict, source: dict, machine: MachineSettings, preset: str, recipe_dir: str = ".") -> dict:
    """The work dir's config: `base` (the shipped config) with the model `source` ({source,
    path, ...}) and everything sized for it on `machine`. ConfigError when even the smallest
    sweep cannot fit, naming the shortfall."""
    from .. import config as qconfig
    from .fit import refusal

    if preset not in PRESETS:
        raise ConfigError(f"init --machine: {preset!r} is not one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(base)
    name = model_name(source["path"])
    cfg["models"] = {name: source}
    machine = machine.updated({"jobs": PRESETS[preset]["jobs"]} if machine.jobs == 1 else {})
    cfg["machine"] = {k: v for k, v in machine.to_dict().items() if k in ("ram_gib", "gpus", "vram_gib", "disk_gib",
                                                                          "jobs") and v}
    cfg["quants"] = [{"name": "Q8_0", "ftype": "Q8_0", "imatrix": False}, *LADDER[1:]]
    cfg.setdefault("imatrix", {})["model"] = "source"
    cfg.setdefault("eval", {})["reference"] = "base"
    cfg["allocate"] = {**cfg.get("allocate", {}), "enabled": False, "budgets": []}
    gpu = machine.gpus > 0
    cfg.setdefault("engine", {})["cuda"] = gpu
    cfg["run"] = {"defaults": {}, "imatrix": {}, "eval": {}, "bench": {}}

    def planned(c):
        sweep = qconfig.load(c, recipe_dir)
        return sweep, plan_sweep(sweep, machine=machine)

    sweep, p = planned(cfg)
    src_bytes = next(j.read_bytes for j in p.jobs if j.rule == "eval_baseline")
    if gpu:
        fits_gpu = src_bytes < 0.8 * machine.vram_gib * machine.gpus * GiB
        cfg["run"]["defaults"] = {"gpu_layers": 99, **({} if fits_gpu else {"override_tensors": ["exps=CPU"]})}
        sweep, p = planned(cfg)
    ram = machine.ram_gib * GiB if machine.ram_gib else float("inf")
    vram = machine.vram_gib * GiB if machine.vram_gib else float("inf")

    def fits(j) -> bool:
        return j.ram_bytes <= ram and j.vram_bytes <= vram

    evals = {j.item: j for j in p.jobs if j.rule == "eval_quant"}
    keep = [q for q in cfg["quants"] if fits(evals[q["name"] if isinstance(q, dict) else q])]
    if len(keep) < 2:
        raise ConfigError(f"init: the machine ({machine.describe()}) holds fewer than two quants of this model "
                          f"({src_bytes / GiB:,.0f} GiB at its source type)")
    cfg["quants"] = keep
    names = [q["name"] if isinstance(q, dict) else q for q in keep]
    if not fits(next(j for j in p.jobs if j.rule == "eval_baseline")):
        cfg["eval"]["reference"] = names[0]
    if not all(fits(j) for j in p.jobs if j.rule == "imatrix_collect"):
        top = names[0]  # the largest that fits (Q8_0 is made without an imatrix already)
        if top != "Q8_0":  # the imatrix's model is made without one
            cfg["quants"].insert(0, {"name": f"{top}-noimatrix", "ftype": top, "imatrix": False})
            top = f"{top}-noimatrix"
        cfg["imatrix"]["model"] = top
    # allocation: a top every sensitivity run can hold (the largest ladder type kept as a quant),
    # and GiB budgets between the smallest quant and the largest
    tops = [i for i, t in enumerate(ALLOC_LADDER) if t.upper() in {n.upper() for n in names}]
    sizes = sorted(evals[n].read_bytes / GiB for n in names)
    if tops and tops[-1] >= 1:
        lo, hi = sizes[0], sizes[-1]
        budgets = sorted({round(lo + (hi - lo) * f) for f in (0.15, 0.4, 0.7)})
        cfg["allocate"] = {**cfg["allocate"], "enabled": True, "ladder": list(ALLOC_LADDER[:tops[-1] + 1]),
                           "budgets": [{"gib": float(b)} for b in budgets]}
    sweep, p = planned(cfg)
    while (refused := refusal(p, sweep)) and cfg["machine"].get("jobs", 1) > 1 and p.peak_disk_bytes > (
            machine.disk_gib or float("inf")) * GiB:  # fewer jobs at once: fewer assembled models on disk
        cfg["machine"]["jobs"] = max(1, cfg["machine"]["jobs"] // 2)
        machine = machine.updated({"jobs": cfg["machine"]["jobs"]})
        sweep, p = planned(cfg)
    if refused:
        raise ConfigError(f"init: {refused}")
    return cfg


HEADER = """\
# quantsweep work dir config for {name}, written by `quantsweep init` ({why}).
# Run it with:  snakemake --directory {dir} --cores all
#   on SLURM:   snakemake --directory {dir} --workflow-profile profiles/slurm --jobs <machine.jobs>
# Every key is documented in config/README.md of the quantsweep checkout; `quantsweep plan
# {dir}/config/config.yaml` prints what each job needs. Set texts to your calibration and
# evaluation files (e.g. calibration_data_v5_rc.txt, wiki.test.raw); builtin is the demo's.
"""


def write_workdir(out_dir: str | Path, cfg: dict, why: str) -> Path:
    """DIR/config/config.yaml (refused if it exists: a work dir's config is the user's)."""
    import yaml

    from ..fileio import write_text

    path = Path(out_dir) / "config" / "config.yaml"
    if path.exists():
        raise ConfigError(f"init: {path} exists; remove it or choose another directory")
    name = next(iter(cfg["models"]))
    text = HEADER.format(name=name, why=why, dir=out_dir) + yaml.safe_dump(cfg, sort_keys=False, width=110)
    write_text(path, text)
    return path
