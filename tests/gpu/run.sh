#!/usr/bin/env bash
# The GPU check (issue 12), for a machine with an NVIDIA GPU, nvcc and cmake. Development machines
# have none, so this is run by hand whenever one is available:
#
#   tests/gpu/run.sh [build|sweeps|all] [WORK_DIR]
#
# A lent GPU machine gives 15 minutes in all, at most 10 per call, and goes back to the pool when
# idle between calls (only what is under the repository travels). A CUDA build of the pinned
# engine with the project's flags took 411 s to get to 84 % on 16 cores (CUDA 13.0), so it cannot
# share a call with the sweeps: run `build` in one call and `sweeps` in the next, issued at once.
# Both use the engine cache in QUANTSWEEP_CACHE, by default .gpu-cache/ in the repository
# (git-ignored), so the build of the first call is what the second finds; WORK_DIR defaults to
# .gpu-cache/work. With no phase (or `all`), both run in one go. A machine that reaches no package
# registry needs the pinned sdist there first: copy ~/.cache/quantsweep/sources/ to
# .gpu-cache/sources/ (41 MB; the device tool's carry takes it).
#
# build:  builds the CUDA engine (engine.cuda: true, native architecture) into the cache;
# sweeps: 1. the demo sweep with full offload (run.defaults.gpu_layers: 99), allocation off;
#         2. again with the MoE experts in RAM (gpu_layers: 99 + override_tensors: [exps=CPU]);
#         3. one baseline perplexity with a partial offload (gpu_layers: 1 of the 4 layers), which
#            ik_llama.cpp #1870 says forces mla 3: the step must fail naming both modes, or run
#            with mla 1;
#         4. checks every record (tests/gpu/check.py): the attention mode that ran is the one
#            asked for, all layers were offloaded, exps=CPU moved tensors, every quant has speeds
#            > 0 measured on a host that lists a GPU; prints PPL, KLD and PP/TG tokens/s of both
#            sweeps side by side.
# Exit code 0 only when every check passes. Logs stay under WORK_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
phase=${1:-all}
case "$phase" in build|sweeps|all) ;; *) echo "usage: $0 [build|sweeps|all] [WORK_DIR]" >&2; exit 2 ;; esac
export QUANTSWEEP_CACHE=${QUANTSWEEP_CACHE:-$root/.gpu-cache}
work=${2:-$QUANTSWEEP_CACHE/work}
mkdir -p "$work"
work=$(cd "$work" && pwd)
echo "quantsweep GPU check ($phase) in $work, engine cache $QUANTSWEEP_CACHE"
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
  echo "sweep $name: $((SECONDS - t0)) s"
}

common='engine: {cuda: true, cuda_architectures: native}
resources: {gpus: 1}
allocate: {enabled: false}'

if [ "$phase" != sweeps ]; then  # the CUDA engine, into the cache the sweeps then find
  t0=$SECONDS
  mkdir -p "$work/build"
  printf '%s\n' "$common" > "$work/build.yaml"
  python3 -m snakemake --snakefile "$root/Snakefile" --directory "$work/build" \
    --configfile "$root/config/config.yaml" "$work/build.yaml" --cores all resources/engine/engine.json \
    > "$work/build.log" 2>&1 || { tail -n 60 "$work/build.log"; echo "CUDA engine build failed" >&2; exit 1; }
  echo "CUDA engine built in $((SECONDS - t0)) s"
  [ "$phase" = build ] && exit 0
fi

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
