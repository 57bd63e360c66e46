"""What converting DeepSeek-V3 (671B, deepseek-ai's FP8 release) to GGUF asks of a scheduler, on
paper: the checkpoint as its headers describe it (no files: quantsweep.hf.checkpoint's
`Checkpoint` built from the real V3 config), its parameter count and bytes, the predicted GGUF
size per outtype, and the mem_mb / disk_mb / runtime the convert job requests on attempts 1-3.

    python benchmarks/convert_resources.py

FP8 (e4m3) for every `*_proj.weight` of model.layers.* (the router `mlp.gate.weight` stays BF16),
each with a float32 `weight_scale_inv` of 128x128 blocks; norms, embeddings and lm_head BF16; the
expert score bias F32. Layer 61 is the multi-token-prediction layer, which the converter drops.
Checkpoint bytes are tensor data only (the ~163 shard headers add a few MB).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantsweep import capacity  # noqa: E402
from quantsweep.hf.checkpoint import OUTTYPES, Checkpoint, TensorEntry, dtype_size  # noqa: E402
from quantsweep.hf.sparse import V3_CONFIG, checkpoint_tensors  # noqa: E402
from quantsweep.settings import Throughput  # noqa: E402

FILE = "model-on-paper.safetensors"


def v3_checkpoint() -> Checkpoint:
    specs = checkpoint_tensors(V3_CONFIG)
    tensors = {n: TensorEntry(FILE, d, s) for n, (d, s) in specs.items()}
    data = sum(t.n_elements * dtype_size(t.dtype) for t in tensors.values())
    return Checkpoint(path=Path("/on-paper/DeepSeek-V3"), config=V3_CONFIG, tensors=tensors, files=(FILE,),
                      file_bytes={"config.json": 1700, FILE: data}, tokenizer_files=())


def main() -> int:
    ck = v3_checkpoint()
    all_params = sum(t.n_elements for n, t in ck.tensors.items() if not n.endswith("_scale_inv"))
    print(f"DeepSeek-V3 FP8 on paper: {len(ck.tensors)} tensors in the headers, {len(ck.model_tensors())} converted")
    print(f"  n_params (converted)      {ck.n_params():>17,}  ({ck.n_params() / 1e9:.1f} B; with MTP "
          f"{all_params / 1e9:.1f} B)")
    print(f"  checkpoint bytes          {ck.total_bytes():>17,}  ({ck.total_bytes() / 1e9:.1f} GB)")
    print(f"  largest held (elements)   {ck.largest_output_elements():>17,}  (256 experts x 2048 x 7168)")
    for t in OUTTYPES:
        b = ck.output_bytes(t)
        print(f"  output bytes {t:<5}        {b:>17,}  ({b / 1e9:.1f} GB, {8 * b / ck.n_params():.2f} bpw)")
    print()
    print(f"{'outtype':<8} {'attempt':>7} {'mem_mb':>9} {'disk_mb':>10} {'runtime_min':>12}")
    rates = Throughput()
    for t in OUTTYPES:
        j = capacity.convert_job("v3", ck, t, rates)
        for a in (1, 2, 3):
            print(f"{t:<8} {a:>7} {capacity.mem_mb(j, a):>9,} {capacity.disk_mb(j, a):>10,} "
                  f"{capacity.runtime_min(j, rates, a):>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
