"""What machine a benchmark ran on: CPU model, the CPUs the job may use, and the GPUs with their
driver. Speeds mean nothing without it (ik_llama.cpp's `_R4` layouts pay off only on some
hardware), and a cluster sweep may run its benchmarks on different nodes."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess

NVIDIA_SMI_QUERY = ["--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits"]


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's allocation), not all of the node's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def parse_nvidia_smi(text: str, visible: str | None = None) -> list[dict]:
    """GPUs from `nvidia-smi --query-gpu=index,name,driver_version,memory.total` CSV lines; with
    CUDA_VISIBLE_DEVICES as numbers, only those the job may use."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit():
            continue
        mem = int(parts[3]) if parts[3].isdigit() else None
        gpus.append({"index": int(parts[0]), "name": parts[1], "driver": parts[2], "memory_mib": mem})
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        keep = [int(v) for v in visible.split(",") if v.strip()]
        gpus = [g for g in gpus if g["index"] in keep]
    return gpus


def gpus() -> list[dict]:
    """The NVIDIA GPUs this job sees ([] without nvidia-smi or a working driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        res = subprocess.run([smi, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(res.stdout, os.environ.get("CUDA_VISIBLE_DEVICES")) if res.returncode == 0 else []


def describe_host() -> dict:
    """The machine in a record: hostname, CPU model and usable CPUs, GPUs (name, driver, MiB)."""
    return {"hostname": socket.gethostname(), "cpu": cpu_model(), "cpus": usable_cpus(), "gpus": gpus()}
