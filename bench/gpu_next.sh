#!/usr/bin/env bash
# The GPU checks still owed (issues 3, 4, 6, 9), in one device run of ~8 minutes:
#   1. install (CPU + CUDA native modules; diffusers from .whl/ when carried)
#   2. the Triton maps->dq fault: new tiles vs the old 64-row x 8-warp tile, one process per case
#   3. Triton GPU tests (half / unfused / custom op), native CUDA check
#   4. `fastfair bench --suite kernels` (fp16, CUDA) and `--suite e2e` (random-weight SD1.5 size)
#   5. guided sampling vs the reference style (bench/bench_guidance.py --device cuda)
# $OUT gets results.tgz and summary.md (the device tool brings back at most 8 files).
set -u
OUT=${OUT:-/tmp/fastfair-gpu}; RES=/tmp/ffres; rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 FASTFAIR_CACHE=/tmp/ffcache HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/fastfair-triton-cache
T0=$(date +%s)
log() { echo "== $(date +%T) (+$(( $(date +%s) - T0 ))s) $*"; }
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - T0) )); }
cap() { local t=$(( $(left) - $2 )); [ $t -gt $1 ] && t=$1; [ $t -lt 20 ] && t=20; echo $t; }  # cap MAX RESERVE
{
log device; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
log install; python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
} > "$RES/setup.log" 2>&1
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
cat "$RES/setup.log"
python3 -c "import torch, triton, fastfair.ops as o; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), o.available_backends('cuda'))"
python3 -c "import torch, fastfair.native; print('OpenMP runtimes mapped:', sorted({l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l}))"
log "call overhead"; python3 bench/bench_call_overhead.py --device cuda --backend native 2>&1 | tail -7
python3 bench/bench_call_overhead.py --device cuda --backend triton 2>&1 | tail -7

log "repro maps->dq (new tiles; 'old' = the 64-row x 8-warp tile that faulted)"
for a in "2 8 1024 80" "2 8 1024 80 154" "2 8 256 160" "2 8 4096 40" "16 8 1024 80" "2 8 1024 80 77 old"; do
  echo "-- $a"; FASTFAIR_TRITON_AUTOTUNE=0 CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 bench/repro_maps_dq.py $a 2>&1 | grep -E "ok|Error" | head -3
done 2>&1 | tee "$RES/repro.txt"
FASTFAIR_TRITON_AUTOTUNE=1 timeout 90 python3 bench/repro_maps_dq.py 2 8 1024 80 2>&1 | grep -E "ok|Error" | tee -a "$RES/repro.txt"

log "triton GPU tests"
FASTFAIR_TRITON_AUTOTUNE=0 timeout 200 python3 -m pytest -q -p no:cacheprovider --noconftest -x \
  tests/test_triton_xattn.py tests/test_triton_softiou.py > "$RES/tests_triton.txt" 2>&1; echo "rc=$?"
tail -6 "$RES/tests_triton.txt"
log "native CUDA tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_native.py -k cuda > "$RES/tests_native.txt" 2>&1; echo "rc=$?"
tail -3 "$RES/tests_native.txt"

log "fastfair bench kernels"
FASTFAIR_TRITON_AUTOTUNE=0 timeout $(cap 200 120) python3 -m fastfair bench --suite kernels --device cuda \
  --dtype fp16 --out "$RES/bench_kernels" > "$RES/bench_kernels.log" 2>&1; echo "rc=$?"
log "fastfair bench e2e"
timeout $(cap 240 70) python3 -m fastfair bench --suite e2e --device cuda --dtype fp16 --out "$RES/bench_e2e" \
  > "$RES/bench_e2e.log" 2>&1; echo "rc=$?"
log "guided sampling"
timeout 60 python3 bench/bench_guidance.py --device cuda --batch 8 --steps 5 > "$RES/guidance.md" 2>&1; tail -6 "$RES/guidance.md"
log done
tar czf "$OUT/results.tgz" -C "$RES" .
cat "$RES/repro.txt" "$RES"/bench_*/bench.md "$RES/guidance.md" > "$OUT/summary.md" 2>/dev/null
