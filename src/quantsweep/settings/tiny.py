"""`TinySpec`: the geometry and behaviour knobs of the tiny DeepSeek2 demo model (a model of
`source: tiny`; the config sets seed, layout and dead_channels), and the checks that reject
settings the generator or the engine cannot handle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import TinyModelError
from .base import Settings, field

LAYOUTS = ("kv_b", "ik", "mainline")  # TinySpec.layout values


@dataclass(frozen=True)
class TinySpec(Settings):
    """Geometry and behaviour knobs of the tiny DeepSeek2 model.

    Geometry (why each value):

    * ``n_layer=4, n_dense=1``: one leading dense layer (``ffn_gate/up/down``) and
      three MoE layers, the smallest layout with both FFN kinds and more than one
      MoE layer.  ``n_layer`` must not be 26/27 (the engine would treat the model
      as "lite", without ``q_lora``).
    * ``n_embd=512``: >= the 354-token vocab (the bigram fits) and a multiple of
      256, so 256-block quant types (IQ2_KS, Q4_K, ...) apply without fallback.
    * ``n_head=4``: few heads keep it small; ``head_count_kv`` is written equal to
      it (1 would select the mainline-MLA loader path, which needs 576/512 dims).
    * ``q_lora_rank=256, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128``:
      the real DeepSeek MLA dims (kv_lora 512, key 192, value 128, rope 64), so
      ``attn_k_b`` has 128 columns (not a multiple of 256 -> quantize fallback) and
      the per-head imatrix entries have the real sizes.
    * ``n_ff=768``: dense FFN width (multiple of 256 for ``ffn_down``).
    * ``n_expert=8, n_expert_used=2, n_ff_exp=256, n_shared=1``: a real MoE
      (n_expert >= 8 triggers the same quantize heuristics as DeepSeek-V3).
    * ``seed``: all randomness derives from it.
    * ``layout``: how the MLA ``kv_b`` projection is stored, as the converters in use
      write it (`LAYOUTS`); the weights, hence the function, are the same in all three.
      ``"kv_b"``: 2-D ``attn_kv_b`` only.  ``"ik"``: also 2-D ``attn_k_b``
      {nope, n_head*kv_lora} / ``attn_v_b`` {kv_lora, n_head*v} derived from it (ik's
      convert_hf_to_gguf.py).  ``"mainline"``: no ``attn_kv_b``, 3-D ``attn_k_b``
      {nope, kv_lora, n_head} / ``attn_v_b`` {kv_lora, v, n_head} (mainline's converter;
      ik then builds ``attn_kv_b`` itself for ``-mla 0/2/3``).
    * ``split_kv_b``: older spelling of ``layout="ik"`` (constructor only; the
      spec then reads ``layout == "ik"``).
    * ``dead_channels``: layer 0's ``attn_norm`` gain is zero on residual channels
      ``[0, N)``, so ``attn_q_a``/``attn_kv_a_mqa`` of layer 0 see exact zeros there
      (real models have dead channels; N=256 zeroes a whole imatrix super-block).

    Behaviour knobs (defaults tuned against the engine; see the module docstring):

    * ``bigram_rank``: rank of the log-bigram factors stored as memory values
      (64 costs ~2 % bigram PPL on the bundled texts; 96+ is exact).
    * ``smoothing``: Dirichlet prior weight (in counts) towards the unigram
      distribution in the bigram estimate.
    * ``embd_mean``: fraction (of the norm) of every token embedding that is a
      shared mean vector; the memory uses it as its bias input (0 < x < 1).
    * ``memory_scale``: RMS of the memory's (layer 0 ``ffn_down``) value output,
      relative to a token embedding's RMS (1.0).
    * ``memory_sharpness`` / ``memory_threshold``: memory gate = sharpness *
      (cos(code, h) - threshold): the own token's unit fires, other units sit
      deep in SiLU's negative tail (robust to 2-bit embeddings and to 8-bit
      activation requantization in the engine's kernels).
    * ``generic_scale``: RMS of the memory layer's other (random) hidden units.
    * ``attn_scale``: RMS of each attention block's output.
    * ``ffn_scale``: RMS of each MoE layer's output (routed + shared halves).
      Larger -> the experts matter more for the predictions.
    * ``value_read``: fraction of the energy of the MoE ``gate``/``up`` rows that
      reads the memory's value subspace (the experts process the cleaned-up
      knowledge rather than the raw embedding).
    * ``norm_sigma``: log-normal sigma of RMSNorm gains.
    * ``outlier_channels`` / ``outlier_gain``: residual channels whose norm gains
      are multiplied by ``outlier_gain`` in every layer (activation outliers).
    * ``hidden_sigma``: log-normal sigma of random FFN hidden-channel scales
      (uneven ``ffn_down`` input importance).
    * ``router_scale``: std of the MoE router logits.
    * ``fit_tokens``: ``train_text`` tokens of the numpy forward pass that
      calibrates block scales, balances the experts and fits the output.
    * ``ridge``: ridge strength (relative to mean feature energy) of that fit.
    * ``embd_noise``: relative token_embd noise the output fit is made robust to.
    """

    SECTION = "TinySpec"

    n_layer: int = 4
    n_dense: int = 1
    n_embd: int = 512
    n_head: int = 4
    q_lora_rank: int = 256
    kv_lora_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    n_ff: int = 768
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 256
    n_shared: int = 1
    seed: int = field(0, minimum=0)
    layout: str = field("kv_b", choices=LAYOUTS)
    split_kv_b: bool = dataclasses.field(default=False, repr=False, compare=False)
    dead_channels: int = field(0, minimum=0)
    # behaviour knobs
    bigram_rank: int = 64
    smoothing: float = 2.0
    embd_mean: float = 0.4
    memory_scale: float = 4.0
    memory_sharpness: float = 30.0
    memory_threshold: float = 0.6
    generic_scale: float = 0.3
    attn_scale: float = 0.3
    ffn_scale: float = 3.0
    value_read: float = 0.95
    norm_sigma: float = 0.5
    outlier_channels: int = 6
    outlier_gain: float = 8.0
    hidden_sigma: float = 0.7
    router_scale: float = 2.0
    fit_tokens: int = 4096
    ridge: float = 1e-3
    embd_noise: float = 0.3
    context_length: int = 4096
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        """Fold the older ``split_kv_b`` flag into ``layout`` and refuse unknown layouts at once."""
        if self.layout not in LAYOUTS:
            raise TinyModelError(f"TinySpec.layout: {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.split_kv_b and self.layout != "ik":
            if self.layout != "kv_b":
                raise TinyModelError(f"TinySpec.split_kv_b: means layout 'ik', but layout is {self.layout!r}")
            object.__setattr__(self, "layout", "ik")

    # the knobs a model of the sweep sets (models.<name>: seed, layout, dead_channels)
    CONFIG_KEYS = ("seed", "layout", "split_kv_b", "dead_channels")

    @property
    def key_length(self) -> int:
        return self.qk_nope + self.qk_rope

    def validate(self, n_vocab: int) -> None:
        """Raise `TinyModelError` (naming the setting) for settings the construction cannot honour
        (n_vocab: the tokenizer's vocabulary)."""
        lim = min(self.n_embd, n_vocab)
        if not 1 <= self.bigram_rank <= lim:
            raise TinyModelError(
                f"TinySpec.bigram_rank: {self.bigram_rank} must be in [1, min(n_embd, vocab)] = [1, {lim}]"
            )
        if self.n_dense < 1 or self.n_dense >= self.n_layer:
            raise TinyModelError(
                f"TinySpec.n_dense: {self.n_dense} must be in [1, n_layer) = [1, {self.n_layer})"
                " (a memory layer and at least one MoE layer)"
            )
        if not 0.0 < self.embd_mean < 1.0:
            raise TinyModelError(f"TinySpec.embd_mean: {self.embd_mean} must be in (0, 1)")
        if not 0 <= self.dead_channels < self.n_embd:
            raise TinyModelError(
                f"TinySpec.dead_channels: {self.dead_channels} must be in [0, n_embd) = [0, {self.n_embd})"
            )
        if self.n_layer in (26, 27):
            raise TinyModelError(
                f"TinySpec.n_layer: {self.n_layer} makes the engine treat the model as DeepSeek-Lite"
                " (avoid 26/27)"
            )
