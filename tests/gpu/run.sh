#!/usr/bin/env bash
# The GPU check (issue 12), for a machine with an NVIDIA GPU, nvcc and cmake. Development machines
# have none, so this is run by hand whenever one is available:
#
#   tests/gpu/run.sh [WORK_DIR]        (QUANTSWEEP_CACHE: engine cache; the sdist must be cached
#                                       there or downloadable)
#
# 1. builds the CUDA engine (engine.cuda: true, native architecture) into the cache;
# 2. runs the demo sweep with full offload (run.defaults.gpu_layers: 99);
# 3. runs it again with the MoE experts in RAM (gpu_layers: 99 + override_tensors: [exps=CPU]);
# 4. runs one baseline perplexity with a partial offload (gpu_layers: 1 of the 4 layers), which
#    ik_llama.cpp #1870 says forces mla 3: the step must fail naming both modes, or run with mla 1;
# 5. checks every record (tests/gpu/check.py): the attention mode that ran is the one asked for,
#    all layers were offloaded, exps=CPU moved tensors, every quant has speeds > 0 measured on a
#    host that lists a GPU; prints PPL, KLD and PP/TG tokens/s of both sweeps side by side.
# Exit code 0 only when every check passes. Logs stay under WORK_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${1:-$(mktemp -d -t quantsweep-gpu.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
echo "quantsweep GPU check in $work"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || {
  echo "no working nvidia-smi: this check needs an NVIDIA GPU" >&2; exit 2; }
command -v nvcc >/dev/null || { echo "no nvcc on PATH (CUDA toolkit)" >&2; exit 2; }
python3 -c "import quantsweep, snakemake" 2>/dev/null || python3 -m pip install -q -e "$root"

sweep() {  # NAME YAML: the default demo sweep with YAML merged over config/config.yaml
  local name=$1 dir="$work/$1"
  mkdir -p "$dir"
  printf '%s\n' "$2" > "$dir/gpu.yaml"
  local t0=$SECONDS
  python3 -m snakemake --snakefile "$root/Snakefile" --directory "$dir" \
    --configfile "$root/config/config.yaml" "$dir/gpu.yaml" --cores all --resources gpu=1 \
    > "$dir/snakemake.log" 2>&1 || { tail -n 60 "$dir/snakemake.log"; echo "sweep $name failed" >&2; exit 1; }
  echo "sweep $name: $((SECONDS - t0)) s (the first includes the CUDA engine build)"
}

common='engine: {cuda: true, cuda_architectures: native}
resources: {gpus: 1}'
sweep full "$common
run: {defaults: {gpu_layers: 99}}"
sweep exps_cpu "$common
run: {defaults: {gpu_layers: 99, override_tensors: [exps=CPU]}}"

# A partial offload of the 4-layer demo model (the mode assertion's real-world case).
partial="$work/partial"
mkdir -p "$partial"
set +e
quantsweep eval base --bin-dir "$work/full/resources/engine/bin" --model "$work/full/resources/models/tiny.gguf" \
  --text "$work/full/resources/text/evaluation.txt" --kld-base "$partial/base.kld" \
  --result "$partial/base.json" --log "$partial/base.log" --threads 4 --mla 1 --fa off \
  --run '{"gpu_layers": 1}' 2> "$partial/stderr.txt"
echo $? > "$partial/rc"
set -e

python3 "$here/check.py" --full "$work/full" --exps-cpu "$work/exps_cpu" --partial "$partial"
