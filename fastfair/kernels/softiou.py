"""Triton kernels for BiasMap's SoftIoU (``naive.soft_iou``): one program per row (map pair).

Per row: min-max normalise a and b, Sinkhorn soft top-k masks (log-domain Sinkhorn of the n
values onto the anchors {0, 1} with masses (n-k)/n and k/n, cost (x-y)^2/gamma, mask =
n * plan[:, 1]), then sum(ab) / (sum a + sum b - sum ab + eps). The row is processed in blocks of
``BLOCK`` elements, so any row length works; the dual vector f (n values) is never stored: it is
an elementwise function of x and the two-value dual g, so every pass recomputes it.

Iteration (BiasMap's order, as ``naive.sinkhorn_topk_mask``), f^0 = 0::

    g^t_j = log nu_j - LSE_i(f^{t-1}_i - C_ij)        (a reduction over the row: one pass)
    f^t_i = log mu   - LSE_j(g^t_j - C_ij)            (elementwise in x_i and g^t)
    mask_i = n exp(f^T_i + g^T_1 - C_i1)

Backward is the exact gradient of the unrolled iterations (what torch autograd computes on
``naive.soft_iou``). The duals g^t and their adjoints dg^t (two scalars each, t = 0..T) live in
registers (``ITERS_P``-wide vectors); each reverse iteration is one pass over the row (a
reduction for dg^t); a last pass accumulates dC over all iterations elementwise and chains through
the cost and the min-max normalisation (ties at min/max share the gradient evenly, as torch's
amin/amax do).

Precision: with gamma = 0.01 the costs reach 1/gamma = 100 and every exponent argument is a sum of
terms of that size that mostly cancel; in fp32 that alone costs ~1e-5 relative error. So the
argument arithmetic (x, costs, duals, exponents' arguments) runs in fp64 and only the
transcendentals (exp, log of O(1) arguments after the cancellation) and the sums run in fp32:
near-fp32 accuracy of the result at a small fraction of the cost of fp64 exp/log.
Scalars lmu, lnu0, lnu1, inv_gamma come in an fp64 tensor ``PRM`` (Triton float args are fp32).
"""
from __future__ import annotations

import triton
import triton.language as tl

NEG = -1.0e30


@triton.jit
def _cost(x, inv_gamma):
    """x fp64 -> fp64 costs to the anchors 0 and 1."""
    return x * x * inv_gamma, (x - 1.0) * (x - 1.0) * inv_gamma


@triton.jit
def _e(z):
    """exp of an fp64 argument (already cancelled down to O(1)) in fp32."""
    return tl.exp(z.to(tl.float32))


@triton.jit
def _fdual(c0, c1, g0, g1, lmu):
    u = g0 - c0
    v = g1 - c1
    m = tl.maximum(u, v)
    return lmu - m - tl.log(1.0 + tl.exp(-(tl.abs(u - v).to(tl.float32)))).to(tl.float64)


@triton.jit
def _lse_update(M, S, e, mask):
    e = tl.where(mask, e, -1.0e30)
    M_new = tl.maximum(M, e)
    S = S * _e(M - M_new) + tl.where(mask, _e(e - M_new), 0.0)
    return M_new, S


@triton.jit
def _lse_finish(M, S):
    Mx = tl.max(M, 0)
    return Mx + tl.log(tl.sum(S * _e(M - Mx), 0)).to(tl.float64)


@triton.jit
def _getv(vec, idx, t):
    return tl.sum(tl.where(idx == t, vec, 0.0), 0)


@triton.jit
def _minmax(P, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    lo_v = tl.full((BLOCK,), float("inf"), dtype=tl.float32)
    hi_v = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        a = tl.load(P + idx, mask=m, other=0.0).to(tl.float32)
        lo_v = tl.minimum(lo_v, tl.where(m, a, float("inf")))
        hi_v = tl.maximum(hi_v, tl.where(m, a, float("-inf")))
    return tl.min(lo_v, 0), tl.max(hi_v, 0)


@triton.jit
def _f_prev(c0, c1, g0, g1, lmu, has_f):
    """f^{t-1} from g^{t-1}; f^0 = 0 (has_f False)."""
    return tl.where(has_f, _fdual(c0, c1, g0, g1, lmu), 0.0)


@triton.jit
def _load_x(P, idx, m, lo, r):
    """min-max normalised values in fp64 (lo fp64, r = hi - lo + 1e-8 fp64)."""
    return (tl.load(P + idx, mask=m, other=0.0).to(tl.float64) - lo) / r


@triton.jit
def _sinkhorn_pass(PA, PB, n, lo_a, ra, lo_b, rb, ga0, ga1, gb0, gb1, has_f, inv_gamma, lmu,
                   BLOCK: tl.constexpr):
    """LSE_i(f_i - c_ij) for both maps, f = f(g) elementwise (or 0 when not has_f)."""
    offs = tl.arange(0, BLOCK)
    Ma0 = tl.full((BLOCK,), -1.0e30, dtype=tl.float64)
    Ma1 = tl.full((BLOCK,), -1.0e30, dtype=tl.float64)
    Mb0 = tl.full((BLOCK,), -1.0e30, dtype=tl.float64)
    Mb1 = tl.full((BLOCK,), -1.0e30, dtype=tl.float64)
    Sa0 = tl.zeros((BLOCK,), dtype=tl.float32)
    Sa1 = tl.zeros((BLOCK,), dtype=tl.float32)
    Sb0 = tl.zeros((BLOCK,), dtype=tl.float32)
    Sb1 = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        xa = _load_x(PA, idx, m, lo_a, ra)
        xb = _load_x(PB, idx, m, lo_b, rb)
        ca0, ca1 = _cost(xa, inv_gamma)
        cb0, cb1 = _cost(xb, inv_gamma)
        fa = _f_prev(ca0, ca1, ga0, ga1, lmu, has_f)
        fb = _f_prev(cb0, cb1, gb0, gb1, lmu, has_f)
        Ma0, Sa0 = _lse_update(Ma0, Sa0, fa - ca0, m)
        Ma1, Sa1 = _lse_update(Ma1, Sa1, fa - ca1, m)
        Mb0, Sb0 = _lse_update(Mb0, Sb0, fb - cb0, m)
        Mb1, Sb1 = _lse_update(Mb1, Sb1, fb - cb1, m)
    return _lse_finish(Ma0, Sa0), _lse_finish(Ma1, Sa1), _lse_finish(Mb0, Sb0), _lse_finish(Mb1, Sb1)


@triton.jit
def _softiou_fwd_kernel(A, B, OUT, PRM, n, sa, sb, ITERS, eps, n_f,
                        HAS_TOPK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    PA = A + row * sa
    PB = B + row * sb
    offs = tl.arange(0, BLOCK)
    lo_a, hi_a = _minmax(PA, n, BLOCK)
    lo_b, hi_b = _minmax(PB, n, BLOCK)
    lo_a = lo_a.to(tl.float64)
    lo_b = lo_b.to(tl.float64)
    ra = hi_a.to(tl.float64) - lo_a + 1e-8
    rb = hi_b.to(tl.float64) - lo_b + 1e-8
    lmu = tl.load(PRM + 0)
    lnu0 = tl.load(PRM + 1)
    lnu1 = tl.load(PRM + 2)
    inv_gamma = tl.load(PRM + 3)

    ga0 = tl.zeros((), dtype=tl.float64)
    ga1 = tl.zeros((), dtype=tl.float64)
    gb0 = tl.zeros((), dtype=tl.float64)
    gb1 = tl.zeros((), dtype=tl.float64)
    if HAS_TOPK:
        for it in range(ITERS):
            la0, la1, lb0, lb1 = _sinkhorn_pass(PA, PB, n, lo_a, ra, lo_b, rb, ga0, ga1, gb0, gb1, it > 0,
                                                inv_gamma, lmu, BLOCK)
            ga0 = lnu0 - la0
            ga1 = lnu1 - la1
            gb0 = lnu0 - lb0
            gb1 = lnu1 - lb1

    I_v = tl.zeros((BLOCK,), dtype=tl.float64)
    SA_v = tl.zeros((BLOCK,), dtype=tl.float64)
    SB_v = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        xa = _load_x(PA, idx, m, lo_a, ra)
        xb = _load_x(PB, idx, m, lo_b, rb)
        if HAS_TOPK:
            ca0, ca1 = _cost(xa, inv_gamma)
            cb0, cb1 = _cost(xb, inv_gamma)
            fa = _f_prev(ca0, ca1, ga0, ga1, lmu, ITERS > 0)
            fb = _f_prev(cb0, cb1, gb0, gb1, lmu, ITERS > 0)
            ma = n_f * _e(fa + ga1 - ca1)
            mb = n_f * _e(fb + gb1 - cb1)
        else:
            ma = xa
            mb = xb
        ma = tl.where(m, ma, 0.0)
        mb = tl.where(m, mb, 0.0)
        I_v += ma * mb
        SA_v += ma
        SB_v += mb
    inter = tl.sum(I_v, 0)
    res = inter / (tl.sum(SA_v, 0) + tl.sum(SB_v, 0) - inter + eps)
    tl.store(OUT + row, res.to(OUT.dtype.element_ty))


@triton.jit
def _softiou_bwd_kernel(A, B, DIOU, DA, DB, DX, PRM, n, sa, sb, sda, sdb, ITERS, eps, n_f,
                        HAS_TOPK: tl.constexpr, BLOCK: tl.constexpr, ITERS_P: tl.constexpr):
    """DX: fp32 scratch (N, 2, n) for dL/dx (read back after a barrier by the same program)."""
    row = tl.program_id(0).to(tl.int64)
    PA = A + row * sa
    PB = B + row * sb
    DXA = DX + row * 2 * n
    DXB = DXA + n
    offs = tl.arange(0, BLOCK)
    tidx = tl.arange(0, ITERS_P)
    d = tl.load(DIOU + row).to(tl.float64)

    lo_a, hi_a = _minmax(PA, n, BLOCK)
    lo_b, hi_b = _minmax(PB, n, BLOCK)
    lo_a = lo_a.to(tl.float64)
    lo_b = lo_b.to(tl.float64)
    ra = hi_a.to(tl.float64) - lo_a + 1e-8
    rb = hi_b.to(tl.float64) - lo_b + 1e-8
    lmu = tl.load(PRM + 0)
    lnu0 = tl.load(PRM + 1)
    lnu1 = tl.load(PRM + 2)
    inv_gamma = tl.load(PRM + 3)

    # forward Sinkhorn, keeping g^t (t = 0..ITERS; g^0 = 0) for both maps
    gha0 = tl.zeros((ITERS_P,), dtype=tl.float64)
    gha1 = tl.zeros((ITERS_P,), dtype=tl.float64)
    ghb0 = tl.zeros((ITERS_P,), dtype=tl.float64)
    ghb1 = tl.zeros((ITERS_P,), dtype=tl.float64)
    ga0 = tl.zeros((), dtype=tl.float64)
    ga1 = tl.zeros((), dtype=tl.float64)
    gb0 = tl.zeros((), dtype=tl.float64)
    gb1 = tl.zeros((), dtype=tl.float64)
    if HAS_TOPK:
        for it in range(ITERS):
            la0, la1, lb0, lb1 = _sinkhorn_pass(PA, PB, n, lo_a, ra, lo_b, rb, ga0, ga1, gb0, gb1, it > 0,
                                                inv_gamma, lmu, BLOCK)
            ga0 = lnu0 - la0
            ga1 = lnu1 - la1
            gb0 = lnu0 - lb0
            gb1 = lnu1 - lb1
            gha0 = tl.where(tidx == it + 1, ga0, gha0)
            gha1 = tl.where(tidx == it + 1, ga1, gha1)
            ghb0 = tl.where(tidx == it + 1, gb0, ghb0)
            ghb1 = tl.where(tidx == it + 1, gb1, ghb1)

    # IoU sums
    I_v = tl.zeros((BLOCK,), dtype=tl.float64)
    SA_v = tl.zeros((BLOCK,), dtype=tl.float64)
    SB_v = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        xa = _load_x(PA, idx, m, lo_a, ra)
        xb = _load_x(PB, idx, m, lo_b, rb)
        if HAS_TOPK:
            ca0, ca1 = _cost(xa, inv_gamma)
            cb0, cb1 = _cost(xb, inv_gamma)
            fa = _f_prev(ca0, ca1, ga0, ga1, lmu, ITERS > 0)
            fb = _f_prev(cb0, cb1, gb0, gb1, lmu, ITERS > 0)
            ma = n_f * _e(fa + ga1 - ca1)
            mb = n_f * _e(fb + gb1 - cb1)
        else:
            ma = xa
            mb = xb
        ma = tl.where(m, ma, 0.0)
        mb = tl.where(m, mb, 0.0)
        I_v += ma * mb
        SA_v += ma
        SB_v += mb
    inter = tl.sum(I_v, 0)
    sum_a = tl.sum(SA_v, 0)
    sum_b = tl.sum(SB_v, 0)
    U = sum_a + sum_b - inter + eps
    cI = d * (U + inter) / (U * U)  # d iou / d inter
    cA = -d * inter / (U * U)       # d iou / d sum_a (= d sum_b)

    # reverse Sinkhorn: dg^t for t = ITERS..1.
    #   df^T = w (= dmask * mask);  df^t = -sum_j dg^{t+1}_j a^{t+1}_ij  (t < T)
    #   dg^t_j = [t == T] sum_i w_i [j == 1] - sum_i df^t_i b^t_ij
    #   a^t_ij = exp(f^{t-1}_i - c_ij + g^t_j - lnu_j),  b^t_ij = exp(g^t_j - c_ij + f^t_i - lmu)
    dgha0 = tl.zeros((ITERS_P,), dtype=tl.float64)
    dgha1 = tl.zeros((ITERS_P,), dtype=tl.float64)
    dghb0 = tl.zeros((ITERS_P,), dtype=tl.float64)
    dghb1 = tl.zeros((ITERS_P,), dtype=tl.float64)
    if HAS_TOPK:
        dga0 = tl.zeros((), dtype=tl.float64)
        dga1 = tl.zeros((), dtype=tl.float64)
        dgb0 = tl.zeros((), dtype=tl.float64)
        dgb1 = tl.zeros((), dtype=tl.float64)
        for tt in range(0, ITERS):
            t = ITERS - tt
            ua0 = _getv(gha0, tidx, t)
            ua1 = _getv(gha1, tidx, t)
            ub0 = _getv(ghb0, tidx, t)
            ub1 = _getv(ghb1, tidx, t)
            na0 = _getv(gha0, tidx, t + 1)
            na1 = _getv(gha1, tidx, t + 1)
            nb0 = _getv(ghb0, tidx, t + 1)
            nb1 = _getv(ghb1, tidx, t + 1)
            sa0 = tl.zeros((BLOCK,), dtype=tl.float64)
            sa1 = tl.zeros((BLOCK,), dtype=tl.float64)
            sb0 = tl.zeros((BLOCK,), dtype=tl.float64)
            sb1 = tl.zeros((BLOCK,), dtype=tl.float64)
            for start in range(0, n, BLOCK):
                idx = start + offs
                m = idx < n
                xa = _load_x(PA, idx, m, lo_a, ra)
                xb = _load_x(PB, idx, m, lo_b, rb)
                ca0, ca1 = _cost(xa, inv_gamma)
                cb0, cb1 = _cost(xb, inv_gamma)
                fa = _fdual(ca0, ca1, ua0, ua1, lmu)  # f^t
                fb = _fdual(cb0, cb1, ub0, ub1, lmu)
                if tt == 0:
                    ma = n_f * _e(fa + ua1 - ca1)
                    mb = n_f * _e(fb + ub1 - cb1)
                    dfa = (cI * mb + cA) * ma
                    dfb = (cI * ma + cA) * mb
                else:
                    dfa = -(dga0 * _e(fa - ca0 + na0 - lnu0) + dga1 * _e(fa - ca1 + na1 - lnu1))
                    dfb = -(dgb0 * _e(fb - cb0 + nb0 - lnu0) + dgb1 * _e(fb - cb1 + nb1 - lnu1))
                dfa = tl.where(m, dfa, 0.0)
                dfb = tl.where(m, dfb, 0.0)
                sa0 += dfa * _e(ua0 - ca0 + fa - lmu)
                sa1 += dfa * _e(ua1 - ca1 + fa - lmu)
                sb0 += dfb * _e(ub0 - cb0 + fb - lmu)
                sb1 += dfb * _e(ub1 - cb1 + fb - lmu)
            direct_a = tl.where(tt == 0, cI * inter + cA * sum_a, 0.0)
            direct_b = tl.where(tt == 0, cI * inter + cA * sum_b, 0.0)
            dga0 = -tl.sum(sa0, 0)
            dga1 = direct_a - tl.sum(sa1, 0)
            dgb0 = -tl.sum(sb0, 0)
            dgb1 = direct_b - tl.sum(sb1, 0)
            dgha0 = tl.where(tidx == t, dga0, dgha0)
            dgha1 = tl.where(tidx == t, dga1, dgha1)
            dghb0 = tl.where(tidx == t, dgb0, dghb0)
            dghb1 = tl.where(tidx == t, dgb1, dghb1)

    # dL/dx (elementwise, all iterations) -> DX, and the sums for the min-max backward
    S1a_v = tl.zeros((BLOCK,), dtype=tl.float64)
    S2a_v = tl.zeros((BLOCK,), dtype=tl.float64)
    S1b_v = tl.zeros((BLOCK,), dtype=tl.float64)
    S2b_v = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        xa = _load_x(PA, idx, m, lo_a, ra)
        xb = _load_x(PB, idx, m, lo_b, rb)
        if HAS_TOPK:
            ca0, ca1 = _cost(xa, inv_gamma)
            cb0, cb1 = _cost(xb, inv_gamma)
            fa = _f_prev(ca0, ca1, ga0, ga1, lmu, ITERS > 0)  # f^T
            fb = _f_prev(cb0, cb1, gb0, gb1, lmu, ITERS > 0)
            ma = n_f * _e(fa + ga1 - ca1)
            mb = n_f * _e(fb + gb1 - cb1)
            dfa = (cI * mb + cA) * ma  # df^T = dmask * mask
            dfb = (cI * ma + cA) * mb
            dca0 = tl.zeros((BLOCK,), dtype=tl.float64)
            dcb0 = tl.zeros((BLOCK,), dtype=tl.float64)
            dca1 = -dfa
            dcb1 = -dfb
            for tt in range(0, ITERS):
                t = ITERS - tt
                ua0 = _getv(gha0, tidx, t)
                ua1 = _getv(gha1, tidx, t)
                ub0 = _getv(ghb0, tidx, t)
                ub1 = _getv(ghb1, tidx, t)
                qa0 = _getv(gha0, tidx, t - 1)
                qa1 = _getv(gha1, tidx, t - 1)
                qb0 = _getv(ghb0, tidx, t - 1)
                qb1 = _getv(ghb1, tidx, t - 1)
                va0 = _getv(dgha0, tidx, t)
                va1 = _getv(dgha1, tidx, t)
                vb0 = _getv(dghb0, tidx, t)
                vb1 = _getv(dghb1, tidx, t)
                # fa, fb hold f^t here
                pa = _f_prev(ca0, ca1, qa0, qa1, lmu, t > 1)  # f^{t-1}
                pb = _f_prev(cb0, cb1, qb0, qb1, lmu, t > 1)
                aa0 = _e(pa - ca0 + ua0 - lnu0)
                aa1 = _e(pa - ca1 + ua1 - lnu1)
                ab0 = _e(pb - cb0 + ub0 - lnu0)
                ab1 = _e(pb - cb1 + ub1 - lnu1)
                dca0 += dfa * _e(ua0 - ca0 + fa - lmu) + va0 * aa0
                dca1 += dfa * _e(ua1 - ca1 + fa - lmu) + va1 * aa1
                dcb0 += dfb * _e(ub0 - cb0 + fb - lmu) + vb0 * ab0
                dcb1 += dfb * _e(ub1 - cb1 + fb - lmu) + vb1 * ab1
                dfa = -(va0 * aa0 + va1 * aa1)  # df^{t-1}
                dfb = -(vb0 * ab0 + vb1 * ab1)
                fa = pa
                fb = pb
            dxa = 2.0 * inv_gamma * (dca0 * xa + dca1 * (xa - 1.0))
            dxb = 2.0 * inv_gamma * (dcb0 * xb + dcb1 * (xb - 1.0))
        else:
            dxa = cI * xb + cA
            dxb = cI * xa + cA
        dxa = tl.where(m, dxa, 0.0)
        dxb = tl.where(m, dxb, 0.0)
        tl.store(DXA + idx, dxa, mask=m)
        tl.store(DXB + idx, dxb, mask=m)
        S1a_v += dxa
        S2a_v += dxa * xa
        S1b_v += dxb
        S2b_v += dxb * xb
    S1a = tl.sum(S1a_v, 0)
    S2a = tl.sum(S2a_v, 0)
    S1b = tl.sum(S1b_v, 0)
    S2b = tl.sum(S2b_v, 0)
    dlo_a = (S2a - S1a) / ra
    dhi_a = -S2a / ra
    dlo_b = (S2b - S1b) / rb
    dhi_b = -S2b / rb

    # tie counts at min / max (amin/amax backward shares the gradient evenly)
    clo_a = tl.zeros((BLOCK,), dtype=tl.float64)
    chi_a = tl.zeros((BLOCK,), dtype=tl.float64)
    clo_b = tl.zeros((BLOCK,), dtype=tl.float64)
    chi_b = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        a = tl.load(PA + idx, mask=m, other=0.0).to(tl.float32)
        bb = tl.load(PB + idx, mask=m, other=0.0).to(tl.float32)
        clo_a += tl.where(m & (a == lo_a), 1.0, 0.0)
        chi_a += tl.where(m & (a == hi_a), 1.0, 0.0)
        clo_b += tl.where(m & (bb == lo_b), 1.0, 0.0)
        chi_b += tl.where(m & (bb == hi_b), 1.0, 0.0)
    glo_a = dlo_a / tl.sum(clo_a, 0)
    ghi_a = dhi_a / tl.sum(chi_a, 0)
    glo_b = dlo_b / tl.sum(clo_b, 0)
    ghi_b = dhi_b / tl.sum(chi_b, 0)

    tl.debug_barrier()
    for start in range(0, n, BLOCK):
        idx = start + offs
        m = idx < n
        a = tl.load(PA + idx, mask=m, other=0.0).to(tl.float32)
        bb = tl.load(PB + idx, mask=m, other=0.0).to(tl.float32)
        dxa = tl.load(DXA + idx, mask=m, other=0.0)
        dxb = tl.load(DXB + idx, mask=m, other=0.0)
        da = dxa / ra + tl.where(a == lo_a, glo_a, 0.0) + tl.where(a == hi_a, ghi_a, 0.0)
        db = dxb / rb + tl.where(bb == lo_b, glo_b, 0.0) + tl.where(bb == hi_b, ghi_b, 0.0)
        tl.store(DA + row * sda + idx, da.to(DA.dtype.element_ty), mask=m)
        tl.store(DB + row * sdb + idx, db.to(DB.dtype.element_ty), mask=m)
