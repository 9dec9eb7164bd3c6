"""Per-call cost of ``fastfair.ops.cross_attention`` at a tiny shape (1x1x4x8 queries, 3 keys), where the
kernel itself is ~nothing: what each layer call pays in Python, dispatch and validation. On a GPU this is
what keeps fused kernels from matching SDPA at SD's small layers. Medians of 300 calls, microseconds.

    python bench/bench_call_overhead.py [--device cpu|cuda] [--backend native]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastfair import ops


def time_call(f, calls: int = 300, sync=lambda: None) -> float:
    """Median microseconds of ``f()`` (each call followed by ``sync()``), after 20 warm-up calls."""
    for _ in range(20):
        f()
    sync()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="native")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    q, k, v = (torch.randn(1, 1, n, 8, device=dev) for n in (4, 3, 3))
    tok = torch.tensor([1], device=dev)
    qg = q.clone().requires_grad_(True)
    be = a.backend

    def fwd_bwd():
        _, m = ops.cross_attention(qg, k, v, map_tokens=tok, backend=be)
        m.sum().backward()

    rows = [
        ("SDPA (no maps), for scale", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
        ("ops.cross_attention, no maps", lambda: ops.cross_attention(q, k, v, backend=be)),
        ("ops.cross_attention, maps, tokens as a tensor (the engine)",
         lambda: ops.cross_attention(q, k, v, map_tokens=tok, backend=be)),
        ("ops.cross_attention, maps, tokens as a list", lambda: ops.cross_attention(q, k, v, map_tokens=[1], backend=be)),
        ("the custom op (what torch.compile traces)",
         lambda: torch.ops.fastfair.xattn_fwd(q, k, v, None, tok[None], 0.35, False, be)),
        ("maps -> dq, forward + backward", fwd_bwd),
    ]
    print(f"device {a.device}, backend {be}, torch {torch.__version__}; median us per call")
    for name, f in rows:
        print(f"| {name} | {time_call(f, 300, sync):.1f} |")


if __name__ == "__main__":
    main()
