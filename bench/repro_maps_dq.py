"""Minimal GPU repro of the benchmark's 'maps_dq' pass (map loss -> dq only), diffusers layout.

    python bench/repro_maps_dq.py [B H Nq D [Nk [old]]]

``old`` forces the backward tile that faulted on an H200 (64 query rows, 8 warps; the launchers now
use 32-row tiles for head dims > 64 and 4 warps for 64-row tiles) and turns autotuning off, so one
GPU run can show whether that config was the cause. Each mode prints one 'ok' line with the dq error
against the fp32 reference.
"""
import os
import sys

import torch

from fastfair import ops
from fastfair.kernels import triton_ops

argv = sys.argv[1:]
B, H, Nq, D = (int(x) for x in (argv[0:4] if len(argv) >= 4 else (2, 8, 1024, 80)))
Nk = int(argv[4]) if len(argv) >= 5 else 77
if "old" in argv[5:]:
    os.environ["FASTFAIR_TRITON_AUTOTUNE"] = "0"
    triton_ops._OVERRIDE.update(BWD_BLOCK_M=64, BWD_WARPS=8)
tag = " (old 64-row x 8-warp backward tile)" if "old" in argv[5:] else ""
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, Nq, H * D, device="cuda", generator=g, dtype=torch.float16).view(B, Nq, H, D).transpose(1, 2)
k = torch.randn(B, Nk, H * D, device="cuda", generator=g, dtype=torch.float16).view(B, Nk, H, D).transpose(1, 2)
v = torch.randn(B, Nk, H * D, device="cuda", generator=g, dtype=torch.float16).view(B, Nk, H, D).transpose(1, 2)
tok = torch.arange(1, 9, device="cuda") % Nk
for mode in ("full", "maps_dq"):
    q_ = q.detach().requires_grad_(True)
    k_ = k.detach().requires_grad_(mode == "full")
    v_ = v.detach().requires_grad_(mode == "full")
    out, maps = ops.cross_attention(q_, k_, v_, map_tokens=tok, backend="triton")
    loss = maps.square().mean() + (out.float().square().mean() if mode == "full" else 0)
    loss.backward()
    torch.cuda.synchronize()
    qr = q.detach().float().requires_grad_(True)
    kr, vr = k.float().requires_grad_(mode == "full"), v.float().requires_grad_(mode == "full")
    o2, m2 = ops.cross_attention(qr, kr, vr, map_tokens=tok, backend="reference")
    (m2.square().mean() + (o2.square().mean() if mode == "full" else 0)).backward()
    err = ((q_.grad.float() - qr.grad).abs().max() / qr.grad.abs().max()).item()
    print(f"B{B} H{H} Nq{Nq} Nk{Nk} D{D} {mode}{tag}: ok, dq rel err {err:.2e}", flush=True)
