"""What `publish` makes of a finished sweep (`publish:`): which quants go into the model repository,
how they are named, split and described, and whether the upload runs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Settings, field

# Keywords of publish.quants beside quant names: the report's marks decide which quants they are.
SELECTORS = {
    "pareto": "every quant on a Pareto front of the report (size vs ln PPL ratio, size vs KLD or KLD vs speed)",
    "gate": "every quant on a Pareto front that passes the gate",
}
# What goes beside the shards (each quant's folder always holds its shards).
INCLUDE = ("imatrix", "imatrix_gguf", "recipes", "records", "plots")
DEFAULT_INCLUDE = ("imatrix", "recipes", "records", "plots")
_UNITS = {"M": 10**6, "G": 10**9}  # llama-gguf-split's units (decimal, as the Hub counts)
_SIZE = re.compile(r"^([1-9][0-9]*)([MG])$")
_REPO = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A model name as llama.cpp's tools and the Hub write it in file names: no path separators or spaces.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def split_bytes(size: str) -> int:
    """`50G` -> 50_000_000_000 (G = 10^9 bytes and M = 10^6, as llama-gguf-split reads them)."""
    m = _SIZE.match(size)
    if not m:
        raise ConfigError(f"publish.split_max_size: {size!r} is not a size like 50G or 4000M (whole M or G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class PublishSettings(Settings):
    """The published repository of each model: results/publish/<model>/."""

    SECTION = "publish"

    quants: tuple[str, ...] = ("gate",)  # quant names, or pareto / gate (SELECTORS)
    name: str = ""            # the model's name in file names and general.name; "" = the model's key
    repo: str = ""            # Hub repo id; "" = <quantized_by>/<name>-GGUF (or <name>-GGUF: your namespace)
    quantized_by: str = ""    # general.quantized_by and the card's quantized_by
    base_model: str = ""      # the Hub repo id quantized (e.g. deepseek-ai/DeepSeek-V3); "" = the GGUF's own
    license: str = ""         # e.g. mit; "" = the source GGUF's general.license (the demo model: mit)
    license_name: str = ""    # with license: other
    license_link: str = ""    # with license: other
    tags: tuple[str, ...] = ()  # more card tags beside gguf, imatrix, ik_llama.cpp, ...
    split_max_size: str = "50G"  # each shard's file size at most (decimal M or G)
    include: tuple[str, ...] = field(DEFAULT_INCLUDE)  # beside the shards: INCLUDE
    check_chunks: int = field(4, minimum=1)  # chunks of the load check: shard 1 vs the unsplit quant
    upload: bool = False      # run the printed `hf upload-large-folder` after every check passed

    def check(self, where: str) -> None:
        split_bytes(self.split_max_size)
        if not self.quants:
            raise ConfigError(f"{where}.quants: name at least one quant, or pareto or gate")
        if bad := [i for i in self.include if i not in INCLUDE]:
            raise ConfigError(f"{where}.include: {bad[0]!r} is not one of {', '.join(INCLUDE)}")
        if self.name and not _NAME.match(self.name):
            raise ConfigError(f"{where}.name: {self.name!r} must match {_NAME.pattern} (it starts every file name)")
        if self.repo and not _REPO.match(self.repo):
            raise ConfigError(f"{where}.repo: {self.repo!r} is not a Hub repo id (owner/name or name)")
        if self.base_model and not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", self.base_model):
            raise ConfigError(f"{where}.base_model: {self.base_model!r} is not a Hub repo id (owner/name)")
        if self.license == "other" and not (self.license_name and self.license_link):
            raise ConfigError(f"{where}.license: other needs license_name and license_link (the Hub's card rules)")

    @property
    def max_bytes(self) -> int:
        return split_bytes(self.split_max_size)

    def model_name(self, model: str) -> str:
        return self.name or model

    def repo_id(self, model: str) -> str:
        if self.repo:
            return self.repo
        name = f"{self.model_name(model)}-GGUF"
        return f"{self.quantized_by}/{name}" if self.quantized_by and _REPO.match(f"{self.quantized_by}/x") else name

    def selectors(self) -> list[str]:
        return [q for q in self.quants if q in SELECTORS]

    def names(self) -> list[str]:
        """The quants named (not selected by the report's marks)."""
        return [q for q in self.quants if q not in SELECTORS]
