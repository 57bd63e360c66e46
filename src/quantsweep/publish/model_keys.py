"""What a published model says of itself: its name, license, base model and size label, as GGUF
metadata (general.*, the keys readers show) and as the card's front matter; and the keys that
would carry a path of the sweep's machine into the published files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gguf.utility import size_label

from ..errors import PublishError
from ..gguf.reader import GGUFTable
from ..settings.publish import PublishSettings
from .shards import MACHINE_PATH

BASE_TAGS = ["gguf", "imatrix", "ik_llama.cpp", "quantsweep"]
# Keys llama-quantize writes with the paths it was given (examples/quantize/quantize.cpp).
PATH_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-.")


def _size_label(t: GGUFTable) -> str:
    """general.size_label as convert_hf_to_gguf writes it (e.g. 256x20B): experts x expert params."""
    total = sum(x.n_elements for x in t.tensors)
    experts = sum(x.n_elements for x in t.tensors if "_exps." in x.name)
    count = int(t.arch_kv("expert_count", 0) or 0)
    # gguf-py's writer counts one expert's share of each expert tensor (GGUFWriter.get_total_parameter_count)
    return size_label(total, total - experts, experts // count if count else 0, count)


def license_of(kv: dict, ps: PublishSettings, model_license: str, what: str) -> str:
    """The published license: publish.license, else the GGUF's general.license, else what the sweep
    knows of the model (the demo's: mit); PublishError naming `what` when none is known."""
    lic = ps.license or str(kv.get("general.license", "")) or model_license
    if not lic:
        raise PublishError(f"publish.license: {what} has no general.license; set publish.license "
                           "(e.g. mit, or other with license_name and license_link)")
    return lic


@dataclass(frozen=True)
class ModelKeys:
    name: str
    license: str
    license_name: str
    license_link: str
    base_model: str
    quantized_by: str
    size_label: str
    arch: str

    @classmethod
    def of(cls, source: GGUFTable, model: str, ps: PublishSettings, model_license: str = "") -> ModelKeys:
        """From publish settings over what the source GGUF says (general.name, general.license,
        general.size_label, its Hub repository) and, for the license, what the sweep knows of the
        model (the generated demo's: mit); PublishError when no license is known."""
        kv = source.kv
        name = ps.name or _safe_name(str(kv.get("general.name", ""))) or model
        lic = license_of(kv, ps, model_license, f"{model}'s GGUF")
        base = ps.base_model or str(kv.get("general.source.huggingface.repository", ""))
        return cls(name, lic, ps.license_name or str(kv.get("general.license.name", "")),
                   ps.license_link or str(kv.get("general.license.link", "")), base, ps.quantized_by,
                   str(kv.get("general.size_label", "")) or _size_label(source),
                   str(kv.get("general.architecture", "")))

    def kv(self) -> dict:
        """The general.* keys every published shard 1 carries."""
        out = {"general.name": self.name, "general.size_label": self.size_label, "general.license": self.license}
        if self.license_name:
            out["general.license.name"] = self.license_name
        if self.license_link:
            out["general.license.link"] = self.license_link
        if self.quantized_by:
            out["general.quantized_by"] = self.quantized_by
        if self.base_model:
            org, _, bname = self.base_model.partition("/")
            out.update({"general.base_model.count": 1, "general.base_model.0.name": bname,
                        "general.base_model.0.organization": org,
                        "general.base_model.0.repo_url": f"https://huggingface.co/{self.base_model}"})
        return out

    def front(self, tags: tuple[str, ...], ppl: list[tuple[str, float]], dataset: str) -> dict:
        """The card's YAML front matter; model-index carries each quant's PPL."""
        fm: dict = {}
        if self.base_model:
            fm.update(base_model=self.base_model, base_model_relation="quantized")
        if self.quantized_by:
            fm["quantized_by"] = self.quantized_by
        fm["license"] = self.license
        if self.license == "other":
            fm.update(license_name=self.license_name, license_link=self.license_link)
        fm["pipeline_tag"] = "text-generation"
        fm["tags"] = list(dict.fromkeys(BASE_TAGS + [t for t in (self.arch, "mla", "moe") if t] + list(tags)))
        fm["model-index"] = [{"name": f"{self.name}-GGUF", "results": [{
            "task": {"type": "text-generation"}, "dataset": {"name": dataset, "type": "text"},
            "metrics": [{"type": "perplexity", "value": round(v, 4), "name": f"PPL ({q})"} for q, v in ppl]}]}]
        return fm

    def license_words(self) -> str:
        if self.license == "other":
            return f"{self.license_name}: see {self.license_link} (the license of the quantized model)."
        return f"`{self.license}`, the license of the quantized model."


def path_keys(table: GGUFTable, imatrix_name: str, calibration_name: str) -> dict:
    """New values for the keys of a quant that name the sweep's files: the imatrix and its dataset
    as published, any other absolute path cut to its file name."""
    out = {}
    for k, v in table.kv.items():
        if not isinstance(v, str):
            continue
        if k == "quantize.imatrix.file" and imatrix_name:
            out[k] = imatrix_name
        elif k == "quantize.imatrix.dataset" and calibration_name:
            out[k] = calibration_name
        elif k in PATH_KEYS or MACHINE_PATH.match(v):
            out[k] = Path(v).name
    return out
