#!/usr/bin/env bash
# GPU check of the Triton backend: tests on CUDA (fp16 / bf16 / fp32) + the benchmark.
#
# Run from the repo root on a CUDA machine (torch + triton; diffusers not needed), after
#     pip install --no-build-isolation --no-deps -e .
# as
#     OUT=/some/dir bash bench/gpu_kernels.sh
# Results in $OUT: summary.md, bench_xattn.md / .json, pytest logs + junit xml, env.txt.
# Budget ~4 minutes: the tests are sharded over parallel pytest processes (Triton compiles on
# the CPU, one kernel at a time per process), the benchmark autotunes a reduced config space.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_kernels}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0
export TRITON_DEFAULT_FP_FUSION=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/fastfair-triton-cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
SHARDS="${SHARDS:-6}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- 1. tests (GPU path), sharded; the sm_90 compile test runs beside them on the CPU -------------
PYTEST="python -m pytest -q -p no:cacheprovider --noconftest"
python -m pytest -p no:cacheprovider --noconftest --collect-only -q tests/test_triton_xattn.py tests/test_triton_softiou.py \
  | grep '::' > "$OUT/nodeids.txt"
echo "collected $(wc -l < "$OUT/nodeids.txt") GPU test items, $SHARDS shards"
pids=()
for i in $(seq 0 $((SHARDS - 1))); do
  awk -v n="$SHARDS" -v i="$i" 'NR % n == i' "$OUT/nodeids.txt" > "$OUT/shard_$i.txt"
  ( FASTFAIR_TRITON_AUTOTUNE=0 timeout 170 $PYTEST $(cat "$OUT/shard_$i.txt") \
      --junitxml="$OUT/junit_$i.xml" > "$OUT/pytest_$i.log" 2>&1; echo "exit $?" >> "$OUT/pytest_$i.log" ) &
  pids+=($!)
done
( FASTFAIR_COMPILE_FULL="${COMPILE_FULL:-0}" FASTFAIR_COMPILE_JOBS=4 timeout 170 $PYTEST tests/test_triton_compile.py --junitxml="$OUT/junit_compile.xml" \
    > "$OUT/pytest_compile.log" 2>&1; echo "exit $?" >> "$OUT/pytest_compile.log" ) &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
echo "tests done after $(( $(date +%s) - T0 ))s"

# ---- 2. benchmark: heuristic configs (compiled already by the tests), then autotuned if time is left --
LEFT=$(( 225 - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 30 ]; then
  timeout "$LEFT" python bench/bench_xattn.py --siou \
      --json "$OUT/bench_xattn.json" --md "$OUT/bench_xattn.md" > "$OUT/bench_stdout.txt" 2> "$OUT/bench_stderr.txt"
  echo "bench exit $? after $(( $(date +%s) - T0 ))s"
else
  echo "no time left for the benchmark" | tee "$OUT/bench_stderr.txt"
fi
LEFT=$(( 235 - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 45 ]; then
  timeout "$LEFT" python bench/bench_xattn.py --autotune --quick --batch 2 \
      --json "$OUT/bench_xattn_autotuned.json" --md "$OUT/bench_xattn_autotuned.md" \
      > "$OUT/bench_autotuned_stdout.txt" 2> "$OUT/bench_autotuned_stderr.txt"
  echo "autotuned bench exit $? after $(( $(date +%s) - T0 ))s"
fi

# ---- 3. summary ----------------------------------------------------------------------------------
python - "$OUT" <<'PY'
import glob, os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
fails = []
for f in sorted(glob.glob(os.path.join(out, "junit_*.xml"))):
    try:
        root = ET.parse(f).getroot()
    except Exception as e:
        fails.append(f"{os.path.basename(f)}: unreadable ({e})")
        continue
    for ts in root.iter("testsuite"):
        for k in tot:
            tot[k] += int(ts.get(k, 0))
        for tc in ts.iter("testcase"):
            for bad in list(tc.findall("failure")) + list(tc.findall("error")):
                fails.append(f"{tc.get('classname')}::{tc.get('name')}: {(bad.get('message') or '')[:300]}")
lines = ["# GPU kernel check", "", open(os.path.join(out, "env.txt")).read(), "",
         f"tests: {tot['tests']} run, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped", ""]
lines += [f"- FAIL {x}" for x in fails]
for f in sorted(glob.glob(os.path.join(out, "pytest_*.log"))):
    tail = open(f).read().strip().splitlines()[-1:]
    if tail and tail[0].startswith("exit") and tail[0] not in ("exit 0", "exit 5"):
        lines.append(f"- {os.path.basename(f)}: {tail[0]}" + (" (TIMEOUT)" if tail[0] == "exit 124" else ""))
for name in ("bench_xattn.md", "bench_xattn_autotuned.md"):
    bench = os.path.join(out, name)
    if os.path.exists(bench):
        lines += ["", open(bench).read()]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "total $(( $(date +%s) - T0 ))s"
