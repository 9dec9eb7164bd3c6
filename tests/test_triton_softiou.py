"""Triton SoftIoU kernels (forward, and backward through the unrolled Sinkhorn) against float64.

CPU: Triton interpreter (TRITON_INTERPRET=1, see tests/triton_mode.py; per test also via monkeypatch).
GPU: with CUDA and TRITON_INTERPRET unset/0 the same tests
run on CUDA tensors (``bench/gpu_kernels.sh``).

Criterion: the reference is ``naive.soft_iou`` in float64 on the same (rounded) inputs, gradients
by torch autograd: max error <= 1e-5 * max|ref| (the kernels do the cancelling argument
arithmetic in fp64, so they are ~10x more accurate than naive.py run in fp32). Half inputs: the
kernels compute in fp32/fp64 from the rounded inputs, so the same bound applies plus the output
rounding.
"""
from __future__ import annotations


import pytest
import torch

from triton_mode import GPU, import_backend  # noqa: E402

T_OPS = import_backend()
from fastfair import ops  # noqa: E402
from fastfair.kernels import naive  # noqa: E402

DEV = "cuda" if GPU else "cpu"


@pytest.fixture(autouse=True)
def _interp_env(monkeypatch):
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    T_OPS._OVERRIDE.clear()
    yield
    T_OPS._OVERRIDE.clear()


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _ref_grad(a, b, top_k, gamma, iters, d, dtype):
    a_ = a.detach().to(dtype).requires_grad_(True)
    b_ = b.detach().to(dtype).requires_grad_(True)
    r = naive.soft_iou(a_, b_, top_k, gamma, iters, 1e-8)
    ga, gb = torch.autograd.grad(r, (a_, b_), d.to(dtype))
    return r.detach(), ga, gb


def _maps(N, n, dtype, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(N, n, generator=g) ** 2  # attention-map-like: skewed
    b = torch.rand(N, n, generator=g)
    if ties and n > 8:
        a[0, 3] = a[0].min()  # a tie at the minimum
        b[-1, 5] = b[-1].max()  # a tie at the maximum
    return a.to(dtype=dtype, device=DEV), b.to(dtype=dtype, device=DEV)


def _compare(a, b, top_k, gamma, iters):
    N = a.shape[0]
    d = torch.linspace(-1.0, 2.0, N, device=DEV)
    r64, ga64, gb64 = _ref_grad(a, b, top_k, gamma, iters, d, torch.float64)
    out = T_OPS.soft_iou_fwd(a, b, top_k, gamma, iters, 1e-8)
    da, db = T_OPS.soft_iou_bwd(a, b, top_k, gamma, iters, 1e-8, d.to(a.dtype))
    assert out.shape == (N,) and out.dtype == a.dtype and da.dtype == a.dtype and db.shape == b.shape
    slack = 0.0 if a.dtype == torch.float32 else {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[a.dtype]
    for name, t, r in (("iou", out, r64), ("da", da, ga64), ("db", db, gb64)):
        s = max(r.abs().max().item(), 1e-3)
        tol = 1e-5 * s + slack * s
        e = _err(t, r)
        assert e <= tol, f"{name}: err {e:.3e} > tol {tol:.3e} (scale {s:.3e})"


@pytest.mark.parametrize("n,iters,top_k", [(100, 5, 0.3), (333, 20, 0.3), (77, 0, 0.3), (64, 1, 0.5),
                                           (50, 3, None)])
def test_fp32(n, iters, top_k):
    a, b = _maps(3, n, torch.float32)
    _compare(a, b, top_k, 0.01, iters)


def test_fp32_block_loop_and_gamma():
    """Rows longer than one block (the kernels loop over the row)."""
    T_OPS._OVERRIDE["SIOU_BLOCK"] = 64
    a, b = _maps(2, 300, torch.float32, seed=3)
    _compare(a, b, 0.2, 0.05, 4)


@pytest.mark.parametrize("n", [4096, 16384])
def test_fp32_long_rows(n):
    if not GPU:
        T_OPS._OVERRIDE["SIOU_BLOCK"] = 4096  # fewer interpreted loop trips
    a, b = _maps(2, n, torch.float32, seed=n)
    _compare(a, b, 0.3, 0.01, 20 if GPU else 2)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if GPU else []))
def test_half(dtype):
    a, b = _maps(2, 200, dtype, seed=5)
    _compare(a, b, 0.3, 0.01, 5)


def test_noncontiguous_rows():
    a, b = _maps(4, 128, torch.float32, seed=7)
    _compare(a[::2], b[::2], 0.3, 0.01, 3)


def test_bad_top_k_raises():
    a, b = _maps(1, 10, torch.float32)
    with pytest.raises(ValueError):
        T_OPS.soft_iou_fwd(a, b, 0.05, 0.01, 3, 1e-8)


def test_float64_falls_back():
    a, b = _maps(2, 50, torch.float64)
    d = torch.ones(2, dtype=torch.float64, device=DEV)
    out = T_OPS.soft_iou_fwd(a, b, 0.3, 0.01, 3, 1e-8)
    da, db = T_OPS.soft_iou_bwd(a, b, 0.3, 0.01, 3, 1e-8, d)
    r, ga, gb = _ref_grad(a, b, 0.3, 0.01, 3, d, torch.float64)
    assert torch.allclose(out, r) and torch.allclose(da, ga) and torch.allclose(db, gb)


def test_custom_op_matches_reference():
    a, b = _maps(3, 8 * 8, torch.float32, seed=11)
    res = {}
    for backend in ("reference", "triton"):
        dt = torch.float64 if backend == "reference" else torch.float32
        a_ = a.detach().to(dt).reshape(3, 8, 8).clone().requires_grad_(True)
        b_ = b.detach().to(dt).reshape(3, 8, 8).clone().requires_grad_(True)
        r = ops.soft_iou(a_, b_, top_k=0.3, iters=6, backend=backend)
        (r * torch.arange(1.0, 4.0, device=DEV, dtype=dt)).sum().backward()
        res[backend] = (r, a_.grad, b_.grad)
    for x, y in zip(res["triton"], res["reference"]):
        assert x.dtype == torch.float32
        assert _err(x, y) <= 1e-5 * max(y.abs().max().item(), 1e-3)
