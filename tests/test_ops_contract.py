"""The edges of the fastfair.ops contract on CPU (reference and native backends): empty sizes, token handling,
mixed and half dtypes, autocast, torch.compile before any eager call, validation, and double backward -- each
against an explicit float64 computation written here (found by a helper's review of the op library)."""
import math

import pytest
import torch

from fastfair import ops

BACKENDS = [b for b in ("reference", "native") if b in ops.available_backends("cpu")]


def explicit(q, k, v, tok):
    """Textbook attention in float64: out and the maps of tokens ``tok`` summed over heads."""
    q, k, v = q.double(), k.double(), v.double()
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return p @ v, p[..., tok].sum(1).transpose(-1, -2)


def explicit_soft_iou(a, b, top_k=0.3, gamma=0.01, iters=20, eps=1e-8):
    """SoftIoU of (N, n) maps in float64: min-max, log-domain Sinkhorn onto {0, 1} (columns, then rows)."""
    def mask(x):
        x = (x - x.min(-1, keepdim=True).values) / (x.max(-1, keepdim=True).values - x.min(-1, keepdim=True).values + 1e-8)
        n = x.shape[-1]
        kk = math.floor(top_k * n)
        cost = torch.stack([x ** 2, (x - 1) ** 2], -1) / gamma
        lmu = -math.log(n)
        lnu = torch.tensor([math.log((n - kk) / n), math.log(kk / n)], dtype=x.dtype)
        f = torch.zeros_like(x)
        for _ in range(iters):
            g = lnu - torch.logsumexp(f[..., None] - cost, dim=-2)
            f = lmu - torch.logsumexp(g[..., None, :] - cost, dim=-1)
        return n * torch.exp(f + g[..., None, 1] - cost[..., 1])
    a, b = mask(a.double()), mask(b.double())
    inter = (a * b).sum(-1)
    return inter / (a.sum(-1) + b.sum(-1) - inter + eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 4), (2, 0, 4), (2, 2, 0)])
def test_empty_sizes(backend, shape):
    """An empty batch, head or query set gives empty outputs and gradients (native divided by them: SIGFPE)."""
    B, H, Nq = shape
    q = torch.randn(B, H, Nq, 8, requires_grad=True)
    k = torch.randn(B, H, 5, 8, requires_grad=True)
    v = torch.randn(B, H, 5, 8, requires_grad=True)
    out, maps = ops.cross_attention(q, k, v, map_tokens=[1, 3], backend=backend)
    assert out.shape == (B, H, Nq, 8) and maps.shape == (B, 2, Nq)
    (out.sum() + maps.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and not k.grad.abs().sum()


def test_head_dim_zero_is_refused():
    with pytest.raises(ValueError, match="head dims"):
        ops.cross_attention(torch.randn(1, 1, 2, 0), torch.randn(1, 1, 3, 0), torch.randn(1, 1, 3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_changed_in_place_are_read_again(backend):
    """A token tensor changed without a version bump (.data, a numpy view) gives the new tokens' maps."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(2)), None, None
    q, k = q
    v = torch.randn(1, 2, 6, 8, generator=g)
    k = torch.randn(1, 2, 6, 8, generator=g)
    for dtype in (torch.int32, torch.int64):
        tok = torch.tensor([1, 2], dtype=dtype)
        ops.cross_attention(q, k, v, map_tokens=tok, backend=backend)
        tok.data[:] = torch.tensor([4, 5], dtype=dtype)
        _, maps = ops.cross_attention(q, k, v, map_tokens=tok, backend=backend)
        torch.testing.assert_close(maps.double(), explicit(q, k, v, [4, 5])[1], rtol=1e-5, atol=1e-6)
        tok.numpy()[:] = [0, 9]
        with pytest.raises(IndexError, match=r"\[0, 6\)"):
            ops.cross_attention(q, k, v, map_tokens=tok, backend=backend)


def test_token_forms():
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    with torch.inference_mode():
        tok = torch.tensor([1, 4])
    _, maps = ops.cross_attention(q, k, v, map_tokens=tok)  # an inference tensor (no version counter)
    torch.testing.assert_close(maps.double(), explicit(q, k, v, [1, 4])[1], rtol=1e-5, atol=1e-6)
    _, maps = ops.cross_attention(q, k, v, map_tokens=torch.tensor([1, 4], dtype=torch.int8))
    torch.testing.assert_close(maps.double(), explicit(q, k, v, [1, 4])[1], rtol=1e-5, atol=1e-6)
    _, maps = ops.cross_attention(q, k, v, map_tokens=[])
    assert maps.shape == (1, 0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_tokens_under_compile(backend):
    """Compiled graphs check the token range inside the op (dynamo cannot at trace time): a clear IndexError,
    never all-zero maps or a segfault."""
    torch._dynamo.reset()
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    f = torch.compile(lambda q, k, v, t: ops.cross_attention(q, k, v, map_tokens=t, backend=backend)[1],
                      backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(q, k, v, torch.tensor([1, 4])).double(), explicit(q, k, v, [1, 4])[1],
                               rtol=1e-5, atol=1e-6)
    for bad in (5, -1, 10 ** 8):
        with pytest.raises(IndexError, match=r"\[0, 5\)"):
            f(q, k, v, torch.tensor([bad]))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_compile_fullgraph_before_any_eager_call(backend):
    """The backend is resolved at trace time even when no eager call cached it (dynamo cannot trace the
    extension's import)."""
    torch._dynamo.reset()
    ops._RESOLVED.clear()
    q = torch.randn(1, 2, 3, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)

    def f(q):
        o, m = ops.cross_attention(q, k, v, map_tokens=[1, 3], backend=backend)
        return o.sum() + m.square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    loss.backward()
    q64 = q.detach().double().requires_grad_()
    o, m = explicit(q64, k, v, [1, 3])
    (o.sum() + m.square().sum()).backward()
    torch.testing.assert_close(loss.double(), o.sum().detach() + m.square().sum().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_clearly(backend):
    """A gradient penalty through cross_attention once came out silently wrong on the reference backend."""
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(1, 1, 5, 8, dtype=torch.float64), torch.randn(1, 1, 5, 8, dtype=torch.float64)
    out, maps = ops.cross_attention(q, k, v, map_tokens=[1, 3], backend=backend)
    (g,) = torch.autograd.grad((out ** 2).sum() + (maps ** 3).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((g ** 2).sum(), q)
    a = torch.rand(2, 16, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 16, dtype=torch.float64)
    (ga,) = torch.autograd.grad(ops.soft_iou(a, b, backend=backend).sum(), a, create_graph=True)
    if backend == "reference":  # plain autograd: second derivatives are right
        a64 = a.detach().requires_grad_()
        (ge,) = torch.autograd.grad(explicit_soft_iou(a64, b).sum(), a64, create_graph=True)
        torch.testing.assert_close(torch.autograd.grad((ga ** 2).sum(), a)[0],
                                   torch.autograd.grad((ge ** 2).sum(), a64)[0], rtol=1e-6, atol=1e-9)
    else:
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad((ga ** 2).sum(), a)


def test_reference_ignores_autocast():
    """The reference computes in float32 inside a bf16 autocast region (its matmuls ran in bf16: 1e-2 off)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 32, generator=g) for _ in range(3))
    out64, maps64 = explicit(q, k, v, [2, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, maps = ops.cross_attention(q, k, v, map_tokens=[2, 5], backend="reference")
        maps2 = ops.attention_maps(q, k, [2, 5])
    for got, want in ((out, out64), (maps, maps64), (maps2, maps64)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_iou_validation_and_dtypes(backend):
    a, b = torch.rand(3, 64), torch.rand(3, 64)
    for kw, msg in (({"iters": -1}, "iters"), ({"iters": 0}, "iters"), ({"gamma": 0.0}, "gamma"),
                    ({"eps": -1.0}, "eps")):
        with pytest.raises(ValueError, match=msg):
            ops.soft_iou(a, b, backend=backend, **kw)
    assert ops.soft_iou(a[:0], b[:0], backend=backend).shape == (0,)
    want = explicit_soft_iou(a, b)
    for dt, tol in ((torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)):
        ah, bh = a.to(dt), b.to(dt)
        got = ops.soft_iou(ah, bh, backend=backend)
        assert got.dtype == dt
        # float32 math: only the output's rounding (before: the reference ran Sinkhorn in half, 5x this)
        torch.testing.assert_close(got.double(), explicit_soft_iou(ah, bh), rtol=tol, atol=1e-6)
    mixed = ops.soft_iou(a.half(), b, backend=backend)
    assert mixed.dtype == torch.float32  # the dtypes promote, whichever comes first
    torch.testing.assert_close(mixed.double(), explicit_soft_iou(a.half(), b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.soft_iou(a, b, backend=backend).double(), want, rtol=1e-5, atol=1e-6)
