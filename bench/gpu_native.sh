#!/usr/bin/env bash
# Native backend on a CUDA machine: tests + CUDA correctness and timing against the reference.
#
#   pip install --no-build-isolation --no-deps -e .      # builds fastfair/_native*.so (+ _native_cuda with nvcc)
#   OUT=/some/dir bash bench/gpu_native.sh
#
# Needs torch with CUDA, no internet, no diffusers. Writes into "$OUT" (default out/gpu_native):
#   env.txt           nvidia-smi, nvcc, torch, which native modules import
#   test_native.txt   python -m pytest tests/test_native.py (CPU kernels, nvcc compile, CUDA vs reference)
#   cuda_check.txt    per case: max |native - reference| (fwd + bwd) and ms (CUDA events), plus SDPA ms
#   cuda_check.json   the same, machine-readable
# Takes well under 2 minutes (each step has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_native}"
mkdir -p "$OUT"

{
  date
  nvidia-smi || true
  nvcc --version || echo "nvcc: not on PATH"
  python - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
import fastfair.native as n
print("native cpu module:", n.available("cpu"), "| cuda module:", n.available("cuda"), "| cuda import error:", n._CUDA_ERR)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# If the CUDA module is missing although nvcc is here, rebuild once with CUDA required (shows the error).
if ! python -c "import fastfair._native_cuda" 2>/dev/null && command -v nvcc >/dev/null; then
  echo "fastfair._native_cuda missing: rebuilding with FASTFAIR_CUDA=ON" | tee -a "$OUT/env.txt"
  FASTFAIR_CUDA=ON timeout 300 pip install --no-build-isolation --no-deps -e . > "$OUT/rebuild.txt" 2>&1 \
    || { echo "rebuild failed, see rebuild.txt"; tail -30 "$OUT/rebuild.txt"; }
fi

timeout 150 python -m pytest -q -rs tests/test_native.py 2>&1 | tee "$OUT/test_native.txt"

timeout 150 python - "$OUT" <<'EOF' 2>&1 | tee "$OUT/cuda_check.txt"
import json, math, sys, time
import torch
import torch.nn.functional as F
from fastfair import native, ops
from fastfair.kernels import naive

out_dir = sys.argv[1]
assert torch.cuda.is_available(), "no CUDA device"
if not native.usable("cuda"):
    print("native CUDA module not usable:", native._CUDA_ERR)
    sys.exit(1)
dev = torch.device("cuda")
print(torch.cuda.get_device_name(), "| torch", torch.__version__)


def cuda_ms(fn, warmup=3, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def maxerr(a, b):
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


rows = []
cases = [  # (B, H, Nq, Nk, D, T, per_head, map_keys Nm)
    (2, 8, 4096, 77, 40, 4, False, 0),
    (2, 8, 4096, 77, 40, 4, True, 0),
    (2, 8, 1024, 77, 80, 4, False, 0),
    (2, 8, 256, 77, 160, 4, False, 0),
    (2, 10, 4096, 77, 64, 4, False, 0),
    (2, 8, 4096, 77, 40, 4, False, 12),
    (4, 8, 1024, 154, 40, 4, False, 0),
]
print(f"{'case':46s} {'dtype':9s} {'err fwd':>9s} {'err bwd':>9s} {'ref f':>7s} {'nat f':>7s} {'ref f+b':>8s} "
      f"{'nat f+b':>8s} {'sdpa f':>7s}")
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for (B, H, Nq, Nk, D, T, ph, Nm) in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H, Nq, D, device=dev, dtype=dtype, generator=g)
        k = torch.randn(B, H, Nk, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, H, Nk, D, device=dev, dtype=dtype, generator=g)
        mk = torch.randn(B, H, Nm, D, device=dev, dtype=dtype, generator=g) if Nm else None
        tok = torch.arange(1, T + 1, device=dev)[None].expand(B, T).contiguous()
        scale = D ** -0.5
        # correctness against the float64 reference
        r = naive.cross_attention_fwd(q.double(), k.double(), v.double(), mk.double() if mk is not None else None,
                                      tok, scale, ph)
        o = native.cross_attention_fwd(q, k, v, mk, tok, scale, ph)
        ef = max(maxerr(o[0], r[0]), maxerr(o[3], r[3]), maxerr(o[1], r[1]))
        dout = torch.randn(o[0].shape, device=dev, dtype=dtype, generator=g)
        dmaps = torch.randn(o[3].shape, device=dev, dtype=o[3].dtype, generator=g)
        gr = naive.cross_attention_bwd(q.double(), k.double(), v.double(), mk.double() if mk is not None else None,
                                       tok, scale, ph, *r[:3], dout.double(), dmaps.double())
        go = native.cross_attention_bwd(q, k, v, mk, tok, scale, ph, *o[:3], dout, dmaps)
        eb = max(maxerr(a, b) / max(1.0, b.abs().max().item()) if b is not None else 0.0 for a, b in zip(go, gr))
        # timing through the op (custom_op + autograd), reference vs native
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        mki = mk.clone().requires_grad_() if mk is not None else None

        def fwd(backend):
            with torch.no_grad():
                return ops.cross_attention(q, k, v, map_tokens=tok, map_keys=mk,
                                           head_reduce="none" if ph else "sum", backend=backend)

        def fwdbwd(backend):
            out, maps = ops.cross_attention(*ins, map_tokens=tok, map_keys=mki, head_reduce="none" if ph else "sum",
                                            backend=backend)
            (out.float().square().sum() + maps.square().sum()).backward()

        t = {name: cuda_ms(lambda: fwd(name)) for name in ("reference", "native")}
        tb = {name: cuda_ms(lambda: fwdbwd(name), warmup=2, iters=10) for name in ("reference", "native")}
        ts = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        name = f"B{B} H{H} Nq{Nq} Nk{Nk} D{D} T{T}{' ph' if ph else ''}{f' mk{Nm}' if Nm else ''}"
        print(f"{name:46s} {str(dtype)[6:]:9s} {ef:9.2e} {eb:9.2e} {t['reference']:7.3f} {t['native']:7.3f} "
              f"{tb['reference']:8.3f} {tb['native']:8.3f} {ts:7.3f}", flush=True)
        rows.append(dict(case=name, dtype=str(dtype), err_fwd=ef, err_bwd_rel=eb, ref_fwd_ms=t["reference"],
                         native_fwd_ms=t["native"], ref_fwdbwd_ms=tb["reference"], native_fwdbwd_ms=tb["native"],
                         sdpa_fwd_ms=ts))

# SoftIoU
for dtype in (torch.float32, torch.float16):
    for (N, n) in ((8, 4096), (64, 1024)):
        g = torch.Generator(device=dev).manual_seed(1)
        a = torch.rand(N, n, device=dev, generator=g).to(dtype)
        b = torch.rand(N, n, device=dev, generator=g).to(dtype)
        la, lb = a.double().requires_grad_(), b.double().requires_grad_()
        ref = naive.soft_iou(la, lb, 0.3, 0.01, 20, 1e-8)
        d = torch.ones(N, device=dev, dtype=torch.float64)
        ga, gb = torch.autograd.grad(ref, (la, lb), d)
        got = native.soft_iou_fwd(a, b, 0.3, 0.01, 20, 1e-8)
        da, db = native.soft_iou_bwd(a, b, 0.3, 0.01, 20, 1e-8, d.to(dtype))
        ef = maxerr(got, ref)
        eb = max(maxerr(da, ga), maxerr(db, gb)) / max(1e-12, ga.abs().max().item())
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        tm = {be: cuda_ms(lambda: ops.soft_iou(ar, br, top_k=0.3, backend=be).sum().backward(), warmup=2, iters=10)
              for be in ("reference", "native")}
        name = f"soft_iou fwd+bwd N{N} n{n} top_k=0.3"
        print(f"{name:46s} {str(dtype)[6:]:9s} {ef:9.2e} {eb:9.2e} {'':7s} {'':7s} {tm['reference']:8.3f} "
              f"{tm['native']:8.3f}", flush=True)
        rows.append(dict(case=name, dtype=str(dtype), err_fwd=ef, err_bwd_rel=eb, ref_fwdbwd_ms=tm["reference"],
                         native_fwdbwd_ms=tm["native"]))

with open(f"{out_dir}/cuda_check.json", "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
bad = [r for r in rows if not (r["err_fwd"] < 5e-2 and r["err_bwd_rel"] < 5e-2)]
print("CUDA CHECK:", "FAIL" if bad else "OK", f"({len(rows)} cases; errors: fp16/bf16 vs float64 reference)")
sys.exit(1 if bad else 0)
EOF
echo "gpu_native.sh done; results in $OUT"
