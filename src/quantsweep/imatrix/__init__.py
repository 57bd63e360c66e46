"""Importance matrices: the file formats (formats), merging passes and fitting them to a model
with the engine's stand-in rules (fit), and the pre-flight check and statistics (check)."""

from ..errors import ImatrixError, ImatrixFormatError
from .check import EntryStats, Problem, check, describe, stats
from .fit import STAND_INS, engine_lookup, expected_size, merge, remap
from .formats import Entry, Imatrix, read_any, read_dat, read_gguf, write_any, write_dat, write_gguf
from .verify import verify_collected

__all__ = [
    "Entry", "EntryStats", "Imatrix", "ImatrixError", "ImatrixFormatError", "Problem", "STAND_INS", "check",
    "describe", "engine_lookup", "expected_size", "merge", "read_any", "read_dat", "read_gguf", "remap", "stats",
    "verify_collected", "write_any", "write_dat", "write_gguf",
]
