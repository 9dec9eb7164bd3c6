#!/usr/bin/env bash
# Second, shorter GPU session: install, the repro of the benchmark's maps->dq crash (plain, then
# under compute-sanitizer), the GPU tests that failed in the first run, and the kernel benchmark
# with one process per case (a crash stays local). $OUT gets results.tgz and summary.md.
set -u
OUT=${OUT:-/tmp/fastfair-gpu}; RES=/tmp/ffres; rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/fastfair-triton-cache FASTFAIR_TRITON_AUTOTUNE=0
log() { echo "== $(date +%T) $*"; }
log install; FASTFAIR_CUDA=OFF python3 -m pip install -q --no-build-isolation --no-deps -e . > "$RES/setup.log" 2>&1; tail -3 "$RES/setup.log"
log repro
for shape in "2 8 1024 80" "2 8 4096 40" "2 8 256 160" "16 8 1024 80"; do
  CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 bench/repro_maps_dq.py $shape 2>&1 | grep -E "ok|Error|error" | head -3
done | tee "$RES/repro.txt"
if grep -q -i error "$RES/repro.txt"; then
  log sanitizer
  timeout 90 compute-sanitizer --tool memcheck --print-limit 4 python3 bench/repro_maps_dq.py 2 8 1024 80 > "$RES/sanitizer.txt" 2>&1
  grep -E "Invalid|at 0x|by thread|Address|kernel|ERROR SUMMARY" "$RES/sanitizer.txt" | head -30
fi
log tests
timeout 100 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_triton_xattn.py -k "half or unfused or custom_op" > "$RES/tests.txt" 2>&1
tail -8 "$RES/tests.txt"
log bench
for c in sd15:4096 sd15:1024 sd15:256 sd15:64 sdxl:4096 sdxl:1024; do
  timeout 45 python3 bench/bench_xattn.py --case $c --batch 2 16 --json "$RES/bench_${c/:/_}.json" > "$RES/bench_${c/:/_}.out" 2> "$RES/bench_${c/:/_}.err"
  echo "$c rc=$?"; grep -E "^# (fastfair|explicit|sdpa)" "$RES/bench_${c/:/_}.err" | head -3
done
timeout 40 python3 bench/bench_xattn.py --case none --siou --batch 2 --json "$RES/bench_siou.json" > /dev/null 2> "$RES/bench_siou.err"
python3 bench/bench_xattn.py --merge "$RES"/bench_*.json --md "$RES/bench_xattn.md" > /dev/null 2>&1
cat "$RES/bench_xattn.md"
log done
tar czf "$OUT/results.tgz" -C "$RES" .
cat "$RES/repro.txt" "$RES/bench_xattn.md" > "$OUT/summary.md" 2>/dev/null
