"""Per-tensor type selection of ik_llama.cpp's llama-quantize, ported to Python.

Given a model's tensor table (gguf.reader.GGUFTable: names, shapes, source types and the
KVs the engine reads) and what llama-quantize is told (EngineOptions: an ftype, --custom-q
rules, type overrides), `select()` gives, tensor by tensor, the type the engine writes and
its size in bytes -- without the engine and without the weights, so recipes for a 700 GB
model can be sized and checked on a laptop (planner.plan builds the Plan and its reports).
This module keeps upstream's shape so it can be diffed against a new engine version; the
facts about each type (default types, fallbacks, interleaving) come from gguf.types.

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
uses std::regex_search; here Python's re.search is used. planner.recipes refuses the
constructs whose meaning differs between the two (see recipes.check_regex), so for accepted patterns
the results are the same.

Not ported (documented, not needed for DeepSeek): the model "type" (7B/8B/70B...) is
derived for arch llama only (it matters only for non-MoE llama-style attn_v/attn_q
branches); --repack, --partial-requant, --keep-split and --include/--exclude-weights;
4-D tensors are sized as ne1*ne2*ne3 rows (the engine's dry-run ignores ne3).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from ..errors import PlanError
from ..gguf.reader import GGUFTable, TensorInfo
from ..gguf.types import BY_NAME, FTYPES, by_name, canonical_ftype, quantized

_ENUM_SPECIAL = {"q4_0_4x4": "Q4_0_4_4", "q4_0_4x8": "Q4_0_4_8", "q4_0_8x8": "Q4_0_8_8"}
# G.Q4_K == "q4_K", G.IQ4_K_R4 == "iq4_k_r4": the engine's enum names -> ggml_type_name().
G = SimpleNamespace(**{_ENUM_SPECIAL.get(n, n.upper()): n for n in BY_NAME})


def interleaved(t: str) -> tuple[str, int]:
    """interleaved_properties() (src/llama-quantize.cpp:83-119): (base type, rows)."""
    row = BY_NAME.get(t)
    return (row.base, row.rows) if row else (t, 1)


def change_type_if_necessary(new_type: str, ne0: int, name: str = "") -> str:
    """The engine's row-size fallback (221-302; returns new_type when none is needed)."""
    row = by_name(new_type)
    if not row.row_multiple or ne0 % row.row_multiple == 0:
        return new_type
    if row.fallback is None:
        raise PlanError(f"{name}: {ne0} columns do not fit {new_type} and the engine has no fallback "
                        "for it (it aborts with 'Unsupported tensor size encountered')")
    return row.fallback


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

    def argv(self) -> list[str]:
        """llama-quantize flags (before the positionals) that make the engine select as this says."""
        args: list[str] = ["--pure"] if self.pure else []
        if self.leave_output:
            args.append("--leave-output-tensor")
        for flag, v in (("--token-embedding-type", self.token_embd), ("--output-tensor-type", self.output),
                        ("--ffn-gate-inp-type", self.ffn_gate_inp), ("--attn-q-type", self.attn_q),
                        ("--attn-k-type", self.attn_k), ("--attn-v-type", self.attn_v),
                        ("--attn-qkv-type", self.attn_qkv), ("--attn-output-type", self.attn_output),
                        ("--ffn-gate-type", self.ffn_gate), ("--ffn-down-type", self.ffn_down),
                        ("--ffn-up-type", self.ffn_up)):
            if v is not None:
                args += [flag, v]
        if self.custom:
            for rx, _ in self.custom:
                if "," in rx or "=" in rx:
                    raise PlanError(f"--custom-q pattern {rx!r} contains ',' or '=' (the engine splits on them)")
            args += ["--custom-q", ",".join(f"{rx}={ty}" for rx, ty in self.custom)]
        return args

    @property
    def default_type(self) -> str:
        """The ftype's default type (switch at 927-1017)."""
        return FTYPES[self.ftype].default


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

        n_layer = kv.get(f"{arch}.block_count")
        if n_layer is None:
            raise PlanError(f"{table.path}: no {arch}.block_count KV")
        n_head = int(table.arch_kv("attention.head_count") or 0)
        n_head_kv = table.arch_kv("attention.head_count_kv")
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


# llama_tensor_get_type (src/llama-quantize.cpp:304-832)
# --------------------------------------------------------------------------------------


def llama_tensor_get_type(qs: _State, hp: HParams, o: EngineOptions, rules: list[tuple[re.Pattern, str]],
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


def _cli_overrides(o: EngineOptions, name: str, new_type: str) -> str:
    """The type flags applied after llama_tensor_get_type (1405-1437)."""
    if o.token_embd is not None and name == "token_embd.weight":
        new_type = o.token_embd
    if o.output is not None and name == "output.weight":
        new_type = o.output
    if o.ffn_gate_inp is not None and "ffn_gate_inp.weight" in name:
        new_type = o.ffn_gate_inp
    # --attn-*/--ffn-*-type compare with strcmp against the bare names "attn_q.weight",
    # "ffn_gate" ... (1420-1436), which never name a tensor of a real model.
    for bare, v in (("attn_q.weight", o.attn_q), ("attn_k.weight", o.attn_k), ("attn_v.weight", o.attn_v),
                    ("attn_qkv.weight", o.attn_qkv), ("attn_output.weight", o.attn_output),
                    ("ffn_gate", o.ffn_gate), ("ffn_down", o.ffn_down), ("ffn_up", o.ffn_up)):
        if v is not None and name == bare:
            new_type = v
    return new_type


def select(table: GGUFTable, o: EngineOptions, has_imatrix: bool) -> tuple[list[TensorPlan], int]:
    """The per-tensor loop of llama_model_quantize_internal: every tensor's type and size, and
    the number of row-size fallbacks (what the engine reports as n_fallback)."""
    hp = HParams.from_table(table)
    default_type = o.default_type
    try:
        rules = [(re.compile(rx), ty) for rx, ty in o.custom]
    except re.error as e:
        raise PlanError(f"invalid --custom-q regex: {e}") from None
    qs = _State(n_layer=hp.n_layer, has_imatrix=has_imatrix,
                has_output=any(t.name == "output.weight" for t in table.tensors))
    qs.n_attention_wv = sum(1 for t in table.tensors if "attn_v.weight" in t.name or "attn_qkv.weight" in t.name)
    out: list[TensorPlan] = []
    for t in table.tensors:
        src, src_nbytes, n_el = t.type, t.nbytes, t.n_elements
        if never_quantized(t.name, t.shape, o, src):
            out.append(TensorPlan(t.name, t.shape, src, src, src_nbytes, src_nbytes, n_el, False, selected=src))
            continue
        new_type, fell_back, rule = default_type, False, None
        if o.pure:
            working = change_type_if_necessary(new_type, t.shape[0], t.name)
            if working != new_type:
                qs.n_fallback += 1
                new_type, fell_back = working, True
        elif quantized(default_type):
            new_type, fell_back, rule = llama_tensor_get_type(qs, hp, o, rules, new_type, t)
        new_type = _cli_overrides(o, t.name, new_type)
        if t.name == "token_embd.weight":
            new_type = interleaved(new_type)[0]
        if new_type == src:
            out.append(TensorPlan(t.name, t.shape, src, src, src_nbytes, src_nbytes, n_el, False,
                                  fell_back, rule, selected=src))
            continue
        selected = new_type
        working, rows = interleaved(new_type)
        if (t.shape[1] if len(t.shape) > 1 else 1) % rows != 0:
            new_type = working
        try:
            nbytes = by_name(new_type).row_bytes(t.shape[0]) * (n_el // t.shape[0])
        except PlanError as e:
            raise PlanError(f"{t.name}: {e} (the engine aborts in ggml_row_size)") from None
        out.append(TensorPlan(t.name, t.shape, src, new_type, nbytes, src_nbytes, n_el, True, fell_back, rule,
                              selected))
    return out, qs.n_fallback
