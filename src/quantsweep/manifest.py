"""Provenance: a JSON manifest beside every imatrix, quantized GGUF, evaluation and report.

It answers "what made this file?" months later: the engine (source, commit or sdist sha256,
cmake flags, tool hashes), the exact command lines, the sha256 of every input and output,
tool versions, host and wall time. Inputs of hundreds of GB are hashed once: a digest is
cached under .quantsweep/sha256/ in the working directory, keyed by path, size, mtime and
inode, so the 1.3 TB source model is read for hashing once per sweep, not once per job.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from . import __version__
from .engine.spec import installed_meta
from .fileio import sha256_file, write_json

HASH_CACHE = Path(".quantsweep") / "sha256"
MANIFEST_VERSION = 1


def sha256(path: str | Path, cache_dir: Path | None = HASH_CACHE) -> str:
    """sha256 of a file, from the cache when the file is unchanged since it was hashed."""
    path = Path(path)
    st = path.stat()
    stamp = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    entry = None
    if cache_dir is not None:
        entry = cache_dir / (hashlib.sha256(stamp["path"].encode()).hexdigest()[:32] + ".json")
        try:
            cached = json.loads(entry.read_text())
            if {k: cached.get(k) for k in stamp} == stamp:
                return cached["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    digest = sha256_file(path)
    if entry is not None:
        try:
            write_json(entry, {**stamp, "sha256": digest})
        except OSError:
            pass  # a read-only work dir still gets its manifest, just no cache
    return digest


def engine_identity(bin_dir: str | Path | None) -> dict | None:
    """What engine.json (written by `quantsweep engine build`) says about the tools in bin_dir."""
    if not bin_dir:
        return None
    meta = installed_meta(bin_dir)
    if meta is None:
        return {"bin_dir": str(bin_dir), "engine_json": None}
    keep = ("source", "version", "commit", "sdist_sha256", "git_url", "path", "cmake_flags", "cuda", "key",
            "toolchain", "tools")
    return {k: meta[k] for k in keep if k in meta}


def tool_versions() -> dict:
    out = {"quantsweep": __version__, "python": platform.python_version()}
    for dist in ("numpy", "gguf", "snakemake", "matplotlib", "pyyaml"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def host() -> dict:
    """Where it ran; scheduler and GPU context from the environment (SLURM, CUDA)."""
    out = {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
           "cpus": os.cpu_count()}
    for var in ("SLURM_JOB_ID", "SLURM_CLUSTER_NAME", "SLURM_CPUS_PER_TASK", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(var):
            out[var.lower()] = os.environ[var]
    return out


def build(*, argv: list[str], inputs: dict[str, list[str]], outputs: list[str], started: float, wall_s: float,
          bin_dir: str | Path | None = None, engine_cmds: list[list[str]] | None = None,
          cache_dir: Path | None = HASH_CACHE) -> dict:
    """The manifest of one step. inputs: role -> files; outputs: the files the step wrote.
    Files are hashed a few at a time (a 163-file checkpoint is ~690 GB; hashlib releases the
    GIL, so threads overlap the reads)."""
    every = sorted({str(p) for files in inputs.values() for p in files} | {str(p) for p in outputs})
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digest = dict(zip(every, pool.map(lambda p: sha256(p, cache_dir), every)))

    def entry(p) -> dict:
        return {"path": str(p), "sha256": digest[str(p)], "bytes": os.path.getsize(p)}

    return {
        "manifest_version": MANIFEST_VERSION,
        "command": shlex.join(argv),
        "engine_commands": [shlex.join(c) for c in engine_cmds or []],
        "engine": engine_identity(bin_dir),
        "inputs": {role: [entry(p) for p in files] for role, files in inputs.items() if files},
        "outputs": [entry(p) for p in outputs],
        "tools": tool_versions(),
        "host": host(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(wall_s, 3),
        "cwd": os.getcwd(),
        "python": sys.executable,
    }
