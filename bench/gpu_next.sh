#!/usr/bin/env bash
# First choice for a 15-minute lease: bench/gpu_session.sh (its order follows the 2026-11-27 H200 run). This script
# keeps the longer runs it does not do: guided sampling, MMDiT attribution and Fair Diffusion benches (B), the MMDiT
# sweep and the torch.compile check (C).
# The GPU checks still owed (issues 3, 4, 9), in device calls of <= 9 minutes each (A and B first; C if time is left):
#   bash bench/gpu_next.sh A   setup, per-call cost (triton, native; Triton launch counts), Triton + native
#                              CUDA tests (xdist, incl. the direct-launch path now on by default; DFT's CUDA
#                              autocast, Triton backward and SD3 bf16: carry the peft + accelerate wheels too),
#                              `fastfair bench --suite kernels` (fp16; eager and CUDA-graph times)
#   bash bench/gpu_next.sh B   setup, `fastfair bench --suite e2e` (random-weight SD1.5 and SDXL sizes),
#                              guided sampling vs the reference style, SD3-medium-size attribution text streams,
#                              Fair Diffusion / SEGA vs diffusers' semantic pipeline
#   bash bench/gpu_next.sh C   setup, bench/triton_sweep.py (head groups, row tiles, query splits; CUDA-graph
#                              times; --mmdit: SD3 / Flux joint attention), bench/compile_check.py (generate with maps, eager vs torch.compile'd
#                              UNet, default and reduce-overhead = CUDA graphs: speed and map agreement)
# Carry .whl (diffusers + importlib_metadata wheels, see bench/RESULTS.md). $OUT gets results.tgz and summary.md;
# every bench leaves bench.partial.json behind if it is cut, so a timeout loses only the case in flight.
# History: the first H200 run (2026-11-26 05:38) confirmed the head-dim-80 fault fix; see bench/RESULTS.md.
# New since (08:00-08:40, unmeasured): DIV_D (SD1.5's D=40 loads were scalar 2-byte ld.global), the pipelined
# head loop of the single-tile forward, BWD_STAGES / NO_FUSE / FWD_STAGES sweep rows. A's GPU tests check the
# new kernels first; A's kernel suite gives their speed against the 05:47 table; C's sweep attributes it.
# Before spending device time: python bench/triton_sweep.py --dry-run (CPU, interpreter).
set -u
PART=${1:-A}
OUT=${OUT:-/tmp/fastfair-gpu}; RES=/tmp/ffres-$PART; rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 FASTFAIR_CACHE=/tmp/ffcache HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/fastfair-triton-cache
T0=$(date +%s)
log() { echo "== $(date +%T) (+$(( $(date +%s) - T0 ))s) $*"; }
left() { echo $(( ${BUDGET:-520} - ($(date +%s) - T0) )); }
cap() { local t=$(( $(left) - $2 )); [ $t -gt $1 ] && t=$1; [ $t -lt 20 ] && t=20; echo $t; }  # cap MAX RESERVE
finish() {
  log done
  tar czf "$OUT/results.tgz" -C "$RES" .
  cat "$RES"/*.txt "$RES"/bench_*/bench.md "$RES"/guidance.md > "$OUT/summary.md" 2>/dev/null
}
trap finish EXIT
{
log device; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
log install; python3 -c "import fastfair.native" 2>/dev/null || python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
} > "$RES/setup.txt" 2>&1
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
cat "$RES/setup.txt"
python3 -c "import torch, triton, fastfair.ops as o; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), o.available_backends('cuda'), 'auto ->', o.resolve_backend('auto', torch.device('cuda')))"

if [ "$PART" = A ]; then
  log "call overhead"
  for be in triton native; do python3 bench/bench_call_overhead.py --device cuda --backend $be 2>&1 | tail -7; done | tee "$RES/overhead.txt"
  timeout 90 python3 bench/triton_host_overhead.py --device cuda --calls 200 2>&1 | tail -8 | tee -a "$RES/overhead.txt"
  log "triton + native CUDA tests (8 workers)"
  FASTFAIR_TRITON_AUTOTUNE=0 timeout $(cap 150 330) python3 -m pytest -q -p no:cacheprovider --noconftest -n 8 \
    tests/test_triton_xattn.py tests/test_triton_softiou.py tests/test_triton_engine.py tests/test_dft_cuda.py \
    > "$RES/tests.log" 2>&1; echo "rc=$?"
  timeout 60 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_native.py -k cuda >> "$RES/tests.log" 2>&1
  grep -E "passed|failed|error" "$RES/tests.log" | tee "$RES/tests.txt"
  log "fastfair bench kernels"
  FASTFAIR_TRITON_AUTOTUNE=0 timeout $(cap 320 15) python3 -m fastfair bench --suite kernels --device cuda \
    --dtype fp16 --out "$RES/bench_kernels" > "$RES/bench_kernels.log" 2>&1; echo "rc=$?"
elif [ "$PART" = C ]; then
  log "triton tile / split sweep (CUDA graphs)"
  timeout $(cap 150 300) python3 bench/triton_sweep.py > "$RES/sweep.txt" 2>&1; echo "rc=$?"
  log "SD3 / Flux joint attention: maps split vs SDPA"
  timeout $(cap 60 240) python3 bench/triton_sweep.py --mmdit > "$RES/sweep_mmdit.txt" 2>&1; echo "rc=$?"
  log "torch.compile check"
  timeout $(cap 480 10) python3 bench/compile_check.py --device cuda > "$RES/compile.txt" 2>&1; tail -6 "$RES/compile.txt"
else
  log "fastfair bench e2e"
  timeout $(cap 400 70) python3 -m fastfair bench --suite e2e --device cuda --dtype fp16 --out "$RES/bench_e2e" \
    > "$RES/bench_e2e.log" 2>&1; echo "rc=$?"; grep "^# e2e" "$RES/bench_e2e.log"
  log "guided sampling"
  timeout $(cap 60 5) python3 bench/bench_guidance.py --device cuda --batch 8 --steps 5 > "$RES/guidance.md" 2>&1
  tail -6 "$RES/guidance.md"
  log "SD3-medium-size open-vocabulary maps (attribution text streams) vs plain"
  timeout $(cap 90 5) python3 bench/bench_mmdit_attribution.py --device cuda --layers 24 --size 1024 --steps 4 \
    --images 2 --repeats 3 > "$RES/mmdit_attribution.txt" 2>&1; tail -7 "$RES/mmdit_attribution.txt"
  log "Fair Diffusion / SEGA vs diffusers' SemanticStableDiffusionPipeline"
  timeout $(cap 90 5) python3 bench/bench_fair_diffusion.py --device cuda --model sd15-shaped --steps 20 \
    --warmup 5 --batch 8 --runs 2 > "$RES/fair_diffusion.md" 2>&1; tail -7 "$RES/fair_diffusion.md"
fi
