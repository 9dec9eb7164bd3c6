"""The `fastfair bench` cases as pytest-benchmark tests (not in the default run: testpaths is tests/).

    pytest bench/test_bench_suite.py --benchmark-only                      # CUDA if available, else CPU
    FASTFAIR_BENCH_DEVICE=cpu FASTFAIR_BENCH_FULL=1 pytest bench/test_bench_suite.py --benchmark-only

Default shapes are the quick ones (tiny); FASTFAIR_BENCH_FULL=1 takes every SD1.5 / SDXL cross-attention shape
at batches 1, 8, 16. Methods that cannot run here are skipped with the reason `fastfair bench` reports.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastfair import bench as fb  # noqa: E402

DEVICE = torch.device(os.environ.get("FASTFAIR_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = fb.DTYPES[os.environ.get("FASTFAIR_BENCH_DTYPE") or ("fp16" if DEVICE.type == "cuda" else "fp32")]
FULL = os.environ.get("FASTFAIR_BENCH_FULL", "0") == "1"
SHAPES = fb.SD15_SHAPES + fb.SDXL_SHAPES if FULL else fb.QUICK_SHAPES
BATCHES = fb.BATCHES if FULL else fb.QUICK_BATCHES
STATUS = fb.backend_status(DEVICE)


def _timed(benchmark, fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    run()  # compile / first-use allocations outside the timing
    benchmark.pedantic(run, rounds=10 if DEVICE.type == "cpu" else 30, warmup_rounds=1, iterations=1)


def _need(method):
    st = STATUS[method]
    if not st["available"]:
        pytest.skip(st["reason"])


@pytest.mark.parametrize("pas", ["fwd", "bwd_full", "bwd_maps_dq"])
@pytest.mark.parametrize("method", fb.METHOD_ORDER)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}x{s[3]}")
def test_xattn(benchmark, shape, B, method, pas):
    _need(method)
    if pas == "bwd_maps_dq" and method not in fb.HAS_MAPS:
        pytest.skip(f"{method} has no maps")
    _, Nq, H, D = shape
    q, k, v, tok = fb.make_inputs(B, Nq, H, D, DTYPE, 0, DEVICE)
    fn = fb.methods()[method]
    nbytes, flops = fb.pass_cost(pas, B, H, Nq, D, q.element_size(), method in fb.HAS_MAPS)
    benchmark.extra_info.update(bytes=nbytes, flops=flops, device=str(DEVICE))
    if pas == "fwd":
        def call():
            with torch.no_grad():
                fn(q, k, v, tok)
    else:
        def call():
            fb.fwd_bwd(fn, q, k, v, tok, "full" if pas == "bwd_full" else "maps_dq")
    _timed(benchmark, call)


@pytest.mark.parametrize("method", [m for m in fb.METHOD_ORDER if m.startswith("fastfair-")])
@pytest.mark.parametrize("shape", fb.SIOU_SHAPES if FULL else fb.QUICK_SIOU, ids=lambda s: f"{s[0]}-{s[1]}")
def test_soft_iou(benchmark, shape, method):
    from fastfair import ops

    _need(method)
    a = torch.rand(BATCHES[-1], shape[1], device=DEVICE)
    b = torch.rand(BATCHES[-1], shape[1], device=DEVICE)

    def call():
        a_ = a.detach().requires_grad_(True)
        ops.soft_iou(a_, b, top_k=0.3, backend=method.split("-", 1)[1]).sum().backward()

    _timed(benchmark, call)


@pytest.mark.parametrize("mode", ["gen-plain", "gen-maps"])
def test_generate_tiny(benchmark, mode):
    pipe = fb._load("tiny-sd", str(DEVICE), "fp32" if DEVICE.type == "cpu" else "fp16")
    f = fb._workload(pipe, mode, images=2, steps=2, batch=2)
    _timed(benchmark, f)
