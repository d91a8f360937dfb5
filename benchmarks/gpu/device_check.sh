#!/usr/bin/env bash
# Issue 14's whole GPU check in one call of the device tool (the lent H100/H200 machine):
#
#   here, once:   bash benchmarks/gpu/prepare_carry.sh         # fills benchmarks/gpu/carry/
#                 python benchmarks/gpu/flashinfer_aot.py      # + FlashInfer modules, compiled
#   device tool:  run(command="bash benchmarks/gpu/device_check.sh",
#                     carry=["benchmarks/gpu/carry"], timeout_s=420)
#
# What it does, each stage logged with its elapsed time, everything written under $OUT:
#   1. installs what the machine lacks from the carried files (FlashInfer, apache-tvm-ffi, gguf)
#      and sets up FlashInfer's JIT (CUDA_HOME, unversioned libcudart/libcuda to link against);
#      FlashInfer modules compiled ahead on the development machine (carry/flashinfer_aot/) are
#      used as they are;
#   2. builds sgl-kernel's CUDA ops against the machine's torch (they are not carried: torch and
#      Python differ from the development machine's);
#   3. pytest -m gpu: the attention backends against torch_native on random pools, the CUDA ops
#      against their torch references, and the engine in bf16 on a random-weight Llama with
#      flashinfer / triton / torch_native and CUDA graphs on and off agreeing on teacher-forced
#      logits, then LLM.generate through the graphs;
#   4. benchmarks/gpu/bench_gpu.py on the Llama-3.2-1B and Llama-3.1-8B shapes: ceilings, one
#      stream's decode against its roofline, 256 x in 512 / out 256 offline against its roofline,
#      attention alone against FlashInfer's raw kernel; then HF transformers' generate for the
#      speedups while time is left. BUDGET_S (default 330 s) bounds the whole script: pytest
#      gets at most 150 s, each later stage starts only if it can finish.
# A failing stage is logged and the next one still runs, so one call brings back all it can.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-330}
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
log() { echo "=== [$(elapsed)s] $*" | tee -a "$OUT/stages.txt"; }
left() { echo $((BUDGET_S - $(elapsed))); }
export PYTHONUNBUFFERED=1

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

log "1. packages"
SITE=/tmp/lmprog-site
mkdir -p "$SITE"
CARRY=benchmarks/gpu/carry
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$CARRY"/*.whl || log "pip install failed"
tar -xJf "$CARRY/flashinfer.tar.xz" -C "$SITE" || log "flashinfer unpack failed"
if [ -d "$CARRY/flashinfer_aot" ]; then
  mkdir -p "$SITE/flashinfer/data/aot" && cp -r "$CARRY/flashinfer_aot/." "$SITE/flashinfer/data/aot/"
fi
export PYTHONPATH="$SITE:$PWD/python:$PWD/sgl-kernel/python"
CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
export CUDA_HOME
LINKS=/tmp/lmprog-cudalibs
mkdir -p "$LINKS"
for lib in cudart cuda; do
  found=$(find "$CUDA_HOME" /usr/local/nvidia /usr/lib /usr/lib64 -name "lib$lib.so*" 2>/dev/null | head -1)
  [ -n "$found" ] && ln -sf "$found" "$LINKS/lib$lib.so"
done
export FLASHINFER_EXTRA_LDFLAGS="-L$LINKS" FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1

log "2. sgl-kernel CUDA ops"
(cd sgl-kernel && SGL_KERNEL_BUILD=cuda MAX_JOBS=16 python3 setup.py build_ext --inplace) \
  > "$OUT/cuda_ops_build.log" 2>&1 || log "CUDA ops build failed (see cuda_ops_build.log)"
tail -3 "$OUT/cuda_ops_build.log"

log "3. pytest -m gpu"
timeout 150 python3 -m pytest -q -m gpu test/gpu -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -30

log "4. benchmarks"
for shape in 1b 8b; do
  parts=ceilings,decode,offline
  [ "$shape" = 1b ] && parts="$parts,attention"
  [ "$(left)" -lt 60 ] && { log "no time left for $shape"; break; }
  timeout "$(left)" python3 benchmarks/gpu/bench_gpu.py --shape "$shape" --parts "$parts" \
    --json "$OUT/bench_$shape.json" 2>&1 | tee "$OUT/bench_$shape.txt" | grep -v "^\s*$"
done
for shape in 1b 8b; do
  [ "$(left)" -lt 90 ] && { log "no time left for HF on $shape"; break; }
  timeout "$(left)" python3 benchmarks/gpu/bench_gpu.py --shape "$shape" --parts hf \
    --json "$OUT/hf_$shape.json" 2>&1 | tee "$OUT/hf_$shape.txt" | grep -v "^\s*$"
done
log "done"
