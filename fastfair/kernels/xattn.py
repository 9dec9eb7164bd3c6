"""Triton kernels for fused cross-attention with per-token attention maps.

The math is ``naive.py``'s (the specification). Launch wrappers live in ``triton_ops.py``.

Design
------
* Scores run in the base-2 domain: ``s2 = (q . k) * scale * log2(e)`` and ``exp2``; the LSE is
  stored in natural log units.
* One key loop serves both variants: when ``Nk <= BLOCK_N`` (``BLOCK_N`` = Nk rounded up to a
  power of two, at most 256) the loop runs once and the softmax is an exact single pass; for long
  key sets (SD3/Flux joint attention) it is an online softmax over key blocks.
* Maps never need the ``Nq x Nk`` probabilities: once the row LSE is known, the selected columns
  are recomputed from the *gathered* key rows, ``p_sel = exp2(q . k[tok]^T * c - lse2)`` -- a
  ``BLOCK_M x BLOCK_T`` dot. For long key sets this is the "second pass over the selected
  columns only, using the final LSE".
* Head-summed maps: one program handles a query block of one batch element for a group of heads
  (loop over ``h`` inside the program) and sums the maps in registers: no atomics, deterministic.
  When there are too few query blocks to fill the GPU, heads are split into groups whose partial
  maps the wrapper sums (still deterministic).
* Backward recomputes P from q, k and the saved LSE (FlashAttention style). The map gradient
  only touches the selected columns, so its terms are also computed from the gathered key rows:
  ``w = dmaps * p_sel``; ``rowsum(P * G) = rowsum(w)``; ``dq += w @ k[tok]``;
  ``dk[tok] += w^T @ q`` (accumulated per query block and scattered by the wrapper).
  For ``Nk <= BLOCK_N`` one kernel computes dq and (optionally) dk/dv/dmk in one pass over the
  queries; each program owns a contiguous range of query blocks of one (b, h) and writes fp32
  partial dk/dv, which the wrapper sums (split over Nq for parallelism, deterministic).
  For long key sets, dq and dk/dv are separate kernels.
* fp16/bf16 inputs use tensor cores with fp32 accumulation (P and dS are rounded to the input
  dtype for their dots, as in FlashAttention); the fp32 map-gradient dots and every dot on fp32
  inputs use 3xTF32 (``PREC`` / ``PREC_MAP``): ~fp32 accuracy on tensor cores.
* ``DIV_D``: the head dims are multiples of it (8 for SD's 40 / 80 / 160). The masks along the head
  dim are written against ``(D // DIV_D) * DIV_D`` so the compiler knows they are constant over
  DIV_D elements: with a runtime D that is not a multiple of 16 (SD1.5's 40, which Triton's JIT
  does not specialise) every q/K/V load was a scalar 2-byte ``ld.global`` and the forward's key
  loop could not use async copies; with it they are 16-byte vectors / ``cp.async``.
* Single-pass key tiles: SD's 77 keys are two power-of-two tiles, 64 + 16 columns (``BLOCK_N2``), instead of
  one of 128 -- 37.5% less score, exp and P V work per row (154 -> 128 + 32). Compiled for sm_90 the SD1.5
  D=40 forward went from 253 to 199 registers and 116 to 92 KiB of shared memory, and the D=80 forward now
  fits double-buffered (136 KiB; it was single-buffered at 184 KiB). The backward does the same when dk/dv are
  not fused into it (guidance's dq-only pass: D=40 220 -> 181 registers; Nk=154 no longer spills).
* Forward with every key in one pass (``SINGLE``: Nk <= BLOCK_N + BLOCK_N2, SD's 77): no key loop, so the head
  loop is the innermost loop and ``num_stages=2`` pipelines it -- the next head's q, K, V tiles are
  copied into shared memory while this head computes.
* Registers: only 1D vectors live across loops; 2D addresses/masks are formed at each load, and
  ``ALIGN`` (8 when all row strides are multiples of 8 elements and data is 16-byte aligned)
  promises the compiler 16-byte vector loads. Without it sm_90 builds spill heavily (see
  tests/test_triton_compile.py, which reports registers / spills / shared memory per config).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _xattn_fwd_kernel(
    Q, K, V, MK, TOK, OUT, LSE, MLSE, MAPS,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smn, smd,
    stb, stt,
    sob, soh, son, sod,
    smg, smapb, smaph, smapt,
    H, Nq, Nk, Nm, D, DV, T, t0, HPP,
    scale_log2,
    NQ_BUCKET,
    HAS_MK: tl.constexpr, HAS_MAPS: tl.constexpr, PER_HEAD: tl.constexpr, COMPUTE_OUT: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
    PREC: tl.constexpr, ALIGN: tl.constexpr, DIV_D: tl.constexpr, BLOCK_N2: tl.constexpr = 0,
):
    """grid (cdiv(Nq, BLOCK_M), B, head groups). SINGLE: Nk <= BLOCK_N + BLOCK_N2 (every key in one pass).
    BLOCK_N2 > 0 (single pass only): the keys are two power-of-two tiles [0, BLOCK_N) and [BLOCK_N,
    BLOCK_N + BLOCK_N2) instead of one of Nk rounded up -- SD's 77 keys as 64 + 16 columns instead of 128,
    which takes 37.5% of the score, exp and P V work off every row."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    grp = tl.program_id(2)
    LOG2E_C: tl.constexpr = 1.4426950408889634
    LN2_C: tl.constexpr = 0.6931471805599453

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Nq
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < (D // DIV_D) * DIV_D  # DIV_D: D is a multiple of it (mask constancy -> vector loads)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < (DV // DIV_D) * DIV_D
    offs_n = tl.arange(0, BLOCK_N)
    offs_nm = tl.arange(0, BLOCK_NM)
    # Only 1D vectors live across the loops; 2D addresses and masks are formed at each load from
    # a loop-varying 1D part (so they are not hoisted and held in registers).

    if HAS_MAPS:
        offs_t = tl.arange(0, BLOCK_T)
        mask_t = (t0 + offs_t) < T
        tok = tl.load(TOK + b * stb + (t0 + offs_t) * stt, mask=mask_t, other=0)
        maps_acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)

    h_start = grp * HPP
    h_end = tl.minimum(h_start + HPP, H)
    for h in range(h_start, h_end):
        qrow = tl.multiple_of((b * sqb + h * sqh) + offs_m * sqn, ALIGN)
        q = tl.load(Q + qrow[:, None] + offs_d[None, :] * sqd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lrow = (b * H + h) * Nq + offs_m
        kbh = b * skb + h * skh
        mbh = b * smb + h * smh
        if COMPUTE_OUT and SINGLE:
            # every key in one tile: exact single pass, no key loop -- the head loop is then the
            # innermost loop, which Triton's pipeliner can prefetch (next head's q, K, V) across
            vbh = b * svb + h * svh
            mask_n = offs_n < Nk
            kt = tl.load(K + tl.multiple_of(kbh + offs_n * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                         mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * scale_log2
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_i = tl.max(s, 1)
            if BLOCK_N2 > 0:  # the keys past the first tile: a second, smaller tile
                offs_n2 = BLOCK_N + tl.arange(0, BLOCK_N2)
                mask_n2 = offs_n2 < Nk
                kt2 = tl.load(K + tl.multiple_of(kbh + offs_n2 * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                              mask=mask_n2[None, :] & mask_d[:, None], other=0.0)
                s2 = tl.dot(q, kt2, input_precision=PREC) * scale_log2
                s2 = tl.where(mask_n2[None, :], s2, float("-inf"))
                m_i = tl.maximum(m_i, tl.max(s2, 1))
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, 1)
            vb = tl.load(V + tl.multiple_of(vbh + offs_n * svn, ALIGN)[:, None] + offs_dv[None, :] * svd,
                         mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
            acc = tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
            if BLOCK_N2 > 0:
                p2 = tl.exp2(s2 - m_i[:, None])
                l_i += tl.sum(p2, 1)
                vb2 = tl.load(V + tl.multiple_of(vbh + offs_n2 * svn, ALIGN)[:, None] + offs_dv[None, :] * svd,
                              mask=mask_n2[:, None] & mask_dv[None, :], other=0.0)
                acc = tl.dot(p2.to(vb2.dtype), vb2, acc, input_precision=PREC)
        elif COMPUTE_OUT:
            vbh = b * svb + h * svh
            # online softmax over key blocks
            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
            for start in range(0, Nk, BLOCK_N):
                cols = start + offs_n
                mask_n = cols < Nk
                kt = tl.load(K + tl.multiple_of(kbh + cols * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                             mask=mask_n[None, :] & mask_d[:, None], other=0.0)
                s = tl.dot(q, kt, input_precision=PREC) * scale_log2
                s = tl.where(mask_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                vb = tl.load(V + tl.multiple_of(vbh + cols * svn, ALIGN)[:, None] + offs_dv[None, :] * svd,
                             mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
                m_i = m_new
        if COMPUTE_OUT:
            out = acc / l_i[:, None]
            orow = tl.multiple_of((b * sob + h * soh) + offs_m * son, ALIGN)
            tl.store(OUT + orow[:, None] + offs_dv[None, :] * sod, out.to(OUT.dtype.element_ty),
                     mask=mask_m[:, None] & mask_dv[None, :])
            lse2 = m_i + tl.log2(l_i)
            tl.store(LSE + lrow, lse2 * LN2_C, mask=mask_m)
            if HAS_MK:
                mm_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
                ml_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for start in range(0, Nm, BLOCK_NM):  # own names: the single-tile branch's are live here
                    cols_m = start + offs_nm
                    mask_nm = cols_m < Nm
                    kt_m = tl.load(MK + tl.multiple_of(mbh + cols_m * smn, ALIGN)[None, :] + offs_d[:, None] * smd,
                                   mask=mask_nm[None, :] & mask_d[:, None], other=0.0)
                    s_m = tl.dot(q, kt_m, input_precision=PREC) * scale_log2
                    s_m = tl.where(mask_nm[None, :], s_m, float("-inf"))
                    mm_new = tl.maximum(mm_i, tl.max(s_m, 1))
                    ml_i = ml_i * tl.exp2(mm_i - mm_new) + tl.sum(tl.exp2(s_m - mm_new[:, None]), 1)
                    mm_i = mm_new
                mlse2 = mm_i + tl.log2(ml_i)
                tl.store(MLSE + lrow, mlse2 * LN2_C, mask=mask_m)
        else:
            lse2 = tl.load(LSE + lrow, mask=mask_m, other=0.0) * LOG2E_C
            if HAS_MK:
                mlse2 = tl.load(MLSE + lrow, mask=mask_m, other=0.0) * LOG2E_C
        if HAS_MAPS:
            if HAS_MK:
                ksel = tl.load(MK + tl.multiple_of(mbh + tok * smn, ALIGN)[None, :] + offs_d[:, None] * smd,
                               mask=mask_t[None, :] & mask_d[:, None], other=0.0)
                L2 = mlse2
            else:
                ksel = tl.load(K + tl.multiple_of(kbh + tok * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                               mask=mask_t[None, :] & mask_d[:, None], other=0.0)
                L2 = lse2
            ssel = tl.dot(q, ksel, input_precision=PREC) * scale_log2
            psel = tl.exp2(ssel - L2[:, None])
            if PER_HEAD:
                mrow = (b * smapb + h * smaph) + (t0 + offs_t) * smapt
                tl.store(MAPS + mrow[None, :] + offs_m[:, None], psel, mask=mask_m[:, None] & mask_t[None, :])
            else:
                maps_acc += psel
    if HAS_MAPS:
        if not PER_HEAD:
            mrow = (grp.to(tl.int64) * smg + b * smapb) + (t0 + offs_t) * smapt
            tl.store(MAPS + mrow[None, :] + offs_m[:, None], maps_acc, mask=mask_m[:, None] & mask_t[None, :])


# --------------------------------------------------------------------------------------------
# backward: dq (+ fused dk/dv/dmk when every key set fits one tile)
# --------------------------------------------------------------------------------------------

@triton.jit
def _xattn_bwd_kernel(
    Q, K, V, MK, TOK, DOUT, DMAPS, LSE, MLSE,
    DQ, DELTA, DELTAM, WPART, DKP, DVP, DMKP,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smn, smd,
    stb, stt,
    sdob, sdoh, sdon, sdod,
    sdmb, sdmh, sdmt,
    sdqb, sdqh, sdqn, sdqd,
    H, Nq, Nk, Nm, D, DV, T, NMB, MB_PER_PROG,
    scale_log2, scale,
    NQ_BUCKET,
    HAS_DOUT: tl.constexpr, HAS_MAPS: tl.constexpr, HAS_MK: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DELTA: tl.constexpr, NEED_W: tl.constexpr,
    FUSE_DK: tl.constexpr, FUSE_DV: tl.constexpr, FUSE_DMK: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
    PREC: tl.constexpr, PREC_MAP: tl.constexpr, ALIGN: tl.constexpr, DIV_D: tl.constexpr,
    BLOCK_N2: tl.constexpr = 0,
):
    """grid (nsplit, B*H): program (sp, bh) handles query blocks [sp*MB_PER_PROG, ...) of (b, h).

    BLOCK_N2 > 0 (SINGLE): the main keys as two tiles [0, BLOCK_N) and [BLOCK_N, BLOCK_N + BLOCK_N2), as in the
    forward (SD's 77 keys: 64 + 16 columns of P, dP and dS, and of the fused dk / dv accumulators, instead of 128).

    SINGLE: Nk <= BLOCK_N and Nm <= BLOCK_NM (every key set is one tile; rowsums are exact in one
    pass and dk/dv/dmk can be fused). DELTA / DELTAM (B,H,Nq) get rowsum(P*dP) of the main keys and
    the map-key rowsum (NEED_DELTA, for the separate dk/dv kernel). WPART (B,H,NMB,T,D) fp32 gets
    w^T q per query block (NEED_W). DKP/DVP/DMKP (nsplit,B,H,N,D) fp32 get the fused partial key
    gradients (dk, dmk already scaled).
    """
    sp = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    LOG2E_C: tl.constexpr = 1.4426950408889634
    MAIN: tl.constexpr = HAS_DOUT or (HAS_MAPS and not HAS_MK)
    MAPS_MAIN: tl.constexpr = HAS_MAPS and not HAS_MK
    MAPS_MK: tl.constexpr = HAS_MAPS and HAS_MK

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < (D // DIV_D) * DIV_D  # DIV_D: D is a multiple of it (mask constancy -> vector loads)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < (DV // DIV_D) * DIV_D
    offs_n = tl.arange(0, BLOCK_N)
    offs_nm = tl.arange(0, BLOCK_NM)
    offs_t = tl.arange(0, BLOCK_T)

    qbh = b * sqb + h * sqh
    kbh = b * skb + h * skh
    vbh = b * svb + h * svh
    mbh = b * smb + h * smh
    dobh = b * sdob + h * sdoh
    dmbh = b * sdmb + h * sdmh
    if HAS_MAPS:
        if HAS_MK:
            SEL = MK
            selbh = mbh
            sel_sn = smn
            sel_sd = smd
        else:
            SEL = K
            selbh = kbh
            sel_sn = skn
            sel_sd = skd

    if FUSE_DK:
        dk_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        if BLOCK_N2 > 0:
            dk_acc2 = tl.zeros((BLOCK_N2, BLOCK_D), dtype=tl.float32)
    if FUSE_DV:
        dv_acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
        if BLOCK_N2 > 0:
            dv_acc2 = tl.zeros((BLOCK_N2, BLOCK_DV), dtype=tl.float32)
    if FUSE_DMK:
        dmk_acc = tl.zeros((BLOCK_NM, BLOCK_D), dtype=tl.float32)

    mb_start = sp * MB_PER_PROG
    mb_end = tl.minimum(mb_start + MB_PER_PROG, NMB)
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Nq
        qrow = tl.multiple_of(qbh + offs_m * sqn, ALIGN)
        q = tl.load(Q + qrow[:, None] + offs_d[None, :] * sqd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lrow = bh * Nq + offs_m
        lse2 = tl.load(LSE + lrow, mask=mask_m, other=0.0) * LOG2E_C
        if HAS_DOUT:
            dorow = tl.multiple_of(dobh + offs_m * sdon, ALIGN)
            do = tl.load(DOUT + dorow[:, None] + offs_dv[None, :] * sdod,
                         mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
        dq_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        delta_map = tl.zeros((BLOCK_M,), dtype=tl.float32)

        # ---- map-gradient terms on the selected columns (gathered rows) --------------------
        if HAS_MAPS:
            if HAS_MK:
                Lsel2 = tl.load(MLSE + lrow, mask=mask_m, other=0.0) * LOG2E_C
            else:
                Lsel2 = lse2
            for t0 in range(0, T, BLOCK_T):
                mask_t = (t0 + offs_t) < T
                tok = tl.load(TOK + b * stb + (t0 + offs_t) * stt, mask=mask_t, other=0)
                ksel = tl.load(SEL + tl.multiple_of(selbh + tok * sel_sn, ALIGN)[None, :] + offs_d[:, None] * sel_sd,
                               mask=mask_t[None, :] & mask_d[:, None], other=0.0)  # (D, T)
                psel = tl.exp2(tl.dot(q, ksel, input_precision=PREC) * scale_log2 - Lsel2[:, None])
                dm = tl.load(DMAPS + (dmbh + (t0 + offs_t) * sdmt)[None, :] + offs_m[:, None],
                             mask=mask_m[:, None] & mask_t[None, :], other=0.0).to(tl.float32)
                w = dm * psel  # (M, T)
                delta_map += tl.sum(w, 1)
                if NEED_DQ:
                    dq_acc += tl.dot(w, tl.trans(ksel.to(tl.float32)), input_precision=PREC_MAP)
                if NEED_W:
                    wq = tl.dot(tl.trans(w), q.to(tl.float32), input_precision=PREC_MAP)  # (T, D)
                    wrow = ((bh * NMB + mb) * T + t0 + offs_t) * D
                    tl.store(WPART + wrow[:, None] + offs_d[None, :], wq, mask=mask_t[:, None] & mask_d[None, :])

        # ---- main keys: dS = P * (dP - delta), dP = dO V^T (+ G, handled through w) -----------
        if MAIN:
            if SINGLE and BLOCK_N2 > 0:
                mask_n = offs_n < Nk
                offs_n2 = BLOCK_N + tl.arange(0, BLOCK_N2)
                mask_n2 = offs_n2 < Nk
                kt = tl.load(K + tl.multiple_of(kbh + offs_n * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                             mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (D, N)
                kt2 = tl.load(K + tl.multiple_of(kbh + offs_n2 * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                              mask=mask_n2[None, :] & mask_d[:, None], other=0.0)  # (D, N2)
                p = tl.where(mask_n[None, :], tl.exp2(tl.dot(q, kt, input_precision=PREC) * scale_log2
                                                      - lse2[:, None]), 0.0)
                p2 = tl.where(mask_n2[None, :], tl.exp2(tl.dot(q, kt2, input_precision=PREC) * scale_log2
                                                        - lse2[:, None]), 0.0)
                if HAS_DOUT:
                    vt = tl.load(V + tl.multiple_of(vbh + offs_n * svn, ALIGN)[None, :] + offs_dv[:, None] * svd,
                                 mask=mask_n[None, :] & mask_dv[:, None], other=0.0)  # (DV, N)
                    vt2 = tl.load(V + tl.multiple_of(vbh + offs_n2 * svn, ALIGN)[None, :] + offs_dv[:, None] * svd,
                                  mask=mask_n2[None, :] & mask_dv[:, None], other=0.0)
                    dp = tl.dot(do, vt, input_precision=PREC)
                    dp2 = tl.dot(do, vt2, input_precision=PREC)
                    delta = tl.sum(p * dp, 1) + tl.sum(p2 * dp2, 1)
                    if MAPS_MAIN:
                        delta += delta_map
                    ds = p * (dp - delta[:, None])
                    ds2 = p2 * (dp2 - delta[:, None])
                else:
                    delta = delta_map
                    ds = -p * delta[:, None]
                    ds2 = -p2 * delta[:, None]
                if NEED_DQ:
                    dq_acc += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PREC)
                    dq_acc += tl.dot(ds2.to(q.dtype), tl.trans(kt2), input_precision=PREC)
                if FUSE_DV:
                    dv_acc += tl.dot(tl.trans(tl.where(mask_m[:, None], p, 0.0).to(do.dtype)), do, input_precision=PREC)
                    dv_acc2 += tl.dot(tl.trans(tl.where(mask_m[:, None], p2, 0.0).to(do.dtype)), do,
                                      input_precision=PREC)
                if FUSE_DK:
                    dk_acc += tl.dot(tl.trans(tl.where(mask_m[:, None], ds, 0.0).to(q.dtype)), q, input_precision=PREC)
                    dk_acc2 += tl.dot(tl.trans(tl.where(mask_m[:, None], ds2, 0.0).to(q.dtype)), q,
                                      input_precision=PREC)
            elif SINGLE:
                mask_n = offs_n < Nk
                kt = tl.load(K + tl.multiple_of(kbh + offs_n * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                             mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (D, N)
                s = tl.dot(q, kt, input_precision=PREC) * scale_log2
                p = tl.where(mask_n[None, :], tl.exp2(s - lse2[:, None]), 0.0)
                if HAS_DOUT:
                    vt = tl.load(V + tl.multiple_of(vbh + offs_n * svn, ALIGN)[None, :] + offs_dv[:, None] * svd,
                                 mask=mask_n[None, :] & mask_dv[:, None], other=0.0)  # (DV, N)
                    dp = tl.dot(do, vt, input_precision=PREC)
                    delta = tl.sum(p * dp, 1)
                    if MAPS_MAIN:
                        delta += delta_map
                    ds = p * (dp - delta[:, None])
                else:
                    delta = delta_map
                    ds = -p * delta[:, None]
                if NEED_DQ:
                    dq_acc += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PREC)
                if FUSE_DV:
                    pm_ = tl.where(mask_m[:, None], p, 0.0)
                    dv_acc += tl.dot(tl.trans(pm_.to(do.dtype)), do, input_precision=PREC)
                if FUSE_DK:
                    ds = tl.where(mask_m[:, None], ds, 0.0)
                    dk_acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            else:
                if MAPS_MAIN:
                    delta = delta_map
                else:
                    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
                if HAS_DOUT:  # pass 1: the exact rowsum(P * dO V^T) over all key blocks
                    for start in range(0, Nk, BLOCK_N):
                        cols = start + offs_n
                        mask_n2 = cols < Nk
                        kt = tl.load(K + tl.multiple_of(kbh + cols * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                                     mask=mask_n2[None, :] & mask_d[:, None], other=0.0)
                        vt = tl.load(V + tl.multiple_of(vbh + cols * svn, ALIGN)[None, :] + offs_dv[:, None] * svd,
                                     mask=mask_n2[None, :] & mask_dv[:, None], other=0.0)
                        s = tl.dot(q, kt, input_precision=PREC) * scale_log2
                        p = tl.where(mask_n2[None, :], tl.exp2(s - lse2[:, None]), 0.0)
                        dp = tl.dot(do, vt, input_precision=PREC)
                        delta += tl.sum(p * dp, 1)
                if NEED_DQ:  # pass 2
                    for start in range(0, Nk, BLOCK_N):
                        cols = start + offs_n
                        mask_n2 = cols < Nk
                        kt = tl.load(K + tl.multiple_of(kbh + cols * skn, ALIGN)[None, :] + offs_d[:, None] * skd,
                                     mask=mask_n2[None, :] & mask_d[:, None], other=0.0)
                        s = tl.dot(q, kt, input_precision=PREC) * scale_log2
                        p = tl.where(mask_n2[None, :], tl.exp2(s - lse2[:, None]), 0.0)
                        if HAS_DOUT:
                            vt = tl.load(V + tl.multiple_of(vbh + cols * svn, ALIGN)[None, :] + offs_dv[:, None] * svd,
                                         mask=mask_n2[None, :] & mask_dv[:, None], other=0.0)
                            dp = tl.dot(do, vt, input_precision=PREC)
                            ds = p * (dp - delta[:, None])
                        else:
                            ds = -p * delta[:, None]
                        dq_acc += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PREC)
            if NEED_DELTA:
                tl.store(DELTA + lrow, delta, mask=mask_m)

        # ---- map keys: dSm = Pm * (G - delta_map), G through w --------------------------------
        if MAPS_MK:
            if NEED_DELTA:
                tl.store(DELTAM + lrow, delta_map, mask=mask_m)
            if SINGLE:
                mask_nm = offs_nm < Nm
                mkt = tl.load(MK + tl.multiple_of(mbh + offs_nm * smn, ALIGN)[None, :] + offs_d[:, None] * smd,
                              mask=mask_nm[None, :] & mask_d[:, None], other=0.0)  # (D, Nm)
                s = tl.dot(q, mkt, input_precision=PREC) * scale_log2
                pm = tl.where(mask_nm[None, :], tl.exp2(s - Lsel2[:, None]), 0.0)
                dsm = -pm * delta_map[:, None]
                if NEED_DQ:
                    dq_acc += tl.dot(dsm.to(q.dtype), tl.trans(mkt), input_precision=PREC)
                if FUSE_DMK:
                    dsm = tl.where(mask_m[:, None], dsm, 0.0)
                    dmk_acc += tl.dot(tl.trans(dsm.to(q.dtype)), q, input_precision=PREC)
            else:
                if NEED_DQ:
                    for start in range(0, Nm, BLOCK_NM):
                        cols = start + offs_nm
                        mask_n2 = cols < Nm
                        mkt = tl.load(MK + tl.multiple_of(mbh + cols * smn, ALIGN)[None, :] + offs_d[:, None] * smd,
                                      mask=mask_n2[None, :] & mask_d[:, None], other=0.0)
                        s = tl.dot(q, mkt, input_precision=PREC) * scale_log2
                        pm = tl.where(mask_n2[None, :], tl.exp2(s - Lsel2[:, None]), 0.0)
                        dsm = -pm * delta_map[:, None]
                        dq_acc += tl.dot(dsm.to(q.dtype), tl.trans(mkt), input_precision=PREC)

        if NEED_DQ:
            dqrow = tl.multiple_of((b * sdqb + h * sdqh) + offs_m * sdqn, ALIGN)
            tl.store(DQ + dqrow[:, None] + offs_d[None, :] * sdqd, (dq_acc * scale).to(DQ.dtype.element_ty),
                     mask=mask_m[:, None] & mask_d[None, :])

    part = sp * tl.num_programs(1) + bh
    if FUSE_DK:
        krow = (part * Nk + offs_n) * D
        tl.store(DKP + krow[:, None] + offs_d[None, :], dk_acc * scale,
                 mask=(offs_n[:, None] < Nk) & mask_d[None, :])
        if BLOCK_N2 > 0:
            offs_k2 = BLOCK_N + tl.arange(0, BLOCK_N2)
            krow2 = (part * Nk + offs_k2) * D
            tl.store(DKP + krow2[:, None] + offs_d[None, :], dk_acc2 * scale,
                     mask=(offs_k2[:, None] < Nk) & mask_d[None, :])
    if FUSE_DV:
        vrow = (part * Nk + offs_n) * DV
        tl.store(DVP + vrow[:, None] + offs_dv[None, :], dv_acc, mask=(offs_n[:, None] < Nk) & mask_dv[None, :])
        if BLOCK_N2 > 0:
            offs_v2 = BLOCK_N + tl.arange(0, BLOCK_N2)
            vrow2 = (part * Nk + offs_v2) * DV
            tl.store(DVP + vrow2[:, None] + offs_dv[None, :], dv_acc2,
                     mask=(offs_v2[:, None] < Nk) & mask_dv[None, :])
    if FUSE_DMK:
        mrow = (part * Nm + offs_nm) * D
        tl.store(DMKP + mrow[:, None] + offs_d[None, :], dmk_acc * scale,
                 mask=(offs_nm[:, None] < Nm) & mask_d[None, :])


# --------------------------------------------------------------------------------------------
# backward: dk/dv for long key sets (a key block per program, split over query blocks)
# --------------------------------------------------------------------------------------------

@triton.jit
def _xattn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DKP, DVP,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    H, Nq, Nk, D, DV, NMB, MB_PER_PROG,
    scale_log2, scale,
    NQ_BUCKET,
    HAS_DOUT: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, ALIGN: tl.constexpr, DIV_D: tl.constexpr,
):
    """grid (cdiv(Nk, BLOCK_N), B*H, nsplit). dS^T = P^T * (dP^T - delta); K may be the map keys
    (then HAS_DOUT is False and LSE/DELTA are the map-key ones). Writes fp32 partials (scaled dk)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    b = bh // H
    h = bh % H
    LOG2E_C: tl.constexpr = 1.4426950408889634

    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < Nk
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < (D // DIV_D) * DIV_D  # DIV_D: D is a multiple of it (mask constancy -> vector loads)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < (DV // DIV_D) * DIV_D
    qbh = b * sqb + h * sqh
    dobh = b * sdob + h * sdoh
    kb = tl.load(K + tl.multiple_of(b * skb + h * skh + offs_k * skn, ALIGN)[:, None] + offs_d[None, :] * skd,
                 mask=mask_k[:, None] & mask_d[None, :], other=0.0)  # (N, D)
    if HAS_DOUT:
        vb = tl.load(V + tl.multiple_of(b * svb + h * svh + offs_k * svn, ALIGN)[:, None] + offs_dv[None, :] * svd,
                     mask=mask_k[:, None] & mask_dv[None, :], other=0.0)  # (N, DV)
    dk_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)

    mb_start = sp * MB_PER_PROG
    mb_end = tl.minimum(mb_start + MB_PER_PROG, NMB)
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Nq
        qrow = tl.multiple_of(qbh + offs_m * sqn, ALIGN)
        q = tl.load(Q + qrow[:, None] + offs_d[None, :] * sqd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lrow = bh * Nq + offs_m
        lse2 = tl.load(LSE + lrow, mask=mask_m, other=0.0) * LOG2E_C
        delta = tl.load(DELTA + lrow, mask=mask_m, other=0.0)
        st = tl.dot(kb, tl.trans(q), input_precision=PREC) * scale_log2  # (N, M)
        pt = tl.where(mask_k[:, None] & mask_m[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        if HAS_DOUT:
            dorow = tl.multiple_of(dobh + offs_m * sdon, ALIGN)
            do = tl.load(DOUT + dorow[:, None] + offs_dv[None, :] * sdod,
                         mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
            if NEED_DV:
                dv_acc += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            if NEED_DK:
                dpt = tl.dot(vb, tl.trans(do), input_precision=PREC)  # (N, M)
                dst = pt * (dpt - delta[None, :])
                dk_acc += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        else:
            if NEED_DK:
                dst = -pt * delta[None, :]
                dk_acc += tl.dot(dst.to(q.dtype), q, input_precision=PREC)

    part = sp * tl.num_programs(1) + bh
    if NEED_DK:
        krow = (part * Nk + offs_k) * D
        tl.store(DKP + krow[:, None] + offs_d[None, :], dk_acc * scale, mask=mask_k[:, None] & mask_d[None, :])
    if NEED_DV:
        vrow = (part * Nk + offs_k) * DV
        tl.store(DVP + vrow[:, None] + offs_dv[None, :], dv_acc, mask=mask_k[:, None] & mask_dv[None, :])
