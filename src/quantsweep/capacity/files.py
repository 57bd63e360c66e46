"""The files a sweep's jobs read, as tensor tables: the source model (its header, or what the
converter or the demo generator will write) and every quant, pool and assembled model (planned
from the source's table with the recipe, as llama-quantize will choose).

A job's RAM, GPU memory and runtime follow from which tensors of the file it reads sit on which
device (`Placement`: -ngl and -ot as the engine applies them) and how many of their weights
one token touches (the routed experts: n_expert_used of n_expert).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..gguf.deepseek2 import deepseek2_table, dims_from_gguf_kv
from ..gguf.reader import GGUFTable, read_model, shards
from ..gguf.types import by_name
from ..settings import MachineSettings, ModelSettings, RunSettings
from ..settings.tiny import TinySpec
from ..tinymodel.write import stored_type

EXPERTS = re.compile(r"_exps\.")
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Tensor:
    name: str
    n_elements: int
    nbytes: int


@dataclass(frozen=True)
class ModelFile:
    """One GGUF a job reads or writes: its tensors' sizes and the model's dimensions."""

    label: str                   # "source", a quant's name, "pool iq4_ks", ...
    tensors: tuple[Tensor, ...]
    dims: dict                   # gguf.deepseek2 dimension keys (n_layer, n_expert, n_vocab, ...)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_elements(self) -> int:
        return max((t.n_elements for t in self.tensors), default=0)

    def scaled(self, label: str, nbytes: int) -> ModelFile:
        """The same tensors at another total size (an auto recipe: its budget, types unknown yet)."""
        f = nbytes / max(self.nbytes, 1)
        return ModelFile(label, tuple(Tensor(t.name, t.n_elements, int(t.nbytes * f)) for t in self.tensors),
                         self.dims)

    def active_fraction(self, name: str) -> float:
        """How much of a tensor one token computes with: a routed-expert stack n_used / n_expert;
        token_embd is a row lookup, not a product."""
        if name == "token_embd.weight":
            return 0.0
        if EXPERTS.search(name) and self.dims.get("n_expert"):
            return min(self.dims.get("n_expert_used", 1), self.dims["n_expert"]) / self.dims["n_expert"]
        return 1.0


def of_table(table: GGUFTable, label: str = "source") -> ModelFile:
    return ModelFile(label, tuple(Tensor(t.name, t.n_elements, t.nbytes) for t in table.tensors),
                     dims_from_gguf_kv(table.kv))


def of_plan(source: ModelFile, plan, label: str) -> ModelFile:
    """A quant's file from its size plan (planner.plan.plan on the source's table)."""
    return ModelFile(label, tuple(Tensor(t.name, t.n_elements, t.nbytes) for t in plan.tensors), source.dims)


def tiny_table(spec: TinySpec) -> GGUFTable:
    """The demo model's table before it is generated, as its writer will write it (so the plan a
    sweep starts with is the plan of the file, and a rerun finds it unchanged)."""
    t = deepseek2_table(layout=spec.layout, source_type="bf16", n_layer=spec.n_layer, n_dense=spec.n_dense,
                        n_embd=spec.n_embd, n_head=spec.n_head, q_lora=spec.q_lora_rank, kv_lora=spec.kv_lora_rank,
                        qk_nope=spec.qk_nope, qk_rope=spec.qk_rope, v_head=spec.v_head, n_ff=spec.n_ff,
                        n_expert=spec.n_expert, n_expert_used=spec.n_expert_used, n_ff_exp=spec.n_ff_exp,
                        n_shared=spec.n_shared, n_vocab=354)
    t.tensors = [replace(x, type_id=by_name(stored_type(x.name)).id) for x in t.tensors]
    return t


def source_table(m: ModelSettings, written: str | Path | None = None) -> GGUFTable:
    """The table of the GGUF the sweep quantizes: `written` (the converted or generated file)
    once every shard of it exists, else a gguf source's header, a checkpoint's predicted
    conversion (its headers and config.json), or the demo's shapes."""
    if written is not None and all(f.exists() for f in shards(written)):
        return read_model(written)
    if m.source == "gguf":
        return read_model(m.path)
    if m.source == "hf":
        from ..hf.checkpoint import Checkpoint

        return Checkpoint.read(m.path).predicted_table(m.outtype)
    return tiny_table(m.tiny)


@dataclass(frozen=True)
class Placement:
    """Where each tensor of a file lives when the engine runs with these run settings: the last
    `-ngl` layers on the GPU(s) (the output too once -ngl exceeds the layers; token_embd never),
    then `-ot PATTERN=BUFFER` moving what matches (first match wins, as the engine applies them)."""

    run: RunSettings
    n_layer: int

    def on_gpu(self, name: str) -> bool:
        for ot in self.run.override_tensors:
            for part in ot.split(","):
                pattern, buffer = part.split("=", 1)
                if re.search(pattern, name):
                    return not buffer.upper().startswith("CPU")
        ngl = min(self.run.gpu_layers, self.n_layer + 1)
        if not ngl or name == "token_embd.weight":
            return False
        m = _LAYER.match(name)
        if m:
            return int(m.group(1)) >= self.n_layer - ngl
        return ngl > self.n_layer  # output.weight, output_norm

    @property
    def kv_on_gpu(self) -> bool:
        return self.run.gpu_layers > 0

    def split(self, f: ModelFile) -> dict[str, float]:
        """Bytes and active weights (per token) on each side."""
        out = {"cpu_bytes": 0.0, "gpu_bytes": 0.0, "cpu_active": 0.0, "gpu_active": 0.0,
               "cpu_active_bytes": 0.0, "gpu_active_bytes": 0.0}
        for t in f.tensors:
            side = "gpu" if self.on_gpu(t.name) else "cpu"
            a = f.active_fraction(t.name)
            out[f"{side}_bytes"] += t.nbytes
            out[f"{side}_active"] += a * t.n_elements
            out[f"{side}_active_bytes"] += a * t.nbytes
        return out


def kv_bytes_per_token(dims: dict, mla: int) -> int:
    """f16 K/V cache per token over all layers: MLA (mla >= 1) caches the compressed latent and
    the rope key (kv_lora + qk_rope per layer); mla 0 full per-head keys and values."""
    if mla:
        per_layer = dims["kv_lora"] + dims["qk_rope"]
    else:
        per_layer = dims["n_head"] * (dims["qk_nope"] + dims["qk_rope"] + dims["v_head"])
    return 2 * per_layer * dims["n_layer"]


def detected(m: MachineSettings, workdir: str | Path = ".") -> MachineSettings:
    """With detect, this host's RAM, GPUs (nvidia-smi) and the work dir's free disk; the values
    written in the config win over detected ones."""
    if not m.detect:
        return m
    from ..engine.hardware import gpus

    found = gpus()
    vram = min((g["memory_mib"] or 0) for g in found) / 1024 if found else 0.0
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    where = Path(workdir).absolute()
    while not where.exists():  # a work dir not made yet: the filesystem it will be on
        where = where.parent
    disk = shutil.disk_usage(where).free / 2**30
    return m.updated({"detect": False, "ram_gib": m.ram_gib or round(ram, 1), "gpus": m.gpus or len(found),
                      "vram_gib": m.vram_gib or round(vram, 1), "disk_gib": m.disk_gib or round(disk, 1)})
