"""CPU timing of the native backend against the reference (naive.py) at SD-like shapes.

    python bench/bench_native_cpu.py [--threads N] [--repeat R] [--quick] [--cpu-time]

Prints one line per case: reference ms, native ms and the speed ratio (reference / native), for
cross-attention forward (with maps), forward + backward (through ops.cross_attention and
autograd), and SoftIoU forward + backward. The ratios decide ops.resolve_backend's CPU rule.
"""
from __future__ import annotations

import argparse
import time

import torch

from fastfair import native, ops


def _time_pair(f_ref, f_nat, repeat: int, clock) -> tuple[float, float]:
    """Min time in ms of each, runs interleaved (robust on a shared, busy machine)."""
    f_ref(), f_nat()  # warm-up
    tr, tn = [], []
    for _ in range(repeat):
        for fn, ts in ((f_ref, tr), (f_nat, tn)):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
    return min(tr) * 1e3, min(tn) * 1e3


CLOCK = time.perf_counter


def bench_xattn(B, H, Nq, Nk, D, T, per_head, dtype, repeat, backward):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=dtype, requires_grad=backward)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=dtype, requires_grad=backward)
    v = torch.randn(B, H, Nk, D, generator=g, dtype=dtype, requires_grad=backward)
    tok = list(range(1, 1 + T)) if T else None
    hr = "none" if per_head else "sum"

    def run(backend):
        def f():
            out, maps = ops.cross_attention(q, k, v, map_tokens=tok, head_reduce=hr, backend=backend)
            if backward:
                loss = out.square().sum() + (maps.square().sum() if maps is not None else 0)
                loss.backward()
        return f

    with torch.set_grad_enabled(backward):
        return _time_pair(run("reference"), run("native"), repeat, CLOCK)


def bench_siou(N, n, top_k, dtype, repeat):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(N, n, generator=g, dtype=dtype, requires_grad=True)
    b = torch.rand(N, n, generator=g, dtype=dtype, requires_grad=True)

    def run(backend):
        def f():
            ops.soft_iou(a, b, top_k=top_k, backend=backend).sum().backward()
        return f

    return _time_pair(run("reference"), run("native"), repeat, CLOCK)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--cpu-time", action="store_true",
                    help="measure thread CPU time instead of wall time (with --threads 1: immune to other load)")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            raise SystemExit("--cpu-time needs --threads 1")
        CLOCK = time.thread_time
    if not native.usable("cpu"):
        raise SystemExit(f"native extension not built: {native.BUILD_HINT}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'thread CPU time' if args.cpu_time else 'wall time'}, min of {args.repeat} interleaved runs")
    cases = [  # (B, H, Nq, Nk, D, T, per_head): SD1.5 down/mid/up resolutions, CLIP context 77
        (2, 8, 4096, 77, 40, 0, False),
        (2, 8, 4096, 77, 40, 4, False),
        (2, 8, 4096, 77, 40, 4, True),
        (2, 8, 1024, 77, 80, 4, False),
        (2, 8, 256, 77, 160, 4, False),
        (2, 8, 64, 77, 160, 4, False),
    ]
    if args.quick:
        cases = cases[1:2] + cases[3:4]
    print(f"{'case':44s} {'ref ms':>9s} {'native ms':>9s} {'ratio':>6s}")
    for dtype in (torch.float32,):
        for backward in (False, True):
            for c in cases:
                r, nt = bench_xattn(*c, dtype=dtype, repeat=args.repeat, backward=backward)
                B, H, Nq, Nk, D, T, ph = c
                name = f"xattn {'fwd+bwd' if backward else 'fwd'} B{B} H{H} Nq{Nq} Nk{Nk} D{D} T{T}{' ph' if ph else ''}"
                print(f"{name:44s} {r:9.2f} {nt:9.2f} {r / nt:6.2f}", flush=True)
    for N, n in ((8, 4096), (32, 1024)) if not args.quick else ((8, 4096),):
        for top_k in (0.3, None):
            r, nt = bench_siou(N, n, top_k, torch.float32, args.repeat)
            name = f"soft_iou fwd+bwd N{N} n{n} top_k={top_k}"
            print(f"{name:44s} {r:9.2f} {nt:9.2f} {r / nt:6.2f}", flush=True)


if __name__ == "__main__":
    main()
