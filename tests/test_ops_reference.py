"""The reference backend of fastfair.ops against an explicit float64 softmax (independent of naive.py)."""
import pytest
import torch

from fastfair import ops


def explicit(q, k, v, tok, mk=None, scale=None, per_head=False):
    """Textbook attention in float64 with torch autograd: the independent reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = p @ v
    pm = p if mk is None else torch.softmax(q @ mk.transpose(-1, -2) * scale, dim=-1)
    B, H = q.shape[:2]
    sel = torch.stack([pm[b][:, :, tok[b]] for b in range(B)])  # (B,H,Nq,T)
    sel = sel.transpose(-1, -2)
    return out, (sel if per_head else sel.sum(1))


SHAPES = [  # B, H, Nq, Nk, D, T
    (1, 1, 1, 1, 8, 1), (2, 3, 17, 7, 40, 2), (1, 2, 65, 77, 80, 3), (2, 1, 33, 154, 160, 4),
    (1, 2, 9, 300, 16, 5), (3, 2, 31, 128, 64, 1),
]


@pytest.mark.parametrize("B,H,Nq,Nk,D,T", SHAPES)
@pytest.mark.parametrize("mode", ["plain", "per_batch_tokens", "map_keys", "per_head"])
def test_forward_and_backward_match_explicit_float64(B, H, Nq, Nk, D, T, mode):
    g = torch.Generator().manual_seed(Nq * 1000 + Nk)
    f64 = dict(dtype=torch.float64)
    q = torch.randn(B, H, Nq, D, generator=g, **f64, requires_grad=True)
    k = torch.randn(B, H, Nk, D, generator=g, **f64, requires_grad=True)
    v = torch.randn(B, H, Nk, D, generator=g, **f64, requires_grad=True)
    mk = None
    nkeys = Nk
    if mode == "map_keys":
        mk = torch.randn(B, H, 6, D, generator=g, **f64, requires_grad=True)
        nkeys = 6
    if mode == "per_batch_tokens":
        tok = torch.randint(0, nkeys, (B, T), generator=g)
    else:
        tok = torch.randint(0, nkeys, (T,), generator=g)
    tok_b = tok if tok.dim() == 2 else tok[None].expand(B, -1)
    per_head = mode == "per_head"
    out, maps = ops.cross_attention(q, k, v, map_tokens=tok, map_keys=mk, head_reduce="none" if per_head else "sum",
                                    backend="reference")
    eout, emaps = explicit(q, k, v, tok_b, mk, per_head=per_head)
    torch.testing.assert_close(out, eout, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maps, emaps, rtol=1e-10, atol=1e-12)
    # backward through out and maps together vs autograd of the explicit formula
    wo = torch.randn_like(out)
    wm = torch.randn_like(maps)
    inputs = [q, k, v] + ([mk] if mk is not None else [])
    got = torch.autograd.grad((out * wo).sum() + (maps * wm).sum(), inputs)
    exp = torch.autograd.grad((eout * wo).sum() + (emaps * wm).sum(), inputs)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_chunking_never_changes_results():
    from fastfair.kernels import naive

    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (50, 5, 5))
    tok = torch.tensor([[1, 3]])
    a = naive.cross_attention_fwd(q, k, v, None, tok, 0.3, False, chunk=7)
    b = naive.cross_attention_fwd(q, k, v, None, tok, 0.3, False, chunk=1024)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_gradcheck_small():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    mk = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    tok = torch.tensor([[0, 2], [1, 1]])
    assert torch.autograd.gradcheck(lambda *a: ops.cross_attention(*a, map_tokens=tok, backend="reference"), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v, mk: ops.cross_attention(q, k, v, map_tokens=tok, map_keys=mk, backend="reference"), (q, k, v, mk))


def test_no_maps_matches_sdpa_and_half_inputs():
    q, k, v = (torch.randn(2, 4, n, 40) for n in (64, 77, 77))
    out, maps = ops.cross_attention(q, k, v)
    assert maps is None
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    for dt in (torch.float16, torch.bfloat16):
        o, m = ops.cross_attention(q.to(dt), k.to(dt), v.to(dt), map_tokens=[1, 2])
        assert o.dtype == dt and m.dtype == torch.float32
        eo, em = explicit(q.double(), k.double(), v.double(), torch.tensor([[1, 2]] * 2))
        tol = 1e-2 if dt == torch.float16 else 5e-2
        torch.testing.assert_close(m.double(), em, rtol=tol, atol=tol)


def test_maps_of_all_keys_sum_to_heads():
    q, k, v = (torch.randn(1, 3, n, 8) for n in (10, 6, 6))
    _, maps = ops.cross_attention(q, k, v, map_tokens=torch.arange(6))
    torch.testing.assert_close(maps.sum(1), torch.full((1, 10), 3.0))


@pytest.mark.parametrize("kwargs,err", [
    (dict(map_tokens=[0, 9]), IndexError),
    (dict(map_tokens=[[0], [1], [2]]), ValueError),
    (dict(map_tokens=[0.5]), TypeError),
    (dict(head_reduce="mean", map_tokens=[0]), ValueError),
    (dict(backend="cuda-magic"), ValueError),
])
def test_bad_input(kwargs, err):
    q, k, v = (torch.randn(2, 1, n, 4) for n in (3, 5, 5))
    with pytest.raises(err):
        ops.cross_attention(q, k, v, **kwargs)


def test_map_keys_without_tokens_is_an_error():
    q, k, v = (torch.randn(1, 1, n, 4) for n in (3, 5, 5))
    with pytest.raises(ValueError, match="map_tokens"):
        ops.cross_attention(q, k, v, map_keys=torch.randn(1, 1, 2, 4))


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("FASTFAIR_BACKEND", "reference")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTFAIR_BACKEND", "nonsense")
    with pytest.raises(ValueError):
        ops.resolve_backend("auto", torch.device("cpu"))


def test_torch_compile_traces_the_custom_op():
    q, k, v = (torch.randn(1, 2, n, 8) for n in (12, 5, 5))
    f = torch.compile(lambda q, k, v: ops.cross_attention(q, k, v, map_tokens=[1, 3], backend="reference"),
                      backend="eager", fullgraph=True)
    o, m = f(q, k, v)
    eo, em = explicit(q.double(), k.double(), v.double(), torch.tensor([[1, 3]]))
    torch.testing.assert_close(m.double(), em, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("loss", ["out", "maps", "both"])
def test_eager_path_equals_the_custom_op(backend, loss):
    """Eager calls bypass the custom-op dispatch; values and gradients must equal the custom op's,
    including when one of the two outputs is unused (its gradient arrives as None)."""
    if backend == "native" and backend not in ops.available_backends("cpu"):
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(3)
    q0, k0, v0 = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for n in (19, 7, 7))
    tok = torch.tensor([[1, 4], [2, 6]])

    def run(eager):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        if eager:
            out, maps = ops.cross_attention(q, k, v, map_tokens=tok, backend=backend)
        else:
            out, _, _, maps = torch.ops.fastfair.xattn_fwd(q, k, v, None, tok, 0.25, False, backend)
        lo = out.square().sum() if loss in ("out", "both") else 0
        lm = maps.square().sum() if loss in ("maps", "both") else 0
        (lo + lm).backward()
        return out.detach(), maps.detach(), q.grad, k.grad, v.grad

    eager = run(True)
    op = run(False)
    for a, b in zip(eager, op):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # against the independent explicit softmax too
    q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
    eo, em = explicit(q, k, v, tok, scale=0.25)
    ((eo.square().sum() if loss != "maps" else 0) + (em.square().sum() if loss != "out" else 0)).backward()
    torch.testing.assert_close(eager[2], q.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(eager[3], k.grad, rtol=1e-9, atol=1e-10)


def test_token_check_cache_sees_changes():
    """The per-layer token check is cached per tensor; an in-place change must be re-checked."""
    q, k, v = (torch.randn(1, 1, n, 8) for n in (4, 3, 3))
    tok = torch.tensor([1])
    ops.cross_attention(q, k, v, map_tokens=tok)
    tok[0] = 5
    with pytest.raises(IndexError, match="map_tokens"):
        ops.cross_attention(q, k, v, map_tokens=tok)
    k5 = torch.randn(1, 1, 6, 8)
    ops.cross_attention(q, k5, k5, map_tokens=tok)  # same tensor, more keys: valid again


def test_auto_on_cuda_prefers_triton_then_native(monkeypatch):
    """The CUDA policy (measured on an H200, bench/RESULTS.md): triton, else native, else the reference.
    Only the usability tests are faked; no CUDA tensor is made."""
    monkeypatch.delenv("FASTFAIR_BACKEND", raising=False)
    cuda = torch.device("cuda")
    usable = {"triton": True, "native": True}
    for name in usable:
        monkeypatch.setattr(ops._BACKENDS[name], "usable", lambda d, n=name: usable[n] and d.type == "cuda")
    cc = [(9, 0)]
    monkeypatch.setattr(ops, "_capability", lambda d: cc[0])
    assert ops.resolve_backend("auto", cuda) == "triton"
    cc[0] = (8, 0)
    assert ops.resolve_backend("auto", cuda) == "triton"
    cc[0] = (8, 9)  # consumer Ada: tiles sized for its 99 KiB (tests/test_triton_compile.py)
    assert ops.resolve_backend("auto", cuda) == "triton"
    cc[0] = (12, 0)  # not compile-tested for triton: native
    assert ops.resolve_backend("auto", cuda) == "native"
    assert ops.resolve_backend("triton", cuda) == "triton"  # a named backend is still honoured
    cc[0] = (7, 5)  # Turing: the native module has no sm_75 code, triton's tiles do not fit 64 KiB
    assert ops.resolve_backend("auto", cuda) == "reference"
    cc[0] = (9, 0)
    usable["triton"] = False
    assert ops.resolve_backend("auto", cuda) == "native"
    usable["native"] = False
    assert ops.resolve_backend("auto", cuda) == "reference"
    monkeypatch.setenv("FASTFAIR_BACKEND", "reference")
    usable["triton"] = True
    assert ops.resolve_backend("auto", cuda) == "reference"


def test_soft_iou_auto_on_cuda_prefers_native(monkeypatch):
    """SoftIoU's own CUDA choice (native's kernels measured 3.5-4x faster than Triton's on an H200):
    native, else the cross-attention order (triton, reference); a named backend or FASTFAIR_BACKEND wins."""
    monkeypatch.delenv("FASTFAIR_BACKEND", raising=False)
    cuda = torch.device("cuda")
    usable = {"triton": True, "native": True}
    for name in usable:
        monkeypatch.setattr(ops._BACKENDS[name], "usable", lambda d, n=name: usable[n] and d.type == "cuda")
    cpu_usable = ops._native_usable
    monkeypatch.setattr(ops, "_native_usable", lambda d: usable["native"] if d.type == "cuda" else cpu_usable(d))
    monkeypatch.setattr(ops, "_capability", lambda d: (9, 0))
    assert ops._resolve_soft_iou("auto", cuda) == "native"
    assert ops.resolve_backend("auto", cuda) == "triton"  # cross attention keeps triton
    assert ops._resolve_soft_iou("triton", cuda) == "triton"
    assert ops._resolve_soft_iou("auto", torch.device("cpu")) == ops.resolve_backend("auto", torch.device("cpu"))
    usable["native"] = False
    assert ops._resolve_soft_iou("auto", cuda) == "triton"
    usable["native"] = True
    monkeypatch.setenv("FASTFAIR_BACKEND", "reference")
    assert ops._resolve_soft_iou("auto", cuda) == "reference"
