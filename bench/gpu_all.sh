#!/usr/bin/env bash
# Everything fastfair checks on a lent CUDA machine, in one run (device tool): install, GPU tests,
# kernel benchmarks, engine figures. Results land in $OUT (markdown + json + logs).
# Needs: torch + triton + nvcc there; diffusers travels as wheels in .whl/ (carry it).
set -u
OUT=${OUT:-/tmp/fastfair-gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTFAIR_CACHE=/tmp/ffcache HF_HUB_OFFLINE=1
log() { echo "== $(date +%T) $*"; }
{
log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
log "install"; time python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
python3 -c "import fastfair.ops as o, torch; print('backends on cuda:', o.available_backends('cuda'))"
} 2>&1 | tee "$OUT/setup.log"

for s in bench/gpu_kernels.sh bench/gpu_native.sh; do
  if [ -f "$s" ]; then log "$s"; timeout 240 bash "$s" 2>&1 | tee "$OUT/$(basename "$s" .sh).log" | tail -40; fi
done
log "engine"; timeout 150 python3 bench/gpu_engine.py --steps 20 --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.md" | tail -30
log "guidance"; timeout 150 python3 bench/bench_guidance.py --device cuda --batch 8 --steps 10 2>&1 | tee "$OUT/guidance.md" | tail -12
log "done"
