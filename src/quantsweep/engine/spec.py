"""What an engine spec (settings.EngineSpec, the `engine:` section) builds, and what an installed
engine says about itself."""

from __future__ import annotations

import json
from pathlib import Path

from ..settings import EngineSpec


def cmake_args(spec: EngineSpec) -> list[str]:
    """The cmake configure flags: static tools so the bin dir is self-contained."""
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_CURL=OFF",
        f"-DGGML_NATIVE={'ON' if spec.native else 'OFF'}",
    ]
    if spec.cuda:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={spec.cuda_architectures}"]
        if spec.cuda_force_bf16:
            args.append("-DGGML_CUDA_IQK_FORCE_BF16=ON")
    if spec.sched_max_copies:
        args.append(f"-DGGML_SCHED_MAX_COPIES={spec.sched_max_copies}")
    if spec.max_contexts:
        args.append(f"-DGGML_MAX_CONTEXTS={spec.max_contexts}")
    return args + list(spec.cmake_flags)


def installed_meta(bin_dir: str | Path) -> dict | None:
    """What an installed engine says about itself: engine.json beside its bin/ (written by
    `quantsweep engine build`); None when there is none or it does not read."""
    try:
        meta = json.loads((Path(bin_dir).parent / "engine.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
