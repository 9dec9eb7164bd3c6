"""Triton cross-attention kernels against the float64 reference (naive.py).

CPU: runs the kernels under the Triton interpreter (TRITON_INTERPRET=1, see tests/triton_mode.py).
GPU: with CUDA and TRITON_INTERPRET unset/0 the same tests run on CUDA tensors in fp16/bf16/fp32
(``bench/gpu_kernels.sh``).

Accuracy criterion: fp32 -- max|tri - ref64| <= 1e-5 * max|ref64|; fp16/bf16 -- the error is at
most twice that of the reference run on the same half-precision inputs (naive.py computes in fp32
and rounds its outputs to the input dtype) plus a small absolute slack.
"""
from __future__ import annotations

import os

import pytest
import torch

from triton_mode import GPU, import_backend  # noqa: E402

T_OPS = import_backend()
from fastfair import ops  # noqa: E402
from fastfair.kernels import naive  # noqa: E402

DEV = "cuda" if GPU else "cpu"
HALF = [torch.float16, torch.bfloat16] if GPU else [torch.float16]  # interpreter bf16 dots are broken


@pytest.fixture(autouse=True)
def _interp_env(monkeypatch):
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.setenv("FASTFAIR_TRITON_AUTOTUNE", os.environ.get("FASTFAIR_TRITON_AUTOTUNE", "0"))
    T_OPS._OVERRIDE.clear()
    yield
    T_OPS._OVERRIDE.clear()


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _scale(b):
    return max(b.double().abs().max().item(), 1.0)  # floor: exactly-zero references (Nk = 1 -> dq = 0)


def _check(name, tri, ref64, half_ref, dtype, extra_atol=0.0):
    """tri, half_ref: results from the triton / naive backends on the same (maybe half) inputs."""
    if tri is None or ref64 is None:
        assert tri is None and ref64 is None, name
        return
    assert tri.shape == ref64.shape, (name, tri.shape, ref64.shape)
    if ref64.numel() == 0:
        return
    e = _err(tri, ref64)
    s = _scale(ref64)
    if dtype == torch.float32:
        tol = 1e-5 * s
    else:
        eps = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
        # fp16: at most twice the error of the reference on the same inputs (the acceptance bound).
        # bf16: four times -- the kernels round dS to bf16 for the tensor-core dot (as FlashAttention
        # does), which costs bf16's 8-bit mantissa once more than the fp32-accumulating reference;
        # on an H200 dq at Nk=77, D=40 came to 2.5x.
        factor = 2.0 if dtype == torch.float16 else 4.0
        tol = factor * _err(half_ref, ref64) + 0.05 * eps * s + extra_atol
    if os.environ.get("FF_DEBUG_TOL"): print(f"{name} {dtype} err {e:.2e} tol {tol:.2e} ratio {e / tol:.2f}")
    assert e <= tol, f"{name}: err {e:.3e} > tol {tol:.3e} (scale {s:.3e})"


def _inputs(B, H, Nq, Nk, D, dtype, DV=None, Nm=0, T=3, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    DV = DV or D
    if transposed:  # diffusers' layout: (B, Nq, H*D) viewed as (B, H, Nq, D)
        q = torch.randn(B, Nq, H, D, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, H, Nk, D, generator=g)
    v = torch.randn(B, H, Nk, DV, generator=g)
    mk = torch.randn(B, H, Nm, D, generator=g) if Nm else None
    nk = Nm or Nk
    tok = torch.randint(0, nk, (B, T), generator=g) if T else None
    if tok is not None and T >= 2:
        tok[:, -1] = tok[:, 0]  # a repeated token
    cvt = lambda t: None if t is None else t.to(dtype=dtype, device=DEV)  # noqa: E731
    return cvt(q), cvt(k), cvt(v), cvt(mk), (tok.to(DEV) if tok is not None else None)


def _d64(t):
    return None if t is None else t.double()


def _run_all(q, k, v, mk, tok, per_head, scale=None, needs=(True, True, True, True), with_dout=True,
             with_dmaps=True, seed=1):
    D = q.shape[-1]
    scale = naive.default_scale(D) if scale is None else scale
    dtype = q.dtype
    ref = naive.cross_attention_fwd(_d64(q), _d64(k), _d64(v), _d64(mk), tok, scale, per_head)
    half = naive.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
    tri = T_OPS.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
    for nm, a, b, c in zip(("out", "lse", "mlse", "maps"), tri, ref, half):
        _check(nm, a, b, c, dtype)
    assert tri[0].dtype == dtype and tri[1].dtype == torch.float32 and tri[3].dtype == torch.float32

    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(ref[0].shape, generator=g).to(dtype=dtype, device=DEV) if with_dout else None
    dmaps = (torch.randn(ref[3].shape, generator=g).to(DEV) if (with_dmaps and tok is not None) else None)
    mlse = lambda r: r[2] if mk is not None else None  # noqa: E731
    rb = naive.cross_attention_bwd(_d64(q), _d64(k), _d64(v), _d64(mk), tok, scale, per_head, ref[0], ref[1],
                                   mlse(ref), _d64(dout), _d64(dmaps), needs)
    hb = naive.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, half[0], half[1], mlse(half), dout, dmaps,
                                   needs)
    tb = T_OPS.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, tri[0], tri[1], mlse(tri), dout, dmaps,
                                   needs)
    for nm, a, b, c, like in zip(("dq", "dk", "dv", "dmk"), tb, rb, hb, (q, k, v, mk)):
        _check(nm, a, b, c, dtype)
        if a is not None:
            assert a.dtype == like.dtype, nm
    return tri, tb


# --------------------------------------------------------------------------------------------
# fp32 against float64: key counts, head dims, single-pass and online variants
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Nk", [1, 7, 77, 128, 154, 256])
def test_fp32_key_counts(Nk):
    q, k, v, mk, tok = _inputs(1, 2, 70, Nk, 40, torch.float32, T=3 if Nk > 1 else 1)
    _run_all(q, k, v, mk, tok, per_head=False)


@pytest.mark.parametrize("D", [64, 80, 160])
def test_fp32_head_dims(D):
    q, k, v, mk, tok = _inputs(1, 2, 37, 77, D, torch.float32)
    _run_all(q, k, v, mk, tok, per_head=D == 80)


def test_fp32_long_keys_online():
    T_OPS._OVERRIDE["NSPLIT"] = 2
    q, k, v, mk, tok = _inputs(1, 2, 70, 600, 40, torch.float32)
    _run_all(q, k, v, mk, tok, per_head=False)


def test_fp32_long_map_keys_online():
    q, k, v, mk, tok = _inputs(1, 2, 40, 300, 64, torch.float32, Nm=280)
    _run_all(q, k, v, mk, tok, per_head=False)


@pytest.mark.parametrize("split", [1, 0])
@pytest.mark.parametrize("Nk,D", [(77, 40), (154, 80), (100, 64)])
def test_split_key_tiles(split, Nk, D):
    """The single-pass forward over two key tiles (77 = 64 + 16, 154 = 128 + 32; 100 keeps one 128 tile) and
    over one (SPLIT_N=0) against the float64 reference, with maps and attribution keys."""
    T_OPS._OVERRIDE["SPLIT_N"] = split
    q, k, v, mk, tok = _inputs(2, 2, 70, Nk, D, torch.float32)
    _run_all(q, k, v, mk, tok, per_head=False)
    q, k, v, mk, tok = _inputs(1, 2, 40, Nk, D, torch.float32, Nm=12)
    _run_all(q, k, v, mk, tok, per_head=True)
    # guidance's backward (dq only, with and without dout): the split tiles there too
    q, k, v, mk, tok = _inputs(2, 2, 70, Nk, D, torch.float32)
    _run_all(q, k, v, mk, tok, per_head=False, needs=(True, False, False, False))
    _run_all(q, k, v, mk, tok, per_head=False, needs=(True, False, False, False), with_dout=False)


@pytest.mark.parametrize("per_head", [False, True])
def test_maps_only_attention_maps(per_head):
    """ops.attention_maps on the Triton backend (an MMDiT's further attribution prompts: the fused forward over
    one zero key, maps from 300 attribution keys) against float64 explicit softmax."""
    q, k, v, mk, tok = _inputs(2, 2, 40, 7, 64, torch.float32, Nm=300, T=3)
    got = ops.attention_maps(q, mk, tok, scale=0.125, head_reduce="none" if per_head else "sum", backend="triton")
    p = torch.softmax(q.double() @ mk.double().transpose(-1, -2) * 0.125, dim=-1)
    want = torch.stack([p[b][:, :, tok[b]] for b in range(2)]).transpose(2, 3)
    want = want if per_head else want.sum(1)
    assert _err(got, want) <= 1e-5 * _scale(want)


@pytest.mark.parametrize("per_head", [False, True])
def test_fp32_map_keys(per_head):
    q, k, v, mk, tok = _inputs(2, 2, 50, 77, 40, torch.float32, Nm=20, T=4)
    _run_all(q, k, v, mk, tok, per_head=per_head)


def test_fp32_value_dim_differs_and_scale():
    q, k, v, mk, tok = _inputs(1, 2, 33, 9, 40, torch.float32, DV=24)
    _run_all(q, k, v, mk, tok, per_head=False, scale=0.3)


def test_fp32_head_groups_splits_many_tokens():
    """Head groups with partial maps, Nq split in the fused backward, >64 tokens (maps-only pass)."""
    T_OPS._OVERRIDE.update(HEAD_GROUPS=2, NSPLIT=2, FWD_BLOCK_M=32, BWD_BLOCK_M=32)
    q, k, v, mk, tok = _inputs(1, 3, 70, 154, 40, torch.float32, T=70)
    _run_all(q, k, v, mk, tok, per_head=False)


def test_fp32_noncontiguous_and_no_tokens():
    q, k, v, mk, _ = _inputs(2, 2, 45, 77, 40, torch.float32, transposed=True)
    assert not q.is_contiguous()
    tri, _ = _run_all(q, k, v, None, None, per_head=False)
    assert tri[3].numel() == 0 and tri[2].shape == (2, 2, 0)


@pytest.mark.parametrize("case", ["dq_maps_only", "dq_dout_maps", "no_dout", "no_dmaps", "mk_no_dout"])
def test_fp32_partial_needs(case):
    Nm = 20 if case == "mk_no_dout" else 0
    q, k, v, mk, tok = _inputs(1, 2, 40, 77, 40, torch.float32, Nm=Nm)
    kw = dict(needs=(True, True, True, True))
    if case == "dq_maps_only":
        kw = dict(needs=(True, False, False, False), with_dout=False)
    elif case == "dq_dout_maps":
        kw = dict(needs=(True, False, False, False))
    elif case in ("no_dout", "mk_no_dout"):
        kw = dict(needs=(True, True, True, True), with_dout=False)
    elif case == "no_dmaps":
        kw = dict(needs=(True, True, True, True), with_dmaps=False)
    _, grads = _run_all(q, k, v, mk, tok, per_head=False, **kw)
    if case.startswith("dq"):
        assert grads[1] is None and grads[2] is None


# --------------------------------------------------------------------------------------------
# half precision: at most twice the error of the reference on the same inputs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("Nk,D,Nm", [(77, 40, 0), (154, 80, 0), (77, 64, 30), (600, 40, 0)])
def test_half(dtype, Nk, D, Nm):
    q, k, v, mk, tok = _inputs(1, 2, 70, Nk, D, dtype, Nm=Nm)
    _run_all(q, k, v, mk, tok, per_head=False)


def test_unfused_single_tile_backward(monkeypatch):
    """dk/dv through the separate kernel even when every key set fits one tile."""
    monkeypatch.setitem(T_OPS._OVERRIDE, "NO_FUSE", True)
    q, k, v, mk, tok = _inputs(1, 2, 70, 77, 40, torch.float32, Nm=20)
    _run_all(q, k, v, mk, tok, per_head=False)
    q, k, v, mk, tok = _inputs(1, 2, 70, 77, 40, torch.float32)
    _run_all(q, k, v, mk, tok, per_head=True)


@pytest.mark.parametrize("Nk,no_fuse", [(77, True), (200, False)])
def test_unfused_map_keys_without_their_grad(monkeypatch, Nk, no_fuse):
    """Attribution keys that need no gradient (guidance's fixed attribution prompt) with dk / dv through the
    separate kernel: the dq kernel's delta_map once landed in the saved LSE (the placeholder for the unused
    buffer), so dk and dv came out 10-700x off and a second backward through the same graph differed."""
    if no_fuse:
        monkeypatch.setitem(T_OPS._OVERRIDE, "NO_FUSE", True)
    q, k, v, mk, tok = _inputs(1, 2, 20, Nk, 16, torch.float32, Nm=6)
    tri = T_OPS.cross_attention_fwd(q, k, v, mk, tok, 0.25, False)
    lse = tri[1].clone()
    _run_all(q, k, v, mk, tok, per_head=False, needs=(True, True, True, False))
    T_OPS.cross_attention_bwd(q, k, v, mk, tok, 0.25, False, tri[0], tri[1], tri[2], torch.randn_like(tri[0]),
                              torch.randn_like(tri[3]), (True, True, True, False))
    assert torch.equal(tri[1], lse), "the backward wrote into the saved log-sum-exp"


# --------------------------------------------------------------------------------------------
# the custom op: backend="triton" equals backend="reference", gradients included
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_mk", [False, True])
def test_custom_op_matches_reference(use_mk):
    q, k, v, mk, tok = _inputs(2, 2, 40, 77, 40, torch.float32, Nm=20 if use_mk else 0)
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        mk_ = mk.detach().clone().requires_grad_(True) if use_mk else None
        out, maps = ops.cross_attention(*leaves, map_tokens=tok, map_keys=mk_, backend=backend)
        loss = (out.float() ** 2).sum() + (maps * torch.linspace(0, 1, maps.shape[-1], device=DEV)).sum()
        loss.backward()
        grads = [t.grad for t in leaves] + ([mk_.grad] if use_mk else [])
        results[backend] = [out, maps] + grads
    for a, b in zip(results["triton"], results["reference"]):
        assert _err(a, b) <= 1e-5 * _scale(b)


def test_custom_op_guidance_path_dq_only():
    """Guidance: gradient of a map loss into q only (k, v frozen)."""
    q, k, v, _, tok = _inputs(1, 2, 40, 77, 40, torch.float32)
    res = {}
    for backend in ("reference", "triton"):
        q_ = q.detach().clone().requires_grad_(True)
        _, maps = ops.cross_attention(q_, k, v, map_tokens=tok[0], head_reduce="none", backend=backend)
        (maps[:, :, 0] - maps[:, :, 1]).pow(2).sum().backward()
        res[backend] = q_.grad
    assert _err(res["triton"], res["reference"]) <= 1e-5 * _scale(res["reference"])


def test_float64_falls_back_to_reference():
    q, k, v, mk, tok = _inputs(1, 2, 20, 7, 16, torch.float64)
    tri = T_OPS.cross_attention_fwd(q, k, v, None, tok, 0.25, False)
    ref = naive.cross_attention_fwd(q, k, v, None, tok, 0.25, False)
    assert tri[0].dtype == torch.float64 and torch.allclose(tri[3], ref[3])


# --------------------------------------------------------------------------------------------
# GPU only: realistic shapes and the autotuned path
# --------------------------------------------------------------------------------------------

_GPU_CASES = [(torch.float16, 1024, 8, 40, 77), (torch.float16, 256, 8, 80, 77), (torch.float16, 64, 8, 160, 77),
              (torch.float16, 1024, 10, 64, 77), (torch.float16, 512, 4, 64, 1200),
              (torch.bfloat16, 1024, 8, 40, 77), (torch.bfloat16, 256, 8, 80, 77), (torch.bfloat16, 512, 4, 64, 1200),
              (torch.float32, 1024, 10, 64, 77)]


@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype,Nq,H,D,Nk", _GPU_CASES)
def test_gpu_diffusion_shapes(dtype, Nq, H, D, Nk):
    q, k, v, mk, tok = _inputs(2, H, Nq, Nk, D, dtype, T=4, transposed=True)
    _run_all(q, k, v, mk, tok, per_head=False)


@pytest.mark.skipif(not GPU, reason="needs CUDA")
def test_gpu_autotuned(monkeypatch):
    monkeypatch.setenv("FASTFAIR_TRITON_AUTOTUNE", "1")
    q, k, v, mk, tok = _inputs(2, 8, 1024, 77, 40, torch.float16, T=4)
    _run_all(q, k, v, mk, tok, per_head=False)


# --------------------------------------------------------------------------------------------
# guarded buffers with the GPU's tiles: no read outside the inputs, no write outside the outputs
# --------------------------------------------------------------------------------------------

_PAD = 2048
_SENT = 7777.0


class _GuardedTorch:
    """Stands in for ``torch`` inside triton_ops: every ``torch.empty`` (outputs, partials) lies inside
    a larger buffer filled with a sentinel, so a store outside the tensor shows in the guard bands."""

    def __init__(self):
        self.bufs = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype=None, device=None, **kw):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        n = 1
        for s in shape:
            n *= int(s)
        buf = torch.full((n + 2 * _PAD,), _SENT, dtype=dtype or torch.float32, device=device)
        self.bufs.append((buf, n))
        return buf[_PAD:_PAD + n].view(shape)

    def written_guards(self):
        bad = []
        for buf, n in self.bufs:
            band = torch.cat([buf[:_PAD], buf[_PAD + n:]])
            hit = int((band != torch.tensor(_SENT, dtype=buf.dtype)).sum())
            if hit:
                bad.append((n, buf.dtype, hit))
        return bad


def _nan_guarded(t, rowpad=0, diffusers=True):
    """t (B,H,N,D) -> (guard buffer, view with t's values): diffusers' (B, N, H*D [+ rowpad]) layout
    inside a NaN-filled buffer with NaN guard bands (and NaN row padding), so any read outside t
    turns results into NaN."""
    B, H, N, D = t.shape
    W = H * D + rowpad
    n = B * N * W
    buf = torch.full((n + 2 * _PAD,), float("nan"), dtype=t.dtype, device=t.device)
    base = buf[_PAD:_PAD + n].view(B, N, W)
    base[:, :, :H * D] = t.transpose(1, 2).reshape(B, N, H * D)
    return buf, base[:, :, :H * D].view(B, N, H, D).transpose(1, 2)


def _guarded_run(monkeypatch, B, H, Nq, Nk, D, dtype, mode, rowpad=16, T=8, overrides=()):
    """Forward + backward ("full" or "maps_dq": map loss into q only, no dout) with the tiles a GPU
    would choose (GPU_CONFIG, two waves of 132 SMs) on guarded diffusers-layout inputs; checks the
    float64 reference, the guard bands of every output and that no input changed."""
    T_OPS._OVERRIDE.update(GPU_CONFIG=True, TARGET_PROGRAMS=264, **dict(overrides))
    gt = _GuardedTorch()
    monkeypatch.setattr(T_OPS, "torch", gt)
    g = torch.Generator().manual_seed(3)
    q0, k0, v0 = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (Nq, Nk, Nk))
    (qb, q), (kb, k), (vb, v) = (_nan_guarded(t, rowpad) for t in (q0, k0, v0))
    tok = (torch.arange(1, T + 1) % Nk)[None].expand(B, -1).contiguous()
    scale = naive.default_scale(D)
    out, lse, mlse, maps = T_OPS.cross_attention_fwd(q, k, v, None, tok, scale, False)
    ref = naive.cross_attention_fwd(q0.double(), k0.double(), v0.double(), None, tok, scale, False)
    half = naive.cross_attention_fwd(q0, k0, v0, None, tok, scale, False)
    for nm, a, b, c in zip(("out", "lse", "maps"), (out, lse, maps), (ref[0], ref[1], ref[3]), (half[0], half[1], half[3])):
        _check(nm, a, b, c, dtype)
    dmaps = torch.randn(ref[3].shape, generator=g)
    dout = torch.randn(out.shape, generator=g).to(dtype) if mode == "full" else None
    needs = (True, True, True, False) if mode == "full" else (True, False, False, False)
    snap = [t.clone() for t in (qb, kb, vb, lse, dmaps, tok)]
    grads = T_OPS.cross_attention_bwd(q, k, v, None, tok, scale, False, out, lse, None, dout, dmaps, needs)
    d64 = None if dout is None else dout.double()
    rb = naive.cross_attention_bwd(q0.double(), k0.double(), v0.double(), None, tok, scale, False, ref[0], ref[1],
                                   None, d64, dmaps.double(), needs)
    hb = naive.cross_attention_bwd(q0, k0, v0, None, tok, scale, False, half[0], half[1], None, dout, dmaps, needs)
    for nm, a, b, c in zip(("dq", "dk", "dv"), grads, rb, hb):
        _check(nm, a, b, c, dtype)
    assert not gt.written_guards(), gt.written_guards()
    for a, b in zip(snap, (qb, kb, vb, lse, dmaps, tok)):
        assert torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0)), "an input was written"
    return grads


@pytest.mark.skipif(GPU, reason="interpreter harness (guards via torch.empty)")
@pytest.mark.parametrize("block_m", [None, 64])
def test_guarded_maps_dq_d80_gpu_tiles(monkeypatch, block_m):
    """bench/repro_maps_dq.py's case (map loss -> dq only, D=80, fp16, diffusers layout), reduced to
    B=1, H=2, Nq=130, with the GPU's tiles; block_m=64 forces the 64-row tile that faulted on the
    H200 (8 warps there; the interpreter has no warps): the kernel logic is right at both tiles."""
    ov = {} if block_m is None else {"BWD_BLOCK_M": block_m}
    dq, dk, dv, _ = _guarded_run(monkeypatch, 1, 2, 130, 77, 80, torch.float16, "maps_dq", overrides=ov)
    assert dk is None and dv is None


@pytest.mark.skipif(GPU, reason="interpreter harness (guards via torch.empty)")
def test_guarded_full_nk154_d80_gpu_tiles(monkeypatch):
    """Nk=154, D=80 with the GPU's tiles: 128-key online forward (no 256x128 tile), online dq, separate
    dk/dv kernel with 64-key blocks."""
    _guarded_run(monkeypatch, 1, 2, 70, 154, 80, torch.float16, "full")


@pytest.mark.skipif(GPU, reason="interpreter harness (guards via torch.empty)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_guarded_d160_gpu_tiles(monkeypatch, dtype):
    """D=160 on the GPU's tiles: 64-key (fp16) / 32-key (fp32) forward and dq tiles, separate dk/dv
    kernel with 32- / 16-key blocks; fp32 runs 16-row backward tiles."""
    _guarded_run(monkeypatch, 1, 1, 40, 77, 160, dtype, "full", T=4)


@pytest.mark.skipif(GPU, reason="interpreter harness (guards via torch.empty)")
@pytest.mark.parametrize("dtype,D", [(torch.float32, 80), (torch.float32, 160), (torch.float16, 80)])
def test_guarded_small_smem_gpu_tiles(monkeypatch, dtype, D):
    """The tiles of a 99 KiB GPU (sm_86 / sm_89): half-size key tiles (online softmax over more tiles),
    single-buffered forward, 16-row fp32 backward at D > 64 -- against float64, guard bands intact."""
    _guarded_run(monkeypatch, 1, 1, 40, 77, D, dtype, "full", T=4, overrides={"SMEM_BUDGET": 101376})


def test_mixed_dtypes_promote():
    """q fp16 with fp32 keys and values: computed in fp32 as the reference (k, v were narrowed to fp16: maps
    2e-4 off); out and dq keep q's dtype, dk / dv their inputs'."""
    q, k, v, _, tok = _inputs(1, 2, 20, 77, 40, torch.float32)
    qh = q.half()
    tri = T_OPS.cross_attention_fwd(qh, k, v, None, tok, 0.2, False)
    ref = naive.cross_attention_fwd(qh.double(), k.double(), v.double(), None, tok, 0.2, False)
    assert tri[0].dtype == torch.float16
    assert _err(tri[3], ref[3]) <= 1e-5 * _scale(ref[3])
    dout = torch.randn(tri[0].shape, device=DEV).half()
    dm = torch.randn(tri[3].shape, device=DEV)
    tb = T_OPS.cross_attention_bwd(qh, k, v, None, tok, 0.2, False, tri[0], tri[1], tri[2], dout, dm,
                                   (True, True, True, False))
    rb = naive.cross_attention_bwd(qh.double(), k.double(), v.double(), None, tok, 0.2, False, ref[0], ref[1],
                                   None, dout.double(), dm.double(), (True, True, True, False))
    assert (tb[0].dtype, tb[1].dtype, tb[2].dtype) == (torch.float16, torch.float32, torch.float32)
    for a, b in zip(tb[1:3], rb[1:3]):
        assert _err(a, b) <= 1e-5 * _scale(b)


@pytest.mark.skipif(GPU, reason="the interpreter's limitation")
def test_interpreter_refuses_bf16():
    q, k, v, _, tok = _inputs(1, 1, 4, 7, 16, torch.float32)
    with pytest.raises(TypeError, match="bfloat16"):
        T_OPS.cross_attention_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, tok, 0.25, False)
    with pytest.raises(TypeError, match="bfloat16"):
        T_OPS.soft_iou_fwd(torch.rand(2, 64).bfloat16(), torch.rand(2, 64).bfloat16(), 0.3, 0.01, 5, 1e-8)


def test_forced_config_is_the_one_launched():
    """``_OVERRIDE["FORCE"]`` (bench/repro_dft_fault.py runs every autotune candidate with it): the forward launches
    with exactly the forced tile -- a 16-row tile gives the same result as the default, an impossible 24-row one
    (not a power of two) fails in the kernel, so the forced config is what ran."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, device=DEV) for n in (40, 7, 7))
    tok = torch.tensor([[1, 3]], device=DEV)
    base = T_OPS.cross_attention_fwd(q, k, v, None, tok, 0.25, False)
    T_OPS._OVERRIDE["FORCE"] = (("fwd", (("BLOCK_M", 16), ("num_stages", 1), ("num_warps", 4))),)
    forced = T_OPS.cross_attention_fwd(q, k, v, None, tok, 0.25, False)
    for a, b in zip(base, forced):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    T_OPS._OVERRIDE["FORCE"] = (("fwd", (("BLOCK_M", 24), ("num_stages", 1), ("num_warps", 4))),)
    with pytest.raises(Exception, match="power of 2|power-of-two|arange"):
        T_OPS.cross_attention_fwd(q, k, v, None, tok, 0.25, False)
