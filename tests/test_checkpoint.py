"""Reading and validating a Hugging Face checkpoint from its headers (no torch), and the convert
job's resource estimates. The safetensors files are written by hand here, byte by byte."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantsweep import capacity
from quantsweep.hf.checkpoint import Checkpoint, TensorEntry
from quantsweep.errors import ConvertError
from quantsweep.settings import Throughput

MiB = 2**20
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

# A tiny DeepSeek-V3-like model: hidden 32, 2 layers (layer 0 dense, layer 1 MoE with 2 experts
# of 16), vocab 40, and one MTP tensor (layer 2 = num_hidden_layers) that the converter drops.
# name -> (shard, shape, dtype)
TENSORS = {
    "model.embed_tokens.weight": (S1, (40, 32), "BF16"),
    "model.layers.0.input_layernorm.weight": (S1, (32,), "BF16"),
    "model.layers.0.self_attn.q_a_proj.weight": (S1, (16, 32), "BF16"),
    "model.layers.0.mlp.down_proj.weight": (S1, (32, 24), "BF16"),  # rows of 24: no whole q8_0 block
    "model.layers.1.mlp.gate.weight": (S2, (2, 32), "BF16"),          # the router: F32 in any GGUF
    "model.layers.1.mlp.gate.e_score_correction_bias": (S2, (2,), "F32"),
    "model.layers.1.mlp.experts.0.up_proj.weight": (S2, (16, 32), "BF16"),
    "model.layers.1.mlp.experts.1.up_proj.weight": (S2, (16, 32), "BF16"),
    "model.norm.weight": (S2, (32,), "BF16"),
    "lm_head.weight": (S2, (40, 32), "BF16"),
    "model.layers.2.eh_proj.weight": (S2, (32, 64), "BF16"),          # MTP: dropped
}
FP8_WEIGHTS = ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.down_proj.weight",
               "model.layers.1.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight")
BLOCK = 16
# elements kept: 1280 + 32 + 512 + 768 + 64 + 2 + 512 + 512 + 32 + 1280 (not the MTP 2048)
N_PARAMS = 4994
# 2-D, rows whole 32-blocks: embed, q_a, 2 experts, lm_head; 2-D rows of 24: down; router; 1-D: 32+2+32
WHOLE, ODD, ROUTER, ONE_D = 1280 + 512 + 512 + 512 + 1280, 768, 64, 66
BF16_BYTES = 2 * (WHOLE + ODD) + 4 * (ROUTER + ONE_D)               # 10248
Q8_0_BYTES = WHOLE // 32 * 34 + 2 * ODD + 4 * (ROUTER + ONE_D)      # 6408: down falls back to F16
F32_BYTES = 4 * N_PARAMS                                             # 19976

NP_DTYPES = {"BF16": np.uint16, "F32": np.float32, "F8_E4M3": np.uint8}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
    """name -> (dtype, shape): a safetensors file as the format says (8-byte LE header length,
    JSON header with data_offsets into the data that follows), filled with random bytes."""
    rng = np.random.default_rng(0)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    blobs, off = [], 0
    for name, (dtype, shape) in tensors.items():
        a = rng.integers(0, 255, size=shape, dtype=np.uint8).astype(NP_DTYPES[dtype])
        b = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def make_checkpoint(root: Path, fp8: bool = False, index: bool = True, block=(BLOCK, BLOCK),
                    drop: tuple[str, ...] = (), shapes: dict | None = None, config: dict | None = None) -> Path:
    """The tiny checkpoint in `root`: config.json, two shards (+ index), tokenizer files. fp8: the
    FP8_WEIGHTS as F8_E4M3 with their weight_scale_inv (and an activation_scale) in the same shard."""
    root.mkdir(parents=True, exist_ok=True)
    specs = {n: (f, s, "F8_E4M3" if fp8 and n in FP8_WEIGHTS else d) for n, (f, s, d) in TENSORS.items()}
    if fp8:
        for n in FP8_WEIGHTS:
            f, (rows, cols), _ = specs[n]
            specs[n + "_scale_inv"] = (f, (-(-rows // block[0]), -(-cols // block[1])), "F32")
        specs["model.layers.0.self_attn.q_a_proj.activation_scale"] = (S1, (1,), "F32")
    for n, s in (shapes or {}).items():
        specs[n] = (specs[n][0], s, specs[n][2])
    specs = {n: v for n, v in specs.items() if n not in drop}
    for shard in (S1, S2):
        write_safetensors(root / shard, {n: (d, s) for n, (f, s, d) in specs.items() if f == shard})
    if index:
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 0}, "weight_map": {n: f for n, (f, _, _) in specs.items()}}))
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 32,
           "num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 2, "moe_intermediate_size": 16,
           "intermediate_size": 24, "num_nextn_predict_layers": 1, "vocab_size": 40}
    if fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": list(block)}
    cfg.update(config or {})
    (root / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return root


def refused(path, pattern: str):
    """The ConvertError read raises: one line matching `pattern`."""
    with pytest.raises(ConvertError, match=pattern) as e:
        Checkpoint.read(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def esc(p) -> str:
    return re.escape(str(p))


# ---------------------------------------------------------------- a valid checkpoint


def test_reads_a_bf16_checkpoint(tmp_path):
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck"))
    assert ck.architecture == "DeepseekV3ForCausalLM"
    assert ck.quant_method is None and ck.block_size is None and ck.n_layer == 2
    assert ck.files == (S1, S2)
    assert ck.tokenizer_files == ("tokenizer.json", "tokenizer_config.json")
    assert set(ck.tensors) == set(TENSORS)
    for name, (f, shape, dtype) in TENSORS.items():
        assert ck.tensors[name] == TensorEntry(file=f, dtype=dtype, shape=shape)
    assert ck.tensors["model.embed_tokens.weight"].n_elements == 1280
    assert set(ck.file_bytes) == {"config.json", "model.safetensors.index.json", S1, S2, "tokenizer.json",
                                  "tokenizer_config.json"}
    for f, n in ck.file_bytes.items():
        assert n == os.path.getsize(tmp_path / "ck" / f)
    assert ck.total_bytes() == ck.file_bytes[S1] + ck.file_bytes[S2]
    assert ck.files_to_hash() == sorted((tmp_path / "ck").absolute() / f for f in ck.file_bytes)
    assert all(p.is_absolute() for p in ck.files_to_hash())


def test_relative_path_hashes_absolute_files(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    ck = Checkpoint.read("ck")
    assert ck.files_to_hash()[0] == tmp_path.absolute() / "ck" / "config.json"


def test_model_tensors_drop_mtp_and_sizes_are_by_hand(tmp_path):
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck"))
    kept = ck.model_tensors()
    assert set(kept) == set(TENSORS) - {"model.layers.2.eh_proj.weight"}
    assert ck.n_params() == N_PARAMS == 4994
    assert ck.output_bytes("bf16") == BF16_BYTES == 10248
    assert ck.output_bytes("q8_0") == Q8_0_BYTES == 6408
    assert ck.output_bytes("f32") == F32_BYTES == 19976
    # one layer's merged experts: 2 experts x 16 x hidden 32
    assert ck.largest_output_elements() == 2 * 16 * 32


def test_unknown_outtype_names_the_allowed_ones(tmp_path):
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck"))
    with pytest.raises(ConvertError, match=r"outtype: 'f16' is not one of q8_0, bf16, f32"):
        ck.output_bytes("f16")


def test_without_experts_the_largest_model_tensor_not_the_mtp_one(tmp_path):
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck", config={"n_routed_experts": None}))
    assert ck.largest_output_elements() == 1280  # embed / lm_head; the dropped MTP tensor has 2048


def test_without_index_every_safetensors_file_is_read(tmp_path):
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck", index=False))
    assert ck.files == (S1, S2) and set(ck.tensors) == set(TENSORS)
    assert "model.safetensors.index.json" not in ck.file_bytes
    assert ck.n_params() == N_PARAMS


def test_tokenizer_model_alone_is_enough(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / "tokenizer.json").unlink()
    (root / "tokenizer_config.json").unlink()
    (root / "tokenizer.model").write_bytes(b"\x0a\x03abc")
    ck = Checkpoint.read(root)
    assert ck.tokenizer_files == ("tokenizer.model",) and "tokenizer.model" in ck.file_bytes


def test_fp8_checkpoint_folds_scales_away(tmp_path):
    bf16 = Checkpoint.read(make_checkpoint(tmp_path / "bf16"))
    ck = Checkpoint.read(make_checkpoint(tmp_path / "fp8", fp8=True))
    assert ck.quant_method == "fp8" and ck.block_size == (16, 16)
    assert ck.tensors["model.layers.0.mlp.down_proj.weight"].dtype == "F8_E4M3"
    # [32, 24] in 16x16 blocks: ceil(32/16) x ceil(24/16)
    assert ck.tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 2)
    assert len(ck.tensors) == len(TENSORS) + len(FP8_WEIGHTS) + 1
    assert set(ck.model_tensors()) == set(bf16.model_tensors())
    assert ck.n_params() == N_PARAMS
    for t in ("bf16", "q8_0", "f32"):
        assert ck.output_bytes(t) == bf16.output_bytes(t)


def test_a_dequantized_checkpoint_keeping_its_quantization_config_reads(tmp_path):
    """DeepSeek's fp8_cast_bf16.py leaves quantization_config in config.json: bf16 weights with no
    scales are fine (nothing to dequantize)."""
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck", config={"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    assert ck.block_size == (128, 128) and ck.n_params() == N_PARAMS


def test_the_package_does_not_import_torch_or_snakemake():
    code = ("import sys, quantsweep.hf.checkpoint, quantsweep.capacity; "
            "bad = [m for m in ('torch', 'snakemake', 'transformers', 'safetensors') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------- the directory and config.json


def test_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    refused(tmp_path / "f", rf"^{esc(tmp_path / 'f')}: not a directory")
    refused(tmp_path / "nothing", rf"^{esc(tmp_path / 'nothing')}: not a directory")


def test_config_missing(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / "config.json").unlink()
    refused(root, rf"^{esc(root / 'config.json')}: missing: .*not a Hugging Face checkpoint directory")


def test_config_not_json_says_the_line(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / "config.json").write_text('{\n  "architectures": ["DeepseekV3ForCausalLM"],\n  "hidden_size": ,\n}')
    refused(root, rf"^{esc(root / 'config.json')}: not valid JSON \(.*line 3\)")


def test_config_not_an_object(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / "config.json").write_text("[1, 2]")
    refused(root, rf"^{esc(root / 'config.json')}: not a JSON object")


@pytest.mark.parametrize("archs", [None, [], "DeepseekV3ForCausalLM"])
def test_config_without_architectures(tmp_path, archs):
    root = make_checkpoint(tmp_path / "ck", config={"architectures": archs})
    refused(root, rf"^{esc(root / 'config.json')}: no architectures")


def test_architecture_not_converted(tmp_path):
    root = make_checkpoint(tmp_path / "ck", config={"architectures": ["LlamaForCausalLM"]})
    refused(root, rf"^{esc(root / 'config.json')}: architecture LlamaForCausalLM is not one quantsweep converts "
                  r"\(DeepseekV2ForCausalLM, DeepseekV3ForCausalLM: MLA \+ MoE\)$")


def test_v2_architecture_reads(tmp_path):
    ck = Checkpoint.read(make_checkpoint(tmp_path / "ck", config={"architectures": ["DeepseekV2ForCausalLM"]}))
    assert ck.architecture == "DeepseekV2ForCausalLM"


@pytest.mark.parametrize("key,value", [("num_hidden_layers", None), ("hidden_size", None), ("hidden_size", "32"),
                                       ("num_hidden_layers", 0)])
def test_config_missing_hparams(tmp_path, key, value):
    root = make_checkpoint(tmp_path / "ck", config={key: value})
    refused(root, rf"^{esc(root / 'config.json')}: {key} is missing or not a positive integer")


def test_experts_without_their_size(tmp_path):
    root = make_checkpoint(tmp_path / "ck", config={"moe_intermediate_size": None})
    refused(root, rf"^{esc(root / 'config.json')}: n_routed_experts is set but moe_intermediate_size is missing")


# ---------------------------------------------------------------- safetensors files and index


def test_index_names_a_missing_shard(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / S2).unlink()
    refused(root, rf"^{esc(root / 'model.safetensors.index.json')}: index names {S2}, which is missing "
                  r"\(an incomplete download\?\)$")


def test_index_maps_a_tensor_the_shard_lacks(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    p = root / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    index["weight_map"]["model.layers.1.mlp.experts.2.up_proj.weight"] = S2
    p.write_text(json.dumps(index))
    refused(root, rf"^{esc(p)}: maps tensor model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight to {S2}, "
                  rf"but the header of {esc(root / S2)} has no such tensor")


def test_index_maps_a_tensor_to_the_wrong_shard(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    p = root / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    index["weight_map"]["lm_head.weight"] = S1
    p.write_text(json.dumps(index))
    refused(root, rf"^{esc(p)}: maps tensor lm_head\.weight to {S1}, but the header of {esc(root / S1)} has no")


def test_no_safetensors_at_all(tmp_path):
    root = make_checkpoint(tmp_path / "ck", index=False)
    (root / S1).unlink()
    (root / S2).unlink()
    refused(root, rf"^{esc(root)}: no \*\.safetensors files$")


def test_truncated_shard(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    n = os.path.getsize(root / S2)
    os.truncate(root / S2, n - 1)
    refused(root, rf"^{esc(root / S2)}: truncated: its header needs {n} bytes, the file has {n - 1} "
                  r"\(an incomplete download\?\)$")


def test_shard_longer_than_its_header(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    n = os.path.getsize(root / S1)
    with open(root / S1, "ab") as f:
        f.write(b"\0" * 3)
    refused(root, rf"^{esc(root / S1)}: longer than its header says: its header needs {n} bytes, the file has {n + 3}$")


def test_shorter_than_the_header_length(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / S1).write_bytes(b"\1\2\3")
    refused(root, rf"^{esc(root / S1)}: truncated: 3 bytes")


@pytest.mark.parametrize("n", [2**40, 10**6])
def test_absurd_header_length(tmp_path, n):
    root = make_checkpoint(tmp_path / "ck")
    data = bytearray((root / S1).read_bytes())
    data[:8] = struct.pack("<Q", n)  # 1 TB, or more than this small file has
    (root / S1).write_bytes(bytes(data))
    refused(root, rf"^{esc(root / S1)}: header length {n} is absurd for a file of {len(data)} bytes")


def test_header_of_101_mb_is_absurd_even_in_a_big_file(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    n = 101 * 10**6
    with open(root / S1, "r+b") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(n + 1000)  # sparse
    refused(root, rf"^{esc(root / S1)}: header length {n} is absurd")


def test_header_not_json(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    data = bytearray((root / S1).read_bytes())
    data[8] = ord("[")
    data[9] = ord("!")
    (root / S1).write_bytes(bytes(data))
    refused(root, rf"^{esc(root / S1)}: header is not valid JSON")


def _rewrite_header(path: Path, edit) -> None:
    """Replace one file's header by edit(header), keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def test_data_offsets_inconsistent_with_shape(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    _rewrite_header(root / S1, lambda h: h["model.embed_tokens.weight"].update(shape=[40, 31]))
    refused(root, rf"^{esc(root / S1)}: tensor model\.embed_tokens\.weight: data_offsets \[0, 2560\] hold 2560 "
                  r"bytes, but BF16 \[40, 31\] is 2480 bytes$")


def test_data_offsets_with_a_gap(tmp_path):
    root = make_checkpoint(tmp_path / "ck")

    def gap(h):
        b, e = h["lm_head.weight"]["data_offsets"]
        h["lm_head.weight"]["data_offsets"] = [b + 2, e + 2]
    _rewrite_header(root / S2, gap)
    refused(root, rf"^{esc(root / S2)}: tensor lm_head\.weight: data_offsets \[\d+, \d+\] leave a gap")


def test_unknown_dtype(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    _rewrite_header(root / S1, lambda h: h["model.embed_tokens.weight"].update(dtype="Q4"))
    refused(root, rf"^{esc(root / S1)}: tensor model\.embed_tokens\.weight: dtype 'Q4' is not")


def test_duplicate_tensor_names_both_files(tmp_path):
    root = make_checkpoint(tmp_path / "ck", index=False)
    write_safetensors(root / "model-extra.safetensors", {"lm_head.weight": ("BF16", (40, 32))})
    msg = refused(root, r"tensor lm_head\.weight is also in")
    assert str(root / S2) in msg and str(root / "model-extra.safetensors") in msg


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_missing(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / "tokenizer.json").unlink()
    refused(root, rf"^{esc(root / 'tokenizer.json')}: missing \(no tokenizer\.json, tokenizer\.model or "
                  r"tiktoken\.model; the converter needs the tokenizer\)$")


def test_kimi_tiktoken_model_is_a_tokenizer(tmp_path):
    root = make_checkpoint(tmp_path / "ck")
    (root / "tokenizer.json").unlink()
    (root / "tiktoken.model").write_bytes(b"IQ== 0\n")
    assert Checkpoint.read(root).tokenizer_files[0] == "tiktoken.model"


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_files_not_json(tmp_path, name):
    root = make_checkpoint(tmp_path / "ck")
    (root / name).write_text('{"model": {\n')
    refused(root, rf"^{esc(root / name)}: not valid JSON \(.*line \d+\)$")


# ---------------------------------------------------------------- quantization


def test_quant_method_not_supported(tmp_path):
    root = make_checkpoint(tmp_path / "ck", config={"quantization_config": {"quant_method": "compressed-tensors"}})
    refused(root, rf"^{esc(root / 'config.json')}: quantization_config\.quant_method compressed-tensors is not "
                  r"supported \(fp8, or none for bf16\)$")


@pytest.mark.parametrize("block", [None, [128], [128, 0], [128, "128"], 128])
def test_fp8_block_size_two_positive_ints(tmp_path, block):
    q = {"quant_method": "fp8"} if block is None else {"quant_method": "fp8", "weight_block_size": block}
    root = make_checkpoint(tmp_path / "ck", config={"quantization_config": q})
    refused(root, rf"^{esc(root / 'config.json')}: quantization_config\.weight_block_size .* is not two positive")


def test_fp8_weight_without_scale(tmp_path):
    name = "model.layers.1.mlp.experts.1.up_proj.weight"
    root = make_checkpoint(tmp_path / "ck", fp8=True, drop=(name + "_scale_inv",))
    refused(root, rf"^{esc(root / S2)}: F8_E4M3 tensor {re.escape(name)} has no {re.escape(name)}_scale_inv")


def test_fp8_scale_of_the_wrong_shape(tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    # floor instead of ceil: 24 / 16 -> 1 column of blocks, not 2
    root = make_checkpoint(tmp_path / "ck", fp8=True, shapes={name + "_scale_inv": (2, 1)})
    refused(root, rf"^{esc(root / S1)}: {re.escape(name)}_scale_inv has shape \[2, 1\], but {re.escape(name)} "
                  r"\[32, 24\] in 16x16 blocks needs \[2, 2\]$")


def test_fp8_scales_follow_the_configured_block(tmp_path):
    """Scales made for 16x16 blocks do not fit a config that says 8x8."""
    root = make_checkpoint(tmp_path / "ck", fp8=True)
    cfg = json.loads((root / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [8, 8]
    (root / "config.json").write_text(json.dumps(cfg))
    refused(root, r"_scale_inv has shape .* in 8x8 blocks needs")


def test_fp8_tensors_without_quantization_config(tmp_path):
    root = make_checkpoint(tmp_path / "ck", fp8=True)
    cfg = json.loads((root / "config.json").read_text())
    del cfg["quantization_config"]
    (root / "config.json").write_text(json.dumps(cfg))
    msg = refused(root, rf"^{esc(root / 'config.json')}: no quantization_config, but .* holds F8_E4M3 tensor")
    assert "model.layers." in msg


# ---------------------------------------------------------------- the convert job's resources


def _paper_checkpoint(config: dict, tensors: dict[str, TensorEntry], checkpoint_bytes: int) -> Checkpoint:
    """A checkpoint on paper (no files): the estimates need only its description."""
    return Checkpoint(path=Path("/nowhere"), config=config, tensors=tensors, files=("model.safetensors",),
                      file_bytes={"config.json": 1000, "model.safetensors": checkpoint_bytes}, tokenizer_files=())


V3 = {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61, "hidden_size": 7168,
      "n_routed_experts": 256, "moe_intermediate_size": 2048}


RATES = Throughput()


def _convert(ck, outtype="bf16"):
    return capacity.convert_job("v3", ck, outtype, RATES)


def test_convert_memory_is_one_merged_expert_stack():
    ck = _paper_checkpoint(V3, {"lm_head.weight": TensorEntry("model.safetensors", "BF16", (129280, 7168))}, 10**9)
    # 256 x 2048 x 7168 floats x 4 bytes x 3 = 43008 MiB, + 4096
    assert capacity.mem_mb(_convert(ck)) == 43008 + 4096
    assert capacity.mem_mb(_convert(ck), attempt=2) == int(1.5 * (43008 + 4096))
    dense = _paper_checkpoint({**V3, "n_routed_experts": None},
                              {"lm_head.weight": TensorEntry("model.safetensors", "BF16", (129280, 7168))}, 10**9)
    assert capacity.mem_mb(_convert(dense)) == int(12 * 129280 * 7168 / MiB + 4096)


def test_convert_disk_tracks_the_output_and_runtime_the_bytes_moved():
    # 3e11 elements of bf16: a 600 GB checkpoint, 600 GB as bf16, 1.2 TB as f32, ~319 GB as q8_0
    ck = _paper_checkpoint(V3, {"w": TensorEntry("model.safetensors", "BF16", (300_000, 1_000_000))}, 600 * 10**9)
    assert ck.output_bytes("bf16") == 600 * 10**9 and ck.output_bytes("f32") == 1200 * 10**9
    assert ck.output_bytes("q8_0") == 3 * 10**11 // 32 * 34
    for t in ("bf16", "f32", "q8_0"):
        assert capacity.disk_mb(_convert(ck, t)) == int(ck.output_bytes(t) * 1.05 / MiB + 1024)
    # read 600 GB + write 600 / 1200 GB at 100 MB/s: 200 / 300 min, x slack 2, + 30
    assert _convert(ck).seconds == 1200e9 / 100e6
    assert capacity.runtime_min(_convert(ck), RATES) == 30 + 2 * 200 == 430
    assert capacity.runtime_min(_convert(ck, "f32"), RATES) == 30 + 2 * 300
    assert capacity.runtime_min(_convert(ck, "f32"), RATES, attempt=2) == int(1.5 * 630)
    fast = RATES.updated({"convert_mb_s": 200.0, "slack": 1.0})  # machine.throughput, measured on a machine
    assert capacity.runtime_min(capacity.convert_job("v3", ck, "bf16", fast), fast) == 30 + 100


def test_convert_figures_grow_on_retries(tmp_path):
    ck = _paper_checkpoint(V3, {"w": TensorEntry("model.safetensors", "BF16", (300_000, 1_000_000))}, 600 * 10**9)
    j = _convert(ck, "q8_0")
    for f in (capacity.mem_mb, capacity.disk_mb, lambda job, attempt: capacity.runtime_min(job, RATES, attempt)):
        one, two, three = f(j, attempt=1), f(j, attempt=2), f(j, attempt=3)
        assert abs(two - 1.5 * one) <= 1 and abs(three - 2 * one) <= 1 and one < two < three
    # a checkpoint read from disk feeds them too (tiny: the constant terms)
    tiny = Checkpoint.read(make_checkpoint(tmp_path / "ck"))
    assert capacity.mem_mb(_convert(tiny)) == 4096 and capacity.disk_mb(_convert(tiny)) == 1024
    assert capacity.runtime_min(_convert(tiny), RATES) == 30
    with pytest.raises(ConvertError, match="outtype: 'q4_0' is not one of"):
        _convert(tiny, "q4_0")


