"""pytest-benchmark cases of the fused cross-attention (skipped without CUDA or pytest-benchmark).

    pytest bench/test_bench_xattn.py --benchmark-only
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytest.importorskip("triton")
if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("needs CUDA (and TRITON_INTERPRET unset)", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_xattn as bx  # noqa: E402

CASES = [("sd15", 4096, 8, 40), ("sdxl", 1024, 20, 64)]


def _timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    run()  # compile / autotune outside the timing
    benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=5)


@pytest.mark.parametrize("method", ["fastfair", "sdpa", "explicit"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_fwd(benchmark, case, method):
    tag, Nq, H, D = case
    q, k, v, tok = bx.make_inputs(2, Nq, H, D)
    fn = bx.METHODS[method]
    _timed(benchmark, lambda: fn(q, k, v, tok))


@pytest.mark.parametrize("method", ["fastfair", "explicit"])
def test_maps_grad_into_q(benchmark, method):
    q, k, v, tok = bx.make_inputs(2, 4096, 8, 40)
    fn = bx.METHODS[method]
    _timed(benchmark, lambda: bx.fwd_bwd(fn, q, k, v, tok, "maps_dq"))
