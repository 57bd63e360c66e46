"""Deterministic generator of a tiny DeepSeek2 (MLA attention + MoE) GGUF.

The model is small (~17 M parameters, ~36 MB in BF16) but has the real DeepSeek
MLA geometry (q/kv LoRA, 128+64 / 128 head dims, kv_lora 512), a leading dense
layer, routed experts with a sigmoid gate and selection bias, and a shared
expert, so every DeepSeek code path of ik_llama.cpp is exercised (MLA,
``llm_prepare_mla``, per-head ``attn_k_b``/``attn_v_b`` imatrix entries, MoE
imatrix entries, the quantize heuristics for n_expert >= 8).

Random weights give a useless test model (PPL ~ vocab size, every quant type
about equally bad).  This one behaves like an LLM in the ways quantization
cares about:

* **Predictive.**  Its knowledge is a byte-bigram model of ``train_text``.  The
  leading dense FFN is a key-value memory: hidden unit j fires only for token j
  and writes token j's value, the rank-``bigram_rank`` factor of its
  log-bigram row.  The output matrix is fitted (ridge regression, in numpy) so
  that the *whole* network, run on a sample of ``train_text``, reproduces the
  bigram logits.  Baseline PPL is that of the bigram (~12 on the bundled
  texts; vocab 354).
* **Knowledge lives in the weights.**  Quantization noise in ``ffn_down`` of the
  memory, in the experts (which read the memory's values) and in attention
  reaches the predictions; noise in ``token_embd`` mostly does not (the memory
  cleans it up, as in real models where 2-bit embeddings are tolerable).
* **Uneven channel importance.**  RMSNorm gains are heavy tailed (log-normal plus
  shared outlier channels), FFN hidden channels have log-normal scales, and the
  memory's hidden units are used with Zipfian token frequencies, so an imatrix
  clearly helps at 2 bits.
* **No dead channels (unless asked), balanced experts.**  By default every matmul
  input column is non-zero on text (q4_K's quantizer aborts on an all-zero imatrix
  column); ``TinySpec.dead_channels`` zeroes layer 0's attention inputs on the
  first N channels to test exactly that case.  The expert selection bias
  (``exp_probs_b``) is tuned so all experts get tokens.
* **Engine-friendly activations.**  ik's CPU kernels for IQ-K types requantize
  activations to 8 bits per 256 values; the memory's "off" units sit deep in
  SiLU's negative tail so that this does not distort the predictions.

Everything is deterministic: weights come from ``numpy.random.default_rng``
seeded by ``(seed, crc32(name))``, linear algebra is float64, no dict-order or
time dependence, and the file is written to a sibling temp file then renamed.

Layout: `tokenizer` (vocabulary, `tokenize`), `spec` (`TinySpec`), `forward` (numpy
reference forward pass), `bigram` (the knowledge), `draws` (seeded draws, BF16 rounding),
`weights` (construction stage by stage), `write` (the GGUF, in one of three layouts of
the MLA ``kv_b`` projection: ``TinySpec.layout``).
"""

from __future__ import annotations

from .forward import forward_logits, mainline_kv_b, split_kv_b
from ..settings.tiny import LAYOUTS, TinySpec
from .tokenizer import N_VOCAB, tokenize, vocab
from .write import MODEL_NAME, build_tensors, write_tensors, write_tiny_model

__all__ = [
    "LAYOUTS",
    "MODEL_NAME",
    "N_VOCAB",
    "TinySpec",
    "build_tensors",
    "forward_logits",
    "mainline_kv_b",
    "split_kv_b",
    "tokenize",
    "vocab",
    "write_tensors",
    "write_tiny_model",
]
