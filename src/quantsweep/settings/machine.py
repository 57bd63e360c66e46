"""The machine a sweep runs on (`machine:`) and the throughput model its runtimes come from.

A sweep of a 671B model takes days and terabytes: `machine` says what one node has (RAM, GPUs
and their memory, free disk), so a sweep that cannot fit is refused before any job starts
(quantsweep.capacity). `detect` reads them from this host. On a cluster it describes one
compute node; disk is the work dir's shared filesystem, `jobs` how many jobs run at once.

`Throughput` holds the rates runtimes are estimated from. The defaults are rough figures for a
current workstation (a 32-core AVX-512 CPU with 8-12 DDR5 channels, one 24-48 GB GPU) and are
documented in config/README.md "Capacity plan"; set your own once a job has run on your machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Settings, field


@dataclass(frozen=True)
class Throughput(Settings):
    """Rates the plan's runtimes come from (documented in config/README.md "Capacity plan").

    Prompt work (imatrix, perplexity, a bench's PP) is compute bound: 2 FLOP per active weight
    per token, on the device the weight sits on. Generation (a bench's TG) is bandwidth bound:
    every active weight read once per token. quantize reads its source at `quantize_mb_s`.
    """

    SECTION = "machine.throughput"

    cpu_gflops: float = field(2000.0, positive=True)   # effective batched matmul GFLOP/s of the CPU
    gpu_gflops: float = field(60000.0, positive=True)  # same for one GPU
    cpu_mem_gb_s: float = field(200.0, positive=True)  # RAM bandwidth a generation step reaches
    gpu_mem_gb_s: float = field(1000.0, positive=True)  # VRAM bandwidth
    quantize_mb_s: float = field(250.0, positive=True)  # llama-quantize, MB of source read per second
    convert_mb_s: float = field(100.0, positive=True)   # convert_hf_to_gguf (one Python process)
    disk_mb_s: float = field(1000.0, positive=True)     # copying (assembling recipes from the pool)
    slack: float = field(2.0, minimum=1.0)  # runtime requests = estimate x slack + 30 min


@dataclass(frozen=True)
class MachineSettings(Settings):
    """One node: 0 = not checked. `detect: true` (or `machine: detect`) reads this host
    (capacity.detected: values written in the config win over detected ones)."""

    SECTION = "machine"

    detect: bool = False
    ram_gib: float = field(0.0, minimum=0)
    gpus: int = field(0, minimum=0)
    vram_gib: float = field(0.0, minimum=0)  # per GPU
    disk_gib: float = field(0.0, minimum=0)  # free disk for the work dir (results/, resources/)
    jobs: int = field(1, minimum=1)  # engine jobs at once (a workstation's engine jobs take every core)
    throughput: Throughput = field(factory=Throughput)

    @property
    def given(self) -> bool:
        """Whether anything is checked against this machine."""
        return bool(self.ram_gib or self.vram_gib or self.disk_gib or self.gpus)

    def describe(self) -> str:
        parts = [f"{self.ram_gib:g} GiB RAM" if self.ram_gib else "RAM not checked"]
        if self.gpus:
            parts.append(f"{self.gpus} x {self.vram_gib:g} GiB GPU")
        parts.append(f"{self.disk_gib:g} GiB disk" if self.disk_gib else "disk not checked")
        return ", ".join(parts)
