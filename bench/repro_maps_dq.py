"""Minimal GPU repro of the benchmark's 'maps_dq' pass (map loss -> dq only), diffusers layout."""
import sys

import torch

from fastfair import ops

B, H, Nq, D = (int(x) for x in (sys.argv[1:5] if len(sys.argv) > 4 else (2, 8, 1024, 80)))
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, Nq, H * D, device="cuda", generator=g, dtype=torch.float16).view(B, Nq, H, D).transpose(1, 2)
k = torch.randn(B, 77, H * D, device="cuda", generator=g, dtype=torch.float16).view(B, 77, H, D).transpose(1, 2)
v = torch.randn(B, 77, H * D, device="cuda", generator=g, dtype=torch.float16).view(B, 77, H, D).transpose(1, 2)
tok = torch.arange(1, 9, device="cuda")
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
    print(f"B{B} H{H} Nq{Nq} D{D} {mode}: ok, dq rel err {err:.2e}", flush=True)
