"""Plain PyTorch reference for every fastfair kernel (the ``naive.py`` beside the kernels).

This module is the *specification* of the kernels: the Triton and native backends must agree
with it. It is written with explicit formulas (no autograd), chunked over queries so that it
never holds more than one ``chunk x Nk`` block of probabilities, and it is float64-friendly:
all math runs in ``acc_dtype(...)`` (float64 when any input is float64, else float32).

Notation, per batch b and head h::

    S  = q @ k^T * scale          (Nq, Nk)     P  = softmax(S)           lse = logsumexp(S)
    out = P @ v
    maps[b, t, n] = sum_h P[b, h, n, tok[b, t]]                     (head_reduce="sum")
    maps[b, h, t, n] = P[b, h, n, tok[b, t]]                         (head_reduce="none")

With ``mk`` (map_keys, the key set of a separate attribution prompt), the maps use
``Pm = softmax(q @ mk^T * scale)`` instead of ``P``; ``out`` still uses ``k`` and ``v``.

Backward (FlashAttention style, P recomputed from the saved LSE)::

    G[n, j]  = sum_t dmaps[t, n] * [tok[t] == j]      (scatter of the map gradient)
    dP  = dout @ v^T  (+ G when the maps come from P)
    dS  = P * (dP - rowsum(P * dP))        dq = scale * dS @ k   dk = scale * dS^T @ q   dv = P^T @ dout
    (with mk)  dSm = Pm * (G - rowsum(Pm * G))   dq += scale * dSm @ mk   dmk = scale * dSm^T @ q
"""
from __future__ import annotations

import math

import torch

# Largest number of query rows whose probabilities the reference holds at once.
DEFAULT_CHUNK = 1024


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (fp16/bf16 accumulate in fp32)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _exact(fn):
    """Run ``fn`` with autocast off: the reference promises float32 (float64) math, and under an enclosing
    ``torch.autocast`` its matmuls would otherwise run in the autocast dtype."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or not torch.is_autocast_enabled(t.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(t.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


def _gather_cols(p: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """p (B,H,n,Nk), tok (B,T) -> (B,H,T,n): the probabilities of the selected key columns."""
    B, H, n, _ = p.shape
    idx = tok[:, None, None, :].expand(B, H, n, tok.shape[1])
    return torch.gather(p, 3, idx).transpose(2, 3)


def _scatter_cols(g: torch.Tensor, tok: torch.Tensor, nk: int) -> torch.Tensor:
    """g (B,H,T,n), tok (B,T) -> G (B,H,n,Nk) with G[..., j] = sum_{t: tok[t]==j} g[..., t, :]."""
    B, H, T, n = g.shape
    G = g.new_zeros(B, H, n, nk)
    idx = tok[:, None, None, :].expand(B, H, n, T)
    G.scatter_add_(3, idx, g.transpose(2, 3))
    return G


@_exact
def cross_attention_fwd(q, k, v, mk, tok, scale: float, per_head: bool, chunk: int = DEFAULT_CHUNK):
    """Returns (out, lse, mlse, maps).

    q (B,H,Nq,D); k, v (B,H,Nk,D); mk (B,H,Nm,D) or None; tok (B,T) int64 or None.
    out has q's dtype; lse (B,H,Nq) and mlse (B,H,Nq) (empty when mk is None) and maps
    ((B,T,Nq) or (B,H,T,Nq); empty when tok is None) are in acc_dtype.
    """
    B, H, Nq, D = q.shape
    acc = acc_dtype(q, k, v, mk)
    kf, vf = k.to(acc), v.to(acc)
    mkf = mk.to(acc) if mk is not None else None
    out = torch.empty(B, H, Nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=acc, device=q.device)
    mlse = torch.empty(B, H, Nq if mk is not None else 0, dtype=acc, device=q.device)
    T = tok.shape[1] if tok is not None else 0
    if tok is None:
        maps = torch.empty(0, dtype=acc, device=q.device)
    elif per_head:
        maps = torch.empty(B, H, T, Nq, dtype=acc, device=q.device)
    else:
        maps = torch.empty(B, T, Nq, dtype=acc, device=q.device)
    for s, e in _chunks(Nq, chunk):
        qc = q[:, :, s:e].to(acc)
        sc = torch.matmul(qc, kf.transpose(-1, -2)) * scale
        l = torch.logsumexp(sc, dim=-1)
        p = torch.exp(sc - l[..., None])
        out[:, :, s:e] = torch.matmul(p, vf).to(q.dtype)
        lse[:, :, s:e] = l
        if mk is not None:
            sm = torch.matmul(qc, mkf.transpose(-1, -2)) * scale
            lm = torch.logsumexp(sm, dim=-1)
            mlse[:, :, s:e] = lm
        if tok is not None:
            if mk is not None:  # only the selected columns: exp(s - lse) there (the same bits as gathering P)
                sel = torch.exp(_gather_cols(sm, tok) - lm[:, :, None, :])
            else:
                sel = _gather_cols(p, tok)  # (B,H,T,n)
            if per_head:
                maps[:, :, :, s:e] = sel
            else:
                maps[:, :, s:e] = sel.sum(1)
    return out, lse, mlse, maps


@_exact
def attention_maps(q, mk, tok, scale: float, per_head: bool, chunk: int = DEFAULT_CHUNK):
    """Maps only: ``Pm = softmax(q @ mk^T * scale)`` at the ``tok`` columns, summed over heads
    (``per_head=False``: (B,T,Nq)) or not ((B,H,T,Nq)), in acc_dtype; no output, no LSE.
    The maps ``cross_attention_fwd(q, k, v, mk, tok, ...)`` gives for any k, v."""
    B, H, Nq, D = q.shape
    acc = acc_dtype(q, mk)
    mkf = mk.to(acc)
    T = tok.shape[1]
    maps = torch.empty((B, H, T, Nq) if per_head else (B, T, Nq), dtype=acc, device=q.device)
    for s, e in _chunks(Nq, chunk):
        sm = torch.matmul(q[:, :, s:e].to(acc), mkf.transpose(-1, -2)) * scale
        lm = torch.logsumexp(sm, dim=-1)
        sel = torch.exp(_gather_cols(sm, tok) - lm[:, :, None, :])  # (B,H,T,n); as cross_attention_fwd: same bits
        if per_head:
            maps[:, :, :, s:e] = sel
        else:
            maps[:, :, s:e] = sel.sum(1)
    return maps


@_exact
def cross_attention_bwd(q, k, v, mk, tok, scale: float, per_head: bool, out, lse, mlse, dout, dmaps,
                        needs=(True, True, True, True), chunk: int = DEFAULT_CHUNK):
    """Returns (dq, dk, dv, dmk); entries not in ``needs`` (or without a source) are None.

    ``dout`` may be None (no gradient reaches ``out``) and ``dmaps`` may be None.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    acc = acc_dtype(q, k, v, mk)
    kf, vf = k.to(acc), v.to(acc)
    mkf = mk.to(acc) if mk is not None else None
    need_q, need_k, need_v, need_mk = needs
    need_mk = need_mk and mk is not None
    dq = torch.zeros(B, H, Nq, D, dtype=acc, device=q.device) if need_q else None
    dk = torch.zeros_like(kf) if need_k else None
    dv = torch.zeros_like(vf) if need_v else None
    dmk = torch.zeros_like(mkf) if need_mk else None
    has_maps = tok is not None and dmaps is not None
    for s, e in _chunks(Nq, chunk):
        qc = q[:, :, s:e].to(acc)
        n = e - s
        p = torch.exp(torch.matmul(qc, kf.transpose(-1, -2)) * scale - lse[:, :, s:e, None].to(acc))
        g = None
        if has_maps:
            dm = dmaps[:, :, :, s:e] if per_head else dmaps[:, None, :, s:e].expand(B, H, -1, n)
            g = _scatter_cols(dm.to(acc), tok, mk.shape[2] if mk is not None else Nk)
        dp = torch.zeros(B, H, n, Nk, dtype=acc, device=q.device)
        if dout is not None:
            doc = dout[:, :, s:e].to(acc)
            dp = dp + torch.matmul(doc, vf.transpose(-1, -2))
            if need_v:
                dv += torch.matmul(p.transpose(-1, -2), doc)
        if g is not None and mk is None:
            dp = dp + g
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        if need_q:
            dq[:, :, s:e] += torch.matmul(ds, kf) * scale
        if need_k:
            dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
        if g is not None and mk is not None:
            pm = torch.exp(torch.matmul(qc, mkf.transpose(-1, -2)) * scale - mlse[:, :, s:e, None].to(acc))
            dsm = pm * (g - (pm * g).sum(-1, keepdim=True))
            if need_q:
                dq[:, :, s:e] += torch.matmul(dsm, mkf) * scale
            if need_mk:
                dmk += torch.matmul(dsm.transpose(-1, -2), qc) * scale
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return cast(dq, q), cast(dk, k), cast(dv, v), (cast(dmk, mk) if need_mk else None)


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


# --------------------------------------------------------------------------------------------
# SoftIoU (BiasMap): differentiable top-k soft masks by entropic optimal transport.
# --------------------------------------------------------------------------------------------

def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-row min-max normalisation of (N, n) maps to [0, 1]."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def sinkhorn_topk_mask(x: torch.Tensor, top_k: float, gamma: float, iters: int) -> torch.Tensor:
    """Soft top-k mask of each row of x (N, n), by log-domain Sinkhorn.

    The n values (uniform mass 1/n) are transported onto the two anchors {0, 1}, with mass
    (n-k)/n on 0 and k/n on 1, k = floor(top_k * n), and cost C_ij = (x_i - y_j)^2 / gamma.
    The mask is n * Gamma[:, 1]: ~1 on the k largest values, ~0 elsewhere. The iteration ends
    with the row update, so every row of the plan has mass exactly 1/n and the mask lies in [0, 1].
    BiasMap (differentiable_topk_mask) runs the same iteration on raw maps; fastfair applies it to
    min-max-normalised maps (see soft_iou), so the mask depends on the ranking of the values, not
    on their magnitude, and cannot overflow in half precision.
    """
    N, n = x.shape
    k = math.floor(top_k * n)
    if not 0 < k < n:
        raise ValueError(f"top_k={top_k} gives k={k} of n={n} elements; need 0 < k < n")
    y = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    cost = (x[..., None] - y) ** 2 / gamma  # (N, n, 2)
    log_mu = torch.full((n,), -math.log(n), dtype=x.dtype, device=x.device)
    log_nu = torch.tensor([math.log((n - k) / n), math.log(k / n)], dtype=x.dtype, device=x.device)
    f = torch.zeros(N, n, dtype=x.dtype, device=x.device)
    g = torch.zeros(N, 2, dtype=x.dtype, device=x.device)
    for _ in range(iters):  # BiasMap's order: column (anchor) update first, then rows
        g = log_nu - torch.logsumexp(f[:, :, None] - cost, dim=1)
        f = log_mu - torch.logsumexp(g[:, None, :] - cost, dim=2)
    log_plan = f[:, :, None] + g[:, None, :] - cost
    return n * torch.exp(log_plan[..., 1])


@_exact
def soft_iou(a: torch.Tensor, b: torch.Tensor, top_k: float | None = 0.3, gamma: float = 0.01,
             iters: int = 20, eps: float = 1e-8) -> torch.Tensor:
    """SoftIoU of (N, n) maps -> (N,). With top_k, each map becomes its Sinkhorn soft top-k mask
    (of its min-max-normalised values); without, the min-max-normalised maps are used directly.
    Result: sum(ab) / (sum(a) + sum(b) - sum(ab) + eps)."""
    a, b = minmax(a), minmax(b)
    if top_k is not None:
        a = sinkhorn_topk_mask(a, top_k, gamma, iters)
        b = sinkhorn_topk_mask(b, top_k, gamma, iters)
    inter = (a * b).sum(-1)
    return inter / (a.sum(-1) + b.sum(-1) - inter + eps)
