"""Benchmark fastfair's fused cross-attention (+ maps) against SDPA, explicit softmax maps, xformers.

Shapes: Stable Diffusion 1.5 and SDXL cross-attention layers (text keys Nk = 77), fp16, diffusers
layout (q from (B, Nq, H*D) viewed as (B, H, Nq, D) -- strided, no copy).

    python bench/bench_xattn.py [--batch 2 16] [--json out.json] [--md out.md] [--quick]

Per case and method: median time (triton.testing.do_bench), bytes moved by the fused forward
(q, k, v, out, maps), achieved GB/s, % of the measured device-to-device copy bandwidth, and the
ratio to SDPA without maps. Forward+backward: "full" (dq, dk, dv from d_out and d_maps) and
"maps->dq" (the guidance path: gradient of a map loss into q only); peak memory of one
forward+backward (torch.cuda.max_memory_allocated above the inputs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SD15 = [("sd15", 4096, 8, 40), ("sd15", 1024, 8, 80), ("sd15", 256, 8, 160), ("sd15", 64, 8, 160)]
SDXL = [("sdxl", 4096, 10, 64), ("sdxl", 1024, 20, 64)]
NK = 77
N_TOKENS = 8  # map tokens per prompt

# inputs, the alternatives and the fwd+bwd driver are shared with `fastfair bench` (fastfair/bench.py)
from fastfair.bench import _xformers, fwd_bwd, m_explicit, m_sdpa, m_xformers, make_inputs  # noqa: E402,F401


def _bench(fn, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")  # ms


def copy_bandwidth_gbs() -> float:
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x), rep=200)
    return 2 * x.numel() / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# methods: each returns (out, maps or None)
# ------------------------------------------------------------------------------------------------

def m_fastfair(q, k, v, tok):
    from fastfair import ops

    return ops.cross_attention(q, k, v, map_tokens=tok, backend="triton")


def m_fastfair_nomaps(q, k, v, tok):
    from fastfair import ops

    return ops.cross_attention(q, k, v, backend="triton")


METHODS = {"fastfair": m_fastfair, "fastfair_nomaps": m_fastfair_nomaps, "sdpa": m_sdpa, "explicit": m_explicit,
           "xformers": m_xformers}


def peak_mem_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def check_correct(q, k, v, tok):
    """The fused kernel agrees with SDPA (out) and the explicit maps (maps) on this case."""
    out, maps = m_fastfair(q, k, v, tok)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    _, maps_ref = m_explicit(q.float(), k.float(), v.float(), tok)
    e_out = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    e_map = ((maps - maps_ref).abs().max() / maps_ref.abs().max()).item()
    return e_out, e_map


def run_case(tag, B, Nq, H, D, copy_bw, quick=False):
    q, k, v, tok = make_inputs(B, Nq, H, D)
    es = q.element_size()
    T = tok.shape[1]
    bytes_fwd = (q.numel() + k.numel() + v.numel() + q.numel()) * es + B * T * Nq * 4
    bytes_fwd_nomaps = (2 * q.numel() + k.numel() + v.numel()) * es
    rows = []
    e_out, e_map = check_correct(q, k, v, tok)
    methods = ["fastfair", "fastfair_nomaps", "sdpa", "explicit"] + (["xformers"] if _xformers() else [])
    res = {}
    for name in methods:
        fn = METHODS[name]
        try:
            ms = _bench(lambda: fn(q, k, v, tok))
        except Exception as e:  # e.g. xformers without a kernel for this shape
            print(f"# {name} {tag} B={B}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        nbytes = bytes_fwd if name in ("fastfair", "explicit") else bytes_fwd_nomaps
        res[("fwd", name)] = ms
        rows.append(dict(case=f"{tag} Nq={Nq} H={H} D={D}", B=B, pass_="fwd", method=name, ms=ms,
                         bytes=nbytes, gbs=nbytes / (ms * 1e-3) / 1e9))
    for mode in ("full", "maps_dq"):
        for name in methods:
            if mode == "maps_dq" and name not in ("fastfair", "explicit"):
                continue
            if name == "fastfair_nomaps":
                continue
            fn = METHODS[name]
            try:
                ms = _bench(lambda: fwd_bwd(fn, q, k, v, tok, mode), rep=50 if quick else 100)
                mem = peak_mem_mb(lambda: fwd_bwd(fn, q, k, v, tok, mode))
            except Exception as e:
                print(f"# {name} {tag} B={B} {mode}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            res[(mode, name)] = ms
            rows.append(dict(case=f"{tag} Nq={Nq} H={H} D={D}", B=B, pass_=f"fwd+bwd {mode}", method=name, ms=ms,
                             peak_mb=mem))
    sd = res.get(("fwd", "sdpa"))
    sdb = res.get(("full", "sdpa"))
    for r in rows:
        if "gbs" in r:
            r["pct_copy_bw"] = 100.0 * r["gbs"] / copy_bw
        base = sd if r["pass_"] == "fwd" else sdb
        if base:
            r["x_sdpa"] = r["ms"] / base
        r["err_out"], r["err_maps"] = e_out, e_map
    return rows


def to_markdown(rows, copy_bw, device) -> str:
    tuned = "autotuned" if os.environ.get("FASTFAIR_TRITON_AUTOTUNE") == "1" else "heuristic configs"
    lines = [f"# fastfair cross-attention benchmark ({device}, {tuned})", "",
             f"Device-to-device copy bandwidth: {copy_bw:.0f} GB/s. fp16, Nk = {NK}, {N_TOKENS} map tokens, "
             "diffusers (strided) layout. Times are medians (triton.testing.do_bench). x SDPA: ratio to SDPA "
             "without maps (fwd) / SDPA forward+backward (fwd+bwd).", "",
             "| case | B | pass | method | ms | GB/s | % copy BW | x SDPA | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if k in r else "")  # noqa: E731
        lines.append(f"| {r['case']} | {r['B']} | {r['pass_']} | {r['method']} | {r['ms']:.4f} | {f('gbs', '{:.0f}')} "
                     f"| {f('pct_copy_bw', '{:.0f}')} | {f('x_sdpa', '{:.2f}')} | {f('peak_mb', '{:.1f}')} |")
    errs = {(r["case"], r["B"]): (r["err_out"], r["err_maps"]) for r in rows}
    lines += ["", "Correctness (fused vs fp32 SDPA / explicit maps, max rel. error): " +
              "; ".join(f"{c} B={b}: out {eo:.1e}, maps {em:.1e}" for (c, b), (eo, em) in errs.items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--quick", action="store_true", help="SD1.5 4096/1024 and SDXL 4096 only")
    ap.add_argument("--siou", action="store_true", help="also time soft_iou fwd/bwd")
    ap.add_argument("--case", nargs="+", default=None, metavar="TAG:NQ",
                    help="only these cases, e.g. sd15:1024 sdxl:4096 (one process per case keeps a crash local)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge the JSON files of earlier runs into one table (no GPU work)")
    ap.add_argument("--autotune", action="store_true",
                    help="autotune the Triton kernels (slow: compiles every config); default: heuristic configs")
    args = ap.parse_args(argv)
    if args.merge:
        runs = [json.load(open(f)) for f in args.merge]
        rows = [r for run in runs for r in run["rows"] if "case" in r and "B" in r]
        md = to_markdown(rows, runs[0]["copy_bw_gbs"], runs[0]["device"])
        print(md)
        if args.md:
            with open(args.md, "w") as f:
                f.write(md)
        return 0
    if not torch.cuda.is_available():
        print("bench_xattn: needs a CUDA device", file=sys.stderr)
        return 0
    os.environ["FASTFAIR_TRITON_AUTOTUNE"] = "1" if args.autotune else "0"
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbs()
    cases = SD15 + SDXL
    if args.quick:
        cases = [SD15[0], SD15[1], SDXL[0]]
    if args.case:
        cases = [c for c in cases if f"{c[0]}:{c[1]}" in args.case]
    rows = []
    t0 = time.time()
    for B in args.batch:
        for tag, Nq, H, D in cases:
            rows += run_case(tag, B, Nq, H, D, copy_bw, quick=args.quick)
            print(f"# {tag} Nq={Nq} B={B} done ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    if args.siou:
        rows += bench_soft_iou()
    md = to_markdown([r for r in rows if "case" in r and "B" in r], copy_bw, device)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "copy_bw_gbs": copy_bw, "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)
    return 0


def bench_soft_iou():
    from fastfair import ops

    rows = []
    for N, n in ((16, 4096), (16, 16384)):
        a = torch.rand(N, n, device="cuda")
        b = torch.rand(N, n, device="cuda")
        for backend in ("triton", "reference"):
            ms_f = _bench(lambda: ops.soft_iou(a, b, backend=backend))

            def fb():
                a_ = a.detach().requires_grad_(True)
                ops.soft_iou(a_, b, backend=backend).sum().backward()

            ms_b = _bench(fb)
            rows.append(dict(case=f"soft_iou N={N} n={n}", B=N, pass_="fwd", method=backend, ms=ms_f))
            rows.append(dict(case=f"soft_iou N={N} n={n}", B=N, pass_="fwd+bwd", method=backend, ms=ms_b))
    for r in rows:
        r["err_out"] = r["err_maps"] = float("nan")
    return rows


if __name__ == "__main__":
    sys.exit(main())
