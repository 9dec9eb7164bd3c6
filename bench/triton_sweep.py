"""Tile and parallelism sweep of the Triton forward (with maps) and the maps->dq backward, timed from CUDA
graphs so that only kernel time counts (the eager calls are host-bound at SD shapes, bench/RESULTS.md).
For a GPU session: it says which head-group split / query split / row tile the launch heuristics should pick.

    python bench/triton_sweep.py [--quick] [--mmdit] [--dry-run]

Compares, per SD1.5/SDXL cross-attention shape at batches 8 and 16 (fp16, Nk 77, 8 map tokens, diffusers
layout): the heuristic launch against forced head groups (fwd: HEAD_GROUPS 1/2/4/8, each with the heuristic
row tile and with 64-row x 4-warp tiles; DIV_D 1 = the scalar head-dim loads of before), the same forward
without maps (the attention core alone) and
forced query splits (and num_stages 2: the query-block loop pipelined) of the fused maps->dq backward (NSPLIT), and the full backward (dq, dk, dv: DFT's case) fused against
unfused, its x SDPA column against SDPA's forward + backward.
Prints ms per call, % of the measured copy bandwidth (fwd bytes as in fastfair.bench.pass_cost) and the
ratio to SDPA without maps. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--dry-run" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from fastfair import bench, ops
from fastfair.kernels import triton_ops as T

DRY = "--dry-run" in sys.argv


def gtime(fn, quick):
    if DRY:  # every case once, wall clock: checks the script on CPU before it spends GPU minutes
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return bench.graph_time_ms(fn, 2, quick)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, one tiny shape, timed once")
    ap.add_argument("--mmdit", action="store_true",
                    help="SD3 / Flux joint attention instead (image queries over [image; text] keys, online softmax)")
    a = ap.parse_args()
    if a.mmdit:
        return mmdit(a)
    dev = torch.device("cpu" if DRY else "cuda")
    ceil = 1.0 if DRY else bench.copy_bandwidth_gbs(dev, a.quick)["gbs"]
    shapes = [("tiny", 40, 2, 40)] if DRY else (bench.SD15_SHAPES + bench.SDXL_SHAPES)[: 2 if a.quick else None]
    name_dev = "CPU (dry run: interpreter, wall clock)" if DRY else torch.cuda.get_device_name()
    print(f"device {name_dev}, copy bandwidth {ceil:.0f} GB/s; CUDA-graph medians (ms)")
    print("| shape | B | pass | config | ms | % copy BW | x SDPA |")
    print("|---|---|---|---|---|---|---|")
    for (model, Nq, H, D) in shapes:
        for B in ((2,) if DRY else (8, 16)):
            q, k, v, tok = bench.make_inputs(B, Nq, H, D, torch.float16, 0, dev)
            nbytes = bench.pass_cost("fwd", B, H, Nq, D, 2, True)[0]
            sdpa = gtime(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), a.quick)
            name = f"{model} Nq={Nq} H={H} D={D}"

            def fwd():
                with torch.no_grad():
                    return ops.cross_attention(q, k, v, map_tokens=tok, backend="triton")

            def fwd_plain():  # the attention core alone (no maps: one head per program, as SDPA)
                with torch.no_grad():
                    return ops.cross_attention(q, k, v, backend="triton")

            def rows(pass_name, fn, cfgs, ref=None, bw=False):
                """Time fn under each (label, overrides); None overrides: fn_plain instead (fwd only)."""
                for label, ov in cfgs:
                    T._OVERRIDE.clear()
                    T._OVERRIDE.update(ov or {})
                    try:
                        ms = gtime(fn if ov is not None else fwd_plain, a.quick)
                        pct = f"{100 * nbytes / (ms * 1e-3) / (ceil * 1e9):.1f}" if bw else ""
                        ratio = f"{ms / ref:.2f}" if ref else ""
                        print(f"| {name} | {B} | {pass_name} | {label} | {ms:.4f} | {pct} | {ratio} |", flush=True)
                    except Exception as e:
                        print(f"| {name} | {B} | {pass_name} | {label} | error: {type(e).__name__}: {str(e)[:80]} | | |",
                              flush=True)
                T._OVERRIDE.clear()

            rows("fwd", fwd, [("heuristic", {})] + [(f"head groups {g}", {"HEAD_GROUPS": g}) for g in (1, 2, 4, 8)]
                 + [(f"head groups {g}, 64-row x 4-warp", {"HEAD_GROUPS": g, "FWD_BLOCK_M": 64}) for g in (1, 2, 4, 8)]
                 + [("64-row x 4-warp, pipelined (2 per SM)", {"FWD_BLOCK_M": 64, "FWD_STAGES": 2}),
                    ("num_stages 1 (head loop not pipelined)", {"FWD_STAGES": 1}),
                    ("DIV_D 1 (scalar head-dim loads, as before 2026-11-26 08:00)", {"DIV_D": 1}),
                    ("SPLIT_N 0 (one key tile of Nk rounded up: 77 -> 128, as before 11:10)", {"SPLIT_N": 0}),
                    ("no maps", None)], ref=sdpa, bw=True)
            qg = q.detach().requires_grad_(True)

            def maps_dq():
                _, m = ops.cross_attention(qg, k, v, map_tokens=tok, backend="triton")
                (dq,) = torch.autograd.grad(m.square().mean(), qg)
                return dq

            rows("fwd + maps->dq", maps_dq, [("heuristic", {}), ("DIV_D 1", {"DIV_D": 1}),
                                              ("SPLIT_N 0 (one key tile)", {"SPLIT_N": 0}),
                                              ("num_stages 2", {"BWD_STAGES": 2})]
                 + [(f"query splits {n}", {"NSPLIT": n}) for n in (1, 4, 16, 64)])
            kg, vg = k.detach().requires_grad_(True), v.detach().requires_grad_(True)
            dout = torch.randn_like(q)

            def full():  # DFT's case: dq, dk, dv from the output and the maps
                o, m = ops.cross_attention(qg, kg, vg, map_tokens=tok, backend="triton")
                return torch.autograd.grad((o * dout).sum() + m.square().mean(), (qg, kg, vg))

            def sdpa_full():
                o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
                return torch.autograd.grad((o * dout).sum(), (qg, kg, vg))

            # fused dq + dk + dv (default) spills 864 B/thread at D=80 on sm_90; unfused: dq kernel + dk/dv kernel
            rows("fwd + full bwd", full, [("heuristic", {}), ("unfused dk/dv", {"NO_FUSE": True}),
                                          ("num_stages 2", {"BWD_STAGES": 2})], ref=gtime(sdpa_full, a.quick))


# SD3-medium / FLUX.1 at 1024^2: 4096 image tokens; text 333 (77 CLIP + 256 T5) / 512 (T5); heads x head dim
MMDIT_SHAPES = [("sd3", 4096, 333, 24, 64), ("flux", 4096, 512, 24, 128)]


def mmdit(a):
    """What maps cost in a joint-attention layer: SDPA over all queries (the plain processor) against
    fastfair's processor split -- the image queries through ops.cross_attention (Triton, online softmax over
    image + text keys, maps at text columns) and the text queries through SDPA -- and the same with the
    maps -> dq backward (guidance)."""
    dev = torch.device("cpu" if DRY else "cuda")
    shapes = [("tiny", 40, 24, 2, 40)] if DRY else MMDIT_SHAPES
    name_dev = "CPU (dry run: interpreter, wall clock)" if DRY else torch.cuda.get_device_name()
    print(f"device {name_dev}; joint attention, CUDA-graph medians (ms)")
    print("| model | B | pass | path | ms | x SDPA |")
    print("|---|---|---|---|---|---|")
    for model, n_img, n_txt, H, D in shapes:
        for B in ((1,) if DRY else (1, 2)):
            g = torch.Generator(device=dev).manual_seed(0)
            S = n_img + n_txt
            q, k, v = (torch.randn(B, S, H * D, device=dev, generator=g).to(torch.float16).view(B, S, H, D)
                       .transpose(1, 2) for _ in range(3))
            text_first = model == "flux"
            img = slice(n_txt, S) if text_first else slice(0, n_img)
            txt = slice(0, n_txt) if text_first else slice(n_img, S)
            tok = (torch.arange(1, 9, device=dev) + txt.start)[None].expand(B, -1).contiguous()

            def plain():
                with torch.no_grad():
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            def split():
                with torch.no_grad():
                    o, m = ops.cross_attention(q[:, :, img], k, v, map_tokens=tok, backend="triton")
                    return o, m, torch.nn.functional.scaled_dot_product_attention(q[:, :, txt], k, v)

            qg = q.detach().requires_grad_(True)

            def plain_bwd():
                return torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(qg, k, v).float().mean(), qg)

            def guided():
                _, m = ops.cross_attention(qg[:, :, img], k, v, map_tokens=tok, backend="triton")
                return torch.autograd.grad(m.square().mean(), qg)

            kg, vg = k.detach().requires_grad_(True), v.detach().requires_grad_(True)

            def plain_full():
                o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
                return torch.autograd.grad(o.float().mean(), (qg, kg, vg))

            def guided_full():  # SD3 / Flux guidance: image keys and values depend on the latents too
                o, m = ops.cross_attention(qg[:, :, img], kg, vg, map_tokens=tok, backend="triton")
                o_t = torch.nn.functional.scaled_dot_product_attention(qg[:, :, txt], kg, vg)
                return torch.autograd.grad(o.float().mean() + o_t.float().mean() + m.square().mean(), (qg, kg, vg))

            for pas, base_fn, fn in (("fwd", plain, split), ("fwd + maps->dq", plain_bwd, guided),
                                     ("fwd + full bwd", plain_full, guided_full)):
                try:
                    ref, ms = gtime(base_fn, a.quick), gtime(fn, a.quick)
                    print(f"| {model} img {n_img} txt {n_txt} H {H} D {D} | {B} | {pas} | SDPA all queries | "
                          f"{ref:.4f} | 1.00 |", flush=True)
                    print(f"| {model} img {n_img} txt {n_txt} H {H} D {D} | {B} | {pas} | fastfair split (maps) | "
                          f"{ms:.4f} | {ms / ref:.2f} |", flush=True)
                except Exception as e:
                    print(f"| {model} | {B} | {pas} | error: {type(e).__name__}: {str(e)[:80]} | | |", flush=True)


if __name__ == "__main__":
    main()
