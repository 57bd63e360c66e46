"""Per-tensor type selection of ik_llama.cpp's llama-quantize, ported to Python.

Given a model's tensor table (gguf_table.GGUFTable: names, shapes, source types and the
KVs the engine reads), an ftype or a recipe (recipes.Recipe) and, optionally, an imatrix,
`plan()` predicts, tensor by tensor, the type the engine writes and its size in bytes --
without the engine and without the weights, so recipes for a 700 GB model can be sized and
checked on a laptop.

The port follows src/llama-quantize.cpp of the pinned engine (ik-llama-cpp-python 0.1.5),
in the engine's order (llama_model_quantize_internal):

 1. never-quantized tensors (names not ending in "weight", 1-D, *_norm.weight, ffn_gate_inp
    unless typed, position/token-type embeddings, ssm_*, attn_rel_b, output with
    --leave-output-tensor, everything with COPY);
 2. new_type = default type of the ftype (switch at 927-1017);
 3. --pure: only the row-size fallback (change_type_if_necessary, 221-302);
    otherwise, when the default type is quantized, llama_tensor_get_type (304-832): the
    built-in heuristics (substring tests, counters i_ffn_down/i_attention_wv/... kept exactly
    as the engine keeps them), then the --custom-q rules (first regex_search match wins),
    then change_type_if_necessary, then "token embeddings cannot be row-interleaved";
 4. the CLI overrides (--token-embedding-type, --output-tensor-type, --ffn-gate-inp-type;
    the --attn-*/--ffn-*-type flags only act inside the heuristics, 1405-1437);
 5. token_embd not row-interleaved (again), then "same type as the source => copy";
 6. row-interleaved types need ne1 % rows == 0, else their base type (1540-1545);
 7. size = ne1 * ne2 * row_size(type, ne0), row size including ik's per-row metadata.

Regexes: the engine compiles --custom-q patterns with std::regex (ECMAScript grammar) and
uses std::regex_search; here Python's re.search is used. recipes.py refuses the constructs
whose meaning differs between the two (see recipes.check_regex), so for accepted patterns
the results are the same.

Not ported (documented, not needed for DeepSeek): the model "type" (7B/8B/70B...) is
derived for arch llama only (it matters only for non-MoE llama-style attn_v/attn_q
branches); --repack, --partial-requant, --keep-split and --include/--exclude-weights;
4-D tensors are sized as ne1*ne2*ne3 rows (the engine's dry-run ignores ne3).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

from . import ggml_types
from .ggml_types import BY_NAME
from .gguf_table import GGUFTable, TensorInfo
from .imatrix import expected_size, needs_imatrix

# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


class PlanError(ValueError):
    """The engine would refuse or abort (one-line message naming the tensor)."""


class RecipeError(ValueError):
    """A recipe is invalid or does not fit the model (one-line message naming file and key)."""


class ImatrixError(ValueError):
    """The imatrix lacks (or has wrongly sized) data for a tensor whose planned type needs it."""


# --------------------------------------------------------------------------------------
# type and ftype tables
# --------------------------------------------------------------------------------------

_ENUM_SPECIAL = {"q4_0_4x4": "Q4_0_4_4", "q4_0_4x8": "Q4_0_4_8", "q4_0_8x8": "Q4_0_8_8"}
# G.Q4_K == "q4_K", G.IQ4_K_R4 == "iq4_k_r4": the engine's enum names -> ggml_type_name().
G = SimpleNamespace(**{_ENUM_SPECIAL.get(n, n.upper()): n for n in BY_NAME})

FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# src/llama-quantize.cpp:927-1017 (ftype -> default ggml type); names as quantize.cpp spells them.
DEFAULT_TYPE: dict[str, str] = {
    "Q4_0": G.Q4_0, "Q4_1": G.Q4_1, "Q5_0": G.Q5_0, "Q5_1": G.Q5_1, "Q6_0": G.Q6_0, "Q8_0": G.Q8_0,
    "Q8_KV": G.Q8_KV, "F16": G.F16, "BF16": G.BF16, "BF16_R16": G.BF16_R16, "F32": G.F32, "COPY": G.F32,
    "Q2_K_S": G.Q2_K, "Q2_K": G.Q2_K, "Q2_K_R4": G.Q2_K_R4, "IQ3_XS": G.IQ3_S,
    "Q3_K_S": G.Q3_K, "Q3_K_M": G.Q3_K, "Q3_K_L": G.Q3_K, "Q3_K_R4": G.Q3_K_R4,
    "Q4_K_S": G.Q4_K, "Q4_K_M": G.Q4_K, "Q4_K_R4": G.Q4_K_R4,
    "Q5_K_S": G.Q5_K, "Q5_K_M": G.Q5_K, "Q5_K_R4": G.Q5_K_R4,
    "Q6_K": G.Q6_K, "Q6_K_R4": G.Q6_K_R4, "Q8_K_R8": G.Q8_K_R8, "Q8_KV_R8": G.Q8_KV_R8,
    "IQ2_XXS": G.IQ2_XXS, "IQ2_XXS_R4": G.IQ2_XXS_R4, "IQ2_XS": G.IQ2_XS, "IQ2_XS_R4": G.IQ2_XS_R4,
    "IQ2_KS": G.IQ2_KS, "IQ1_KT": G.IQ1_KT, "IQ2_KT": G.IQ2_KT, "IQ2_S": G.IQ2_XS, "IQ2_M": G.IQ2_S,
    "IQ2_M_R4": G.IQ2_S_R4, "IQ3_XXS": G.IQ3_XXS, "IQ3_KT": G.IQ3_KT, "IQ4_KT": G.IQ4_KT,
    "IQ3_XXS_R4": G.IQ3_XXS_R4, "IQ1_S": G.IQ1_S, "IQ1_S_R4": G.IQ1_S_R4, "IQ1_M_R4": G.IQ1_M_R4,
    "IQ1_M": G.IQ1_M, "IQ1_BN": G.IQ1_BN, "IQ2_BN": G.IQ2_BN, "IQ2_BN_R4": G.IQ2_BN_R4,
    "IQ4_NL": G.IQ4_NL, "IQ4_NL_R4": G.IQ4_NL_R4, "IQ4_XS_R8": G.IQ4_XS_R8, "Q4_0_R8": G.Q4_0_R8,
    "Q5_0_R4": G.Q5_0_R4, "Q6_0_R4": G.Q6_0_R4, "Q8_0_R8": G.Q8_0_R8, "MXFP4": G.MXFP4,
    "IQ4_XS": G.IQ4_XS, "IQ4_KS": G.IQ4_KS, "IQ4_KS_R4": G.IQ4_KS_R4, "IQ5_KS_R4": G.IQ5_KS_R4,
    "IQ4_KSS": G.IQ4_KSS, "IQ5_KS": G.IQ5_KS, "IQ2_K": G.IQ2_K, "IQ2_K_R4": G.IQ2_K_R4,
    "IQ3_KS": G.IQ3_KS, "IQ2_KL": G.IQ2_KL, "IQ3_K": G.IQ3_K, "IQ3_K_R4": G.IQ3_K_R4, "IQ3_KL": G.IQ3_K,
    "IQ4_K": G.IQ4_K, "IQ4_K_R4": G.IQ4_K_R4, "IQ5_K": G.IQ5_K, "IQ5_K_R4": G.IQ5_K_R4, "IQ6_K": G.IQ6_K,
    "IQ3_S": G.IQ3_S, "IQ3_S_R4": G.IQ3_S_R4, "IQ3_M": G.IQ3_S,
    "Q4_0_4_4": G.Q4_0_4_4, "Q4_0_4_8": G.Q4_0_4_8, "Q4_0_8_8": G.Q4_0_8_8,
}

# Types ggml does not mark is_quantized (ggml.c type_traits): llama_tensor_get_type and with it
# the --custom-q rules are skipped when the ftype's default type is one of them.
NOT_QUANTIZED = frozenset({G.F32, G.F16, G.BF16, G.BF16_R16, G.I8, G.I16, G.I32, G.I64, G.F64})

# interleaved_properties() (src/llama-quantize.cpp:83-119): type -> (base type, rows).
INTERLEAVED: dict[str, tuple[str, int]] = {
    G.Q4_0_4_4: (G.Q4_0, 4), G.Q4_0_4_8: (G.Q4_0, 4), G.Q4_0_8_8: (G.Q4_0, 8),
    G.Q4_0_R8: (G.Q4_0, 8), G.Q5_0_R4: (G.Q5_0, 4), G.Q6_0_R4: (G.Q6_0, 4), G.Q8_0_R8: (G.Q8_0, 8),
    G.Q2_K_R4: (G.Q2_K, 4), G.Q3_K_R4: (G.Q3_K, 4), G.Q4_K_R4: (G.Q4_K, 4), G.Q5_K_R4: (G.Q5_K, 4),
    G.Q6_K_R4: (G.Q6_K, 4), G.IQ2_XXS_R4: (G.IQ2_XXS, 4), G.IQ2_XS_R4: (G.IQ2_XS, 4),
    G.IQ2_S_R4: (G.IQ2_S, 4), G.IQ3_XXS_R4: (G.IQ3_XXS, 4), G.IQ3_S_R4: (G.IQ3_S, 4),
    G.IQ4_XS_R8: (G.IQ4_XS, 8), G.IQ4_NL_R4: (G.IQ4_NL, 4), G.IQ1_S_R4: (G.IQ1_S, 4),
    G.IQ1_M_R4: (G.IQ1_M, 4), G.IQ2_BN_R4: (G.IQ2_BN, 4), G.IQ2_K_R4: (G.IQ2_K, 4),
    G.IQ3_K_R4: (G.IQ3_K, 4), G.IQ4_K_R4: (G.IQ4_K, 4), G.IQ4_KS_R4: (G.IQ4_KS, 4),
    G.IQ5_KS_R4: (G.IQ5_KS, 4), G.IQ5_K_R4: (G.IQ5_K, 4), G.Q8_KV_R8: (G.Q8_KV, 8),
    G.Q8_K_R8: (G.Q8_0, 8), G.BF16_R16: (G.BF16, 16),
}


def interleaved(t: str) -> tuple[str, int]:
    return INTERLEAVED.get(t, (t, 1))


# change_type_if_necessary(): types that need ne0 % 256 == 0, and what they fall back to.
_QK_K_TYPES = frozenset({
    G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K, G.Q6_K, G.IQ4_XS, G.IQ2_XS, G.IQ2_XXS, G.IQ2_S, G.IQ3_XXS, G.IQ1_S,
    G.IQ3_S, G.IQ1_M, G.IQ4_K, G.IQ2_K, G.IQ5_K, G.IQ3_K, G.Q4_K_R4, G.IQ6_K, G.IQ4_KS, G.IQ4_XS_R8,
    G.IQ2_KS, G.IQ4_KSS, G.Q6_K_R4, G.Q5_K_R4, G.Q3_K_R4, G.Q2_K_R4, G.IQ4_K_R4, G.Q8_K_R8, G.IQ3_K_R4,
    G.IQ2_K_R4, G.IQ5_K_R4, G.IQ4_KS_R4, G.IQ3_XXS_R4, G.IQ2_XXS_R4, G.IQ2_XS_R4, G.IQ2_S_R4, G.IQ3_S_R4,
    G.IQ3_KS, G.IQ2_KT, G.IQ3_KT, G.IQ4_KT, G.IQ5_KS, G.IQ5_KS_R4, G.IQ2_KL, G.IQ1_KT,
})
_BN_TYPES = frozenset({G.IQ1_BN, G.IQ2_BN, G.IQ2_BN_R4})
_FALLBACK: dict[str, str] = {
    **dict.fromkeys([
        G.IQ2_XXS, G.IQ2_XXS_R4, G.IQ2_XS, G.IQ2_XS_R4, G.IQ2_KS, G.IQ2_S, G.IQ2_S_R4, G.IQ3_XXS,
        G.IQ3_XXS_R4, G.IQ3_S, G.IQ3_S_R4, G.IQ1_S, G.IQ1_M, G.Q2_K, G.Q2_K_R4, G.Q3_K, G.Q3_K_R4, G.IQ2_K,
        G.IQ2_K_R4, G.IQ2_KL, G.IQ3_KS, G.IQ3_K, G.IQ3_K_R4, G.IQ4_KSS, G.IQ4_KS, G.IQ4_KS_R4, G.IQ4_XS_R8,
        G.IQ1_KT, G.IQ2_KT, G.IQ3_KT, G.IQ4_KT, G.IQ4_XS,
    ], G.IQ4_NL),
    **dict.fromkeys([G.IQ4_K, G.IQ4_K_R4, G.Q4_K_R4, G.IQ5_KS, G.IQ5_KS_R4, G.Q4_K], G.Q5_0),
    **dict.fromkeys([G.IQ5_K, G.IQ5_K_R4, G.Q5_K_R4, G.Q5_K], G.Q6_0),
    **dict.fromkeys([G.IQ6_K, G.Q6_K_R4, G.Q8_K_R8, G.Q6_K], G.Q8_0),
}


def change_type_if_necessary(new_type: str, ne0: int, name: str = "") -> str:
    """The engine's row-size fallback (returns new_type when no fallback is needed)."""
    incompatible = (new_type in _QK_K_TYPES and ne0 % 256 != 0) or (new_type in _BN_TYPES and ne0 % 64 != 0)
    if not incompatible:
        return new_type
    if new_type not in _FALLBACK:
        raise PlanError(f"{name}: {ne0} columns do not fit {new_type} and the engine has no fallback "
                        "for it (it aborts with 'Unsupported tensor size encountered')")
    return _FALLBACK[new_type]


# quantize.cpp:611-623: ftypes refused outright without --imatrix.
FTYPES_NEED_IMATRIX = frozenset(name for name, needs in ggml_types.FTYPES.items() if needs)


def canonical_ftype(name: str) -> str:
    """The engine's ftype (case-insensitive, aliases resolved: Q4_K -> Q4_K_M)."""
    up = str(name).upper()
    up = FTYPE_ALIASES.get(up, up)
    if up not in DEFAULT_TYPE:
        raise PlanError(f"unknown ftype {name!r} (llama-quantize accepts e.g. IQ4_KS, Q4_K_M, IQ2_K_R4)")
    return up


# --------------------------------------------------------------------------------------
# engine parameters and model hyper-parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """What llama-quantize is told: the ftype and the flags that affect type selection."""

    ftype: str
    custom: tuple[tuple[str, str], ...] = ()  # --custom-q (regex, type), in order
    pure: bool = False
    token_embd: str | None = None  # --token-embedding-type
    output: str | None = None  # --output-tensor-type
    ffn_gate_inp: str | None = None  # --ffn-gate-inp-type
    attn_q: str | None = None  # --attn-q-type etc.: act inside the heuristics only
    attn_k: str | None = None
    attn_v: str | None = None
    attn_qkv: str | None = None
    attn_output: str | None = None
    ffn_gate: str | None = None
    ffn_down: str | None = None
    ffn_up: str | None = None
    leave_output: bool = False  # --leave-output-tensor

    def __post_init__(self):
        object.__setattr__(self, "ftype", canonical_ftype(self.ftype))
        for f in ("token_embd", "output", "ffn_gate_inp", "attn_q", "attn_k", "attn_v", "attn_qkv",
                  "attn_output", "ffn_gate", "ffn_down", "ffn_up"):
            v = getattr(self, f)
            if v is not None and v not in BY_NAME:
                raise PlanError(f"{f}: unknown ggml type {v!r}")
        for rx, ty in self.custom:
            if ty not in BY_NAME:
                raise PlanError(f"custom rule {rx}={ty}: unknown ggml type {ty!r}")


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters llama_tensor_get_type looks at."""

    arch: str
    n_layer: int
    n_expert: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    n_vocab: int = 0
    model_type: str = ""  # "8B", "70B", ... (only for arch llama; see module doc)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @classmethod
    def from_table(cls, table: GGUFTable) -> "HParams":
        kv = table.kv
        arch = kv.get("general.architecture")
        if not arch:
            raise PlanError(f"{table.path}: no general.architecture KV")

        def first(v):
            return v[0] if isinstance(v, (list, tuple)) else v

        n_layer = kv.get(f"{arch}.block_count")
        if n_layer is None:
            raise PlanError(f"{table.path}: no {arch}.block_count KV")
        n_head = int(first(kv.get(f"{arch}.attention.head_count")) or 0)
        n_head_kv = first(kv.get(f"{arch}.attention.head_count_kv"))
        n_head_kv = n_head if n_head_kv is None else int(n_head_kv)
        n_vocab = kv.get(f"{arch}.vocab_size")
        if n_vocab is None:
            emb = table.by_name().get("token_embd.weight")
            n_vocab = emb.shape[1] if emb is not None and len(emb.shape) > 1 else 0
        n_expert = int(kv.get(f"{arch}.expert_count") or 0)
        model_type = ""
        if arch == "llama" and n_expert != 8:
            model_type = {22: "1B", 26: "3B", 36: "8B", 40: "13B", 48: "34B", 60: "30B"}.get(int(n_layer), "")
            if n_layer == 32:
                model_type = "3B" if n_vocab == 49152 else ("7B" if n_vocab < 40000 else "8B")
            elif n_layer == 80:
                model_type = "65B" if n_head == n_head_kv else "70B"
        return cls(arch, int(n_layer), n_expert, n_head, n_head_kv, int(n_vocab), model_type)


@dataclass
class _State:
    """quantize_state_internal: the counters the heuristics advance, in file order."""

    n_layer: int
    has_imatrix: bool
    has_output: bool
    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0

    @property
    def n_ffn_down(self) -> int:
        return self.n_layer

    n_ffn_gate = n_ffn_up = n_ffn_down


_BLK = re.compile(r"blk\.\s*([+-]?\d+)")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# --------------------------------------------------------------------------------------
# llama_tensor_get_type (src/llama-quantize.cpp:304-832)
# --------------------------------------------------------------------------------------


def _get_type(qs: _State, hp: HParams, o: EngineOptions, rules: list[tuple[re.Pattern, str]],
              new_type: str, t: TensorInfo) -> tuple[str, bool, int | None]:
    """Returns (type, fell back, index of the winning custom rule or None)."""
    name, ft, arch = t.name, o.ftype, hp.arch
    ne0 = t.shape[0]
    n_exp, gqa = hp.n_expert, hp.n_gqa
    big = hp.n_vocab >= 127999 and hp.model_type in ("8B", "70B")

    custom_type, rule_index = None, None
    for i, (rx, ty) in enumerate(rules):
        if rx.search(name):
            custom_type, rule_index = ty, i
            break

    n_expert_li = max(1, n_exp)

    def layer_info(i_layer: int, n_layer: int) -> tuple[int, int]:
        if n_expert_li > 1:
            m = _BLK.match(name)
            if not m:
                raise PlanError(f"Failed to determine layer for tensor {name}")
            i_layer = int(m.group(1))
            if i_layer < 0 or i_layer >= n_layer:
                raise PlanError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
        return i_layer, n_layer

    if name == "output.weight" or (not qs.has_output and name == "token_embd.weight"):
        if o.output is not None:
            new_type = o.output
        elif arch == "falcon" or ne0 % 256 != 0:
            new_type = G.Q8_0
        elif ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M", "IQ2_K", "IQ3_K", "IQ2_KS",
                    "IQ3_K_R4", "IQ3_KS", "IQ2_K_R4", "IQ3_XXS_R4", "IQ2_KL", "IQ2_M_R4", "IQ1_S_R4", "IQ1_M_R4",
                    "IQ2_KT", "IQ3_KT", "IQ1_KT"):
            new_type = G.IQ4_K if not qs.has_output else G.Q5_K
        elif ft in ("IQ2_XXS_R4", "IQ2_XS_R4"):
            new_type = G.IQ4_K_R4 if not qs.has_output else G.Q5_K_R4
        elif ft in ("IQ3_S", "IQ3_M", "IQ3_KL", "IQ4_XS", "IQ3_S_R4", "IQ4_KS", "IQ4_KSS", "IQ4_KS_R4") \
                and not qs.has_output:
            new_type = G.IQ5_K
        elif new_type not in (G.Q8_0, G.Q8_0_R8, G.IQ6_K, G.Q6_K_R4, G.Q8_K_R8, G.Q8_KV, G.Q8_KV_R8):
            new_type = G.Q6_K
    elif name == "token_embd.weight":
        if o.token_embd is not None:
            new_type = o.token_embd
        elif ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M", "IQ2_XXS_R4", "IQ2_XS_R4", "IQ1_S_R4", "IQ1_M_R4"):
            new_type = G.Q2_K
        elif ft in ("IQ2_S", "IQ2_M", "IQ2_M_R4"):
            new_type = G.IQ3_S
        elif ft in ("IQ3_XXS", "IQ3_KT"):
            new_type = G.IQ3_S
        elif ft == "IQ3_XXS_R4":
            new_type = G.IQ3_K
        elif ft in ("IQ1_BN", "IQ2_BN", "IQ2_BN_R4"):
            new_type = G.IQ4_NL
    elif ft in ("IQ1_S_R4", "IQ1_M_R4"):
        if "attn_v.weight" in name:
            if n_exp >= 4 or gqa >= 4:
                new_type = G.IQ4_K_R4
            elif gqa >= 2:
                new_type = G.IQ3_K_R4
            else:
                new_type = G.Q2_K_R4
            qs.i_attention_wv += 1
        elif n_exp >= 8 and "attn_k" in name:
            new_type = G.Q4_K_R4
        elif n_exp >= 8 and ("blk.0.ffn_down" in name or "blk.0.ffn_gate" in name or "blk.0.ffn_up" in name):
            new_type = G.IQ3_K_R4
        elif n_exp >= 8 and "attn_q" in name:
            new_type = G.Q4_K_R4
        elif "attn_qkv.weight" in name:
            new_type = G.IQ2_K_R4
        elif "_shexp.weight" in name:
            new_type = G.IQ4_K_R4
        elif "ffn_down" in name:
            i_layer, n_layer = layer_info(qs.i_ffn_down, qs.n_ffn_down)
            if o.ffn_down is not None:
                new_type = o.ffn_down
            elif i_layer < n_layer // 8:
                new_type = G.Q2_K_R4
            qs.i_ffn_down += 1
        elif "attn_output.weight" in name:
            new_type = G.Q5_K_R4 if n_exp >= 4 else G.IQ2_K_R4
    elif ft == "IQ2_KT":
        if "attn_v.weight" in name:
            if n_exp >= 4 or gqa >= 4:
                new_type = G.IQ4_K
            elif gqa >= 2:
                new_type = G.IQ3_K
            else:
                new_type = G.Q2_K
            qs.i_attention_wv += 1
        elif n_exp >= 8 and "attn_k" in name:
            new_type = G.Q4_K
        elif n_exp >= 8 and ("blk.0.ffn_down" in name or "blk.0.ffn_gate" in name or "blk.0.ffn_up" in name):
            new_type = G.IQ3_K
        elif n_exp >= 8 and "attn_q" in name:
            new_type = G.Q4_K
        elif "attn_qkv.weight" in name:
            new_type = G.IQ3_K
        elif "_shexp.weight" in name:
            new_type = G.IQ4_K
        elif "ffn_down" in name:
            i_layer, n_layer = layer_info(qs.i_ffn_down, qs.n_ffn_down)
            if o.ffn_down is not None:
                new_type = o.ffn_down
            elif i_layer < n_layer // 8:
                new_type = G.IQ3_K
            qs.i_ffn_down += 1
        elif "attn_output.weight" in name:
            new_type = G.Q5_K if n_exp >= 4 else G.IQ3_K
    elif ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M", "IQ2_KS", "IQ2_XXS_R4", "IQ2_XS_R4",
                "IQ2_M_R4"):
        is_iq2_m = ft in ("IQ2_M", "IQ2_M_R4")
        iq2_s_or_m = ft == "IQ2_S" or is_iq2_m
        if "attn_v.weight" in name:
            if gqa >= 4 or n_exp >= 4:
                new_type = G.IQ4_K
            elif gqa >= 2 or n_exp >= 2:
                new_type = G.IQ3_K
            else:
                new_type = G.IQ3_S if iq2_s_or_m else G.Q2_K
            qs.i_attention_wv += 1
        elif n_exp >= 8 and "attn_k" in name:
            new_type = G.Q4_K
        elif n_exp >= 8 and "attn_q" in name:
            new_type = G.Q4_K
        elif "attn_qkv.weight" in name:
            new_type = G.IQ3_XXS if iq2_s_or_m else G.IQ2_K
        elif "ffn_down" in name:
            if qs.i_ffn_down < qs.n_ffn_down // 8:
                new_type = G.IQ3_S if iq2_s_or_m else G.Q2_K
            qs.i_ffn_down += 1
        elif "attn_output.weight" in name:
            if o.attn_output is not None:
                new_type = o.attn_output
            elif n_exp >= 4:
                new_type = G.Q5_K
            elif ft in ("IQ1_S", "IQ1_M"):
                new_type = G.IQ2_K
            elif iq2_s_or_m:
                new_type = G.IQ3_S
    elif "attn_v.weight" in name:
        if o.attn_v is not None:
            new_type = o.attn_v
        elif n_exp >= 4:
            new_type = G.Q8_0
        elif hp.model_type == "70B":
            if new_type in (G.Q3_K, G.Q4_K):
                new_type = G.Q5_K
            if new_type == G.IQ3_K:
                new_type = G.IQ5_K
        elif ft == "Q2_K":
            new_type = G.Q4_K if gqa >= 4 else G.Q3_K
        elif ft == "IQ2_K":
            new_type = G.IQ4_K if gqa >= 2 else G.IQ3_K
        elif ft == "IQ2_K_R4":
            new_type = G.IQ4_K_R4 if gqa >= 2 else G.IQ3_K_R4
        elif ft == "Q2_K_S" and gqa >= 4:
            new_type = G.Q4_K
        elif ft == "Q2_K_R4" and gqa >= 4:
            new_type = G.Q4_K_R4
        elif ft == "IQ3_XXS":
            new_type = G.Q4_K if gqa >= 4 else G.IQ3_K if gqa >= 2 else G.IQ3_S if not qs.has_imatrix else G.IQ3_XXS
        elif ft == "IQ3_KT":
            new_type = G.IQ4_K if gqa >= 4 else G.IQ3_K
        elif ft == "IQ4_KT":
            new_type = G.IQ5_K if gqa >= 4 else G.IQ4_K
        elif ft == "IQ3_XXS_R4":
            new_type = (G.Q4_K_R4 if gqa >= 4 else G.IQ3_K_R4 if gqa >= 2
                        else G.IQ3_K_R4 if not qs.has_imatrix else G.IQ3_XXS_R4)
        elif ft in ("IQ3_XS", "IQ3_S") and gqa >= 2:
            new_type = G.IQ4_K
        elif ft == "IQ3_S_R4" and gqa >= 2:
            new_type = G.IQ4_K_R4
        elif ft == "IQ3_K" and gqa >= 2:
            new_type = G.IQ4_K
        elif ft == "IQ3_KS" and gqa >= 2:
            new_type = G.IQ4_KS
        elif ft == "IQ2_KL" and gqa >= 2:
            new_type = G.IQ4_KS
        elif ft == "IQ3_K_R4" and gqa >= 2:
            new_type = G.IQ4_K_R4
        elif ft == "IQ3_KL":
            new_type = G.IQ5_K if gqa >= 2 else G.IQ4_K
        elif ft == "IQ3_M":
            new_type = G.IQ5_K if gqa >= 2 else G.IQ4_K
        elif ft == "Q3_K_M":
            new_type = G.Q5_K if qs.i_attention_wv < 2 else G.Q4_K
        elif ft == "Q3_K_L":
            new_type = G.Q5_K
        elif ft in ("IQ4_NL", "IQ4_XS", "IQ4_NL_R4", "IQ4_XS_R8", "IQ4_KS", "IQ4_KSS") and gqa >= 2:
            new_type = G.IQ5_K
        elif ft == "IQ4_KS_R4" and gqa >= 2:
            new_type = G.IQ5_K_R4
        elif ft == "IQ4_K" and gqa >= 2:
            new_type = G.IQ5_K
        elif ft == "IQ4_K_R4" and gqa >= 2:
            new_type = G.IQ5_K
        elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = G.Q6_K
        elif ft == "Q4_K_S" and qs.i_attention_wv < 4:
            new_type = G.Q5_K
        elif ft == "Q4_K_R4" and qs.i_attention_wv < 4:
            new_type = G.Q5_K
        elif ft == "Q5_K_S":
            if big:
                new_type = G.Q6_K
        elif ft in ("IQ5_K", "IQ5_KS"):
            if big:
                new_type = G.IQ6_K
        elif gqa >= 4:
            new_type = {
                G.Q2_K: G.IQ3_S, G.IQ3_XXS: G.IQ3_S, G.Q2_K_R4: G.IQ3_K_R4, G.IQ3_XXS_R4: G.IQ3_K_R4,
                G.Q3_K: G.Q4_K, G.IQ3_S: G.Q4_K, G.IQ3_K: G.IQ4_K, G.IQ3_KS: G.IQ4_KS, G.IQ2_KL: G.IQ4_KS,
                G.IQ3_S_R4: G.Q4_K_R4, G.Q3_K_R4: G.Q4_K_R4, G.Q4_K: G.Q5_K, G.IQ4_XS: G.Q5_K,
                G.IQ4_NL: G.Q5_K, G.IQ4_K: G.IQ5_K, G.IQ4_KS: G.IQ5_K, G.IQ4_NL_R4: G.Q5_K,
                G.IQ4_XS_R8: G.Q5_K, G.Q5_K: G.Q6_K, G.IQ5_K: G.IQ6_K, G.IQ5_KS: G.IQ6_K,
            }.get(new_type, new_type)
        qs.i_attention_wv += 1
    elif "attn_k" in name:
        if o.attn_k is not None:
            new_type = o.attn_k
        elif n_exp >= 4:
            new_type = G.Q8_0
        elif ft == "IQ3_XS":
            new_type = G.IQ3_XXS
        elif ft in ("IQ3_XXS", "IQ3_XXS_R4"):
            new_type = G.IQ2_S
    elif "attn_q" in name:
        if o.attn_q is not None:
            new_type = o.attn_q
        elif ft == "IQ3_XS":
            new_type = G.IQ3_XXS
        elif ft in ("IQ3_XXS", "IQ3_XXS_R4"):
            new_type = G.IQ2_S
        elif ft == "Q5_K_S":
            if big:
                new_type = G.Q4_K
        elif ft == "IQ5_K":
            if big:
                new_type = G.IQ4_K
        elif ft == "IQ5_KS":
            if big:
                new_type = G.IQ4_KS
    elif "ffn_down" in name:
        i_layer, n_layer = layer_info(qs.i_ffn_down, qs.n_ffn_down)
        falcon = arch == "falcon"
        if o.ffn_down is not None:
            new_type = o.ffn_down
        elif ft == "Q2_K":
            new_type = G.Q3_K
        elif ft == "Q2_K_S":
            if i_layer < n_layer // 8:
                new_type = G.Q4_K
        elif ft == "Q2_K_R4":
            if i_layer < n_layer // 8:
                new_type = G.Q4_K_R4
        elif ft == "IQ3_XXS" and not qs.has_imatrix:
            new_type = G.Q4_K if i_layer < n_layer // 8 else G.Q3_K
        elif ft == "IQ3_KT" and not qs.has_imatrix:
            new_type = G.IQ4_K if i_layer < n_layer // 8 else G.IQ3_K
        elif ft == "IQ3_XXS_R4" and not qs.has_imatrix:
            new_type = G.Q4_K_R4 if i_layer < n_layer // 8 else G.IQ3_K_R4
        elif ft == "Q3_K_M":
            new_type = (G.Q5_K if i_layer < n_layer // 16
                        else G.Q4_K if not falcon or _use_more_bits(i_layer, n_layer) else G.Q3_K)
        elif ft == "IQ3_M" and (i_layer < n_layer // 8 or (n_exp >= 4 and _use_more_bits(i_layer, n_layer))):
            new_type = G.IQ4_K
        elif ft == "Q3_K_L":
            new_type = G.Q4_K if falcon else G.Q5_K
        elif ft == "IQ3_KL":
            new_type = G.IQ4_KS if _use_more_bits(i_layer, n_layer) else G.IQ3_K
        elif ft == "Q4_K_M":
            if falcon:
                new_type = (G.Q6_K if i_layer < n_layer // 16
                            else G.Q5_K if _use_more_bits(i_layer, n_layer) else G.Q4_K)
            elif _use_more_bits(i_layer, n_layer):
                new_type = G.Q6_K
        elif i_layer < n_layer // 8 and not qs.has_imatrix and ft in (
                "IQ4_NL", "IQ4_XS", "IQ4_KS", "IQ4_KSS", "IQ4_NL_R4", "IQ4_XS_R8"):
            new_type = G.Q5_K
        elif ft == "IQ4_KS_R4" and i_layer < n_layer // 8 and not qs.has_imatrix:
            new_type = G.Q5_K_R4
        elif ft == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = G.Q6_K
        elif ft == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new_type = G.Q5_K
        elif ft == "Q4_K_R4" and not falcon and i_layer < n_layer // 8:
            new_type = G.Q5_K
        elif ft in ("Q4_0", "Q5_0") and qs.has_imatrix and i_layer < n_layer // 8:
            new_type = G.Q4_1 if ft == "Q4_0" else G.Q5_1
        elif ft == "Q4_0_R8" and qs.has_imatrix and i_layer < n_layer // 8:
            new_type = G.IQ4_NL_R4
        qs.i_ffn_down += 1
    elif "attn_output.weight" in name:
        if o.attn_output is not None:
            new_type = o.attn_output
        elif arch != "falcon":
            if n_exp >= 4:
                if ft in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                          "IQ3_M", "IQ4_XS", "IQ4_K", "IQ4_KSS", "IQ4_KS", "IQ4_KS_R4", "IQ5_KS", "IQ5_KS_R4",
                          "IQ2_K", "IQ3_K", "IQ3_KL", "Q4_K_R4", "IQ4_NL_R4", "IQ4_XS_R8", "Q3_K_R4", "IQ3_KT",
                          "IQ3_KS", "Q2_K_R4", "IQ4_K_R4", "IQ3_K_R4", "IQ2_K_R4", "IQ3_XXS_R4", "IQ3_S_R4"):
                    new_type = G.Q5_K
                elif ft == "IQ2_KL":
                    new_type = G.IQ4_KS
            else:
                if ft == "Q2_K":
                    new_type = G.Q3_K
                elif ft == "IQ3_XXS":
                    new_type = G.IQ3_S
                elif ft == "IQ3_KT" and gqa >= 4:
                    new_type = G.IQ3_K
                elif ft == "IQ3_XXS_R4":
                    new_type = G.IQ3_K_R4
                elif ft == "Q3_K_M":
                    new_type = G.Q4_K
                elif ft == "Q3_K_L":
                    new_type = G.Q5_K
                elif ft == "IQ3_M":
                    new_type = G.IQ4_K
                elif ft == "IQ2_K":
                    new_type = G.IQ3_K
                elif ft == "IQ2_K_R4":
                    new_type = G.IQ3_K_R4
                elif ft == "IQ3_KL":
                    new_type = G.IQ4_KS
        elif ft == "Q3_K_L":
            new_type = G.Q4_K
    elif "attn_qkv.weight" in name:
        if o.attn_qkv is not None:
            new_type = o.attn_qkv
        elif ft in ("Q3_K_M", "Q3_K_L"):
            new_type = G.Q4_K
        elif ft == "IQ3_M":
            new_type = G.IQ4_K
        elif ft == "Q4_K_M":
            new_type = G.Q5_K
        elif ft == "Q5_K_M":
            new_type = G.Q6_K
    elif "ffn_gate" in name:
        i_layer, n_layer = layer_info(qs.i_ffn_gate, qs.n_ffn_gate)
        if o.ffn_gate is not None:
            new_type = o.ffn_gate
        elif ft == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = G.IQ3_XXS
        elif ft == "IQ3_KL" and _use_more_bits(i_layer, n_layer):
            new_type = G.IQ4_KS
        qs.i_ffn_gate += 1
    elif "ffn_up" in name:
        i_layer, n_layer = layer_info(qs.i_ffn_up, qs.n_ffn_up)
        if o.ffn_up is not None:
            new_type = o.ffn_up
        elif ft == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = G.IQ3_XXS
        elif ft == "IQ3_KL" and _use_more_bits(i_layer, n_layer):
            new_type = G.IQ4_KS
        qs.i_ffn_up += 1

    if custom_type is not None:
        new_type = custom_type

    fell_back = False
    working = change_type_if_necessary(new_type, ne0, name)
    if working != new_type:
        qs.n_fallback += 1
        new_type, fell_back = working, True

    if name == "token_embd.weight":
        new_type = interleaved(new_type)[0]
    return new_type, fell_back, rule_index


# --------------------------------------------------------------------------------------
# the per-tensor loop of llama_model_quantize_internal
# --------------------------------------------------------------------------------------


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return max(n, 1)


def never_quantized(name: str, shape: tuple[int, ...], o: EngineOptions, src_type: str) -> bool:
    """The engine's reasons (src/llama-quantize.cpp:1307-1339) to copy a tensor unchanged."""
    # name.rfind("weight") == name.size() - 6; for a 5-character name without "weight" npos
    # equals size - 6 (unsigned wrap-around), so the engine treats it as a weight too.
    q = name.endswith("weight") or (len(name) == 5 and "weight" not in name)
    q &= _n_dims(shape) >= 2
    q &= "_norm.weight" not in name
    q &= not o.leave_output or name != "output.weight"
    q &= o.ftype != "COPY"
    if "ffn_gate_inp.weight" in name and (o.ffn_gate_inp is None or o.ffn_gate_inp == src_type):
        q = False
    q &= name not in ("position_embd.weight", "token_types.weight")
    q &= not any(s in name for s in ("ssm_conv1d.weight", "ssm_x.weight", "ssm_dt.weight", "attn_rel_b.weight"))
    return not q


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    src_type: str
    type: str  # what the output file holds (== src_type when copied)
    nbytes: int
    src_nbytes: int
    n_elements: int
    quantized: bool  # False: copied unchanged (the engine logs "size = ... MB", no "converting to")
    fallback: bool = False  # change_type_if_necessary changed the type (counted in n_fallback)
    rule: int | None = None  # index of the --custom-q rule that matched (None: heuristics/default)
    selected: str = ""  # type before the row-interleave constraint (what the imatrix check sees)

    @property
    def engine_type(self) -> str | None:
        """As llama-quantize's log reports it: the converted-to type, None when copied."""
        return self.type if self.quantized else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class Plan:
    model: str
    ftype: str
    options: EngineOptions
    tensors: list[TensorPlan]
    n_fallback: int
    has_imatrix: bool
    recipe: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def src_bytes(self) -> int:
        return sum(t.src_nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def gib(self) -> float:
        return self.total_bytes / 2**30

    @property
    def mib(self) -> float:
        """What llama-quantize prints as 'quant size = %.2f MB' (it is MiB)."""
        return self.total_bytes / 2**20

    @property
    def bpw(self) -> float:
        """8 * bytes / elements over all tensors (as llama's loader prints 'model size ... BPW')."""
        return 8.0 * self.total_bytes / self.n_elements if self.n_elements else 0.0

    def types(self) -> dict[str, str | None]:
        """{tensor: converted-to type or None when copied}: the form logparse.parse_quantize_tensors gives."""
        return {t.name: t.engine_type for t in self.tensors}

    def by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            d = out.setdefault(t.type, {"tensors": 0, "bytes": 0, "elements": 0})
            d["tensors"] += 1
            d["bytes"] += t.nbytes
            d["elements"] += t.n_elements
        return out

    def file_bytes(self, header_bytes: int, alignment: int = 32) -> int:
        """Size of the written GGUF: header (KVs + tensor infos, padded) + each tensor padded."""
        return header_bytes + sum((t.nbytes + alignment - 1) // alignment * alignment for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "ftype": self.ftype,
            "has_imatrix": self.has_imatrix,
            "engine_flags": engine_flags(self.options),
            "total_bytes": self.total_bytes,
            "src_bytes": self.src_bytes,
            "n_elements": self.n_elements,
            "gib": round(self.gib, 6),
            "bpw": round(self.bpw, 6),
            "n_fallback": self.n_fallback,
            "by_type": self.by_type(),
            "warnings": list(self.warnings),
            "tensors": [t.to_dict() for t in self.tensors],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        lines = [f"{self.recipe or self.ftype} on {self.model}: {self.gib:.3f} GiB, {self.bpw:.3f} bpw, "
                 f"{len(self.tensors)} tensors, {self.n_fallback} fallback(s)"]
        for ty, d in sorted(self.by_type().items(), key=lambda kv: -kv[1]["bytes"]):
            lines.append(f"  {ty:>10}: {d['tensors']:5d} tensors {d['bytes'] / 2**30:10.3f} GiB "
                         f"{8 * d['bytes'] / max(d['elements'], 1):7.3f} bpw")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def engine_flags(o: EngineOptions) -> list[str]:
    """llama-quantize flags (before the positionals) that make the engine select as `o` says."""
    args: list[str] = []
    if o.pure:
        args.append("--pure")
    if o.leave_output:
        args.append("--leave-output-tensor")
    for flag, v in (("--token-embedding-type", o.token_embd), ("--output-tensor-type", o.output),
                    ("--ffn-gate-inp-type", o.ffn_gate_inp), ("--attn-q-type", o.attn_q),
                    ("--attn-k-type", o.attn_k), ("--attn-v-type", o.attn_v), ("--attn-qkv-type", o.attn_qkv),
                    ("--attn-output-type", o.attn_output), ("--ffn-gate-type", o.ffn_gate),
                    ("--ffn-down-type", o.ffn_down), ("--ffn-up-type", o.ffn_up)):
        if v is not None:
            args += [flag, v]
    if o.custom:
        for rx, _ in o.custom:
            if "," in rx or "=" in rx:
                raise RecipeError(f"--custom-q pattern {rx!r} contains ',' or '=' (the engine splits on them)")
        args += ["--custom-q", ",".join(f"{rx}={ty}" for rx, ty in o.custom)]
    return args


def _as_options(spec: Any) -> tuple[EngineOptions, str | None]:
    if isinstance(spec, EngineOptions):
        return spec, None
    if isinstance(spec, str):
        return EngineOptions(ftype=spec), None
    if hasattr(spec, "options"):  # recipes.Recipe
        return spec.options(), getattr(spec, "name", None)
    raise TypeError(f"plan(): expected an ftype name, EngineOptions or Recipe, got {type(spec).__name__}")


def plan(table: GGUFTable, recipe_or_ftype: Any, imatrix: Any = None, *, has_imatrix: bool | None = None,
         strict: bool = True) -> Plan:
    """The engine's type for every tensor of `table`.

    recipe_or_ftype: an ftype name ("IQ4_KS"), a recipes.Recipe or EngineOptions.
    imatrix: None, a path, or an imatrix.Imatrix (as remapped for this model). Given one, the
      heuristics run as with --imatrix, and a tensor whose type needs imatrix data but has
      none (or has data of the wrong size) raises ImatrixError.
    has_imatrix: plan as if --imatrix were given without checking data (default: imatrix given).
    strict: with a recipe, a rule that matches no tensor name raises RecipeError (rules marked
      optional excepted); rules that never take effect are reported in Plan.warnings.
    """
    opts, recipe_name = _as_options(recipe_or_ftype)
    im = None
    if imatrix is not None:
        from . import imatrix as imx

        im = imx.read_any(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    has_im = (im is not None) if has_imatrix is None else bool(has_imatrix)
    hp = HParams.from_table(table)
    ft = opts.ftype
    default_type = DEFAULT_TYPE[ft]
    try:
        rules = [(re.compile(rx), ty) for rx, ty in opts.custom]
    except re.error as e:
        raise RecipeError(f"invalid --custom-q regex: {e}") from None

    qs = _State(n_layer=hp.n_layer, has_imatrix=has_im,
                has_output=any(t.name == "output.weight" for t in table.tensors))
    qs.n_attention_wv = sum(1 for t in table.tensors if "attn_v.weight" in t.name or "attn_qkv.weight" in t.name)

    out: list[TensorPlan] = []
    for t in table.tensors:
        src = t.type
        src_nbytes = t.nbytes
        n_el = t.n_elements
        if never_quantized(t.name, t.shape, opts, src):
            out.append(TensorPlan(t.name, t.shape, src, src, src_nbytes, src_nbytes, n_el, False, selected=src))
            continue
        new_type, fell_back, rule = default_type, False, None
        if opts.pure:
            working = change_type_if_necessary(new_type, t.shape[0], t.name)
            if working != new_type:
                qs.n_fallback += 1
                new_type, fell_back = working, True
        elif default_type not in NOT_QUANTIZED:
            new_type, fell_back, rule = _get_type(qs, hp, opts, rules, new_type, t)
        if opts.token_embd is not None and t.name == "token_embd.weight":
            new_type = opts.token_embd
        if opts.output is not None and t.name == "output.weight":
            new_type = opts.output
        if opts.ffn_gate_inp is not None and "ffn_gate_inp.weight" in t.name:
            new_type = opts.ffn_gate_inp
        # --attn-*/--ffn-*-type compare with strcmp against the bare names "attn_q.weight",
        # "ffn_gate" ... (1420-1436), which never name a tensor of a real model.
        for bare, v in (("attn_q.weight", opts.attn_q), ("attn_k.weight", opts.attn_k),
                        ("attn_v.weight", opts.attn_v), ("attn_qkv.weight", opts.attn_qkv),
                        ("attn_output.weight", opts.attn_output), ("ffn_gate", opts.ffn_gate),
                        ("ffn_down", opts.ffn_down), ("ffn_up", opts.ffn_up)):
            if v is not None and t.name == bare:
                new_type = v
        if t.name == "token_embd.weight":
            new_type = interleaved(new_type)[0]
        if new_type == src:
            out.append(TensorPlan(t.name, t.shape, src, src, src_nbytes, src_nbytes, n_el, False,
                                  fell_back, rule, selected=src))
            continue
        selected = new_type
        working, rows = interleaved(new_type)
        ne1 = t.shape[1] if len(t.shape) > 1 else 1
        if ne1 % rows != 0:
            new_type = working
        rows_total = n_el // t.shape[0]
        try:
            nbytes = BY_NAME[new_type].row_bytes(t.shape[0]) * rows_total
        except ValueError as e:
            raise PlanError(f"{t.name}: {e} (the engine aborts in ggml_row_size)") from None
        out.append(TensorPlan(t.name, t.shape, src, new_type, nbytes, src_nbytes, n_el, True, fell_back, rule,
                              selected))

    name = str(getattr(table, "path", "") or "model")
    p = Plan(model=name, ftype=ft, options=opts, tensors=out, n_fallback=qs.n_fallback, has_imatrix=has_im,
             recipe=recipe_name)
    requant = [t for t in out if t.quantized and t.src_type not in NOT_QUANTIZED]
    if requant:
        p.warnings.append(f"{len(requant)} tensor(s) are already quantized (e.g. {requant[0].name}: "
                          f"{requant[0].src_type}); llama-quantize needs --allow-requantize")
    _rule_report(p, opts, table, recipe_or_ftype, strict)
    _override_report(p, opts)
    _imatrix_report(p, im, has_im)
    return p


def _rule_report(p: Plan, opts: EngineOptions, table: GGUFTable, spec: Any, strict: bool) -> None:
    if not opts.custom:
        return
    optional = [bool(getattr(r, "optional", False)) for r in getattr(spec, "rules", ())] or [False] * len(opts.custom)
    where = getattr(spec, "source", None) or (p.recipe or "custom rules")
    names = [t.name for t in table.tensors]
    won: dict[int, list[TensorPlan]] = {}
    for t in p.tensors:
        if t.rule is not None:
            won.setdefault(t.rule, []).append(t)
    for i, (rx, ty) in enumerate(opts.custom):
        hits = [n for n in names if re.search(rx, n)]
        if not hits:
            if not optional[i]:
                if strict:
                    raise RecipeError(f"{where}: rules[{i}].match {rx!r} matches no tensor of {p.model}")
                p.warnings.append(f"rules[{i}] {rx}={ty} matches no tensor")
            continue
        if i not in won:
            p.warnings.append(f"rules[{i}] {rx}={ty} never applies: its {len(hits)} tensor(s) "
                              f"(e.g. {hits[0]}) are taken by earlier rules or never quantized")
            continue
        fb = [t for t in won[i] if t.fallback]
        if fb:
            p.warnings.append(f"rules[{i}] {rx}={ty}: {len(fb)} tensor(s) fall back to {fb[0].selected} "
                              f"(e.g. {fb[0].name}: {fb[0].shape[0]} columns)")
        ri = [t for t in won[i] if t.type != t.selected]
        if ri:
            p.warnings.append(f"rules[{i}] {rx}={ty}: {len(ri)} tensor(s) get {ri[0].type} instead "
                              f"(e.g. {ri[0].name}: {ri[0].shape[1]} rows, not a multiple of the interleave)")
    if opts.pure or DEFAULT_TYPE[opts.ftype] in NOT_QUANTIZED:
        p.warnings.append(f"the engine ignores --custom-q with {'--pure' if opts.pure else 'ftype ' + opts.ftype}")


def _override_report(p: Plan, opts: EngineOptions) -> None:
    """CLI type overrides the engine does not honour as asked (interleaving constraints)."""
    for flag, want, match in (("token_embd", opts.token_embd, lambda n: n == "token_embd.weight"),
                              ("output", opts.output, lambda n: n == "output.weight"),
                              ("ffn_gate_inp", opts.ffn_gate_inp, lambda n: "ffn_gate_inp.weight" in n)):
        if want is None:
            continue
        got = [t for t in p.tensors if match(t.name) and t.type != want and (t.quantized or t.src_type != want)]
        if got:
            t = got[0]
            why = ("token embeddings cannot be row-interleaved" if t.name == "token_embd.weight"
                   else f"{t.shape[1] if len(t.shape) > 1 else 1} rows are not a multiple of the interleave")
            p.warnings.append(f"{flag}: {want} asked, the engine writes {t.type} for {len(got)} tensor(s) "
                              f"(e.g. {t.name}: {why})")


def _imatrix_report(p: Plan, im: Any, has_im: bool) -> None:
    """What the engine's per-tensor imatrix lookup (1462-1537) would do, in file order."""
    exempt = ("token_embd.weight", "output.weight")
    if im is None:
        need = [t for t in p.tensors if t.quantized and needs_imatrix(t.selected, p.ftype) and t.name not in exempt]
        if not has_im:
            if p.ftype in FTYPES_NEED_IMATRIX:
                p.warnings.append(f"llama-quantize refuses ftype {p.ftype} without --imatrix")
            if need:
                p.warnings.append(f"{len(need)} tensor(s) get a type that needs an imatrix (e.g. {need[0].name}: "
                                  f"{need[0].selected}); the engine aborts without one")
        return
    from .imatrix import engine_lookup

    names = set(im.entries)
    problems: list[str] = []
    for t in p.tensors:
        if not t.quantized:
            continue
        key = engine_lookup(names, t.name)
        if key is not None:
            want = expected_size(t.shape)
            if im.entries[key].nval != want and t.name != "token_embd.weight":
                problems.append(f"imatrix entry {key} has {im.entries[key].nval} values but {t.name} needs {want} "
                                "(llama-quantize aborts; remap the imatrix for this model)")
        elif needs_imatrix(t.selected, p.ftype) and t.name not in exempt:
            problems.append(f"imatrix has no data for {t.name}, planned as {t.selected} which needs it "
                            "(llama-quantize aborts with 'Missing importance matrix')")
    if problems:
        more = f" [and {len(problems) - 1} more]" if len(problems) > 1 else ""
        raise ImatrixError(problems[0] + more)


# --------------------------------------------------------------------------------------
# running the engine's own selection (for comparisons)
# --------------------------------------------------------------------------------------


@dataclass
class EngineDryRun:
    types: dict[str, str | None]  # as Plan.types()
    quant_mib: float
    model_mib: float
    n_fallback: int
    log: str
    cmd: list[str]


def engine_dry_run(bin_dir: str | Path, model: str | Path, spec: Any, imatrix: str | Path | None = None,
                   threads: int = 1, check_imatrix: bool = False) -> EngineDryRun:
    """llama-quantize --dry-run with the same flags a plan models (ftype, recipe or EngineOptions).

    By default also --ignore-imatrix-rules, so every tensor is listed; check_imatrix=True
    leaves the engine's own "Missing importance matrix" checks on."""
    import tempfile

    from . import commands, logparse

    opts, _ = _as_options(spec)
    extra = engine_flags(opts) + ["--dry-run"] + ([] if check_imatrix else ["--ignore-imatrix-rules"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = commands.quantize_cmd(Path(bin_dir), Path(model), Path(tmp) / "dry-run.gguf", opts.ftype, threads,
                                    Path(imatrix) if imatrix else None, extra)
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    text = proc.stdout + proc.stderr
    try:
        res = logparse.parse_quantize(text)
    except logparse.EngineOutputError as e:
        raise PlanError(f"engine dry-run failed (exit {proc.returncode}): {e}") from None
    return EngineDryRun(logparse.parse_quantize_tensors(text), res.quant_mib, res.model_mib, res.n_fallback, text, cmd)


# --------------------------------------------------------------------------------------
# a DeepSeek-V3-shaped table (no weights needed)
# --------------------------------------------------------------------------------------

V3 = {
    "n_layer": 61, "n_dense": 3, "n_expert": 256, "n_expert_used": 8, "n_embd": 7168, "n_head": 128,
    "q_lora": 1536, "kv_lora": 512, "qk_nope": 128, "qk_rope": 64, "v_head": 128, "n_ff": 18432,
    "n_ff_exp": 2048, "n_vocab": 129280,
}


def deepseek_v3_table(layout: str = "ik", source_type: str = "bf16") -> GGUFTable:
    """The tensor table of a DeepSeek-V3/R1 GGUF, from shapes alone (see deepseek2_table)."""
    return deepseek2_table(layout=layout, source_type=source_type)


def deepseek2_table(layout: str = "ik", source_type: str = "bf16", **dims: int) -> GGUFTable:
    """The tensor table of a DeepSeek-V3/R1 GGUF, from shapes alone; `dims` override V3's sizes
    (keys of V3, e.g. n_embd=256, n_expert=8 for a small model with V3's names and layer count).

    layout "ik" (default): attn_kv_b plus 2-D attn_k_b/attn_v_b, 1147 tensors, in the order of
    the ik/evshiron-converted BF16 GGUFs (as logged in ik_llama.cpp issue #296 / PR #185);
    "kv_b": pre-MLA, attn_kv_b only (1025); "mainline": 3-D attn_k_b/attn_v_b, no attn_kv_b
    (1086). Matrices are `source_type`, norms/biases/ffn_gate_inp f32 (as convert_hf_to_gguf
    writes them). The KVs are the ones the engine reads for deepseek2.
    """
    if layout not in ("ik", "kv_b", "mainline"):
        raise ValueError(f"layout {layout!r} is not one of ik, kv_b, mainline")
    unknown = set(dims) - set(V3)
    if unknown:
        raise ValueError(f"unknown dimension(s) {sorted(unknown)}; known: {sorted(V3)}")
    c = {**V3, **dims}
    src = BY_NAME[source_type].id
    f32 = BY_NAME["f32"].id
    E, H = c["n_embd"], c["n_head"]
    tensors: list[TensorInfo] = []

    def add(name, shape, ty=src):
        tensors.append(TensorInfo(name, tuple(shape), ty, 0))

    def attn(p):
        add(p + "attn_kv_a_norm.weight", (c["kv_lora"],), f32)
        add(p + "attn_kv_a_mqa.weight", (E, c["kv_lora"] + c["qk_rope"]))
        if layout in ("ik", "kv_b"):
            add(p + "attn_kv_b.weight", (c["kv_lora"], H * (c["qk_nope"] + c["v_head"])))
        if layout == "ik":
            add(p + "attn_k_b.weight", (c["qk_nope"], H * c["kv_lora"]))
            add(p + "attn_v_b.weight", (c["kv_lora"], H * c["v_head"]))
        elif layout == "mainline":
            add(p + "attn_k_b.weight", (c["qk_nope"], c["kv_lora"], H))
            add(p + "attn_v_b.weight", (c["kv_lora"], c["v_head"], H))
        add(p + "attn_output.weight", (H * c["v_head"], E))
        add(p + "attn_q_a_norm.weight", (c["q_lora"],), f32)
        add(p + "attn_q_a.weight", (E, c["q_lora"]))
        add(p + "attn_q_b.weight", (c["q_lora"], H * (c["qk_nope"] + c["qk_rope"])))

    add("token_embd.weight", (E, c["n_vocab"]))
    for il in range(c["n_layer"]):
        p = f"blk.{il}."
        if il < c["n_dense"]:
            add(p + "attn_norm.weight", (E,), f32)
            add(p + "ffn_down.weight", (c["n_ff"], E))
            add(p + "ffn_gate.weight", (E, c["n_ff"]))
            add(p + "ffn_up.weight", (E, c["n_ff"]))
            add(p + "ffn_norm.weight", (E,), f32)
            attn(p)
        else:
            add(p + "exp_probs_b.bias", (c["n_expert"],), f32)
            add(p + "ffn_gate_inp.weight", (E, c["n_expert"]), f32)
            add(p + "ffn_down_shexp.weight", (c["n_ff_exp"], E))
            add(p + "ffn_gate_shexp.weight", (E, c["n_ff_exp"]))
            add(p + "ffn_up_shexp.weight", (E, c["n_ff_exp"]))
            attn(p)
            if il == c["n_layer"] - 1:
                add("output.weight", (E, c["n_vocab"]))
            add(p + "attn_norm.weight", (E,), f32)
            add(p + "ffn_down_exps.weight", (c["n_ff_exp"], E, c["n_expert"]))
            add(p + "ffn_gate_exps.weight", (E, c["n_ff_exp"], c["n_expert"]))
            add(p + "ffn_up_exps.weight", (E, c["n_ff_exp"], c["n_expert"]))
            add(p + "ffn_norm.weight", (E,), f32)
    add("output_norm.weight", (E,), f32)

    a = "deepseek2"
    kv = {
        "general.architecture": a,
        "general.name": "DeepSeek-V3 (shapes only)" if not dims else "DeepSeek2 (shapes only)",
        "general.file_type": {"bf16": 32, "f16": 1, "f32": 0}.get(source_type, 32),
        f"{a}.block_count": c["n_layer"],
        f"{a}.context_length": 163840,
        f"{a}.embedding_length": E,
        f"{a}.feed_forward_length": c["n_ff"],
        f"{a}.attention.head_count": H,
        f"{a}.attention.head_count_kv": 1 if layout == "mainline" else H,
        f"{a}.attention.key_length": 576 if layout == "mainline" else c["qk_nope"] + c["qk_rope"],
        f"{a}.attention.value_length": 512 if layout == "mainline" else c["v_head"],
        f"{a}.rope.dimension_count": c["qk_rope"],
        f"{a}.rope.freq_base": 10000.0,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{a}.leading_dense_block_count": c["n_dense"],
        f"{a}.attention.q_lora_rank": c["q_lora"],
        f"{a}.attention.kv_lora_rank": c["kv_lora"],
        f"{a}.expert_feed_forward_length": c["n_ff_exp"],
        f"{a}.expert_count": c["n_expert"],
        f"{a}.expert_used_count": min(c["n_expert_used"], c["n_expert"]),
        f"{a}.expert_shared_count": 1,
        f"{a}.expert_weights_scale": 2.5,
        f"{a}.expert_weights_norm": True,
        f"{a}.expert_gating_func": 2,
        f"{a}.vocab_size": c["n_vocab"],
    }
    if layout == "mainline":
        kv[f"{a}.attention.key_length_mla"] = c["qk_nope"] + c["qk_rope"]
        kv[f"{a}.attention.value_length_mla"] = c["v_head"]
    label = "DeepSeek-V3" if not dims else "DeepSeek2-" + "-".join(f"{k}{v}" for k, v in sorted(dims.items()))
    return GGUFTable(path=Path(f"{label}-{layout}-{source_type}"), version=3, kv=kv, tensors=tensors, data_offset=0)


def write_shape_gguf(table: GGUFTable, path: str | Path, alignment: int = 32) -> int:
    """Write a GGUF with `table`'s KVs and tensor infos and all-zero tensor data (a sparse file).

    llama-quantize --dry-run reads only headers and (zero) data pages, so this lets the engine
    select types for a model shape without its weights. Scalar KVs only (arrays are dropped).
    Returns the file size."""
    import struct

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kvs = []
    for k, v in table.kv.items():
        if k == "general.alignment" or v is None or isinstance(v, (list, tuple)):
            continue
        if isinstance(v, bool):
            kvs.append(s(k) + struct.pack("<I?", 7, v))
        elif isinstance(v, int):
            kvs.append(s(k) + (struct.pack("<II", 4, v) if 0 <= v < 2**32 else struct.pack("<Iq", 11, v)))
        elif isinstance(v, float):
            kvs.append(s(k) + struct.pack("<If", 6, v))
        else:
            kvs.append(s(k) + struct.pack("<I", 8) + s(str(v)))
    infos, offset = [], 0
    for t in table.tensors:
        infos.append(s(t.name) + struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", d) for d in t.shape)
                     + struct.pack("<IQ", t.type_id, offset))
        offset += (t.nbytes + alignment - 1) // alignment * alignment
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + offset)
    return len(head) + offset


def all_ftypes() -> list[str]:
    """Every ftype name llama-quantize accepts (aliases included), as ggml_types.FTYPES lists them."""
    return list(ggml_types.FTYPES)


def compare(planned: Plan, engine_types: dict[str, str | None]) -> list[str]:
    """Differences between a plan and the engine's per-tensor types, one line each."""
    diffs = []
    mine = planned.types()
    for n in sorted(set(mine) | set(engine_types)):
        if mine.get(n, "<absent>") != engine_types.get(n, "<absent>"):
            diffs.append(f"{n}: plan {mine.get(n, '<absent>')} engine {engine_types.get(n, '<absent>')}")
    return diffs


def iter_plans(table: GGUFTable, ftypes: Iterable[str], **kw) -> Iterable[Plan]:
    for f in ftypes:
        yield plan(table, f, **kw)
