"""The ggml type table of the engine we build (ik_llama.cpp, ggml/include/ggml.h and the
type_traits in ggml/src/ggml.c): id -> name, block size, bytes per block, per-row metadata.

ik's types carry per-row metadata (e.g. IQ4_KS: 4 bytes per row) that gguf-py ignores, so
sizes computed from gguf-py are wrong for them; this table is what the engine uses:
    row_bytes = row_meta + (ne0 / block) * type_size
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str  # ggml_type_name(): the spelling --custom-q and the --*-type flags require
    block: int
    type_size: int
    row_meta: int = 0

    def row_bytes(self, ne0: int) -> int:
        if ne0 % self.block:
            raise ValueError(f"row of {ne0} values is not a multiple of {self.name}'s block size {self.block}")
        return self.row_meta + (ne0 // self.block) * self.type_size

    @property
    def bpw(self) -> float:
        """Bits per weight without row metadata (what the usage text quotes)."""
        return 8.0 * self.type_size / self.block


_TABLE = [
    (0, "f32", 1, 4), (1, "f16", 1, 2), (2, "q4_0", 32, 18), (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22), (7, "q5_1", 32, 24), (8, "q8_0", 32, 34), (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84), (11, "q3_K", 256, 110), (12, "q4_K", 256, 144), (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210), (15, "q8_K", 256, 296), (16, "iq2_xxs", 256, 66), (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98), (19, "iq1_s", 256, 50), (20, "iq4_nl", 32, 18), (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82), (23, "iq4_xs", 256, 136), (24, "i8", 1, 1), (25, "i16", 1, 2),
    (26, "i32", 1, 4), (27, "i64", 1, 8), (28, "f64", 1, 8), (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2), (31, "q4_0_4x4", 32, 18), (32, "q4_0_4x8", 32, 18), (33, "q4_0_8x8", 32, 18),
    (39, "mxfp4", 32, 17), (41, "q1_0_g128", 128, 18),
    (133, "q6_0", 32, 26), (134, "iq1_bn", 64, 13, 2), (135, "iq2_bn", 64, 16, 4),
    (137, "iq2_k", 256, 76), (138, "iq3_k", 256, 110), (139, "iq4_k", 256, 144),
    (140, "iq5_k", 256, 176), (141, "iq6_k", 256, 212), (144, "iq4_ks", 256, 136, 4),
    (145, "iq2_ks", 256, 70, 2), (146, "iq4_kss", 256, 128, 4), (151, "q8_KV", 32, 32, 8),
    (152, "iq5_ks", 256, 168, 4), (153, "iq2_kt", 256, 68, 4), (154, "iq3_kt", 256, 100, 4),
    (155, "iq4_kt", 256, 128, 4), (156, "iq3_ks", 256, 102, 2), (157, "iq2_kl", 256, 86, 2),
    (158, "iq1_kt", 256, 56, 4),
    (202, "q4_0_r8", 32, 18), (206, "q5_0_r4", 32, 22), (208, "q8_0_r8", 32, 34),
    (210, "q2_k_r4", 256, 84), (211, "q3_k_r4", 256, 110), (212, "q4_k_r4", 256, 144),
    (213, "q5_k_r4", 256, 176), (214, "q6_k_r4", 256, 210), (216, "iq2_xxs_r4", 256, 66),
    (217, "iq2_xs_r4", 256, 74), (218, "iq3_xxs_r4", 256, 98), (219, "iq1_s_r4", 32, 6, 2),
    (220, "iq4_nl_r4", 32, 18), (221, "iq3_s_r4", 256, 110), (222, "iq2_s_r4", 256, 82),
    (223, "iq4_xs_r8", 256, 136), (229, "iq1_m_r4", 32, 7, 2), (230, "bf16_r16", 1, 2),
    (233, "q6_0_r4", 32, 26), (335, "iq2_bn_r4", 64, 16, 4), (337, "iq2_k_r4", 256, 76),
    (338, "iq3_k_r4", 256, 110), (339, "iq4_k_r4", 256, 144), (340, "iq5_k_r4", 256, 176),
    (344, "iq4_ks_r4", 256, 136, 4), (352, "iq5_ks_r4", 256, 168, 4), (397, "q8_k_r16", 256, 258),
    (398, "q8_KV_r8", 32, 32, 4), (399, "q8_k_r8", 256, 258),
]

TYPES: dict[int, GGMLType] = {t[0]: GGMLType(*t) for t in _TABLE}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES.values()}


def get(type_id: int) -> GGMLType:
    try:
        return TYPES[type_id]
    except KeyError:
        raise KeyError(f"unknown ggml type id {type_id}") from None


def type_name(type_id: int) -> str:
    t = TYPES.get(type_id)
    return t.name if t else f"type{type_id}"


def tensor_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    t = get(type_id)
    rows = 1
    for d in shape[1:]:
        rows *= d
    return t.row_bytes(shape[0]) * rows


# llama-quantize's positional FTYPE names (quantize.cpp QUANT_OPTIONS; case-insensitive in the
# engine, canonical spelling here) -> does the engine refuse it without an imatrix?
FTYPES: dict[str, bool] = {
    **dict.fromkeys([
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "MXFP4", "IQ2_M", "IQ2_M_R4", "IQ1_BN", "IQ2_BN", "IQ2_BN_R4",
        "Q2_K", "Q2_K_R4", "IQ3_XXS", "IQ3_XXS_R4", "IQ3_KT", "IQ4_KT", "IQ3_S", "IQ3_S_R4", "IQ3_M", "IQ3_XS",
        "Q3_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q3_K_R4", "IQ4_NL", "IQ4_NL_R4", "IQ4_XS", "IQ4_XS_R8",
        "Q4_0_R8", "Q5_0_R4", "Q6_0_R4", "Q8_0_R8", "Q8_KV", "Q8_KV_R8", "IQ4_KS", "IQ4_KS_R4", "IQ4_KSS",
        "IQ5_KS", "IQ5_KS_R4", "IQ2_K", "IQ2_K_R4", "IQ2_KS", "IQ1_KT", "IQ2_KT", "IQ2_KL", "IQ3_KS", "IQ3_K",
        "IQ3_K_R4", "IQ3_KL", "IQ4_K", "IQ4_K_R4", "IQ5_K", "IQ5_K_R4", "IQ6_K", "Q4_K", "Q4_K_S", "Q4_K_M",
        "Q4_K_R4", "Q5_K", "Q5_K_S", "Q5_K_M", "Q5_K_R4", "Q6_K", "Q6_K_R4", "Q8_K_R8", "Q8_0", "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "F16", "BF16", "BF16_R16", "F32", "COPY",
    ], False),
    **dict.fromkeys([
        "IQ2_XXS", "IQ2_XXS_R4", "IQ2_XS", "IQ2_XS_R4", "IQ2_S", "IQ1_S", "IQ1_S_R4", "IQ1_M", "IQ1_M_R4", "Q2_K_S",
    ], True),
}

