"""``fastfair bench``: kernels and end-to-end workloads against the alternatives, with rooflines.

    fastfair bench [--suite kernels|e2e|all] [--device cuda|cpu] [--dtype fp16|bf16|fp32] [--quick] [--out DIR]
    fastfair.bench.run(suite="all", device="cpu", dtype="fp32", quick=False, out="bench-out")

Writes ``DIR/bench.partial.json`` after every case (what has run survives a crash or a timeout; removed at the
end), then ``DIR/bench.json`` (every raw timing, the environment, the ceilings, which backends ran and why the
others did not), ``DIR/bench.md`` (tables) and ``DIR/bench.png`` (time and % of roofline per shape and backend).

**Kernel suite**: every cross-attention shape of SD1.5 (512x512) and SDXL (1024x1024), batches 1, 8, 16 (text keys
Nk = 77, 8 map tokens, diffusers' strided layout). Passes: ``fwd`` (with maps where the method has them),
``bwd_full`` (forward + backward into q, k, v from d_out and d_maps), ``bwd_maps_dq`` (forward + gradient of a map
loss into q only: the guidance path) and ``soft_iou`` (SoftIoU with Sinkhorn top-k, forward + backward).
Methods: fastfair's ``triton``, ``native`` and ``reference`` backends; ``sdpa`` (no maps: the floor);
``explicit`` (baddbmm + softmax + bmm with maps gathered from the probabilities, as DAAM / prompt-to-prompt);
``xformers`` (no maps). A method that cannot run is listed with the reason.

Ceilings are measured once per run on the chosen device: copy bandwidth (``y.copy_(x)``, 2 bytes moved per byte)
and the dense matmul rate in the run's dtype. Each row carries a byte and FLOP model of the pass (see
:func:`pass_cost`), the achieved GB/s and TFLOP/s, and ``pct_roofline = 100 * max(bytes/BW, flops/peak) / time``.

Timing: CPU ``torch.utils.benchmark`` (blocked_autorange; raw per-block times kept); CUDA
``triton.testing.do_bench`` (median, warm-up, L2 flushed) when triton is installed, else CUDA events; on CUDA the
inputs rotate over enough copies to exceed twice the L2 cache.

**End-to-end suite**: ``generate`` with 4 word maps against plain diffusers generation and DAAM 0.2.0 tracing (when
installed); guided sampling (fastfair, batched) against the one-image-at-a-time explicit-softmax reference style
(BiasMap's code); one DFT training step with fastfair's attention against diffusers'. Images/s, peak memory
(CPU: resident-set growth, VmHWM reset after a warm-up; CUDA: ``max_memory_allocated`` growth) and the ratios.
Models: ``sd15-shaped`` on CPU; on CUDA SD1.5- and SDXL-shaped UNets at their real sizes with random weights
(``random-sd15``, ``random-sdxl``), or ``--model`` (a hub id or a local folder with real weights).
Outside ``--quick`` every e2e case runs in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ._env import _version, device_name, environment, git_revision  # noqa: F401 (re-exported)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NK = 77            # CLIP context: the keys of every SD cross-attention layer
N_TOKENS = 8       # map tokens per prompt
PROMPT = "a photo of the face of a doctor"
WORDS = ["photo", "face", "doctor", "a"]
# (model, Nq, heads, head dim) of every distinct cross-attention layer shape
SD15_SHAPES = [("sd15", 4096, 8, 40), ("sd15", 1024, 8, 80), ("sd15", 256, 8, 160), ("sd15", 64, 8, 160)]
SDXL_SHAPES = [("sdxl", 4096, 10, 64), ("sdxl", 1024, 20, 64)]
QUICK_SHAPES = [("tiny", 256, 2, 40), ("tiny", 64, 4, 64)]
BATCHES, QUICK_BATCHES = (1, 8, 16), (1,)
# SoftIoU: (model, map pixels) -- the latent grid of a 512 / 1024 image
SIOU_SHAPES = [("sd15", 64 * 64), ("sdxl", 128 * 128)]
QUICK_SIOU = [("tiny", 16 * 16)]
FASTFAIR_BACKENDS = ("triton", "native", "reference")
ALTERNATIVES = ("sdpa", "explicit", "xformers")
METHOD_ORDER = tuple(f"fastfair-{b}" for b in FASTFAIR_BACKENDS) + ALTERNATIVES
PASSES = ("fwd", "bwd_full", "bwd_maps_dq", "soft_iou")


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------

def _select(status: dict, methods) -> dict:
    """``status`` with the methods not in ``methods`` (None: all) marked unavailable: not selected."""
    if methods is None:
        return status
    return {m: (s if m in methods else {"available": False, "reason": "not selected (--methods)"})
            for m, s in status.items()}


def backend_status(device: torch.device) -> dict:
    """{method: {"available": bool, "reason": str | None}} for every method of the kernel suite."""
    import importlib.util

    from . import ops

    st = {}
    usable = ops.available_backends(device)
    for b in FASTFAIR_BACKENDS:
        reason = None
        if b == "triton":
            if importlib.util.find_spec("triton") is None:
                reason = "triton is not installed (pip install triton)"
            elif device.type != "cuda":
                reason = "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU as an interpreter, not benchmarked)"
        elif b == "native" and b not in usable:
            from . import native

            reason = f"extension not built for {device.type}: {native.BUILD_HINT}"
        if reason is None and b not in usable:
            reason = f"not usable on {device.type}"
        st[f"fastfair-{b}"] = {"available": reason is None, "reason": reason}
    st["sdpa"] = {"available": True, "reason": None}
    st["explicit"] = {"available": True, "reason": None}
    if _xformers() is None:
        st["xformers"] = {"available": False, "reason": "xformers is not installed"}
    elif device.type != "cuda":
        st["xformers"] = {"available": False, "reason": "xformers' memory_efficient_attention needs a CUDA device"}
    else:
        st["xformers"] = {"available": True, "reason": None}
    return st


# ------------------------------------------------------------------------------------------------
# timing and ceilings
# ------------------------------------------------------------------------------------------------

def time_fn(fn, device: torch.device, quick: bool = False) -> dict:
    """Time ``fn()``; ``{"median_ms", "times_ms" (raw), "method"}``."""
    if device.type == "cuda":
        try:
            import triton.testing

            try:
                times = triton.testing.do_bench(fn, warmup=25, rep=30 if quick else 100, return_mode="all")
                times = [float(t) for t in times]
            except (TypeError, ValueError, AssertionError):  # an older triton without return_mode="all"
                times = [float(triton.testing.do_bench(fn, warmup=25, rep=30 if quick else 100,
                                                       return_mode="median"))]
            how = "triton.testing.do_bench"
        except ImportError:
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(10 if quick else 50):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            how = "cuda events"
        times.sort()
        return {"median_ms": times[len(times) // 2], "times_ms": times, "timer": how}
    from torch.utils import benchmark as tb

    fn()  # warm-up (first-use allocations, lazy imports)
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.05 if quick else 0.5)
    return {"median_ms": m.median * 1e3, "times_ms": [t * 1e3 for t in m.times],
            "timer": f"torch.utils.benchmark blocked_autorange ({m.number_per_run} per block)"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device, quick: bool = False) -> dict:
    n = (16 if quick else 256 if device.type == "cuda" else 64) * 2 ** 20
    x = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), device, quick)  # the ceiling is the best block, not the median
    return {"gbs": 2 * n / (min(t["times_ms"]) * 1e-3) / 1e9, "bytes": n, **t}


def matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    n = 512 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda: a @ b, device, quick)
    return {"tflops": 2 * n ** 3 / (min(t["times_ms"]) * 1e-3) / 1e12, "n": n, **t}


# ------------------------------------------------------------------------------------------------
# cross-attention methods (shared with bench/bench_xattn.py): each returns (out, maps or None)
# ------------------------------------------------------------------------------------------------

def make_inputs(B, Nq, H, D, dtype=torch.float16, seed=0, device="cuda", nk=NK, n_tokens=N_TOKENS):
    """q, k, v in diffusers' layout ((B, N, H*D) viewed as (B, H, N, D), strided) and the map tokens (B, T)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def t(n):
        return torch.randn(B, n, H * D, device=device, generator=g).to(dtype).view(B, n, H, D).transpose(1, 2)

    q, k, v = t(Nq), t(nk), t(nk)
    tok = torch.arange(1, 1 + n_tokens, device=device)[None].expand(B, -1).contiguous()
    return q, k, v, tok


def fastfair_method(backend: str):
    def m(q, k, v, tok):
        from . import ops

        return ops.cross_attention(q, k, v, map_tokens=tok, backend=backend)

    m.__name__ = f"fastfair_{backend}"
    return m


def m_sdpa(q, k, v, tok):
    return F.scaled_dot_product_attention(q, k, v), None


def m_explicit(q, k, v, tok):
    """diffusers' AttnProcessor math: baddbmm + softmax + bmm, then the map columns gathered."""
    B, H, Nq, D = q.shape
    qf = q.reshape(B * H, Nq, D)
    kf = k.reshape(B * H, k.shape[2], D)
    vf = v.reshape(B * H, v.shape[2], v.shape[3])
    s = torch.baddbmm(torch.empty(B * H, Nq, kf.shape[1], dtype=q.dtype, device=q.device), qf, kf.transpose(1, 2),
                      beta=0, alpha=1.0 / math.sqrt(D))
    p = s.softmax(dim=-1)
    out = torch.bmm(p, vf).view(B, H, Nq, -1)
    idx = tok[:, None, None, :].expand(B, H, Nq, tok.shape[1])
    maps = torch.gather(p.view(B, H, Nq, -1), 3, idx).float().sum(1).transpose(1, 2)  # (B, T, Nq)
    return out, maps


def _xformers():
    try:
        import xformers.ops as xops

        return xops
    except Exception:
        return None


def m_xformers(q, k, v, tok):
    out = _xformers().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2), None


def methods() -> dict:
    d = {f"fastfair-{b}": fastfair_method(b) for b in FASTFAIR_BACKENDS}
    d.update(sdpa=m_sdpa, explicit=m_explicit, xformers=m_xformers)
    return d


HAS_MAPS = {"fastfair-triton", "fastfair-native", "fastfair-reference", "explicit"}


def fwd_bwd(method, q, k, v, tok, mode):
    """mode 'full': grads into q, k, v from d_out (+ d_maps); 'maps_dq': map loss into q only."""
    q_ = q.detach().requires_grad_(True)
    k_ = k.detach().requires_grad_(mode == "full")
    v_ = v.detach().requires_grad_(mode == "full")
    out, maps = method(q_, k_, v_, tok)
    if mode == "full":
        loss = out.float().square().mean()
        if maps is not None:
            loss = loss + maps.square().mean()
    else:
        loss = maps.square().mean()
    loss.backward()
    return q_.grad


def pass_cost(pas: str, B: int, H: int, Nq: int, D: int, es: int, maps: bool, nk: int = NK,
              T: int = N_TOKENS, iters: int = 20) -> tuple[int, int]:
    """(bytes, FLOPs) of one pass: the minimum traffic of a fused kernel and the algorithmic FLOPs.

    fwd: read q, k, v, write out (+ fp32 maps); 4*B*H*Nq*Nk*D FLOPs (q k^T and P v).
    bwd_full (fwd + bwd): fwd + read q, k, v, out, d_out (+ d_maps), write dq, dk, dv; 4 + 8 (dV, dP, dQ, dK)
    = 12*B*H*Nq*Nk*D FLOPs. bwd_maps_dq: fwd + read q, k, d_maps, write dq; 4 + 4 (recomputed S, dQ).
    soft_iou (``Nq`` = pixels, ``B`` = maps): read a, b, write da, db (fp32); ~10 FLOPs per pixel, map and
    Sinkhorn iteration, forward and twice that backward.
    """
    if pas == "soft_iou":
        return 4 * B * Nq * 4, 3 * 10 * iters * 2 * B * Nq
    nq, nkv = B * H * Nq * D, B * H * nk * D
    mb = B * T * Nq * 4 if maps else 0
    fwd_b, fwd_f = (2 * nq + 2 * nkv) * es + mb, 4 * B * H * Nq * nk * D
    if pas == "fwd":
        return fwd_b, fwd_f
    if pas == "bwd_full":
        return fwd_b + (4 * nq + 4 * nkv) * es + mb, 3 * fwd_f
    if pas == "bwd_maps_dq":
        return fwd_b + (2 * nq + nkv) * es + mb, 2 * fwd_f
    raise ValueError(pas)


def _rotating(make, nbytes: int, device: torch.device):
    """A closure cycling over enough input copies to exceed twice the L2 cache (CUDA), else one copy;
    its ``n`` attribute is the number of copies."""
    n = 1
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20) or 50 * 2 ** 20
        n = max(1, min(64, math.ceil(2 * l2 / max(nbytes, 1))))
    sets = [make(seed) for seed in range(n)]
    it = itertools.cycle(sets)

    def nxt():
        return next(it)

    nxt.n = n
    return nxt


def graph_time_ms(fn, warm_calls: int, quick: bool = False) -> float:
    """GPU time of ``fn`` without host cost: ``triton.testing.do_bench_cudagraph`` replays a CUDA graph of
    unrolled calls (each call still gets the next rotating input set). ``warm_calls`` eager calls first, so
    that no first-use work (token checks, lazy allocations) happens while the graph is captured."""
    import triton.testing

    for _ in range(warm_calls):
        fn()
    torch.cuda.synchronize()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=10 if quick else 30, return_mode="median"))
    except TypeError:  # an older triton without return_mode
        return float(triton.testing.do_bench_cudagraph(fn, rep=10 if quick else 30))


def _row(**kw) -> dict:
    return kw


def _finish(row: dict, ceil: dict) -> dict:
    t = row["median_ms"] * 1e-3
    bw, peak = ceil["copy_bw_gbs"] * 1e9, ceil["matmul_tflops"] * 1e12
    row["gbs"] = row["bytes"] / t / 1e9
    row["tflops"] = row["flops"] / t / 1e12
    row["pct_bw"] = 100 * row["gbs"] * 1e9 / bw
    row["pct_flops"] = 100 * row["tflops"] * 1e12 / peak
    row["roofline_ms"] = 1e3 * max(row["bytes"] / bw, row["flops"] / peak)
    row["pct_roofline"] = 100 * row["roofline_ms"] / row["median_ms"]
    return row


def kernel_suite(device: torch.device, dtype: torch.dtype, quick: bool, ceil: dict, status: dict,
                 log=print, on_progress=None) -> list[dict]:
    """Rows of every (shape, batch, pass, method); ``on_progress(rows)`` after each (shape, batch)."""
    shapes = QUICK_SHAPES if quick else SD15_SHAPES + SDXL_SHAPES
    batches = QUICK_BATCHES if quick else BATCHES
    run_methods = [m for m in METHOD_ORDER if status[m]["available"]]
    rows = []
    for (model, Nq, H, D), B in itertools.product(shapes, batches):
        shape = f"{model} Nq={Nq} H={H} D={D}"
        if device.type == "cuda" and not quick:
            # one process per case: a kernel fault (illegal memory access) loses the CUDA context
            spec = dict(model=model, Nq=Nq, H=H, D=D, B=B, device=str(device), dtype=str(dtype).split(".")[-1],
                        ceil={k: ceil[k] for k in ("copy_bw_gbs", "matmul_tflops")}, methods=run_methods)
            p = subprocess.run([sys.executable, "-m", "fastfair.bench", "--kernel-child", json.dumps(spec)],
                               capture_output=True, text=True)
            rows += [json.loads(ln[4:]) for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            if p.returncode:
                tail = _child_error(p.stderr) or f"exit {p.returncode}"
                rows.append(_row(shape=shape, model=model, B=B, Nq=Nq, H=H, D=D, Nk=NK, pass_="all",
                                 method="all", error=f"case process died: {tail}"[:300]))
        else:
            rows += _shape_rows(model, Nq, H, D, B, device, dtype, quick, ceil, run_methods, log)
        log(f"# kernels: {shape} B={B} done")
        if on_progress:
            on_progress(rows)
    return rows + _soft_iou_rows(device, quick, batches, ceil, run_methods)


def _shape_rows(model, Nq, H, D, B, device, dtype, quick, ceil, run_methods, log=print, on_row=None) -> list[dict]:
    """Every method and pass at one (shape, batch)."""
    ms = methods()
    es = torch.empty((), dtype=dtype).element_size()
    shape = f"{model} Nq={Nq} H={H} D={D}"
    rows = []
    nbytes = pass_cost("fwd", B, H, Nq, D, es, False)[0]
    nxt = _rotating(lambda s: make_inputs(B, Nq, H, D, dtype, s, device), nbytes, device)
    for name in run_methods:
        fn = ms[name]
        for pas in ("fwd", "bwd_full", "bwd_maps_dq"):
            if pas == "bwd_maps_dq" and name not in HAS_MAPS:
                continue
            if pas == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(*nxt())
            else:
                mode = "full" if pas == "bwd_full" else "maps_dq"

                def call(fn=fn, mode=mode):
                    return fwd_bwd(fn, *nxt(), mode)
            b, f = pass_cost(pas, B, H, Nq, D, es, name in HAS_MAPS)
            row = _row(shape=shape, model=model, B=B, Nq=Nq, H=H, D=D, Nk=NK, pass_=pas, method=name,
                       bytes=b, flops=f)
            try:
                row.update(time_fn(call, device, quick))
                rows.append(_finish(row, ceil))
                if device.type == "cuda":  # the same calls in a CUDA graph: kernel time without host cost
                    try:
                        row["graph_ms"] = graph_time_ms(call, nxt.n + 1, quick)
                        row["graph_pct_bw"] = 100 * row["bytes"] / (row["graph_ms"] * 1e-3) / (ceil["copy_bw_gbs"] * 1e9)
                    except Exception as e:  # capture is not possible for every method (host syncs)
                        row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            except Exception as e:  # a shape a method has no kernel for, a GPU fault, OOM ...
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                rows.append(row)
                log(f"# {name} {shape} B={B} {pas}: {row['error']}")
            if on_row:
                on_row(rows[-1])
    return rows


def _soft_iou_rows(device, quick, batches, ceil, run_methods) -> list[dict]:
    """SoftIoU with top-k, fwd + bwd, fastfair backends."""
    from . import ops

    rows = []

    for (model, n), B in itertools.product(QUICK_SIOU if quick else SIOU_SHAPES, batches):
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.rand(B, n, device=device, generator=g)
        bm = torch.rand(B, n, device=device, generator=g)
        for name in run_methods:
            if not name.startswith("fastfair-"):
                continue
            be = name.split("-", 1)[1]

            def call(be=be):
                a_ = a.detach().requires_grad_(True)
                ops.soft_iou(a_, bm, top_k=0.3, backend=be).sum().backward()

            nb, f = pass_cost("soft_iou", B, 1, n, 1, 4, False)
            row = _row(shape=f"{model} soft_iou n={n}", model=model, B=B, Nq=n, H=1, D=1, Nk=0, pass_="soft_iou",
                       method=name, bytes=nb, flops=f)
            try:
                row.update(time_fn(call, device, quick))
                rows.append(_finish(row, ceil))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# end-to-end workloads
# ------------------------------------------------------------------------------------------------

class ExplicitProcessor:
    """attn2 with explicit probabilities kept in the autograd graph (DAAM / prompt-to-prompt / BiasMap style)."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        p = attn.get_attention_scores(q, k, None)
        if not self.name.startswith("mid"):
            self.store.append(p.reshape(b, attn.heads, *p.shape[1:]))
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(p, v))))


def reference_style(pipe, seed, steps, sem, dem, scale=100.0, prompt=PROMPT):
    """One image of BiasMap-guided sampling the way BiasMap's code does it: batch 1, explicit probabilities."""
    from .kernels import naive
    from .processors import cross_attention_modules

    store = []
    mods = cross_attention_modules(pipe.unet)
    saved = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.set_processor(ExplicitProcessor(n, store))
    try:
        dev = pipe.device
        emb, neg = pipe.encode_prompt(prompt, dev, 1, True)
        ehs = torch.cat([neg, emb])
        H = pipe.unet.config.sample_size
        x = torch.randn(1, 4, H, H, generator=torch.Generator(dev).manual_seed(seed), device=dev, dtype=emb.dtype)
        pipe.scheduler.set_timesteps(steps)
        x = x * pipe.scheduler.init_noise_sigma
        for t in pipe.scheduler.timesteps:
            store.clear()
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                inp = pipe.scheduler.scale_model_input(torch.cat([x, x]), t)
                eps = pipe.unet(inp, t, encoder_hidden_states=ehs, return_dict=False)[0]
                maps = {}
                for pos in (sem, dem):
                    acc = 0
                    for p in store:
                        m = p[1:, :, :, pos].sum(1)  # cond row, sum over heads
                        s = int(round(math.sqrt(H * H / m.shape[-1])))
                        acc = acc + F.interpolate(m.reshape(1, 1, H // s, H // s).float(), size=(H, H),
                                                  mode="bilinear")
                    maps[pos] = acc.reshape(1, -1)
                E = naive.soft_iou(maps[sem], maps[dem], 0.3, 0.01, 20, 1e-8)
                g = torch.autograd.grad(E.sum(), x)[0]
            eps = eps.detach()
            eps = eps[:1] + 7.5 * (eps[1:] - eps[:1])
            if g.norm() < 1.0:
                abar = pipe.scheduler.alphas_cumprod[int(t)]
                eps = eps + scale * float(1 - abar) ** 0.5 * g
            x = pipe.scheduler.step(eps, t, x.detach(), return_dict=False)[0]
        with torch.no_grad():
            img = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return img
    finally:
        for n, m in mods.items():
            m.set_processor(saved[n])


def random_pipeline(kind: str, device=None, dtype=torch.float16, seed: int = 0):
    """SD1.5 (``random-sd15``) or SDXL (``random-sdxl``) at their real sizes, random weights (no download)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .pipelines import _scheduler, clip_tokenizer

    if kind not in ("random-sd15", "random-sdxl"):
        raise ValueError(f"unknown random pipeline {kind!r}; choose random-sd15 or random-sdxl")

    def te(hidden, layers, heads, proj=None):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                             projection_dim=proj or hidden, hidden_act="quick_gelu")
        return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()

    torch.manual_seed(seed)
    # The modules are built (and randomly initialised) on the target device: initialising 1-3.5 B parameters
    # on the host CPU took most of each e2e case's ~30 s on the H200 machine (the timed runs took ~2 s).
    # The scheduler and tokenizers stay outside (schedulers keep host tensors).
    with torch.device(device if device is not None else "cpu"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=4, sample_size=512).eval()
        if kind == "random-sd15":
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
            encoders = dict(text_encoder=te(768, 12, 12))
        else:
            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816).eval()
            encoders = dict(text_encoder=te(768, 12, 12), text_encoder_2=te(1280, 32, 20, proj=1280))
    if kind == "random-sd15":
        pipe = StableDiffusionPipeline(vae=vae, tokenizer=clip_tokenizer(), unet=unet, scheduler=_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **encoders)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
                                         unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
                                         **encoders)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def _load(model: str, device: str, dtype: str):
    if model.startswith("random-"):
        return random_pipeline(model, device, DTYPES[dtype])
    from .pipelines import load_pipeline

    return load_pipeline(model, device=device, dtype=dtype)


def _kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _workload(pipe, mode: str, images: int, steps: int, batch: int, checkpointing: bool = True):
    """A callable running ``mode`` for ``images`` images with ``steps`` steps (``batch`` at a time).

    Modes: gen-plain, gen-maps, gen-daam, guided-fastfair, guided-reference, dft-fastfair, dft-diffusers
    (``checkpointing``: DFT's gradient checkpointing). Shared with bench/memory_sd15.py and bench/bench_dft.py.
    """
    import fastfair

    dev = pipe.device
    seeds = list(range(images))
    if mode == "gen-plain":
        def f():
            for i in range(0, images, batch):
                s = seeds[i:i + batch]
                with torch.no_grad():
                    pipe([PROMPT] * len(s), num_inference_steps=steps,
                         generator=[torch.Generator(dev).manual_seed(x) for x in s])
    elif mode == "gen-maps":
        def f():
            fastfair.generate(pipe, PROMPT, seeds=seeds, steps=steps, maps=WORDS, batch_size=batch, progress=False)
    elif mode == "gen-daam":
        import daam

        def f():  # DAAM traces one prompt at a time
            for s in seeds:
                with torch.no_grad(), daam.trace(pipe) as tc:
                    pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator(dev).manual_seed(s))
                    hm = tc.compute_global_heat_map()
                    [hm.compute_word_heat_map(w) for w in WORDS]
    elif mode == "guided-fastfair":
        guide = fastfair.EntanglementGuidance("doctor", "face")

        def f():
            fastfair.generate(pipe, PROMPT, seeds=seeds, steps=steps, batch_size=batch, guidance=guide,
                              progress=False)
    elif mode == "guided-reference":
        sem, dem = 8, 5  # key positions of "doctor" and "face" in PROMPT

        def f():
            for s in seeds:
                reference_style(pipe, s, steps, sem, dem)
    elif mode in ("dft-fastfair", "dft-diffusers"):
        from .dft import DFTConfig, DFTTrainer

        class Red(torch.nn.Module):
            labels = {"gender": ("male", "female")}

            def forward(self, x):
                p0 = torch.sigmoid(50 * (x[:, 0].float().mean((1, 2)) - 0.45))
                return {"gender": torch.stack([p0, 1 - p0], 1)}

        cfg = DFTConfig(images_per_prompt=images, sampling_steps=(steps, steps), rank=4, quality_weight=0.0,
                        ema_decay=0.996, checkpoint_every=0, uncertainty_threshold=1.0,
                        gradient_checkpointing=checkpointing,
                        attention="fastfair" if mode == "dft-fastfair" else "diffusers")
        tr = DFTTrainer(pipe, [PROMPT], Red(), cfg, quality_encoder=None)

        def f():
            return tr.step()
    else:
        raise ValueError(f"unknown e2e mode {mode!r}")
    return f


E2E_GROUPS = {  # group: (fastfair mode, [alternatives])
    "generate, 4 word maps": ("gen-maps", ["gen-plain", "gen-daam"]),
    "guided sampling": ("guided-fastfair", ["guided-reference"]),
    "DFT step": ("dft-fastfair", ["dft-diffusers"]),
}


def e2e_case(model: str, mode: str, device: str, dtype: str, images: int, steps: int, batch: int,
             pipe=None) -> dict:
    """Load (unless given), warm up one step, then time one run and measure its peak memory growth."""
    dev = torch.device(device)
    pipe = pipe if pipe is not None else _load(model, device, dtype)
    f = _workload(pipe, mode, images, steps, batch)
    if not mode.startswith("dft"):
        _workload(pipe, mode, min(images, batch), 1, batch)()  # warm-up of the same path, one step
    else:
        f()  # the warm-up DFT step (optimizer state allocated)
    gc.collect()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM
        base = _kb("VmRSS")
    t0 = time.perf_counter()
    res = f()
    _sync(dev)
    dt = time.perf_counter() - t0
    if dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
        mem = "max_memory_allocated growth"
    else:
        peak_mb = (_kb("VmHWM") - base) / 1024
        mem = "peak RSS growth (VmHWM)"
    in_flight = 1 if mode in ("gen-daam", "guided-reference") else min(batch, images)
    out = dict(model=model, mode=mode, images=images, steps=steps, batch=batch, in_flight=in_flight, seconds=dt,
               images_per_s=images / dt, peak_mb=peak_mb, peak_mb_per_image=peak_mb / in_flight, memory=mem)
    if isinstance(res, dict) and "loss" in res:
        out["loss"] = float(res["loss"])
    if mode.endswith("fastfair") or mode == "gen-maps":
        from . import ops

        out["backend"] = ops.resolve_backend("auto", dev)  # what fastfair's kernels ran on
    return out


class CaseFailed(RuntimeError):
    """An e2e case's process failed; the message is its exception (type included) and where it was raised."""


def _e2e_subprocess(spec: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "fastfair.bench", "--child", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        why = _child_error(p.stderr)
        if not why:
            why = f"exit {p.returncode}"
            if p.returncode < 0:
                import signal

                with contextlib.suppress(ValueError):
                    why = f"killed by {signal.Signals(-p.returncode).name}"
        raise CaseFailed(why)
    return json.loads(p.stdout.strip().splitlines()[-1])


_WARNING_LINE = re.compile(r"^(\S+:\d+: \w*Warning: |\[W\d* )")  # warnings.warn's / torch's C++ warnings
_NOT_MESSAGE = ("Traceback (most recent call last)", "During handling of the above exception",
                "The above exception was the direct cause", "terminate called", "Exception raised from ")


def _exception_at(lines: list[str], tb: int) -> tuple[list[str], str | None]:
    """The exception of the traceback starting at ``lines[tb]``: its message lines (the first unindented line
    after the frames, then its continuation lines up to a blank line or what Python / C++ print next) and the
    innermost frame ("File ..., line N, in f")."""
    i, frame = tb + 1, None
    while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
        if lines[i].lstrip().startswith("File "):
            frame = lines[i].strip()
        i += 1
    msg = []
    for ln in lines[i:i + 8]:
        if not ln.strip() or ln.startswith(_NOT_MESSAGE) or _WARNING_LINE.match(ln):
            break
        msg.append(ln.strip())
    return msg, frame


def _child_error(stderr: str) -> str:
    """The failed case's exception: the last traceback's exception line with its continuation lines and the frame
    that raised it (a CUDA error's cause is its first line, "CUDA error: an illegal memory access ..."; its last is
    the generic TORCH_USE_CUDA_DSA hint; C++ abort output may follow), its direct cause when chained; with no
    Python traceback a C++ ``what():`` / CUDA error line; else stderr's last line. ``; ``-joined, one line."""
    lines = stderr.rstrip().splitlines()
    if not any(ln.strip() for ln in lines):
        return ""
    tbs = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if tbs:
        msg, frame = _exception_at(lines, tbs[-1])
        if msg:
            out = "; ".join(msg)[:500] + (f" (raised at {frame})" if frame else "")
            if len(tbs) > 1 and any(ln.startswith("The above exception was the direct cause")
                                    for ln in lines[tbs[-2]:tbs[-1]]):
                cause, _ = _exception_at(lines, tbs[-2])
                if cause:
                    out += f"; caused by {cause[0][:200]}"
            return out
    for ln in lines:
        if "what():" in ln or "CUDA error" in ln:
            return ln.strip()[:500]
    return next(ln.strip() for ln in reversed(lines) if ln.strip())[:500]


def e2e_suite(device: torch.device, dtype: str, quick: bool, model: str | None = None, images: int | None = None,
              steps: int | None = None, log=print, on_progress=None) -> tuple[list[dict], list[dict]]:
    """Rows (one per model and mode, or the error / unavailability) and the fastfair / alternative ratios;
    ``on_progress(rows)`` after each case."""
    import importlib.util

    if model:
        models = [model]
    elif quick:
        models = ["tiny-sd"]
    else:
        models = ["sd15-shaped"] if device.type == "cpu" else ["random-sd15", "random-sdxl"]
    for name, v in (("images", images), ("steps", steps)):
        if v is not None and (int(v) != v or v < 1):
            raise ValueError(f"--{name} must be a whole number >= 1; got {v}")
    images = images if images is not None else (2 if quick or device.type == "cpu" else 8)
    steps = steps if steps is not None else (2 if quick else 5 if device.type == "cpu" else 20)
    batch = images
    groups = {"generate, 4 word maps": E2E_GROUPS["generate, 4 word maps"]} if quick else E2E_GROUPS
    rows = []
    for m in models:
        pipe = _load(m, str(device), dtype) if quick else None
        for group, (ff, alts) in groups.items():
            for mode in [ff] + (alts if not quick else alts[:1]):
                row = dict(model=m, group=group, mode=mode)
                if mode == "gen-daam" and importlib.util.find_spec("daam") is None:
                    row.update(available=False, reason="daam is not installed (pip install daam==0.2.0)")
                elif mode.startswith("dft") and importlib.util.find_spec("peft") is None:
                    row.update(available=False, reason="peft is not installed (pip install '.[train]')")
                elif mode.startswith("dft") and images < 2:
                    row.update(available=False, reason="a DFT step aligns a distribution over >= 2 images: --images 2")
                elif mode == "guided-reference" and "xl" in m:  # BiasMap's released code: SD 1.x/2.x UNets
                    row.update(available=False, reason="the reference style (BiasMap's code) runs SD 1.x/2.x only")
                else:
                    spec = dict(model=m, mode=mode, device=str(device), images=images, steps=steps, batch=batch,
                                dtype="fp32" if mode.startswith("dft") else dtype)  # DFT: fp32 frozen weights
                    try:
                        t0 = time.perf_counter()
                        row.update(e2e_case(**spec, pipe=pipe) if quick else _e2e_subprocess(spec, 3600))
                        row["available"] = True
                        log(f"# e2e: {m} {mode}: {row['images_per_s']:.4f} images/s, {row['peak_mb']:.0f} MB "
                            f"({time.perf_counter() - t0:.0f} s)")
                    except Exception as e:
                        msg = str(e) if isinstance(e, CaseFailed) else f"{type(e).__name__}: {e}"
                        row.update(available=True, error=msg[:800])
                        log(f"# e2e: {m} {mode}: {row['error']}")
                rows.append(row)
                if on_progress:
                    on_progress(rows)
        del pipe
    ratios = []
    for m in models:
        by = {r["mode"]: r for r in rows if r["model"] == m and "images_per_s" in r}
        for group, (ff, alts) in groups.items():
            for a in alts:
                if ff in by and a in by:
                    f, b = by[ff], by[a]
                    ratios.append(dict(model=m, group=group, fastfair=ff, alternative=a,
                                       throughput_ratio=f["images_per_s"] / b["images_per_s"],
                                       peak_mb_ratio=(f["peak_mb"] / b["peak_mb"] if b["peak_mb"] >= MIN_PEAK_MB
                                                      else None),
                                       peak_mb_per_image_ratio=(f["peak_mb_per_image"] / b["peak_mb_per_image"]
                                                                if b["peak_mb_per_image"] >= MIN_PEAK_MB else None)))
    return rows, ratios


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------

MIN_PEAK_MB = 1.0  # below this a peak (CPU: RSS growth, page granular) is noise: no memory ratio from it


def _f(x, fmt):
    return "" if x is None else fmt.format(x)


def _cell(text) -> str:
    """Text for one markdown table cell: one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def to_markdown(res: dict) -> str:
    env, ceil = res["environment"], res.get("ceilings", {})
    L = [f"# fastfair bench: {env['device_name']}", "",
         f"{env['date']}; suite {res['suite']}, {res['dtype']}{', quick' if res['quick'] else ''}; torch "
         f"{env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}; git {env['git_revision']}", ""]
    if ceil:
        L += [f"Ceilings (measured): copy bandwidth {ceil['copy_bw_gbs']:.1f} GB/s, matmul "
              f"{ceil['matmul_tflops']:.3f} TFLOP/s ({res['dtype']}).", ""]
    L += ["| backend | status |", "|---|---|"]
    for name, s in res["backends"].items():
        ok = "ran" if res.get("kernels") else "available"
        L.append(f"| {name} | {ok if s['available'] else 'unavailable: ' + s['reason']} |")
    if res.get("kernels"):
        L += ["", "## Kernels", "",
              "Median times; % roofline = max(bytes / copy BW, FLOPs / matmul rate) / time. "
              "x SDPA: time over SDPA's (no maps) in the same pass. On CUDA, graph ms: the same calls replayed "
              "from a CUDA graph (kernel time without the host's per-call cost) and its % of copy bandwidth."
              + ("" if (res["backends"].get("sdpa") or {}).get("available", True) else
                 f" The x SDPA columns are empty: SDPA {res['backends']['sdpa']['reason']}."), "",
              "| shape | B | pass | backend | ms | MB | GFLOP | GB/s | % BW | TFLOP/s | % roofline | x SDPA "
              "| graph ms | graph % BW | graph x SDPA |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        sdpa = {(r["shape"], r["B"], r["pass_"]): r["median_ms"] for r in res["kernels"]
                if r["method"] == "sdpa" and "median_ms" in r}
        gsdpa = {(r["shape"], r["B"], r["pass_"]): r["graph_ms"] for r in res["kernels"]
                 if r["method"] == "sdpa" and "graph_ms" in r}
        for r in res["kernels"]:
            if "error" in r:
                L.append(f"| {r['shape']} | {r['B']} | {r['pass_']} | {r['method']} | error: {_cell(r['error'])} "
                         "|  |  |  |  |  |  |  |  |  |  |")
                continue
            base = sdpa.get((r["shape"], r["B"], r["pass_"]))
            gbase, g = gsdpa.get((r["shape"], r["B"], r["pass_"])), r.get("graph_ms")
            graph = (f"{g:.4f} | {r['graph_pct_bw']:.1f} | {_f(gbase and g / gbase, '{:.2f}')}" if g is not None
                     else f"{'no graph: ' + r['graph_error'] if r.get('graph_error') else ''} |  | ")
            L.append(f"| {r['shape']} | {r['B']} | {r['pass_']} | {r['method']} | {r['median_ms']:.4f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['flops'] / 1e9:.3f} | {r['gbs']:.1f} | {r['pct_bw']:.1f} | "
                     f"{r['tflops']:.3f} | {r['pct_roofline']:.1f} | {_f(base and r['median_ms'] / base, '{:.2f}')} | "
                     f"{graph} |")
    if res.get("e2e"):
        L += ["", "## End to end", "",
              "| model | workload | mode | images | steps | images/s | peak MB | peak MB / image in flight |",
              "|---|---|---|---|---|---|---|---|"]
        for r in res["e2e"]:
            if "images_per_s" in r:
                mode = f"{r['mode']} ({r['backend']})" if r.get("backend") else r["mode"]
                L.append(f"| {r['model']} | {r['group']} | {mode} | {r['images']} | {r['steps']} | "
                         f"{r['images_per_s']:.4f} | {r['peak_mb']:.0f} | {r['peak_mb_per_image']:.0f} |")
            else:
                L.append(f"| {r['model']} | {r['group']} | {r['mode']} | | | "
                         f"{_cell(r.get('error') or 'unavailable: ' + str(r.get('reason')))} | | |")
        if res.get("e2e_ratios"):
            L += ["", "| model | workload | fastfair / alternative | throughput ratio | peak memory ratio | "
                      "per image in flight |", "|---|---|---|---|---|---|"]
            for q in res["e2e_ratios"]:
                L.append(f"| {q['model']} | {q['group']} | {q['fastfair']} / {q['alternative']} | "
                         f"{q['throughput_ratio']:.2f}x | {_f(q['peak_mb_ratio'], '{:.2f}x')} | "
                         f"{_f(q['peak_mb_per_image_ratio'], '{:.2f}x')} |")
    return "\n".join(L) + "\n"


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194)]


def _plot_series(res: dict):
    """(categories, methods, {metric: {(cat, method): value}}) of the kernel rows; e2e throughput if no kernels."""
    rows = [r for r in res.get("kernels", []) if "median_ms" in r]
    if rows:
        cats = list(dict.fromkeys(f"{r['shape']} B{r['B']} {r['pass_']}" for r in rows))
        meths = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
        vals = {"time (ms, log)": {}, "% of roofline": {}}
        for r in rows:
            c = f"{r['shape']} B{r['B']} {r['pass_']}"
            vals["time (ms, log)"][(c, r["method"])] = r["median_ms"]
            vals["% of roofline"][(c, r["method"])] = r["pct_roofline"]
        return cats, meths, vals
    rows = [r for r in res.get("e2e", []) if "images_per_s" in r]
    cats = list(dict.fromkeys(f"{r['model']} {r['group']}" for r in rows))
    meths = list(dict.fromkeys(r["mode"] for r in rows))
    vals = {"images/s": {(f"{r['model']} {r['group']}", r["mode"]): r["images_per_s"] for r in rows},
            "peak MB": {(f"{r['model']} {r['group']}", r["mode"]): r["peak_mb"] for r in rows}}
    return cats, meths, vals


def write_png(res: dict, path: Path) -> str:
    """Grouped bars: time and % of roofline per shape/pass and backend. matplotlib if importable, else PIL."""
    cats, meths, vals = _plot_series(res)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        plt = None
    if plt is not None:
        fig, axes = plt.subplots(len(vals), 1, figsize=(max(8, 0.35 * len(cats) * max(1, len(meths)) / 2), 8),
                                 squeeze=False)
        w = 0.8 / max(1, len(meths))
        for ax, (metric, d) in zip(axes[:, 0], vals.items()):
            for j, m in enumerate(meths):
                xs = [i + j * w for i, c in enumerate(cats) if (c, m) in d]
                ys = [d[(c, m)] for c in cats if (c, m) in d]
                ax.bar(xs, ys, w, label=m, color=[x / 255 for x in _COLORS[j % len(_COLORS)]])
            if metric.endswith("log)"):
                ax.set_yscale("log")
            ax.set_ylabel(metric)
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cats))])
            ax.set_xticklabels(cats, rotation=60, ha="right", fontsize=6)
        axes[0, 0].legend(fontsize=7)
        axes[0, 0].set_title(f"fastfair bench: {res['environment']['device_name']} ({res['dtype']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return "matplotlib"
    from PIL import Image, ImageDraw

    W, Hp, pad = max(640, 12 * len(cats) * max(1, len(meths))), 260, 40
    img = Image.new("RGB", (W, Hp * len(vals) + 30), "white")
    dr = ImageDraw.Draw(img)
    dr.text((5, 5), f"fastfair bench: {res['environment']['device_name'][:80]}", fill="black")
    for j, m in enumerate(meths):
        dr.rectangle([W - 160, 5 + 10 * j, W - 152, 13 + 10 * j], fill=_COLORS[j % len(_COLORS)])
        dr.text((W - 148, 3 + 10 * j), m, fill="black")
    for k, (metric, d) in enumerate(vals.items()):
        top, bot = 30 + k * Hp + 20, 30 + (k + 1) * Hp - 20
        logy = metric.endswith("log)")
        v = [x for x in d.values() if x and x > 0] or [1.0]
        lo, hi = (math.log10(min(v)) - 0.1, math.log10(max(v)) + 0.1) if logy else (0.0, max(v) * 1.05)
        dr.text((5, top - 15), metric, fill="black")
        dr.line([pad, bot, W - 5, bot], fill="black")
        cw = (W - pad - 5) / max(1, len(cats))
        bw = cw * 0.8 / max(1, len(meths))
        for i, c in enumerate(cats):
            for j, m in enumerate(meths):
                x = d.get((c, m))
                if not x or x <= 0:
                    continue
                y = math.log10(x) if logy else x
                h = (y - lo) / (hi - lo) * (bot - top) if hi > lo else 0
                x0 = pad + i * cw + j * bw
                dr.rectangle([x0, bot - max(1, h), x0 + bw - 1, bot], fill=_COLORS[j % len(_COLORS)])
    img.save(path)
    return "PIL"


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------

def run(suite: str = "all", device: str = "cpu", dtype: str | None = None, quick: bool = False,
        out: str | os.PathLike = "bench-out", model: str | None = None, images: int | None = None,
        steps: int | None = None, log=None, methods=None) -> dict:
    """Run the benchmark; write ``out/bench.json``, ``out/bench.md``, ``out/bench.png``; return the results.
    ``methods``: the kernel suite's methods to time (names of METHOD_ORDER, a list or comma-separated; None: all)."""
    if suite not in ("kernels", "e2e", "all"):
        raise ValueError(f"suite must be kernels, e2e or all; got {suite!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to torch")
    dtype = dtype or ("fp16" if dev.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if methods is not None:
        unknown = sorted(set(methods) - set(METHOD_ORDER))
        if unknown or not methods:
            raise ValueError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(METHOD_ORDER)}")
        if suite == "e2e":
            raise ValueError("--methods selects the kernel suite's methods; --suite e2e runs none of them "
                             "(use --suite kernels or all)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"suite": suite, "device": str(dev), "dtype": dtype, "quick": quick, "environment": environment(dev),
           "backends": _select(backend_status(dev), methods),
           "timing": "CPU: torch.utils.benchmark; CUDA: triton.testing.do_bench (else CUDA events), rotating inputs "
                     "> 2x L2"}
    from ._io import atomic_write

    partial = out / "bench.partial.json"

    def checkpoint(key):  # what has run so far survives a crash or a timeout
        def save(rows):
            atomic_write(partial, json.dumps(dict(res, **{key: rows}, partial=True), indent=1,
                                             default=str).encode(), fsync=False)
        return save

    if suite in ("kernels", "all"):
        bw = copy_bandwidth_gbs(dev, quick)
        mm = matmul_tflops(dev, DTYPES[dtype], quick)
        res["ceilings"] = {"copy_bw_gbs": bw["gbs"], "matmul_tflops": mm["tflops"], "copy": bw, "matmul": mm}
        log(f"# ceilings: copy {bw['gbs']:.1f} GB/s, matmul {mm['tflops']:.3f} TFLOP/s")
        res["kernels"] = kernel_suite(dev, DTYPES[dtype], quick, res["ceilings"], res["backends"], log,
                                      on_progress=checkpoint("kernels"))
    if suite in ("e2e", "all"):
        res["e2e"], res["e2e_ratios"] = e2e_suite(dev, dtype, quick, model, images, steps, log,
                                                  on_progress=checkpoint("e2e"))
    res["wall_s"] = time.perf_counter() - t0
    atomic_write(out / "bench.json", json.dumps(res, indent=1, default=str).encode())
    atomic_write(out / "bench.md", to_markdown(res).encode())
    res["png_writer"] = write_png(res, out / "bench.png")
    partial.unlink(missing_ok=True)
    res["outputs"] = {k: str(out / f"bench.{k}") for k in ("json", "md", "png")}
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="all", choices=("kernels", "e2e", "all"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="tiny shapes and two e2e cases on tiny-sd (CPU: < 2 min)")
    p.add_argument("--out", default="bench-out", help="output folder (bench.json, bench.md, bench.png)")
    p.add_argument("--model", default=None, help="e2e model: a preset, random-sd15, random-sdxl, a hub id or folder")
    p.add_argument("--images", type=int, default=None, help="e2e images per case")
    p.add_argument("--steps", type=int, default=None, help="e2e sampling steps")
    p.add_argument("--methods", default=None,
                   help="kernel suite: a comma-separated subset of " + ", ".join(METHOD_ORDER) + " (default: every "
                        "available one; the others are listed as not selected)")


def cli_main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = run(args.suite, device, args.dtype, args.quick, args.out, model=args.model, images=args.images,
              steps=args.steps, methods=args.methods)
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {', '.join(res['outputs'].values())} ({res['wall_s']:.0f} s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastfair.bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kernel-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kernel_child:
        k = json.loads(args.kernel_child)
        _shape_rows(k["model"], k["Nq"], k["H"], k["D"], k["B"], torch.device(k["device"]), getattr(torch, k["dtype"]),
                    False, k["ceil"], k["methods"], log=lambda s: print(s, file=sys.stderr),
                    on_row=lambda r: print("ROW " + json.dumps(r), flush=True))
        return 0
    if args.child:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        print(json.dumps(e2e_case(**json.loads(args.child))))
        return 0
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
