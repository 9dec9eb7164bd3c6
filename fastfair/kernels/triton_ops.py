"""Triton backend of fastfair (loaded lazily by ``ops.py`` as backend ``"triton"``).

Provides ``naive.py``'s functions with the same signatures and return conventions:
``cross_attention_fwd``, ``cross_attention_bwd``, ``soft_iou_fwd``, ``soft_iou_bwd``.

* Inputs fp16 / bf16 / fp32, math in fp32; float64 inputs fall back to ``naive`` (Triton's
  float64 dots are not worth it here). Non-contiguous q/k/v/dout are handled through strides
  (diffusers' ``(B, Nq, H*D) -> (B, H, Nq, D)`` transpose view needs no copy).
* Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
* Autotuning (``triton.autotune`` keyed on a power-of-two Nq bucket, Nk, D, ...) is on for CUDA
  unless ``FASTFAIR_TRITON_AUTOTUNE=0``; otherwise (and always under the interpreter) a fixed
  heuristic config is used.
* Deterministic: no atomics; partial sums (head groups, query splits) are reduced by torch.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton

from . import naive
from .softiou import _softiou_bwd_kernel, _softiou_fwd_kernel
from .xattn import LOG2E, _xattn_bwd_dkdv_kernel, _xattn_bwd_kernel, _xattn_fwd_kernel

__all__ = ["cross_attention_fwd", "cross_attention_bwd", "soft_iou_fwd", "soft_iou_bwd"]

# Largest key tile: Nk <= MAX_SINGLE_N runs the exact single-pass softmax; beyond, online softmax.
MAX_SINGLE_N = 256
LONG_BLOCK_N = 128
MAX_BLOCK_T = 64

# Tunables (tests override them to exercise every path on small shapes). GPU_CONFIG=True makes the
# interpreter choose the tiles a GPU would (tests run the GPU's exact configs on CPU).
_OVERRIDE: dict = {}

# Dry run: while this is a list, the launchers append (kernel name, args, constexprs, options) for
# every config a launch could run (the heuristic one and each autotune config left after pruning)
# and run nothing -- tests/test_triton_compile.py compiles exactly those (meta tensors suffice).
_RECORD: list | None = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_on() -> bool:
    return (not _interpret()) and os.environ.get("FASTFAIR_TRITON_AUTOTUNE", "1") != "0"


def _gpu_rules() -> bool:
    """Tiles as for a GPU: always outside the interpreter; inside it only when a test asks."""
    return not _interpret() or bool(_OVERRIDE.get("GPU_CONFIG"))


def _cdiv(a: int, b: int) -> int:
    """triton.cdiv in plain int math: Triton's is a JIT function (~4 us per call from Python)."""
    return -(-a // b)


def _np2(x: int) -> int:
    """triton.next_power_of_2 for x >= 1 in plain int math."""
    return 1 << (max(1, x) - 1).bit_length()


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, _np2(int(x)))


def _key_block(n: int) -> int:
    if "BLOCK_N" in _OVERRIDE:
        return _OVERRIDE["BLOCK_N"]
    return _p2(n) if n <= MAX_SINGLE_N else LONG_BLOCK_N


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs worth launching: about two waves of the GPU's SMs (1 under the interpreter)."""
    if "TARGET_PROGRAMS" in _OVERRIDE:
        return _OVERRIDE["TARGET_PROGRAMS"]
    if device.type != "cuda":
        return 1  # interpreter: fewest programs is fastest
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _nq_bucket(nq: int) -> int:
    return min(_np2(nq), 8192)


def _prec(dtype: torch.dtype) -> tuple[str, str]:
    """(input_precision of the dots on the input dtype, of the fp32 map-gradient dots).

    Half inputs: the main dots run on fp16/bf16 operands (the precision argument is moot); the
    small fp32 map-gradient dots (BLOCK_M x BLOCK_T x D) use 3xTF32 -- fp32 range and ~fp32
    accuracy on tensor cores. fp32 inputs: 3xTF32 everywhere ("ieee" FMA-loop dots spill heavily
    and take minutes to compile)."""
    return ("tf32x3", "tf32x3") if dtype == torch.float32 else ("tf32", "tf32x3")


def _align(*ts) -> int:
    """8 when every tensor has a unit last-dim stride, 16-byte aligned data and row strides that are
    multiples of 8 elements (the kernels then promise the compiler 16-byte vector loads), else 1."""
    for t in ts:
        if t is None:
            continue
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:-1]):
            return 1
    return 8


def _dev_ctx(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# tiles and configs
#
# Shared memory: a GPU build stages the K/V tiles of every dot in shared memory (double-buffered when
# the key loop is pipelined, num_stages=2). On sm_90 a 256-key x 128-dim half tile pair needed 272 KiB
# (seen on an H200 at Nk=154, D=80), so on a GPU no key tile may exceed KEY_TILE_BYTES: longer key
# sets run the online-softmax loop over several tiles. tests/test_triton_compile.py compiles every
# config the launchers choose for Nk in {1..4096}, D in {40, 64, 80, 160}, fp16/bf16/fp32 for sm_90
# and checks shared memory against sm_80's 163 KiB (the smaller limit).
#
# Backward warps: every bwd config that faulted on the H200 (illegal memory access: maps->dq at D=80,
# and the unfused backward at Nk=154, D=80) ran 64-query tiles with 8 warps (two warpgroups over one
# 64-row wgmma tile); every 64-row tile with 4 warps and every 32-row tile with 8 warps passed. The
# backward kernels therefore run 64-row tiles with 4 warps only, and 32-row tiles for head dims > 64.
# --------------------------------------------------------------------------------------------

KEY_TILE_BYTES = 32 * 1024  # largest key tile (keys x padded head dim x element size) on a GPU
KV_ROWS_BYTES = 16 * 1024  # largest key block of the separate dk/dv kernel (it also holds V, dK, dV)
STAGED_BYTES = 144 * 1024  # pipelined (num_stages=2) forward only while its K/V buffers stay below this


def _fit_keys(bn: int, bd: int, esz: int, limit: int = KEY_TILE_BYTES) -> int:
    """Halve a key tile until BLOCK_N x BLOCK_D x esz <= limit (GPU rules only)."""
    if "BLOCK_N" in _OVERRIDE or not _gpu_rules():
        return bn
    while bn > 16 and bn * bd * esz > limit:
        bn //= 2
    return bn


def _fwd_stages(bm: int, bn: int, bd: int, bdv: int, esz: int, stages: int) -> int:
    """num_stages of a forward config: 2 (K/V double-buffered in shared memory: measured on sm_90 as
    2 x BLOCK_N x (BLOCK_D + BLOCK_DV) x esz + BLOCK_M x BLOCK_D x esz) only for half inputs whose
    buffers stay under STAGED_BYTES; else 1."""
    if stages > 1 and (esz >= 4 or stages * bn * (bd + bdv) * esz + bm * bd * esz > STAGED_BYTES):
        return 1
    return stages


def _fwd_configs():
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
            for bm, w in ((64, 4), (64, 8), (128, 8)) for st in (2,)]


def _fwd_prune(configs, named_args, **kwargs):
    """Keep tiles that compile without (much) spilling on sm_90 (checked with cuobjdump, see
    tests/test_triton_compile.py): 128-row tiles only for half inputs with head dims <= 64; fp32
    inputs with head dims > 64 only the heuristic config; num_stages as _fwd_stages says."""
    bd, bdv = kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64)
    bn = max(kwargs.get("BLOCK_N", 64), kwargs.get("BLOCK_NM", 16))
    q = (named_args or {}).get("Q")
    esz = q.element_size() if q is not None else 2
    h = _fwd_heuristic(max(bd, bdv), bn, esz=esz, bdv=bdv)
    if esz >= 4 and max(bd, bdv) > 64:
        return [triton.Config({"BLOCK_M": h["BLOCK_M"]}, num_warps=h["num_warps"], num_stages=h["num_stages"])]
    out = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if bm == 128 and (max(bd, bdv) > 64 or esz >= 4):
            continue
        out.append(triton.Config({"BLOCK_M": bm}, num_warps=c.num_warps,
                                 num_stages=_fwd_stages(bm, bn, bd, bdv, esz, c.num_stages)))
    return out


def _bwd_configs():
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


def _bwd_warps_ok(block_m: int, num_warps: int) -> bool:
    """64-row tiles only with 4 warps (see the note above)."""
    return not (block_m >= 64 and num_warps > 4)


def _bwd_prune(configs, named_args, **kwargs):
    """The fused backward holds dk/dv accumulators: 8 warps only (32-row tiles); 64-row tiles: 4 warps."""
    bm = kwargs.get("BLOCK_M", 64)
    out = [c for c in configs if _bwd_warps_ok(bm, c.num_warps)]
    if kwargs.get("FUSE_DK") or kwargs.get("FUSE_DV") or kwargs.get("FUSE_DMK"):
        out = [c for c in out if c.num_warps == 8] or out
    return out or [triton.Config({}, num_warps=4, num_stages=1)]


def _dkdv_prune(configs, named_args, **kwargs):
    bm = kwargs.get("BLOCK_M", 64)
    return [c for c in configs if _bwd_warps_ok(bm, c.num_warps)] or [triton.Config({}, num_warps=4, num_stages=1)]


_FWD_KEY = ["NQ_BUCKET", "Nk", "Nm", "D", "DV", "HAS_MK", "HAS_MAPS", "PER_HEAD", "COMPUTE_OUT"]
_BWD_KEY = ["NQ_BUCKET", "Nk", "Nm", "D", "DV", "HAS_DOUT", "HAS_MAPS", "HAS_MK", "NEED_DQ",
            "FUSE_DK", "FUSE_DV", "FUSE_DMK", "SINGLE"]
_DKDV_KEY = ["NQ_BUCKET", "Nk", "D", "DV", "HAS_DOUT", "NEED_DK", "NEED_DV"]

# kernel name -> (jit function, its autotuner, the autotune configs, their pruning)
_KERNELS = {
    "fwd": (_xattn_fwd_kernel, triton.autotune(configs=_fwd_configs(), key=_FWD_KEY,
                                               prune_configs_by={"early_config_prune": _fwd_prune})(_xattn_fwd_kernel),
            _fwd_configs(), _fwd_prune),
    "bwd": (_xattn_bwd_kernel, triton.autotune(configs=_bwd_configs(), key=_BWD_KEY,
                                               prune_configs_by={"early_config_prune": _bwd_prune})(_xattn_bwd_kernel),
            _bwd_configs(), _bwd_prune),
    "dkdv": (_xattn_bwd_dkdv_kernel,
             triton.autotune(configs=_bwd_configs(), key=_DKDV_KEY,
                             prune_configs_by={"early_config_prune": _dkdv_prune})(_xattn_bwd_dkdv_kernel),
             _bwd_configs(), _dkdv_prune),
}


def _fwd_heuristic(bd: int, bn: int, esz: int = 2, bdv: int | None = None) -> dict:
    """Tile config without autotuning. Checked on sm_90 for spills and shared memory by
    tests/test_triton_compile.py."""
    if "FWD_BLOCK_M" in _OVERRIDE:
        return {"BLOCK_M": _OVERRIDE["FWD_BLOCK_M"], "num_warps": 4, "num_stages": 1}
    if not _gpu_rules():
        return {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}
    if esz >= 4:  # fp32 operands: twice the shared memory per tile
        return {"BLOCK_M": 64 if bd <= 64 else 32, "num_warps": 4 if bd <= 64 else 8, "num_stages": 1}
    bm, w = (128, 8) if bd <= 64 else (64, 8)
    return {"BLOCK_M": bm, "num_warps": w, "num_stages": _fwd_stages(bm, bn, bd, bdv or bd, esz, 2)}


def _key_tile(nk: int, bd: int, esz: int = 2) -> int:
    """Key tile of the forward and of the dq kernel's loop: Nk rounded up (single pass) unless the tile
    exceeds KEY_TILE_BYTES on a GPU: then smaller tiles (online softmax)."""
    return _fit_keys(_key_block(nk), bd, esz)


def _dkdv_key_block(bn: int, bd: int, esz: int = 2) -> int:
    """Key rows per program of the separate dk/dv kernel: it keeps K, V and fp32 dK, dV accumulators
    of BLOCK_N rows, so at most KV_ROWS_BYTES of keys on a GPU."""
    return _fit_keys(bn, bd, esz, KV_ROWS_BYTES)


def _bwd_block_m(bd: int, bn: int, fused: bool, esz: int = 2) -> int:
    if "BWD_BLOCK_M" in _OVERRIDE:
        return _OVERRIDE["BWD_BLOCK_M"]
    if not _gpu_rules():
        return 64
    if esz >= 4 and bd > 128:
        return 16  # fp32 with head dims > 128: 32-row tiles need 176 KiB of shared memory on sm_90
    return 32 if (fused or esz >= 4 or bd > 64) else 64


def _bwd_heuristic(bd: int, bn: int, fused: bool, esz: int = 2, block_m: int = 64) -> dict:
    if "BWD_WARPS" in _OVERRIDE:  # bench/repro_maps_dq.py: rerun the configs that faulted
        return {"num_warps": _OVERRIDE["BWD_WARPS"], "num_stages": 1}
    if not _gpu_rules():
        return {"num_warps": 4, "num_stages": 1}
    w = 8 if (fused or bd >= 128 or bn >= 256 or esz >= 4) else 4
    if not _bwd_warps_ok(block_m, w):
        w = 4
    return {"num_warps": w, "num_stages": 1}


def _launch(name: str, grid, args, consts: dict, cfg: dict, tune: bool = True):
    """Run kernel ``name`` with the heuristic ``cfg`` (num_warps, num_stages and maybe BLOCK_M) or,
    when autotuning (and ``tune``), through its autotuner. ``grid(meta)`` gives the grid. In a dry run
    (``_RECORD``) record every config that could run instead."""
    fn, tuned, configs, prune = _KERNELS[name]
    if _RECORD is not None:
        cands = [dict(cfg)]
        if tune:
            for c in prune(configs, dict(zip(fn.arg_names, args)), **consts):
                cands.append(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
        seen = []
        for c in cands:
            opts = {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}
            cx = dict(consts, **{k: v for k, v in c.items() if k not in opts})
            if (cx, opts) not in seen:
                seen.append((cx, opts))
                _RECORD.append((fn.fn.__name__, tuple(args), cx, opts))
        return
    if tune and _autotune_on():
        tuned[grid](*args, **consts)
    else:
        fn[grid(cfg)](*args, **consts, **cfg)


# --------------------------------------------------------------------------------------------
# cross attention
# --------------------------------------------------------------------------------------------

def _common_dtype(q, k, v, mk):
    dt = q.dtype
    k = k if k.dtype == dt else k.to(dt)
    v = v if v.dtype == dt else v.to(dt)
    if mk is not None and mk.dtype != dt:
        mk = mk.to(dt)
    return k, v, mk


def _is64(*ts) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in ts)


def cross_attention_fwd(q, k, v, mk, tok, scale: float, per_head: bool):
    """See ``naive.cross_attention_fwd``: returns (out, lse, mlse, maps)."""
    if _is64(q, k, v, mk) or q.numel() == 0:
        return naive.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
    k, v, mk = _common_dtype(q, k, v, mk)
    B, H, Nq, D = q.shape
    Nk, DV = k.shape[2], v.shape[3]
    Nm = mk.shape[2] if mk is not None else 0
    dev = q.device
    out = torch.empty(B, H, Nq, DV, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=dev)
    mlse = torch.empty(B, H, Nq if mk is not None else 0, dtype=torch.float32, device=dev)
    T = tok.shape[1] if tok is not None else 0
    has_maps = tok is not None and T > 0
    if tok is None:
        maps = torch.empty(0, dtype=torch.float32, device=dev)
    elif per_head:
        maps = torch.empty(B, H, T, Nq, dtype=torch.float32, device=dev)
    else:
        maps = torch.empty(B, T, Nq, dtype=torch.float32, device=dev)
    tok_ = tok if tok is not None else torch.zeros(B, 1, dtype=torch.int64, device=dev)

    BLOCK_D, BLOCK_DV = _p2(D), _p2(DV)
    esz = q.element_size()
    BLOCK_N = _key_tile(Nk, max(BLOCK_D, BLOCK_DV), esz)
    BLOCK_NM = _key_tile(Nm, BLOCK_D, esz) if mk is not None else 16
    BLOCK_T = min(MAX_BLOCK_T, _p2(T)) if has_maps else 16
    prec, _ = _prec(q.dtype)

    # head groups: all heads in one program (maps summed in registers) unless that leaves the GPU
    # idle; then groups of heads whose partial maps are summed below.
    if has_maps and not per_head:
        nprog = _cdiv(Nq, 64) * B
        hg = max(1, min(H, _cdiv(_target_programs(dev), nprog)))
        if "HEAD_GROUPS" in _OVERRIDE:
            hg = min(H, _OVERRIDE["HEAD_GROUPS"])
        hpp = _cdiv(H, hg)
        hg = _cdiv(H, hpp)
    else:
        hg, hpp = H, 1
    if has_maps and not per_head and hg > 1:
        maps_buf = torch.empty(hg, B, T, Nq, dtype=torch.float32, device=dev)
    elif has_maps and not per_head:
        maps_buf = maps[None]
    else:
        maps_buf = maps
    if has_maps and per_head:
        smap = (0, maps.stride(0), maps.stride(1), maps.stride(2))
    elif has_maps:
        smap = (maps_buf.stride(0), maps_buf.stride(1), 0, maps_buf.stride(2))
    else:
        smap = (0, 0, 0, 0)
    mk_ = mk if mk is not None else k
    align = _align(q, k, v, mk, out)

    def launch(t0: int, compute_out: bool):
        args = (q, k, v, mk_, tok_, out, lse, mlse if mk is not None else lse, maps_buf,
                *q.stride(), *k.stride(), *v.stride(), *mk_.stride(), *tok_.stride(), *out.stride(),
                *smap,
                H, Nq, Nk, Nm, D, DV, T, t0, hpp,
                float(scale) * LOG2E, _nq_bucket(Nq))
        consts = dict(HAS_MK=mk is not None, HAS_MAPS=has_maps, PER_HEAD=per_head, COMPUTE_OUT=compute_out,
                      SINGLE=Nk <= BLOCK_N, BLOCK_N=BLOCK_N, BLOCK_NM=BLOCK_NM, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                      BLOCK_T=BLOCK_T, PREC=prec, ALIGN=align)
        cfg = _fwd_heuristic(max(BLOCK_D, BLOCK_DV), max(BLOCK_N, BLOCK_NM), esz=esz, bdv=BLOCK_DV)
        grid = lambda meta: (_cdiv(Nq, meta["BLOCK_M"]), B, hg)  # noqa: E731
        _launch("fwd", grid, args, consts, cfg, tune="FWD_BLOCK_M" not in _OVERRIDE)

    with _dev_ctx(q):
        launch(0, True)
        for t0 in range(BLOCK_T, T, BLOCK_T):  # more tokens than one tile: maps-only passes
            launch(t0, False)
    if has_maps and not per_head and hg > 1:
        torch.sum(maps_buf, dim=0, out=maps)
    return out, lse, mlse, maps


def cross_attention_bwd(q, k, v, mk, tok, scale: float, per_head: bool, out, lse, mlse, dout, dmaps,
                        needs=(True, True, True, True)):
    """See ``naive.cross_attention_bwd``: returns (dq, dk, dv, dmk), None where not needed."""
    if _is64(q, k, v, mk) or q.numel() == 0:
        return naive.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, out, lse, mlse, dout, dmaps, needs)
    k_in, v_in, mk_in = k, v, mk
    k, v, mk = _common_dtype(q, k, v, mk)
    B, H, Nq, D = q.shape
    Nk, DV = k.shape[2], v.shape[3]
    Nm = mk.shape[2] if mk is not None else 0
    dev = q.device
    need_q, need_k, need_v, need_mk = (bool(x) for x in needs)
    need_mk = need_mk and mk is not None
    T = tok.shape[1] if tok is not None else 0
    has_dout = dout is not None
    has_maps = tok is not None and dmaps is not None and T > 0
    maps_main = has_maps and mk is None
    main = has_dout or maps_main
    dk_src = need_k and main
    dv_src = need_v and has_dout
    dmk_src = need_mk and has_maps
    dq_src = need_q and (main or has_maps)

    def zeros_like(t, need):
        return torch.zeros_like(t) if need else None

    dq = zeros_like(q, need_q and not dq_src)
    dk = zeros_like(k_in, need_k and not dk_src)
    dv = zeros_like(v_in, need_v and not dv_src)
    dmk = zeros_like(mk_in, need_mk and not dmk_src) if mk is not None else None
    if not (dq_src or dk_src or dv_src or dmk_src):
        return dq, dk, dv, dmk

    esz = q.element_size()
    BLOCK_D, BLOCK_DV = _p2(D), _p2(DV)
    BLOCK_N = _key_tile(Nk, max(BLOCK_D, BLOCK_DV), esz)
    BLOCK_NM = _key_tile(Nm, BLOCK_D, esz) if mk is not None else 16
    BLOCK_T = min(MAX_BLOCK_T, _p2(T)) if has_maps else 16
    single = Nk <= BLOCK_N and (mk is None or Nm <= BLOCK_NM)
    # dk/dv/dmk fused into the dq kernel only while their accumulators stay small: with 256-key
    # tiles (Nk > 128) the fused kernel needs more than sm_90's 227 KiB of shared memory (seen on an
    # H200 at Nk=154, D=80), so those go through the separate dk/dv kernel.
    fuse = (single and (dk_src or dv_src or dmk_src) and BLOCK_N <= 128 and BLOCK_NM <= 128
            and not _OVERRIDE.get("NO_FUSE", False))
    need_w = has_maps and ((maps_main and dk_src) or (mk is not None and dmk_src))
    need_delta = (not fuse) and (dk_src or dmk_src)
    prec, prec_map = _prec(q.dtype)
    BLOCK_M = _bwd_block_m(max(BLOCK_D, BLOCK_DV), BLOCK_N, fuse, esz)
    NMB = _cdiv(Nq, BLOCK_M)
    if fuse:
        nsplit = max(1, min(NMB, _cdiv(_target_programs(dev), B * H)))
        if "NSPLIT" in _OVERRIDE:
            nsplit = max(1, min(NMB, _OVERRIDE["NSPLIT"]))
    else:
        nsplit = NMB
    mb_per = _cdiv(NMB, nsplit)
    nsplit = _cdiv(NMB, mb_per)

    f32 = dict(dtype=torch.float32, device=dev)
    dq_buf = torch.empty(B, H, Nq, D, dtype=q.dtype, device=dev) if dq_src else lse
    delta = torch.empty(B, H, Nq, **f32) if need_delta else lse
    deltam = torch.empty(B, H, Nq, **f32) if (need_delta and dmk_src) else lse
    wpart = torch.empty(B, H, NMB, T, D, **f32) if need_w else lse
    dkp = torch.empty(nsplit, B, H, Nk, D, **f32) if (fuse and dk_src) else lse
    dvp = torch.empty(nsplit, B, H, Nk, DV, **f32) if (fuse and dv_src) else lse
    dmkp = torch.empty(nsplit, B, H, Nm, D, **f32) if (fuse and dmk_src) else lse
    mk_ = mk if mk is not None else k
    mlse_ = mlse if (mk is not None and mlse is not None and mlse.numel()) else lse
    tok_ = tok if tok is not None else torch.zeros(B, 1, dtype=torch.int64, device=dev)
    dout_ = dout if has_dout else q
    if has_maps:
        dm_ = dmaps.contiguous()
        sdm = (dm_.stride(0), dm_.stride(1), dm_.stride(2)) if per_head else (dm_.stride(0), 0, dm_.stride(1))
    else:
        dm_, sdm = lse, (0, 0, 0)
    sdq = dq_buf.stride() if dq_src else (0, 0, 0, 0)
    align = _align(q, k, v, mk, dout, dq_buf if dq_src else None)
    scale = float(scale)

    with _dev_ctx(q):
        args = (q, k, v, mk_, tok_, dout_, dm_, lse, mlse_,
                dq_buf, delta, deltam, wpart, dkp, dvp, dmkp,
                *q.stride(), *k.stride(), *v.stride(), *mk_.stride(), *tok_.stride(), *dout_.stride(),
                *sdm, *sdq,
                H, Nq, Nk, Nm, D, DV, T, NMB, mb_per,
                scale * LOG2E, scale, _nq_bucket(Nq))
        consts = dict(HAS_DOUT=has_dout, HAS_MAPS=has_maps, HAS_MK=mk is not None,
                      NEED_DQ=dq_src, NEED_DELTA=need_delta, NEED_W=need_w,
                      FUSE_DK=fuse and dk_src, FUSE_DV=fuse and dv_src, FUSE_DMK=fuse and dmk_src,
                      SINGLE=single, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_NM=BLOCK_NM,
                      BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, BLOCK_T=BLOCK_T, PREC=prec, PREC_MAP=prec_map,
                      ALIGN=align)
        _launch("bwd", lambda meta: (nsplit, B * H), args, consts,
                _bwd_heuristic(max(BLOCK_D, BLOCK_DV), BLOCK_N, fuse, esz, BLOCK_M))

        def dkdv(K_, V_, L_, DEL_, n_keys, block_n, has_do, need_dk_, need_dv_):
            nkb = _cdiv(n_keys, block_n)
            ns = max(1, min(NMB, _cdiv(_target_programs(dev), nkb * B * H)))
            if "NSPLIT" in _OVERRIDE:
                ns = max(1, min(NMB, _OVERRIDE["NSPLIT"]))
            per = _cdiv(NMB, ns)
            ns = _cdiv(NMB, per)
            kp = torch.empty(ns, B, H, n_keys, D, **f32) if need_dk_ else lse
            vp = torch.empty(ns, B, H, n_keys, DV, **f32) if need_dv_ else lse
            a = (q, K_, V_, dout_, L_, DEL_, kp, vp,
                 *q.stride(), *K_.stride(), *V_.stride(), *dout_.stride(),
                 H, Nq, n_keys, D, DV, NMB, per, scale * LOG2E, scale, _nq_bucket(Nq))
            c = dict(HAS_DOUT=has_do, NEED_DK=need_dk_, NEED_DV=need_dv_, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                     BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PREC=prec, ALIGN=align)
            _launch("dkdv", lambda meta: (nkb, B * H, ns), a, c,
                    _bwd_heuristic(max(BLOCK_D, BLOCK_DV), block_n, False, esz, BLOCK_M))
            return kp, vp

        if not fuse:
            if dk_src or dv_src:
                dkp, dvp = dkdv(k, v, lse, delta, Nk, _dkdv_key_block(BLOCK_N, max(BLOCK_D, BLOCK_DV), esz),
                                has_dout, dk_src, dv_src)
            if dmk_src:
                dmkp, _ = dkdv(mk, mk, mlse_, deltam, Nm, _dkdv_key_block(BLOCK_NM, BLOCK_D, esz), False, True, False)

        def scatter_w(acc, n_keys):
            # dk[tok[b, t]] += scale * sum_n w[n, t] q[n]   (one-hot matmul: deterministic)
            W = wpart.sum(2)  # (B, H, T, D)
            oh = (tok[:, :, None] == torch.arange(n_keys, device=dev)[None, None, :]).to(torch.float32)
            return acc + scale * torch.einsum("btn,bhtd->bhnd", oh, W)

        if dq_src:
            dq = dq_buf
        if dk_src:
            acc = dkp.sum(0)
            if need_w and maps_main:
                acc = scatter_w(acc, Nk)
            dk = acc.to(k_in.dtype)
        if dv_src:
            dv = dvp.sum(0).to(v_in.dtype)
        if dmk_src:
            acc = dmkp.sum(0)
            if need_w:
                acc = scatter_w(acc, Nm)
            dmk = acc.to(mk_in.dtype)
    if dq is not None and dq.dtype != q.dtype:
        dq = dq.to(q.dtype)
    return dq, dk, dv, dmk


# --------------------------------------------------------------------------------------------
# SoftIoU
# --------------------------------------------------------------------------------------------

def _siou_setup(a, b, top_k, gamma, iters):
    N, n = a.shape
    if top_k is not None:
        kk = math.floor(top_k * n)
        if not 0 < kk < n:
            raise ValueError(f"top_k={top_k} gives k={kk} of n={n} elements; need 0 < k < n")
        lnu0, lnu1 = math.log((n - kk) / n), math.log(kk / n)
    else:
        lnu0 = lnu1 = 0.0
    block = _OVERRIDE.get("SIOU_BLOCK", min(1024, _p2(n, 32)))
    return N, n, lnu0, lnu1, block


def _siou_params(n, lnu0, lnu1, gamma, device):
    return torch.tensor([-math.log(n), lnu0, lnu1, 1.0 / gamma], dtype=torch.float64, device=device)


def soft_iou_fwd(a, b, top_k, gamma: float, iters: int, eps: float):
    """See ``naive.soft_iou``: (N, n) maps -> (N,) in a's dtype; math in fp32."""
    if _is64(a, b) or a.numel() == 0:
        return naive.soft_iou(a, b, top_k, gamma, iters, eps)
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    N, n, lnu0, lnu1, block = _siou_setup(a, b, top_k, gamma, iters)
    out = torch.empty(N, dtype=a.dtype, device=a.device)
    prm = _siou_params(n, lnu0, lnu1, gamma, a.device)
    with _dev_ctx(a):
        _softiou_fwd_kernel[(N,)](a, b, out, prm, n, a.stride(0), b.stride(0), int(iters), float(eps), float(n),
                                  HAS_TOPK=top_k is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out


def soft_iou_bwd(a, b, top_k, gamma: float, iters: int, eps: float, d_iou):
    """Exact gradient of the unrolled computation (as torch autograd of ``naive.soft_iou``)."""
    if _is64(a, b) or a.numel() == 0:
        a_ = a.detach().requires_grad_(True)
        b_ = b.detach().requires_grad_(True)
        with torch.enable_grad():
            r = naive.soft_iou(a_, b_, top_k, gamma, iters, eps)
            da, db = torch.autograd.grad(r, (a_, b_), d_iou.to(r.dtype), allow_unused=True)
        return (da if da is not None else torch.zeros_like(a)), (db if db is not None else torch.zeros_like(b))
    b_dtype = b.dtype
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    N, n, lnu0, lnu1, block = _siou_setup(a, b, top_k, gamma, iters)
    da = torch.empty(N, n, dtype=a.dtype, device=a.device)
    db = torch.empty(N, n, dtype=a.dtype, device=a.device)
    dx = torch.empty(N, 2, n, dtype=torch.float32, device=a.device)
    d = d_iou.contiguous()
    prm = _siou_params(n, lnu0, lnu1, gamma, a.device)
    with _dev_ctx(a):
        _softiou_bwd_kernel[(N,)](a, b, d, da, db, dx, prm, n, a.stride(0), b.stride(0), da.stride(0), db.stride(0),
                                  int(iters), float(eps), float(n),
                                  HAS_TOPK=top_k is not None, BLOCK=block, ITERS_P=_p2(int(iters) + 1, 2),
                                  num_warps=4 if block <= 1024 else 8)
    return da, db.to(b_dtype)
