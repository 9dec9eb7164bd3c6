"""Tile and parallelism sweep of the Triton forward (with maps) and the maps->dq backward, timed from CUDA
graphs so that only kernel time counts (the eager calls are host-bound at SD shapes, bench/RESULTS.md).
For a GPU session: it says which head-group split / query split / row tile the launch heuristics should pick.

    python bench/triton_sweep.py [--quick]

Compares, per SD1.5/SDXL cross-attention shape at batches 8 and 16 (fp16, Nk 77, 8 map tokens, diffusers
layout): the heuristic launch against forced head groups (fwd: HEAD_GROUPS 1/2/4/8, each with the heuristic
row tile and with 64-row x 4-warp tiles; DIV_D 1 = the scalar head-dim loads of before), the same forward
without maps (the attention core alone) and
forced query splits (and num_stages 2: the query-block loop pipelined) of the fused maps->dq backward (NSPLIT).
Prints ms per call, % of the measured copy bandwidth (fwd bytes as in fastfair.bench.pass_cost) and the
ratio to SDPA without maps. Needs a CUDA device.
"""
from __future__ import annotations

import argparse

import torch

from fastfair import bench, ops
from fastfair.kernels import triton_ops as T


def gtime(fn, quick):
    return bench.graph_time_ms(fn, 2, quick)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    ceil = bench.copy_bandwidth_gbs(dev, a.quick)["gbs"]
    shapes = (bench.SD15_SHAPES + bench.SDXL_SHAPES)[: 2 if a.quick else None]
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {ceil:.0f} GB/s; CUDA-graph medians (ms)")
    print("| shape | B | pass | config | ms | % copy BW | x SDPA |")
    print("|---|---|---|---|---|---|---|")
    for (model, Nq, H, D) in shapes:
        for B in (8, 16):
            q, k, v, tok = bench.make_inputs(B, Nq, H, D, torch.float16, 0, dev)
            nbytes = bench.pass_cost("fwd", B, H, Nq, D, 2, True)[0]
            sdpa = gtime(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), a.quick)
            name = f"{model} Nq={Nq} H={H} D={D}"

            def fwd():
                with torch.no_grad():
                    return ops.cross_attention(q, k, v, map_tokens=tok, backend="triton")

            cfgs = [("heuristic", {})] + [(f"head groups {g}", {"HEAD_GROUPS": g}) for g in (1, 2, 4, 8)] + \
                   [(f"head groups {g}, 64-row x 4-warp", {"HEAD_GROUPS": g, "FWD_BLOCK_M": 64}) for g in (1, 2, 4, 8)]
            def fwd_plain():  # the attention core alone (no maps: one head per program, as SDPA)
                with torch.no_grad():
                    return ops.cross_attention(q, k, v, backend="triton")

            cfgs.append(("DIV_D 1 (scalar head-dim loads, as before 2026-11-26 08:00)", {"DIV_D": 1}))
            for label, ov in cfgs + [("no maps", None)]:
                T._OVERRIDE.clear()
                T._OVERRIDE.update(ov or {})
                try:
                    ms = gtime(fwd if ov is not None else fwd_plain, a.quick)
                    print(f"| {name} | {B} | fwd | {label} | {ms:.4f} | {100 * nbytes / (ms * 1e-3) / (ceil * 1e9):.1f} "
                          f"| {ms / sdpa:.2f} |", flush=True)
                except Exception as e:
                    print(f"| {name} | {B} | fwd | {label} | error: {type(e).__name__}: {str(e)[:80]} | | |", flush=True)
            qg = q.detach().requires_grad_(True)

            def maps_dq():
                _, m = ops.cross_attention(qg, k, v, map_tokens=tok, backend="triton")
                (dq,) = torch.autograd.grad(m.square().mean(), qg)
                return dq

            for label, ov in [("heuristic", {}), ("DIV_D 1", {"DIV_D": 1}), ("num_stages 2", {"BWD_STAGES": 2})] + \
                    [(f"query splits {n}", {"NSPLIT": n}) for n in (1, 4, 16, 64)]:
                T._OVERRIDE.clear()
                T._OVERRIDE.update(ov)
                try:
                    ms = gtime(maps_dq, a.quick)
                    print(f"| {name} | {B} | fwd + maps->dq | {label} | {ms:.4f} | | |", flush=True)
                except Exception as e:
                    print(f"| {name} | {B} | fwd + maps->dq | {label} | error: {type(e).__name__}: {str(e)[:80]} | | |",
                          flush=True)
            T._OVERRIDE.clear()


if __name__ == "__main__":
    main()
