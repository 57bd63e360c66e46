"""A Hugging Face checkpoint directory, read and validated from its headers alone.

What the convert job and its resource estimates need to know before they start: the config,
every tensor's dtype and shape, the files (to hash them into the manifest) and their sizes.
A DeepSeek-V3 checkpoint is ~700 GB (FP8) or 1.3 TB (bf16), so only the safetensors headers
are read, never tensor data, and without torch. Everything that would make the converter fail
hours in (a missing or truncated shard, a missing tokenizer, an FP8 weight without its scale,
an architecture it does not convert) is refused here, in one line that names the file.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConvertError
from ..gguf.types import by_name
from ..settings.model import OUTTYPES

MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")  # Kimi-K2 also says DeepseekV3ForCausalLM

# Bytes per element of a converted 2-D+ weight at each outtype (q8_0: a 34-byte block per 32 values).
OUTTYPE_BYTES: dict[str, float] = {t: by_name(t).type_size / by_name(t).block for t in OUTTYPES}
Q8_0_BLOCK = by_name("q8_0").block

# safetensors dtypes: the bit width is in the name (F8_E4M3, BF16, I64), BOOL is a byte.
_DTYPE = re.compile(r"^(?:BOOL|[UI](?:8|16|32|64)|F(?:16|32|64)|BF16|F8_E4M3|F8_E5M2|F8_E8M0)$")


def dtype_size(dtype: str) -> int | None:
    """Bytes per element of a safetensors dtype; None for one quantsweep does not read."""
    if not isinstance(dtype, str) or not _DTYPE.match(dtype):
        return None
    return 1 if dtype == "BOOL" else int(re.search(r"\d+", dtype).group()) // 8


FP8_DTYPES = ("F8_E4M3", "F8_E5M2")

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# tiktoken.model: Kimi-K2's (its tokenizer code comes with the checkpoint; trust_remote_code).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "tokenizer_config.json")
MAX_HEADER = 100 * 10**6  # real headers are a few MB; a larger length is a corrupt or foreign file
ROUTER_SUFFIX = "mlp.gate.weight"  # the MoE router: mainline writes it F32 whatever the outtype
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: where it is and what it holds (not its data)."""

    file: str                # safetensors file name, relative to the checkpoint dir
    dtype: str               # safetensors dtype string: "BF16", "F32", "F16", "F8_E4M3", ...
    shape: tuple[int, ...]   # torch order: rows first

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory as the converter will see it; build it with `Checkpoint.read`."""

    path: Path
    config: dict                        # config.json as read
    tensors: dict[str, TensorEntry]     # every tensor of every safetensors file, scales and MTP included
    files: tuple[str, ...]              # safetensors files (relative), sorted
    file_bytes: dict[str, int]          # every file the conversion depends on (relative) -> size
    tokenizer_files: tuple[str, ...]    # tokenizer.json / tokenizer.model / tiktoken.model / tokenizer_config.json

    @classmethod
    def read(cls, path: str | Path) -> Checkpoint:
        """Read config, tokenizer and safetensors headers, and refuse what the converter could not
        convert: ConvertError, one line naming the file and what is wrong."""
        path = Path(path)
        if not path.is_dir():
            raise ConvertError(f"{path}: not a directory (a Hugging Face checkpoint is a directory)")
        config = _read_config(path)
        block = _block_size(path, config)
        tokenizer = _check_tokenizer(path)
        files, index = _safetensors_files(path)
        tensors: dict[str, TensorEntry] = {}
        file_bytes = {CONFIG: _size(path / CONFIG)}
        if index is not None:
            file_bytes[INDEX] = _size(path / INDEX)
        for f in files:
            header, size = _read_header(path, f)
            file_bytes[f] = size
            for name, entry in header.items():
                if name in tensors:
                    raise ConvertError(f"{path}/{f}: tensor {name} is also in {path}/{tensors[name].file}")
                tensors[name] = entry
        if index is not None:
            for name, f in index.items():
                if tensors.get(name) is None or tensors[name].file != f:
                    raise ConvertError(f"{path}/{INDEX}: maps tensor {name} to {f}, "
                                       f"but the header of {path}/{f} has no such tensor")
        _check_fp8(path, tensors, block)
        for f in tokenizer:
            file_bytes[f] = _size(path / f)
        return cls(path=path, config=config, tensors=tensors, files=tuple(files), file_bytes=file_bytes,
                   tokenizer_files=tokenizer)

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    @property
    def quant_method(self) -> str | None:
        q = self.config.get("quantization_config")
        return q.get("quant_method") if isinstance(q, dict) else None

    @property
    def fp8(self) -> bool:
        """Whether any weight is stored in FP8 (a bf16 checkpoint made by DeepSeek's
        fp8_cast_bf16.py keeps its quantization_config but has none)."""
        return any(t.dtype in FP8_DTYPES for t in self.tensors.values())

    @property
    def block_size(self) -> tuple[int, int] | None:
        """The FP8 scale blocks (rows, cols), e.g. (128, 128); None for a bf16 checkpoint."""
        if self.quant_method != "fp8":
            return None
        b0, b1 = self.config["quantization_config"]["weight_block_size"]
        return int(b0), int(b1)

    @property
    def n_layer(self) -> int:
        return int(self.config["num_hidden_layers"])

    def model_tensors(self) -> dict[str, TensorEntry]:
        """The tensors the converter keeps: not the FP8 scales (folded into their weights), not the
        activation scales, not the multi-token-prediction layers (model.layers.N, N >= n_layer),
        which the engine does not run."""
        n_layer = self.n_layer
        out = {}
        for name, t in self.tensors.items():
            if name.endswith("_scale_inv") or name.endswith(".activation_scale"):
                continue
            m = _LAYER.match(name)
            if m and int(m.group(1)) >= n_layer:
                continue
            out[name] = t
        return out

    def n_params(self) -> int:
        return sum(t.n_elements for t in self.model_tensors().values())

    def total_bytes(self) -> int:
        """Bytes of the safetensors files: what the converter reads."""
        return sum(self.file_bytes[f] for f in self.files)

    def output_bytes(self, outtype: str) -> int:
        """The GGUF's tensor data as mainline's converter writes it (alignment padding left out):
        2-D+ weights at `outtype`, the MoE router and every 1-D tensor (norms, the expert score
        bias) F32. A q8_0 row that is not whole 32-value blocks falls back to F16, as there."""
        if outtype not in OUTTYPE_BYTES:
            raise ConvertError(f"outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
        total = 0
        for name, t in self.model_tensors().items():
            n = t.n_elements
            if len(t.shape) < 2 or name.endswith(ROUTER_SUFFIX):
                total += 4 * n
            elif outtype == "q8_0" and t.shape[-1] % Q8_0_BLOCK:
                total += 2 * n  # the converter falls back to f16 for such a row
            else:
                total += int(OUTTYPE_BYTES[outtype] * n)
        return total

    def predicted_table(self, outtype: str):
        """The tensor table of the GGUF converting this checkpoint gives, before it exists (the
        capacity plan of a sweep that starts from the download): mainline's converter's layout
        (3-D attn_k_b/attn_v_b, no attn_kv_b), matrices at `outtype`, from config.json's
        dimensions (gguf.deepseek2.dims_from_hf_config)."""
        from ..gguf.deepseek2 import deepseek2_table, dims_from_hf_config

        self.output_bytes(outtype)  # the outtype checked, as for the conversion itself
        table = deepseek2_table(layout="mainline", source_type=outtype, **dims_from_hf_config(self.config))
        return dataclasses.replace(table, path=self.path)

    def largest_output_elements(self) -> int:
        """The largest tensor the converter holds at once: one layer's routed experts, merged into
        one stack, when the model has experts; else the largest model tensor."""
        c = self.config
        n_expert = c.get("n_routed_experts") or 0
        if n_expert:
            return int(n_expert) * int(c["moe_intermediate_size"]) * int(c["hidden_size"])
        return max((t.n_elements for t in self.model_tensors().values()), default=0)

    def files_to_hash(self) -> list[Path]:
        """Absolute paths of every file the conversion depends on, for the manifest's hashes."""
        root = self.path.absolute()
        return sorted(root / f for f in self.file_bytes)


def _size(p: Path) -> int:
    try:
        return os.stat(p).st_size  # follows links: a Hugging Face cache snapshot is links to blobs
    except OSError as e:
        raise ConvertError(f"{p}: cannot be read ({e.strerror or e})") from None


def _read_json(p: Path):
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConvertError(f"{p}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConvertError(f"{p}: not valid JSON (not UTF-8 text)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _read_config(path: Path) -> dict:
    p = path / CONFIG
    if not p.is_file():
        raise ConvertError(f"{p}: missing: {path} is not a Hugging Face checkpoint directory")
    config = _read_json(p)
    if not isinstance(config, dict):
        raise ConvertError(f"{p}: not a JSON object")
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConvertError(f"{p}: no architectures (a list naming the model class, e.g. DeepseekV3ForCausalLM)")
    if archs[0] not in MLA_ARCHITECTURES:
        raise ConvertError(f"{p}: architecture {archs[0]} is not one quantsweep converts "
                           f"({', '.join(MLA_ARCHITECTURES)}: MLA + MoE)")
    for key in ("num_hidden_layers", "hidden_size"):
        if not _positive_int(config.get(key)):
            raise ConvertError(f"{p}: {key} is missing or not a positive integer ({config.get(key)!r})")
    if config.get("n_routed_experts") and not _positive_int(config.get("moe_intermediate_size")):
        raise ConvertError(f"{p}: n_routed_experts is set but moe_intermediate_size is missing or not a "
                           f"positive integer ({config.get('moe_intermediate_size')!r})")
    return config


def _block_size(path: Path, config: dict) -> tuple[int, int] | None:
    """The FP8 block size from quantization_config; None when there is none."""
    if "quantization_config" not in config:
        return None
    p = path / CONFIG
    q = config["quantization_config"]
    if not isinstance(q, dict):
        raise ConvertError(f"{p}: quantization_config is not an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConvertError(f"{p}: quantization_config.quant_method {method} is not supported (fp8, or none for bf16)")
    b = q.get("weight_block_size")
    if not isinstance(b, list) or len(b) != 2 or not all(_positive_int(x) for x in b):
        raise ConvertError(f"{p}: quantization_config.weight_block_size {b!r} is not two positive integers")
    return b[0], b[1]


def _check_tokenizer(path: Path) -> tuple[str, ...]:
    present = tuple(f for f in sorted(TOKENIZER_FILES) if (path / f).is_file())
    if not {"tokenizer.json", "tokenizer.model", "tiktoken.model"} & set(present):
        raise ConvertError(f"{path}/tokenizer.json: missing (no tokenizer.json, tokenizer.model or tiktoken.model; "
                           "the converter needs the tokenizer)")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if f in present:
            _read_json(path / f)
    return present


def _safetensors_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shards (from the index when there is one) and the index's weight_map."""
    if (path / INDEX).exists():
        p = path / INDEX
        index = _read_json(p)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise ConvertError(f"{p}: no weight_map (an object mapping each tensor to its file)")
        files = sorted(set(wm.values()))
        for f in files:
            if not (path / f).is_file():
                raise ConvertError(f"{p}: index names {f}, which is missing (an incomplete download?)")
        return files, wm
    files = sorted(f.name for f in path.glob("*.safetensors") if f.is_file())
    if not files:
        raise ConvertError(f"{path}: no *.safetensors files")
    return files, None


def _read_header(path: Path, f: str) -> tuple[dict[str, TensorEntry], int]:
    """The tensors of one safetensors file, from its header, and the file's size; the header
    must describe exactly the bytes the file has (a truncated download is caught here)."""
    p = path / f
    size = _size(p)
    if size < 8:
        raise ConvertError(f"{p}: truncated: {size} bytes, not even the 8-byte header length (an incomplete download?)")
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8 or n > MAX_HEADER:
            raise ConvertError(f"{p}: header length {n} is absurd for a file of {size} bytes (not a safetensors file?)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{p}: header is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{p}: header is not a JSON object")
    out: dict[str, TensorEntry] = {}
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        dtype = t.get("dtype") if isinstance(t, dict) else None
        shape = t.get("shape") if isinstance(t, dict) else None
        offs = t.get("data_offsets") if isinstance(t, dict) else None
        if dtype_size(dtype) is None:
            raise ConvertError(f"{p}: tensor {name}: dtype {dtype!r} is not a safetensors dtype quantsweep reads")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ConvertError(f"{p}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
            raise ConvertError(f"{p}: tensor {name}: data_offsets {offs!r} is not [begin, end]")
        entry = TensorEntry(file=f, dtype=dtype, shape=tuple(shape))
        want = entry.n_elements * dtype_size(dtype)
        if offs[1] - offs[0] != want:
            raise ConvertError(f"{p}: tensor {name}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, "
                               f"but {dtype} {list(shape)} is {want} bytes")
        spans.append((offs[0], offs[1], name))
        out[name] = entry
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlap the previous tensor" if begin < end else f"leave a gap after byte {end}"
            raise ConvertError(f"{p}: tensor {name}: data_offsets [{begin}, {stop}] {what}")
        end = stop
    need = 8 + n + end
    if size < need:
        raise ConvertError(f"{p}: truncated: its header needs {need} bytes, the file has {size} "
                           "(an incomplete download?)")
    if size > need:
        raise ConvertError(f"{p}: longer than its header says: its header needs {need} bytes, the file has {size}")
    return out, size


def _check_fp8(path: Path, tensors: dict[str, TensorEntry], block: tuple[int, int] | None) -> None:
    """Every float8 weight needs its block scales, shaped for the config's block size; float8
    weights without a quantization_config cannot be dequantized at all."""
    for name, t in tensors.items():
        if t.dtype not in FP8_DTYPES:
            continue
        if block is None:
            raise ConvertError(f"{path}/{CONFIG}: no quantization_config, but {path}/{t.file} holds {t.dtype} "
                               f"tensor {name} (an FP8 checkpoint needs quant_method fp8 and weight_block_size)")
        if len(t.shape) != 2:
            raise ConvertError(f"{path}/{t.file}: {t.dtype} tensor {name} has shape {list(t.shape)}, "
                               "not 2-D (block scales are per 2-D block)")
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            raise ConvertError(f"{path}/{t.file}: {t.dtype} tensor {name} has no {name}_scale_inv "
                               "(it cannot be dequantized)")
        want = (math.ceil(t.shape[0] / block[0]), math.ceil(t.shape[1] / block[1]))
        if scale.shape != want:
            raise ConvertError(f"{path}/{scale.file}: {name}_scale_inv has shape {list(scale.shape)}, but "
                               f"{name} {list(t.shape)} in {block[0]}x{block[1]} blocks needs {list(want)}")
