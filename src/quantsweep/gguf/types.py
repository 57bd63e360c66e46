"""THE type table: every fact quantsweep knows about a ggml type or a llama-quantize ftype.

One row per type of the engine we build (ik_llama.cpp: ggml/include/ggml.h, type_traits in
ggml/src/ggml.c, src/llama-quantize.cpp); the planner, the imatrix check, recipes and the
config read these rows and keep no lists of their own. Adding a type is one row here (plus a
size formula if it is not `row_meta + ne0 / block * bytes`).

ik's types carry per-row metadata (e.g. IQ4_KS: 4 bytes per row) that gguf-py ignores, so
sizes from gguf-py are wrong for them; the table's size is what the engine uses.

Type columns:
  id, name    ggml_type and ggml_type_name() (the case-sensitive spelling --custom-q needs)
  block       values per block; bytes: bytes per block; meta: bytes of metadata per row
  flags       q  ggml marks it quantized (the quantize heuristics run only for these)
              s  a weight storage type (recipes may name it; q8_1, q8_K, i8... are not)
              i  llama-quantize refuses it without imatrix data (quantize.cpp "Missing
                 importance matrix ... very low-bit quantization")
              w  its quantizer weighs the rounding error by the imatrix values
  row         change_type_if_necessary (src/llama-quantize.cpp:221-302): ne0 must be a
              multiple of this, else the type falls back to `fallback` ("-": the engine
              aborts with "Unsupported tensor size encountered")
  interleave  row-interleaved types (interleaved_properties, 83-119): base type / rows; a
              tensor whose ne1 is not a multiple of rows gets the base type (1540-1545)
  zero        llama-quantize fails (SIGABRT, SIGSEGV, or "quantized data validation failed")
              when an aligned group of this many imatrix values of a row is all zero; "-":
              never. Measured with the engine, every type against zero groups of 16/32/128/256
              values, scattered zeros and a whole row (benchmarks/zero_imatrix.py): q4_K's
              make_qp_quants divides 0/0 (ggml-quants.c:2409), q5_K/q2_K store a NaN scale,
              iq4_nl/iq2_xxs/iq1_s assert, iq3_xxs/iq2_xs read an uninitialised array (so fail
              on some runs only); the repacked and IQK types guard zero blocks (iqk_quantize.cpp
              QHelper::row_weights). Dead input channels are normal: the pre-flight check flags
              exactly these groups and `imatrix remap` floors every all-zero 16-group

Ftype columns (quantize.cpp QUANT_OPTIONS, default type from src/llama-quantize.cpp:927-1017):
  name, id (llama_ftype: general.file_type of a file made with it), default type,
  flags (i: refused without --imatrix, quantize.cpp:611-623),
  imatrix types (types that need imatrix data under this ftype only), aliases.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ..errors import PlanError, RecipeError

# id   name        block bytes meta flags row  fallback  interleave                   zero
_TYPES = """
   0   f32            1    4    0   s     -    -         -            -
   1   f16            1    2    0   s     -    -         -            -
   2   q4_0          32   18    0   qsw   -    -         -            -
   3   q4_1          32   20    0   qsw   -    -         -            -
   6   q5_0          32   22    0   qsw   -    -         -            -
   7   q5_1          32   24    0   qsw   -    -         -            -
   8   q8_0          32   34    0   qs    -    -         -            -
   9   q8_1          32   36    0   q     -    -         -            -
  10   q2_K         256   84    0   qsw   256  iq4_nl    -            256
  11   q3_K         256  110    0   qsw   256  iq4_nl    -            -
  12   q4_K         256  144    0   qsw   256  q5_0      -            256
  13   q5_K         256  176    0   qsw   256  q6_0      -            256
  14   q6_K         256  210    0   qsw   256  q8_0      -            -
  15   q8_K         256  296    0   q     -    -         -            -
  16   iq2_xxs      256   66    0   qsiw  256  iq4_nl    -            32
  17   iq2_xs       256   74    0   qsiw  256  iq4_nl    -            16
  18   iq3_xxs      256   98    0   qsw   256  iq4_nl    -            32
  19   iq1_s        256   50    0   qsiw  256  iq4_nl    -            32
  20   iq4_nl        32   18    0   qsw   -    -         -            32
  21   iq3_s        256  110    0   qsw   256  iq4_nl    -            -
  22   iq2_s        256   82    0   qsiw  256  iq4_nl    -            -
  23   iq4_xs       256  136    0   qsw   256  iq4_nl    -            -
  24   i8             1    1    0   -     -    -         -            -
  25   i16            1    2    0   -     -    -         -            -
  26   i32            1    4    0   -     -    -         -            -
  27   i64            1    8    0   -     -    -         -            -
  28   f64            1    8    0   -     -    -         -            -
  29   iq1_m        256   56    0   qsiw  256  iq4_nl    -            -
  30   bf16           1    2    0   s     -    -         -            -
  31   q4_0_4x4      32   18    0   qsw   -    -         q4_0/4       -
  32   q4_0_4x8      32   18    0   qsw   -    -         q4_0/4       -
  33   q4_0_8x8      32   18    0   qsw   -    -         q4_0/8       -
  39   mxfp4         32   17    0   qsw   -    -         -            -
  41   q1_0_g128    128   18    0   qsw   -    -         -            -
 133   q6_0          32   26    0   qsw   -    -         -            -
 134   iq1_bn        64   13    2   qsw   64   -         -            -
 135   iq2_bn        64   16    4   qsw   64   -         -            -
 137   iq2_k        256   76    0   qsw   256  iq4_nl    -            -
 138   iq3_k        256  110    0   qsw   256  iq4_nl    -            -
 139   iq4_k        256  144    0   qsw   256  q5_0      -            -
 140   iq5_k        256  176    0   qsw   256  q6_0      -            -
 141   iq6_k        256  212    0   qsw   256  q8_0      -            -
 144   iq4_ks       256  136    4   qsw   256  iq4_nl    -            -
 145   iq2_ks       256   70    2   qsw   256  iq4_nl    -            -
 146   iq4_kss      256  128    4   qsw   256  iq4_nl    -            -
 151   q8_KV         32   32    8   qs    -    -         -            -
 152   iq5_ks       256  168    4   qsw   256  q5_0      -            -
 153   iq2_kt       256   68    4   qsiw  256  iq4_nl    -            -
 154   iq3_kt       256  100    4   qsw   256  iq4_nl    -            -
 155   iq4_kt       256  128    4   qsw   256  iq4_nl    -            -
 156   iq3_ks       256  102    2   qsw   256  iq4_nl    -            -
 157   iq2_kl       256   86    2   qsw   256  iq4_nl    -            -
 158   iq1_kt       256   56    4   qsiw  256  iq4_nl    -            -
 202   q4_0_r8       32   18    0   qsw   -    -         q4_0/8       -
 206   q5_0_r4       32   22    0   qsw   -    -         q5_0/4       -
 208   q8_0_r8       32   34    0   qs    -    -         q8_0/8       -
 210   q2_k_r4      256   84    0   qsw   256  iq4_nl    q2_K/4       -
 211   q3_k_r4      256  110    0   qsw   256  iq4_nl    q3_K/4       -
 212   q4_k_r4      256  144    0   qsw   256  q5_0      q4_K/4       -
 213   q5_k_r4      256  176    0   qsw   256  q6_0      q5_K/4       -
 214   q6_k_r4      256  210    0   qsw   256  q8_0      q6_K/4       -
 216   iq2_xxs_r4   256   66    0   qsiw  256  iq4_nl    iq2_xxs/4    -
 217   iq2_xs_r4    256   74    0   qsiw  256  iq4_nl    iq2_xs/4     -
 218   iq3_xxs_r4   256   98    0   qsw   256  iq4_nl    iq3_xxs/4    -
 219   iq1_s_r4      32    6    2   qsiw  -    -         iq1_s/4      -
 220   iq4_nl_r4     32   18    0   qsw   -    -         iq4_nl/4     -
 221   iq3_s_r4     256  110    0   qsw   256  iq4_nl    iq3_s/4      -
 222   iq2_s_r4     256   82    0   qsiw  256  iq4_nl    iq2_s/4      -
 223   iq4_xs_r8    256  136    0   qsw   256  iq4_nl    iq4_xs/8     -
 229   iq1_m_r4      32    7    2   qsiw  -    -         iq1_m/4      -
 230   bf16_r16       1    2    0   s     -    -         bf16/16      -
 233   q6_0_r4       32   26    0   qsw   -    -         q6_0/4       -
 335   iq2_bn_r4     64   16    4   qsw   64   -         iq2_bn/4     -
 337   iq2_k_r4     256   76    0   qsw   256  iq4_nl    iq2_k/4      -
 338   iq3_k_r4     256  110    0   qsw   256  iq4_nl    iq3_k/4      -
 339   iq4_k_r4     256  144    0   qsw   256  q5_0      iq4_k/4      -
 340   iq5_k_r4     256  176    0   qsw   256  q6_0      iq5_k/4      -
 344   iq4_ks_r4    256  136    4   qsw   256  iq4_nl    iq4_ks/4     -
 352   iq5_ks_r4    256  168    4   qsw   256  q5_0      iq5_ks/4     -
 397   q8_k_r16     256  258    0   qs    -    -         -            -
 398   q8_KV_r8      32   32    4   qs    -    -         q8_KV/8      -
 399   q8_k_r8      256  258    0   qs    256  q8_0      q8_0/8       -
"""

# name          id  default       flags imatrix types  aliases
_FTYPES = """
Q4_0             2  q4_0          -   -     -
Q4_1             3  q4_1          -   -     -
Q5_0             8  q5_0          -   -     -
Q5_1             9  q5_1          -   -     -
Q6_0           135  q6_0          -   -     -
Q8_0             7  q8_0          c   -     -
Q8_KV          149  q8_KV         -   -     -
F16              1  f16           -   -     -
BF16            32  bf16          c   -     -
BF16_R16       232  bf16_r16      -   -     -
F32              0  f32           c   -     -
COPY             0  f32           -   -     -
Q2_K_S          21  q2_K          i   q2_K  -
Q2_K            10  q2_K          -   -     -
Q2_K_R4        210  q2_k_r4       -   -     -
IQ3_XS          22  iq3_s         -   -     -
Q3_K_S          11  q3_K          -   -     -
Q3_K_M          12  q3_K          -   -     Q3_K
Q3_K_L          13  q3_K          -   -     -
Q3_K_R4        211  q3_k_r4       -   -     -
Q4_K_S          14  q4_K          -   -     -
Q4_K_M          15  q4_K          -   -     Q4_K
Q4_K_R4        214  q4_k_r4       -   -     -
Q5_K_S          16  q5_K          -   -     -
Q5_K_M          17  q5_K          -   -     Q5_K
Q5_K_R4        216  q5_k_r4       -   -     -
Q6_K            18  q6_K          -   -     -
Q6_K_R4        218  q6_k_r4       -   -     -
Q8_K_R8        399  q8_k_r8       -   -     -
Q8_KV_R8       398  q8_KV_r8      -   -     -
IQ2_XXS         19  iq2_xxs       i   -     -
IQ2_XXS_R4     219  iq2_xxs_r4    i   -     -
IQ2_XS          20  iq2_xs        i   -     -
IQ2_XS_R4      220  iq2_xs_r4     i   -     -
IQ2_KS         147  iq2_ks        -   -     -
IQ1_KT         156  iq1_kt        -   -     -
IQ2_KT         151  iq2_kt        -   -     -
IQ2_S           28  iq2_xs        i   -     -
IQ2_M           29  iq2_s         -   -     -
IQ2_M_R4       229  iq2_s_r4      -   -     -
IQ3_XXS         23  iq3_xxs       -   -     -
IQ3_KT         152  iq3_kt        -   -     -
IQ4_KT         153  iq4_kt        -   -     -
IQ3_XXS_R4     223  iq3_xxs_r4    -   -     -
IQ1_S           24  iq1_s         i   -     -
IQ1_S_R4       224  iq1_s_r4      i   -     -
IQ1_M_R4       231  iq1_m_r4      i   -     -
IQ1_M           31  iq1_m         i   -     -
IQ1_BN         136  iq1_bn        -   -     -
IQ2_BN         137  iq2_bn        -   -     -
IQ2_BN_R4      337  iq2_bn_r4     -   -     -
IQ4_NL          25  iq4_nl        -   -     -
IQ4_NL_R4      225  iq4_nl_r4     -   -     -
IQ4_XS_R8      230  iq4_xs_r8     -   -     -
Q4_0_R8        202  q4_0_r8       -   -     -
Q5_0_R4        208  q5_0_r4       -   -     -
Q6_0_R4        335  q6_0_r4       -   -     -
Q8_0_R8        207  q8_0_r8       -   -     -
MXFP4           38  mxfp4         -   -     -
IQ4_XS          30  iq4_xs        -   -     -
IQ4_KS         145  iq4_ks        -   -     -
IQ4_KS_R4      345  iq4_ks_r4     -   -     -
IQ5_KS_R4      350  iq5_ks_r4     -   -     -
IQ4_KSS        148  iq4_kss       -   -     -
IQ5_KS         150  iq5_ks        -   -     -
IQ2_K          138  iq2_k         -   -     -
IQ2_K_R4       338  iq2_k_r4      -   -     -
IQ3_KS         154  iq3_ks        -   -     -
IQ2_KL         155  iq2_kl        -   -     -
IQ3_K          139  iq3_k         -   -     -
IQ3_K_R4       339  iq3_k_r4      -   -     -
IQ3_KL         146  iq3_k         -   -     -
IQ4_K          140  iq4_k         -   -     -
IQ4_K_R4       340  iq4_k_r4      -   -     -
IQ5_K          141  iq5_k         -   -     -
IQ5_K_R4       341  iq5_k_r4      -   -     -
IQ6_K          142  iq6_k         -   -     -
IQ3_S           26  iq3_s         -   -     -
IQ3_S_R4       226  iq3_s_r4      -   -     -
IQ3_M           27  iq3_s         -   -     -
Q4_0_4_4        33  q4_0_4x4      -   -     -
Q4_0_4_8        34  q4_0_4x8      -   -     -
Q4_0_8_8        35  q4_0_8x8      -   -     -
"""


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block: int
    type_size: int
    row_meta: int = 0
    quantized: bool = False
    storage: bool = True
    needs_imatrix: bool = False
    imatrix_weighted: bool = False
    row_multiple: int = 0  # 0: no row-size check
    fallback: str | None = None
    interleave: tuple[str, int] | None = None  # (base type, rows)
    zero_group: int | None = None  # an all-zero imatrix group this wide breaks quantize

    def row_bytes(self, ne0: int) -> int:
        if ne0 % self.block:
            raise PlanError(f"a row of {ne0} values is not a multiple of {self.name}'s block size {self.block}")
        return self.row_meta + (ne0 // self.block) * self.type_size

    @property
    def bpw(self) -> float:
        """Bits per weight without row metadata (what the usage text quotes)."""
        return 8.0 * self.type_size / self.block

    @property
    def base(self) -> str:
        """The type without row interleaving (itself when it is not interleaved)."""
        return self.interleave[0] if self.interleave else self.name

    @property
    def rows(self) -> int:
        return self.interleave[1] if self.interleave else 1


@dataclass(frozen=True)
class Ftype:
    name: str  # canonical spelling (quantize.cpp QUANT_OPTIONS)
    id: int  # llama_ftype (include/llama.h): what general.file_type says
    default: str  # ggml type name of every tensor before the heuristics
    needs_imatrix: bool = False  # llama-quantize refuses the ftype without --imatrix
    imatrix_types: frozenset[str] = frozenset()  # types needing data under this ftype only
    aliases: tuple[str, ...] = ()
    # flag c: what quantsweep lets the Hugging Face converter write (convert_hf_to_gguf.py
    # --outtype, spelled as the default type); f16 is left out, bf16 weights overflow it
    converter_outtype: bool = False


def _parse_types(text: str) -> dict[int, GGMLType]:
    out = {}
    for line in text.strip().splitlines():
        tid, name, block, size, meta, flags, row, fallback, inter, zero = line.split()
        base, _, rows = inter.partition("/")
        out[int(tid)] = GGMLType(
            int(tid), name, int(block), int(size), int(meta),
            quantized="q" in flags, storage="s" in flags, needs_imatrix="i" in flags,
            imatrix_weighted="w" in flags, row_multiple=0 if row == "-" else int(row),
            fallback=None if fallback == "-" else fallback,
            interleave=None if inter == "-" else (base, int(rows)),
            zero_group=None if zero == "-" else int(zero),
        )
    return out


def _parse_ftypes(text: str) -> dict[str, Ftype]:
    out = {}
    for line in text.strip().splitlines():
        name, fid, default, flags, imatrix_types, aliases = line.split()
        out[name] = Ftype(name, int(fid), default, "i" in flags,
                          frozenset() if imatrix_types == "-" else frozenset(imatrix_types.split(",")),
                          () if aliases == "-" else tuple(aliases.split(",")), "c" in flags)
    return out


TYPES: dict[int, GGMLType] = _parse_types(_TYPES)
BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES.values()}
FTYPES: dict[str, Ftype] = _parse_ftypes(_FTYPES)
# The finest all-zero imatrix group any type breaks on: `imatrix remap` floors groups this size.
ZERO_FLOOR_GROUP: int = min(t.zero_group for t in TYPES.values() if t.zero_group)


# The ladders quantsweep proposes (quantsweep init, the capacity plan's fixes): ik's types from
# 8.5 down to ~2.2 bpw that need no imatrix, most bits first, as ftypes; and the allocator's
# ladder of ggml types, fewest bits first (its top is what every sensitivity run holds).
SWEEP_LADDER = ("Q8_0", "IQ6_K", "IQ5_KS", "IQ4_KS", "IQ3_K", "IQ2_KS")
ALLOCATION_LADDER = ("iq2_ks", "iq3_ks", "iq4_ks", "iq5_ks", "q8_0")


def get(type_id: int) -> GGMLType:
    """The row of a type id; PlanError for an id the table lacks."""
    try:
        return TYPES[type_id]
    except KeyError:
        raise PlanError(f"unknown ggml type id {type_id} (not in quantsweep's type table)") from None


def by_name(name: str) -> GGMLType:
    try:
        return BY_NAME[name]
    except KeyError:
        raise PlanError(f"unknown ggml type {name!r}") from None


def type_name(type_id: int) -> str:
    t = TYPES.get(type_id)
    return t.name if t else f"type{type_id}"


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    rows = 1
    for d in shape[1:]:
        rows *= d
    return get(type_id).row_bytes(shape[0]) * rows


def needs_imatrix(type_name: str, ftype: str) -> bool:
    """Does llama-quantize refuse to make a tensor of `type_name` under `ftype` without data?"""
    t = BY_NAME.get(type_name)
    f = FTYPES.get(str(ftype).upper())
    return bool(t and t.needs_imatrix) or bool(f and type_name in f.imatrix_types)


def quantized(type_name: str) -> bool:
    t = BY_NAME.get(type_name)
    return bool(t and t.quantized)


def canonical_ftype(name: str) -> str:
    """The engine's ftype (case-insensitive, aliases resolved: Q4_K -> Q4_K_M)."""
    up = str(name).upper()
    for f in FTYPES.values():
        if up == f.name or up in f.aliases:
            return f.name
    raise PlanError(f"unknown ftype {name!r} (llama-quantize accepts e.g. IQ4_KS, Q4_K_M, IQ2_K_R4)")


def close_ftype(name: str) -> str | None:
    """The ftype a misspelt name most likely means (iq4ks -> IQ4_KS), or None."""
    names = ftype_names()
    squashed = {n.replace("_", ""): n for n in names}
    key = str(name).upper().replace("_", "").replace("-", "")
    if key in squashed:
        return canonical_ftype(squashed[key])
    close = difflib.get_close_matches(str(name).upper(), names, n=1, cutoff=0.6)
    return canonical_ftype(close[0]) if close else None


def ftype_names(aliases: bool = True) -> list[str]:
    """Every name llama-quantize accepts as FTYPE (canonical names, then aliases)."""
    names = list(FTYPES)
    return names + [a for f in FTYPES.values() for a in f.aliases] if aliases else names


def check_type(value: Any, where: str) -> str:
    """A ggml type name as the engine spells it, or RecipeError suggesting the right spelling."""
    row = BY_NAME.get(value) if isinstance(value, str) else None
    if row is not None:
        if not row.storage:
            raise RecipeError(f"{where}: {value!r} is not a weight storage type")
        return value
    right = next((n for n in BY_NAME if n.lower() == str(value).lower()), None)
    if right is not None:
        raise RecipeError(f"{where}: type names are case-sensitive in llama-quantize: {value!r} is spelled {right!r}")
    close = difflib.get_close_matches(str(value), [n for n, t in BY_NAME.items() if t.storage], n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise RecipeError(f"{where}: unknown ggml type {value!r}{hint}")
