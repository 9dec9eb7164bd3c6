#!/usr/bin/env bash
# Everything fastfair checks on a lent CUDA machine, in one run (device tool): install, GPU tests,
# kernel benchmarks, engine figures. Logs go to $RES; $OUT gets results.tgz plus summary.md
# (the device tool brings back at most 8 files).
# Needs torch + triton + nvcc there; diffusers travels as wheels in .whl/ (carry it).
set -u
OUT=${OUT:-/tmp/fastfair-gpu}; RES=/tmp/ffres; rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 FASTFAIR_CACHE=/tmp/ffcache HF_HUB_OFFLINE=1
log() { echo "== $(date +%T) $*"; }
{
log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
log "install"; time python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
python3 -c "import fastfair.ops as o; print('backends on cuda:', o.available_backends('cuda'))"
} > "$RES/setup.log" 2>&1
export PYTHONPATH=${PYTHONPATH:-}
cat "$RES/setup.log"
for s in gpu_kernels:245 gpu_native:110; do
  lim=${s#*:}; s=${s%%:*}
  if [ -f "bench/$s.sh" ]; then
    log "$s"; mkdir -p "$RES/$s"; OUT="$RES/$s" timeout $lim bash "bench/$s.sh" > "$RES/$s.log" 2>&1
    echo "rc=$?"; tail -25 "$RES/$s.log"
  fi
done
log "engine"; timeout 90 python3 bench/gpu_engine.py --steps 20 --json "$RES/engine.json" > "$RES/engine.md" 2>&1; tail -20 "$RES/engine.md"
log "guidance"; timeout 80 python3 bench/bench_guidance.py --device cuda --batch 8 --steps 5 > "$RES/guidance.md" 2>&1; tail -8 "$RES/guidance.md"
log "done"
tar czf "$OUT/results.tgz" -C "$RES" .
cat "$RES"/*.md > "$OUT/summary.md" 2>/dev/null
