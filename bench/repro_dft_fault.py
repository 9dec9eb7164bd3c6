"""GPU repro of the DFT crash seen on the H200 on 2026-11-27 (bench/RESULTS.md): the e2e case `dft-fastfair`
(random-sd15, fp32, 8 images, 20 steps) died of a CUDA error, while the same case at 2 images / 4 steps ran.

    python bench/repro_dft_fault.py [--budget SECONDS]

Every case runs in a process of its own (a CUDA fault loses the context) and prints one line: ``ok`` with the
largest error against the fp32 / float64 reference, or the error's cause. In order, until the budget is spent:

1. kernels: fp32 (DFT's dtype) forward + full backward (dq, dk, dv; with and without 4 map tokens) at every SD1.5
   cross-attention shape in the diffusers layout, batch 16 (8 images with CFG; autotuning as set); 1b. every
   combination of the kernels' autotune candidates forced in turn (``triton_ops._OVERRIDE["FORCE"]``), so that a
   config that faults is named (the crashed case autotuned; the GPU tests ran the heuristic tiles);
2. the bench's DFT case at 8 images / 20 steps: as run (autotuning on), with ``FASTFAIR_TRITON_AUTOTUNE=0``
   (the heuristic tiles every passing GPU test used), with ``FASTFAIR_TRITON_DIRECT=0`` (Triton's own launch
   path), with ``FASTFAIR_BACKEND=native`` and ``=reference`` (which attention is at fault), and under
   ``CUDA_LAUNCH_BLOCKING=1`` (the failing call's own traceback);
3. ``compute-sanitizer`` on the first failing kernel case of step 1, when it is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

DEV = os.environ.get("REPRO_DEVICE", "cuda")  # cpu: a dry run under TRITON_INTERPRET=1
SHAPES = [(4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)]  # (Nq, H, D) of SD1.5 at 512 px


def _inputs(B, Nq, H, D, maps):
    import torch

    g = torch.Generator(device=DEV).manual_seed(0)

    def x(n):  # the processors' layout: (B, N, H*D) viewed as (B, H, N, D)
        return torch.randn(B, n, H * D, device=DEV, generator=g).view(B, n, H, D).transpose(1, 2)

    return x(Nq), x(77), x(77), (torch.tensor([2, 5, 8, 11], device=DEV) if maps else None)


def _fwd_bwd(q, k, v, tok, backend):
    import torch

    from fastfair import ops

    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, m = ops.cross_attention(qs, ks, vs, map_tokens=tok, backend=backend)
    loss = out.square().mean() + (m.square().mean() if tok is not None else 0)
    loss.backward()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return [t.detach() for t in [out, qs.grad, ks.grad, vs.grad] + ([m] if tok is not None else [])]


def _errs(got, ref) -> str:
    return " ".join(f"{float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)):.1e}" for a, b in zip(got, ref))


def kernel_case(B: int, Nq: int, H: int, D: int, maps: bool) -> str:
    q, k, v, tok = _inputs(B, Nq, H, D, maps)
    return "ok max rel err " + _errs(_fwd_bwd(q, k, v, tok, "triton"), _fwd_bwd(q, k, v, tok, "reference"))


_KERNEL_NAMES = {"_xattn_fwd_kernel": "fwd", "_xattn_bwd_kernel": "bwd", "_xattn_bwd_dkdv_kernel": "dkdv"}


def candidates(q, k, v, tok) -> dict:
    """Each kernel's autotune candidates at this shape, as launched: a dry run (``triton_ops._RECORD``) lists the
    heuristic config and every config the autotuner may pick after pruning."""
    from fastfair.kernels import triton_ops as T

    T._RECORD = []
    try:
        _fwd_bwd(q, k, v, tok, "triton")
        rec = T._RECORD
    finally:
        T._RECORD = None
    out: dict = {}
    for fname, _args, cx, opts in rec:
        name = _KERNEL_NAMES.get(fname)
        if name is None:
            continue
        kw = dict(opts, **({"BLOCK_M": cx["BLOCK_M"]} if name == "fwd" else {}))  # the forward tunes BLOCK_M too
        if kw not in out.setdefault(name, []):
            out[name].append(kw)
    return out


def every_candidate(B: int, Nq: int, H: int, D: int, maps: bool) -> None:
    """Every combination of the kernels' autotune candidates, forced one after the other (``FORCE``), each against
    the reference. Prints 'start' before each, so that a fault that kills the process names its config."""
    import itertools

    from fastfair.kernels import triton_ops as T

    q, k, v, tok = _inputs(B, Nq, H, D, maps)
    ref = _fwd_bwd(q, k, v, tok, "reference")
    cands = candidates(q, k, v, tok)
    names = sorted(cands)
    print("candidates " + json.dumps(cands, sort_keys=True), flush=True)
    for combo in itertools.product(*(cands[n] for n in names)):
        force = tuple((n, tuple(sorted(kw.items()))) for n, kw in zip(names, combo))
        label = "; ".join(f"{n} {kw}" for n, kw in zip(names, combo))
        print(f"start {label}", flush=True)
        T._OVERRIDE["FORCE"] = force
        try:
            print(f"ok {label}: max rel err {_errs(_fwd_bwd(q, k, v, tok, 'triton'), ref)}", flush=True)
        finally:
            T._OVERRIDE.pop("FORCE", None)


def run(cmd: list[str], env: dict | None, timeout: float) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout:.0f} s"
    if p.returncode == 0:
        return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "ok"
    from fastfair.bench import _child_error

    return f"FAILED (exit {p.returncode}): " + (_child_error(p.stderr) or "no stderr")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=400)
    ap.add_argument("--kernel", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--candidates", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.kernel:
        print(kernel_case(**json.loads(a.kernel)))
        return
    if a.candidates:
        every_candidate(**json.loads(a.candidates))
        return
    t0 = time.time()
    left = lambda: a.budget - (time.time() - t0)  # noqa: E731
    first_bad = None
    print("## 1. fp32 kernels, forward + full backward (triton vs reference)", flush=True)
    for B in (16,):  # 8 images with CFG (batch 4 ran in the passing 2-image case)
        for Nq, H, D in SHAPES:
            for maps in (False, True):
                if left() < 20:
                    print("budget spent"); return
                spec = dict(B=B, Nq=Nq, H=H, D=D, maps=maps)
                line = run([sys.executable, __file__, "--kernel", json.dumps(spec)], None, min(120, left()))
                print(f"B={B} Nq={Nq} H={H} D={D} maps={maps}: {line}", flush=True)
                if first_bad is None and not line.startswith("ok"):
                    first_bad = spec
    print("## 1b. every autotune candidate (the crashed case autotuned; every passing GPU test ran the heuristic "
          "tiles), fp32, batch 16, no maps", flush=True)
    for Nq, H, D in SHAPES:
        if left() < 30:
            print("budget spent"); return
        spec = dict(B=16, Nq=Nq, H=H, D=D, maps=False)
        try:
            p = subprocess.run([sys.executable, __file__, "--candidates", json.dumps(spec)], capture_output=True,
                               text=True, timeout=min(150, left()))
            lines = p.stdout.strip().splitlines()
            bad = [ln for ln in lines if ln.startswith("start")][-1:] if p.returncode else []
            from fastfair.bench import _child_error

            for ln in lines:
                if not ln.startswith("start"):
                    print(f"Nq={Nq} D={D}: {ln}", flush=True)
            if bad:
                print(f"Nq={Nq} D={D}: FAILED (exit {p.returncode}) at {bad[0][6:]}: "
                      f"{_child_error(p.stderr) or 'no stderr'}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"Nq={Nq} D={D}: timeout", flush=True)
    print("## 2. the bench's DFT case (random-sd15, fp32, 8 images, 20 steps)", flush=True)
    spec = dict(model="random-sd15", mode="dft-fastfair", device=DEV, images=8, steps=20, batch=8, dtype="fp32")
    for label, env in (("as run (autotuning on)", None),
                       ("FASTFAIR_TRITON_AUTOTUNE=0 (heuristic tiles, as every GPU test)",
                        {"FASTFAIR_TRITON_AUTOTUNE": "0"}),
                       ("FASTFAIR_TRITON_DIRECT=0", {"FASTFAIR_TRITON_DIRECT": "0"}),
                       ("FASTFAIR_BACKEND=native", {"FASTFAIR_BACKEND": "native"}),
                       ("FASTFAIR_BACKEND=reference", {"FASTFAIR_BACKEND": "reference"}),
                       ("CUDA_LAUNCH_BLOCKING=1", {"CUDA_LAUNCH_BLOCKING": "1"})):
        if left() < 40:
            print("budget spent"); return
        line = run([sys.executable, "-m", "fastfair.bench", "--child", json.dumps(spec)], env, min(150, left()))
        if line.startswith("{"):
            r = json.loads(line)
            line = f"ok {r['images_per_s']:.3f} images/s, {r['peak_mb']:.0f} MB"
        print(f"{label}: {line}", flush=True)
    san = shutil.which("compute-sanitizer")
    if first_bad is not None and san and left() > 60:
        print("## 3. compute-sanitizer on", first_bad, flush=True)
        try:
            p = subprocess.run([san, "--print-limit", "5", sys.executable, __file__, "--kernel",
                                json.dumps(first_bad)], capture_output=True, text=True, timeout=left() - 10)
            print("\n".join((p.stdout + p.stderr).strip().splitlines()[-40:]))
        except subprocess.TimeoutExpired:
            print("compute-sanitizer: out of time")


if __name__ == "__main__":
    main()
