"""Deterministic random draws and the BF16 rounding the weights are stored with.

Every tensor draws from its own generator seeded by ``(seed, crc32(name))``, so a draw
depends on the seed and the name only, never on the order of construction.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..settings.tiny import TinySpec


def rng(spec: TinySpec, name: str) -> np.random.Generator:
    """Independent generator per tensor name (order-independent, deterministic)."""
    return np.random.default_rng([spec.seed, zlib.crc32(name.encode())])


def normal(spec: TinySpec, name: str, shape: tuple[int, ...], std: float = 1.0) -> np.ndarray:
    """Standard normal draws of `shape` from `name`'s generator, times `std`."""
    return rng(spec, name).standard_normal(shape) * std


def bf16_round(a: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest-even, as gguf/ggml) and return float64."""
    f = np.ascontiguousarray(a, dtype=np.float32)
    n = f.view(np.uint32).astype(np.uint64)
    n = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint32) << 16
    return n.astype(np.uint32).view(np.float32).astype(np.float64)


def norm_gain(spec: TinySpec, name: str, n: int, outliers: np.ndarray | None) -> np.ndarray:
    """Heavy-tailed RMSNorm gain: log-normal, times `outlier_gain` on `outliers`; RMS 1."""
    g = np.exp(spec.norm_sigma * rng(spec, name).standard_normal(n))
    if outliers is not None:
        g[outliers] *= spec.outlier_gain
    return bf16_round(g / np.sqrt(np.mean(g * g)))
