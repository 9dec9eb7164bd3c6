"""The native backend (csrc/ via fastfair/native.py) against explicit float64 formulas and naive.py.

Skips cleanly when the extension is not built (the install builds it). Two checks run in the
background from the first test, overlapping with the others: nvcc compiles the CUDA sources
(-arch=sm_90 -c) when nvcc is on PATH, so CUDA compile errors cannot land unnoticed; and
csrc/group_sim_check.cpp runs the header's row math with a thread-emulated multi-lane group (the
CUDA driver's code paths) against the serial group.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from fastfair import native, ops
from fastfair.kernels import naive

ROOT = Path(__file__).resolve().parents[1]
built = pytest.mark.skipif(not native.available("cpu"),
                           reason=f"fastfair._native not built: {native.BUILD_HINT}")

# ------------------------------------------------------------------------------------------------
# nvcc compile check, started in the background (see test_cuda_sources_compile)
# ------------------------------------------------------------------------------------------------
_NVCC = {"proc": None, "dir": None}


def _start_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None or _NVCC["proc"] is not None:
        return
    d = tempfile.mkdtemp(prefix="ff_nvcc_")
    cmd = [nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-c", "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "native_cuda.cu"), "-o", os.path.join(d, "native_cuda.o")]
    _NVCC["dir"] = d
    _NVCC["proc"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


_SIM = {"proc": None, "dir": None}


def _start_group_sim():
    """Build and run csrc/group_sim_check.cpp: the header's row math with a multi-lane group."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or _SIM["proc"] is not None:
        return
    d = tempfile.mkdtemp(prefix="ff_sim_")
    exe = os.path.join(d, "sim")
    cmd = (f"'{cxx}' -std=c++20 -O1 -pthread -I'{ROOT / 'csrc'}' '{ROOT / 'csrc' / 'group_sim_check.cpp'}' "
           f"-o '{exe}' && '{exe}'")
    _SIM["dir"] = d
    _SIM["proc"] = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_start_background_checks():
    _start_nvcc()
    _start_group_sim()


# ------------------------------------------------------------------------------------------------
# explicit float64 formulas
# ------------------------------------------------------------------------------------------------

def explicit_xattn(q, k, v, mk, tok, scale, per_head):
    """out, maps by explicit softmax (differentiable), in the inputs' dtype."""
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = p @ v
    if tok is None:
        return out, None
    pm = torch.softmax(q @ mk.transpose(-1, -2) * scale, dim=-1) if mk is not None else p
    B, H, Nq, _ = pm.shape
    idx = tok[:, None, None, :].expand(B, H, Nq, tok.shape[1])
    sel = torch.gather(pm, 3, idx).transpose(2, 3)  # (B,H,T,Nq)
    return out, (sel if per_head else sel.sum(1))


def _inputs(B, H, Nq, Nk, D, Nm, T, dtype, seed, strided=False, Dv=None):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D

    def mk_t(n, d):
        if strided:  # (B, N, H, D) memory viewed as (B, H, N, D), as diffusers attention does
            return torch.randn(B, n, H, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = mk_t(Nq, D), mk_t(Nk, D), mk_t(Nk, Dv)
    mk = mk_t(Nm, D) if Nm else None
    tok = torch.randint(0, Nm or Nk, (B, T), generator=g) if T else None
    return q, k, v, mk, tok


def _close(a, b, rtol, atol, what=""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


SHAPES = [(nk, d) for nk in (1, 7, 77, 154, 300) for d in (8, 40, 80, 160)]
MODES = ["sum", "per_head", "map_keys", "none", "map_keys_per_head"]


@built
@pytest.mark.parametrize("nk,d", SHAPES)
def test_xattn_fwd_bwd_float64(nk, d):
    i = SHAPES.index((nk, d))
    mode = MODES[i % len(MODES)]
    B, H, Nq = 2, 2, 33 + 2 * (i % 3)
    Nm = 0 if "map_keys" not in mode else (5 if i % 2 else 80)
    T = 0 if mode == "none" else 3 + (i % 4)
    per_head = "per_head" in mode
    q, k, v, mk, tok = _inputs(B, H, Nq, nk, d, Nm, T, torch.float64, seed=i, strided=(i % 4 == 1))
    scale = 1.0 / math.sqrt(d) * (1.0 + 0.5 * (i % 2))
    out, lse, mlse, maps = native.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
    ref = naive.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([mk.clone().requires_grad_()] if mk is not None else [])
    eo, em = explicit_xattn(*leaves[:3], leaves[3] if mk is not None else None, tok, scale, per_head)
    _close(out, eo, 1e-10, 1e-12, "out")
    _close(lse, ref[1], 1e-10, 1e-12, "lse")
    assert mlse.shape == ref[2].shape
    if mk is not None:
        _close(mlse, ref[2], 1e-10, 1e-12, "mlse")
    assert maps.shape == ref[3].shape and maps.dtype == ref[3].dtype
    if tok is not None:
        _close(maps, em, 1e-10, 1e-12, "maps")
    # backward vs autograd of the explicit formula
    g = torch.Generator().manual_seed(100 + i)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dmaps = torch.randn(maps.shape, generator=g, dtype=torch.float64) if tok is not None else None
    loss = (eo * dout).sum() + ((em * dmaps).sum() if tok is not None else 0)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    got = native.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, out, lse, mlse, dout, dmaps,
                                     (True, True, True, True))
    for name, a, e in zip("dq dk dv dmk".split(), got, grads):
        if e is None:
            assert a is None, name
            continue
        _close(a, e, 1e-9, 1e-11, name)


@built
@pytest.mark.parametrize("mode", MODES)
def test_xattn_float32_and_partial_needs(mode):
    per_head = "per_head" in mode
    Nm = 9 if "map_keys" in mode else 0
    T = 0 if mode == "none" else 4
    q, k, v, mk, tok = _inputs(2, 2, 67, 77, 40, Nm, T, torch.float32, seed=7, Dv=24)
    scale = 40 ** -0.5
    out, lse, mlse, maps = native.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
    r = naive.cross_attention_fwd(*(t.double() if t is not None and t.is_floating_point() else t
                                    for t in (q, k, v, mk, tok)), scale, per_head)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    for name, a, e in zip("out lse mlse maps".split(), (out, lse, mlse, maps), r):
        _close(a, e, 1e-5, 2e-6, name)
    dout = torch.randn_like(out)
    dmaps = torch.randn_like(maps) if tok is not None else None
    for needs in [(True, True, True, True), (True, False, False, False), (False, True, True, False),
                  (False, False, False, True)]:
        for do, dm in [(dout, dmaps), (None, dmaps), (dout, None)]:
            got = native.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, out, lse, mlse, do, dm, needs)
            exp = naive.cross_attention_bwd(q.double(), k.double(), v.double(),
                                            mk.double() if mk is not None else None, tok, scale, per_head,
                                            *r[:3], do.double() if do is not None else None,
                                            dm.double() if dm is not None else None, needs)
            for name, a, e in zip("dq dk dv dmk".split(), got, exp):
                assert (a is None) == (e is None), (name, needs)
                if a is not None:
                    assert a.dtype == torch.float32
                    _close(a, e, 1e-4, 1e-5, f"{name} {needs}")


@built
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xattn_half_inputs(dtype):
    q, k, v, mk, tok = _inputs(1, 2, 17, 7, 8, 0, 2, dtype, seed=3)
    out, lse, mlse, maps = native.cross_attention_fwd(q, k, v, mk, tok, 0.3, False)
    r = naive.cross_attention_fwd(q, k, v, mk, tok, 0.3, False)
    assert out.dtype == dtype and lse.dtype == torch.float32 and maps.dtype == torch.float32
    _close(out, r[0], 1e-2, 1e-2, "out")
    _close(maps, r[3], 1e-5, 1e-5, "maps")
    dq, dk, dv, dmk = native.cross_attention_bwd(q, k, v, mk, tok, 0.3, False, out, lse, mlse,
                                                 torch.ones_like(out), torch.ones_like(maps))
    assert dq.dtype == dtype and dmk is None


@built
def test_xattn_determinism_and_threads():
    q, k, v, mk, tok = _inputs(1, 2, 300, 77, 40, 0, 3, torch.float32, seed=11)
    o1 = native.cross_attention_fwd(q, k, v, mk, tok, 0.2, False)
    d1 = native.cross_attention_bwd(q, k, v, mk, tok, 0.2, False, *o1[:3], torch.ones_like(o1[0]),
                                    torch.ones_like(o1[3]))
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o2 = native.cross_attention_fwd(q, k, v, mk, tok, 0.2, False)
        d2 = native.cross_attention_bwd(q, k, v, mk, tok, 0.2, False, *o2[:3], torch.ones_like(o2[0]),
                                        torch.ones_like(o2[3]))
    finally:
        torch.set_num_threads(nt)
    for a, b in zip(o1 + d1[:3], o2 + d2[:3]):
        assert torch.equal(a, b)


@built
def test_thread_pool_concurrent_callers_and_fork():
    """The CPU module's threading: Python threads calling at once (the GIL is released) get exactly the
    serial results, and a forked child, where the parent's worker threads do not exist, still runs
    multi-threaded calls without hanging."""
    import threading
    import time

    nt = torch.get_num_threads()
    torch.set_num_threads(max(2, nt))
    try:
        cases = [_inputs(1, 2, 200 + 37 * i, 77, 40, 0, 3, torch.float32, seed=20 + i) for i in range(4)]
        want = [native.cross_attention_fwd(q, k, v, mk, tok, 0.2, False) for q, k, v, mk, tok in cases]
        got = [None] * len(cases)

        def work(i):
            for _ in range(5):
                got[i] = native.cross_attention_fwd(*cases[i], 0.2, False)

        ths = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        for w, g_ in zip(want, got):
            for a, b in zip(w, g_):
                assert torch.equal(a, b)

        pid = os.fork()
        if pid == 0:  # child: multi-threaded call, then compare; exit code says the result
            code = 1
            try:
                o = native.cross_attention_fwd(*cases[0], 0.2, False)
                code = 0 if all(torch.equal(a, b) for a, b in zip(o, want[0])) else 2
            finally:
                os._exit(code)
        deadline = time.time() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, 9)
                raise AssertionError("forked child hung in a multi-threaded native call")
            time.sleep(0.05)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        torch.set_num_threads(nt)


@built
@pytest.mark.parametrize("head_reduce,use_mk", [("sum", False), ("none", False), ("sum", True), ("none", True)])
def test_ops_gradcheck_native(head_reduce, use_mk):
    g = torch.Generator().manual_seed(5)
    B, H, Nq, Nk, D, Nm = 2, 2, 5, 4, 3, 3
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64, requires_grad=True)
    mk = torch.randn(B, H, Nm, D, generator=g, dtype=torch.float64, requires_grad=True) if use_mk else None
    tok = torch.tensor([[0, 2], [1, 1]])
    ins = (q, k, v) + ((mk,) if use_mk else ())

    def f(*xs):
        out, maps = ops.cross_attention(xs[0], xs[1], xs[2], map_tokens=tok, map_keys=xs[3] if use_mk else None,
                                        head_reduce=head_reduce, backend="native")
        return out, maps

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)
    ref = ops.cross_attention(q, k, v, map_tokens=tok, map_keys=mk, head_reduce=head_reduce, backend="reference")
    got = f(*ins)
    for a, b in zip(got, ref):
        _close(a, b, 1e-12, 1e-13)


# ------------------------------------------------------------------------------------------------
# SoftIoU
# ------------------------------------------------------------------------------------------------

def _siou_inputs(N, n, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(N, n, generator=g, dtype=torch.float64)
    b = torch.rand(N, n, generator=g, dtype=torch.float64) ** 3
    if ties:  # tied extremes (amin/amax share their gradient) and a constant row
        a[0, :5] = a[0].max()
        a[0, 7:9] = a[0].min()
        b[-1] = 0.25
    return a.to(dtype), b.to(dtype)


@built
@pytest.mark.parametrize("top_k", [None, 0.3, 0.05])
@pytest.mark.parametrize("iters", [0, 1, 3, 20])
def test_soft_iou_float64_vs_autograd(top_k, iters):
    a, b = _siou_inputs(4, 97, torch.float64, seed=iters, ties=True)
    gamma = 0.01 if iters != 3 else 0.1
    la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = naive.soft_iou(la, lb, top_k, gamma, iters, 1e-8)
    d = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    ga, gb = torch.autograd.grad(ref, (la, lb), d)
    got = native.soft_iou_fwd(a, b, top_k, gamma, iters, 1e-8)
    _close(got, ref.detach(), 1e-10, 1e-12, "iou")
    da, db = native.soft_iou_bwd(a, b, top_k, gamma, iters, 1e-8, d)
    _close(da, ga, 1e-8, 1e-10, "da")
    _close(db, gb, 1e-8, 1e-10, "db")


@built
@pytest.mark.parametrize("n", [64, 1024])
def test_soft_iou_float32(n):
    a, b = _siou_inputs(3, n, torch.float32, seed=n)
    d = torch.tensor([1.0, -0.5, 2.0])
    la, lb = a.double().requires_grad_(), b.double().requires_grad_()
    ref = naive.soft_iou(la, lb, 0.3, 0.01, 20, 1e-8)
    ga, gb = torch.autograd.grad(ref, (la, lb), d.double())
    got = native.soft_iou_fwd(a, b, 0.3, 0.01, 20, 1e-8)
    assert got.dtype == torch.float32
    _close(got, ref.detach(), 1e-4, 1e-5, "iou")
    da, db = native.soft_iou_bwd(a, b, 0.3, 0.01, 20, 1e-8, d)
    scale = max(ga.abs().max().item(), gb.abs().max().item())
    _close(da, ga, 1e-3, 1e-3 * scale, "da")
    _close(db, gb, 1e-3, 1e-3 * scale, "db")


@built
def test_soft_iou_ops_autograd_and_errors():
    g = torch.Generator().manual_seed(1)  # well-separated values: finite differences never swap the extremes
    a, b = ((torch.stack([torch.randperm(64, generator=g) for _ in range(3)]).double()
             + 0.5 * torch.rand(3, 64, generator=g, dtype=torch.float64)) / 64 for _ in range(2))
    a, b = a.reshape(3, 8, 8).requires_grad_(), b.reshape(3, 8, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ops.soft_iou(x, y, top_k=0.3, gamma=0.1, iters=5, backend="native"),
                                    (a, b), eps=1e-6, atol=1e-6)
    r = ops.soft_iou(a, b, top_k=0.3, backend="reference")
    n = ops.soft_iou(a, b, top_k=0.3, backend="native")
    _close(n, r, 1e-10, 1e-12)
    with pytest.raises(ValueError):
        native.soft_iou_fwd(a.detach().reshape(3, -1)[:, :3], b.detach().reshape(3, -1)[:, :3], 0.3, 0.01, 20, 1e-8)


# Degenerate maps: constant (any value), all-zero, one constant and the other not. The normalisation
# guard R = hi - lo + 1e-8 must give R = 1e-8 (x = 0) on a constant row, as naive.minmax does. The CPU
# module is built with -fassociative-math, under which GCC compiled it as hi + (1e-8 - lo): in float
# that is 0 once |lo| > 0.25 (NaN = 0/0 where the reference is finite) and off by up to ~50% below
# (so the gradients, scaled by 1/R, were wrong by as much); in double it would bite from ~1.3e8.
_DEGENERATE_CONSTS = [0.0, 1e-3, 0.25, 0.3, 0.5, 1.0, -0.7, 3.0, 1e3]


def _degenerate_pairs(n, dtype, big=None):
    """(a, b), rows of n elements: each constant with a random partner (both ways), pairs of constants
    (one of them identical), an all-zero pair."""
    g = torch.Generator().manual_seed(n)
    consts = _DEGENERATE_CONSTS + ([big] if big is not None else [])
    rand = torch.rand(len(consts), n, generator=g, dtype=torch.float64)
    const = torch.tensor(consts, dtype=torch.float64)[:, None].expand(-1, n)
    a = torch.cat([const, rand, const, torch.zeros(1, n, dtype=torch.float64)])
    b = torch.cat([rand, const, const.flip(0), torch.zeros(1, n, dtype=torch.float64)])
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


@built
@pytest.mark.parametrize("top_k", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_iou_degenerate_maps_forward(top_k, dtype):
    """Constant / all-zero maps: native == naive.soft_iou (finite), in float32 and float64."""
    a, b = _degenerate_pairs(64, dtype, big=1e9 if dtype == torch.float64 else None)
    ref = naive.soft_iou(a, b, top_k, 0.01, 20, 1e-8)
    got = native.soft_iou_fwd(a, b, top_k, 0.01, 20, 1e-8)
    assert torch.isfinite(ref).all()
    assert torch.isfinite(got).all(), got
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    _close(got, ref, *tol, "iou")


@built
@pytest.mark.parametrize("top_k", [None, 0.3])
def test_soft_iou_degenerate_maps_backward_float64(top_k):
    """The exact gradient on constant / all-zero maps, float64 (tight): finite and == autograd of naive."""
    a, b = _degenerate_pairs(48, torch.float64, big=1e9)
    d = torch.linspace(-1.0, 2.0, a.shape[0], dtype=torch.float64)
    la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(naive.soft_iou(la, lb, top_k, 0.1, 5, 1e-8), (la, lb), d)
    da, db = native.soft_iou_bwd(a, b, top_k, 0.1, 5, 1e-8, d)
    assert torch.isfinite(da).all() and torch.isfinite(db).all()
    # a constant row's gradient is (dx - mean dx) / 1e-8: compare relative to each row's scale
    for got, ref, what in ((da, ga, "da"), (db, gb, "db")):
        scale = ref.abs().amax(-1, keepdim=True).clamp_min(1.0)
        _close(got / scale, ref / scale, 0, 1e-8, what)


@built
@pytest.mark.parametrize("top_k", [None, 0.3])
def test_soft_iou_degenerate_maps_backward_float32(top_k):
    """float32 gradient on constant / all-zero maps: finite and == float64 autograd of naive on the
    same values, relative to each row's scale (a constant row's gradient is (dx - mean dx) / 1e-8)."""
    a, b = _degenerate_pairs(48, torch.float32)
    d = torch.linspace(-1.0, 2.0, a.shape[0])
    la, lb = a.double().requires_grad_(), b.double().requires_grad_()
    ga, gb = torch.autograd.grad(naive.soft_iou(la, lb, top_k, 0.1, 5, 1e-8), (la, lb), d.double())
    da, db = native.soft_iou_bwd(a, b, top_k, 0.1, 5, 1e-8, d)
    assert da.dtype == torch.float32
    assert torch.isfinite(da).all() and torch.isfinite(db).all()
    for got, ref, what in ((da, ga, "da"), (db, gb, "db")):
        scale = ref.abs().amax(-1, keepdim=True).clamp_min(1.0)
        _close(got.double() / scale, ref / scale, 0, 3e-5, what)


@built
@pytest.mark.parametrize("value", [0.001, 0.01, 0.2, 0.3, 0.5, 1.0, 7.0])
@pytest.mark.parametrize("top_k", [None, 0.3])
def test_soft_iou_constant_map_metrics_api(value, top_k, monkeypatch):
    """The user-level report: metrics.soft_iou(torch.ones(1,4,4) * v, rand) was NaN with the native
    (auto on CPU) backend where the reference is finite; forward and autograd gradients."""
    from fastfair import metrics
    monkeypatch.delenv("FASTFAIR_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    b0 = torch.rand(2, 4, 4, generator=g)
    a0 = torch.full((2, 4, 4), value)
    outs = {}
    for be in ("native", "reference", "auto"):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = metrics.soft_iou(a, b, top_k=top_k, backend=be)
        ga, gb = torch.autograd.grad(y.sum(), (a, b))
        outs[be] = (y.detach(), ga, gb)
    for be in ("native", "auto"):
        y, ga, gb = outs[be]
        assert torch.isfinite(y).all() and torch.isfinite(ga).all() and torch.isfinite(gb).all(), (be, y)
        _close(y, outs["reference"][0], 1e-4, 1e-5, f"{be} iou")
        _close(gb, outs["reference"][2], 1e-3, 1e-3, f"{be} db")
        scale = outs["reference"][1].abs().max().item() + 1.0  # (dx - mean dx) / 1e-8 on the constant map
        _close(ga / scale, outs["reference"][1] / scale, 0, 1e-4, f"{be} da")


# ------------------------------------------------------------------------------------------------
# backend selection and the missing-extension fallback
# ------------------------------------------------------------------------------------------------

@built
def test_auto_picks_native_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTFAIR_BACKEND", raising=False)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "native"
    assert "native" in ops.available_backends("cpu")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    """Without the extension auto runs the reference with one warning; native asked for by name (argument or
    FASTFAIR_BACKEND) raises with the cause and the way out -- it used to run the reference silently but for a
    warning, while the run recorded the backend asked for."""
    monkeypatch.delenv("FASTFAIR_BACKEND", raising=False)
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_C_ERR", ImportError("simulated"))
    monkeypatch.setattr(native, "_WARNED", False)
    cpu = torch.device("cpu")
    assert not native.usable(cpu)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ops.resolve_backend("auto", cpu) == "reference"
        assert ops.resolve_backend("reference", cpu) == "reference"
        out, maps = ops.cross_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                                        map_tokens=[1])
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "pip install" in msgs[0] and "\n" not in msgs[0]
    assert maps.shape == (1, 1, 3)
    for ask in (lambda: ops.resolve_backend("native", cpu),
                lambda: ops.cross_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                                            map_tokens=[1], backend="native")):
        with pytest.raises(RuntimeError, match=r"'native' is not usable.*simulated.*pip install.*'reference'"):
            ask()
    monkeypatch.setenv("FASTFAIR_BACKEND", "native")
    with pytest.raises(RuntimeError, match="not usable"):
        ops.resolve_backend("auto", cpu)


def test_package_imports_without_extension(monkeypatch):
    """fastfair.native re-imported with the compiled modules unavailable: still imports, auto falls back."""
    import importlib
    monkeypatch.delenv("FASTFAIR_BACKEND", raising=False)
    import fastfair
    cpu_mods = tuple(native.VARIANT_MODULES.values())  # every CPU variant (the loader would take another)
    saved = {m: sys.modules.get(m) for m in (*cpu_mods, "fastfair._native_cuda")}
    for m in saved:  # `from . import _native` looks at the package attribute first
        monkeypatch.delattr(fastfair, m.split(".")[1], raising=False)
    try:
        for m in saved:
            sys.modules[m] = None  # makes `import fastfair._native` raise ImportError
        mod = importlib.reload(native)
        assert not mod.usable("cpu") and not mod.available("cuda")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out, maps = ops.cross_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                                            map_tokens=[0])
            ops.cross_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
        assert len([x for x in w if "native extension" in str(x.message)]) == 1
        assert out.shape == (1, 1, 3, 4) and maps.shape == (1, 1, 3)
        with pytest.raises(RuntimeError, match="not built"):
            mod.cross_attention_fwd(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                                    None, None, 0.5, False)
    finally:
        for m, v in saved.items():
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v
                setattr(fastfair, m.split(".")[1], v)
        importlib.reload(native)
    assert native.available("cpu") == any(saved[m] is not None for m in cpu_mods)


# ------------------------------------------------------------------------------------------------
# CUDA sources compile (nvcc -arch=sm_90 -c), when nvcc is on PATH
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile():
    _start_nvcc()
    proc = _NVCC["proc"]
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        shutil.rmtree(_NVCC["dir"], ignore_errors=True)
        _NVCC["proc"] = None
    assert proc.returncode == 0, out[-4000:]
    assert "warning" not in out.lower(), out[-4000:]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_group_math_multilane_matches_serial():
    """The CUDA driver's lane-strided group code paths (WarpGroup / BlockGroup), emulated with threads."""
    _start_group_sim()
    proc = _SIM["proc"]
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        shutil.rmtree(_SIM["dir"], ignore_errors=True)
        _SIM["proc"] = None
    assert proc.returncode == 0 and out.strip().startswith("OK"), out[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not native.available("cuda"), reason="needs CUDA and the CUDA module")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_matches_reference(dtype):
    dev = torch.device("cuda")
    q, k, v, mk, tok = _inputs(2, 3, 65, 77, 40, 0, 3, dtype, seed=1, strided=True)
    q, k, v, tok = q.to(dev), k.to(dev), v.to(dev), tok.to(dev)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    for mk_ in (None, torch.randn(2, 3, 9, 40, dtype=dtype, device=dev)):
        tk = tok.clamp(max=8) if mk_ is not None else tok
        for per_head in (False, True):
            o = native.cross_attention_fwd(q, k, v, mk_, tk, 0.2, per_head)
            r = naive.cross_attention_fwd(q, k, v, mk_, tk, 0.2, per_head)
            for a, b in zip(o, r):
                _close(a, b, tol, tol)
            dout, dmaps = torch.randn_like(o[0]), torch.randn_like(o[3])
            go = native.cross_attention_bwd(q, k, v, mk_, tk, 0.2, per_head, *o[:3], dout, dmaps)
            gr = naive.cross_attention_bwd(q, k, v, mk_, tk, 0.2, per_head, *r[:3], dout, dmaps)
            for a, b in zip(go, gr):
                assert (a is None) == (b is None)
                if a is not None:
                    _close(a, b, 10 * tol, 10 * tol)
    a, b = _siou_inputs(3, 4096, dtype, seed=2)
    a, b = a.to(dev), b.to(dev)
    ref = naive.soft_iou(a.double(), b.double(), 0.3, 0.01, 20, 1e-8)
    _close(native.soft_iou_fwd(a, b, 0.3, 0.01, 20, 1e-8), ref, 1e-3, 1e-3)


@built
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux-only")
def test_one_openmp_runtime_in_the_process():
    """The CPU module's OpenMP must resolve to the libgomp torch loaded (one thread pool for both);
    a second runtime would bring back the two pools fighting over the cores."""
    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not torch_gomp.exists():
        pytest.skip("this torch build does not ship libgomp.so.1")
    native.cross_attention_fwd(*_inputs(1, 2, 70, 77, 40, 0, 3, torch.float32, seed=3), 0.2, False)
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(mapped) == 1, mapped
