"""The ``native`` backend: fused C++/CUDA kernels from ``csrc/`` (built by CMake + pybind11).

Exposes exactly the functions of ``fastfair/kernels/naive.py`` that the op contract uses, with the
same signatures and return conventions, plus ``usable(device)``:

* ``cross_attention_fwd(q, k, v, mk, tok, scale, per_head) -> (out, lse, mlse, maps)``
* ``cross_attention_bwd(q, k, v, mk, tok, scale, per_head, out, lse, mlse, dout, dmaps, needs)
  -> (dq, dk, dv, dmk)``
* ``soft_iou_fwd(a, b, top_k, gamma, iters, eps) -> (N,)`` and
  ``soft_iou_bwd(a, b, top_k, gamma, iters, eps, d) -> (da, db)`` (a, b: (N, n))

CPU tensors run in ``fastfair._native`` (float32 / float64; fp16 / bf16 inputs are computed in
float32 and cast back), or in one of its instruction-set variants ``_native_v3`` (x86-64-v3: AVX2, FMA) /
``_native_v4`` (x86-64-v4: AVX-512), the best one the running CPU supports (``cpu_variant()`` says which;
the environment variable ``FASTFAIR_NATIVE_VARIANT=portable|v3|v4`` forces one); CUDA tensors run in ``fastfair._native_cuda`` (fp16 / bf16 / fp32 read
natively with fp32 accumulation, fp64), which is imported only when CUDA tensors are used. Both
receive raw data pointers, shapes, strides and (CUDA) the current stream; neither links torch.
When the extension is not built this module still imports: ``usable`` answers False and
``warn_unbuilt`` says how to build it.
"""
from __future__ import annotations

import importlib
import math
import os
import platform
import warnings
from typing import Optional

import torch
from torch import Tensor

from .kernels import naive

__all__ = ["cross_attention_fwd", "cross_attention_bwd", "soft_iou_fwd", "soft_iou_bwd", "usable",
           "available", "warn_unbuilt", "BUILD_HINT", "cpu_variant", "supported_variants"]

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (or `pip install .`) in the fastfair "
              "checkout; needs cmake>=3.18, a C++17 compiler, pybind11 and scikit-build-core (nvcc for CUDA)")

# ---- the CPU module: one build per x86-64 micro-architecture level (CMakeLists.txt), picked at import ----------
# A module compiled for an instruction set the CPU lacks dies with SIGILL (no Python error) as soon as it runs one
# of its instructions, so the choice is made from the CPU's flags before importing, never by trying.
VARIANT_MODULES = {"v4": "fastfair._native_v4", "v3": "fastfair._native_v3", "portable": "fastfair._native"}
# the flags of the x86-64 psABI levels, as Linux's /proc/cpuinfo names them (pni = SSE3, abm = LZCNT)
_X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def supported_variants(flags, machine: str = "x86_64") -> list[str]:
    """The CPU module variants a CPU with these /proc/cpuinfo ``flags`` can run, best first
    (``["v4", "v3", "portable"]`` at most; just ``["portable"]`` off x86-64 or when the flags are unknown)."""
    if flags is None or machine.lower() not in ("x86_64", "amd64"):
        return ["portable"]
    flags = set(flags)
    out = [v for v, need in (("v4", _X86_64_V4), ("v3", _X86_64_V3)) if need <= flags]
    return out + ["portable"]


def _cpu_flags() -> Optional[set[str]]:
    """The running CPU's flags from /proc/cpuinfo (Linux), or None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _load_cpu_module():
    """(module, error): the best CPU module variant this CPU runs, or the one FASTFAIR_NATIVE_VARIANT names."""
    supported = supported_variants(_cpu_flags(), platform.machine())
    forced = os.environ.get("FASTFAIR_NATIVE_VARIANT", "").strip().lower()
    if forced and forced not in VARIANT_MODULES:
        warnings.warn(f"fastfair: FASTFAIR_NATIVE_VARIANT={forced!r} is none of {', '.join(VARIANT_MODULES)}; "
                      "ignored", RuntimeWarning, stacklevel=2)
    elif forced and forced not in supported:
        warnings.warn(f"fastfair: FASTFAIR_NATIVE_VARIANT={forced}: this CPU lacks its instruction set "
                      f"(it runs {', '.join(supported)}); ignored", RuntimeWarning, stacklevel=2)
    elif forced:
        supported = [forced]  # that one or nothing: a test that forces a variant must not run another
    err: Optional[BaseException] = None
    for v in supported:
        try:
            return importlib.import_module(VARIANT_MODULES[v]), None
        except ImportError as e:  # not built (v3 / v4 off x86-64, or with FASTFAIR_NATIVE_ARCH=ON)
            err = e  # the last one tried: the portable module's (or the forced one's)
    return None, err


_C, _C_ERR = _load_cpu_module()


def cpu_variant() -> Optional[str]:
    """Which CPU module runs: "portable", "v3", "v4" (x86-64 levels) or "native" (built with
    FASTFAIR_NATIVE_ARCH=ON for the building machine); None when the extension is not built."""
    return None if _C is None else getattr(_C, "variant", "portable")

_CUDA = None
_CUDA_ERR: Optional[BaseException] = None
_WARNED = False


def _cuda_module():
    """fastfair._native_cuda, imported on first use (it needs no CUDA libraries to be installed,
    but importing it is only useful with CUDA tensors)."""
    global _CUDA, _CUDA_ERR
    if _CUDA is None and _CUDA_ERR is None:
        try:
            _CUDA = importlib.import_module("fastfair._native_cuda")
        except ImportError as e:
            _CUDA_ERR = e
    return _CUDA


def available(device: torch.device | str = "cpu") -> bool:
    """Is the compiled module for this device type present?"""
    device = torch.device(device)
    if device.type == "cpu":
        return _C is not None
    if device.type == "cuda":
        return _cuda_module() is not None
    return False


def usable(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and _cuda_module() is not None
    return available(device)


def unbuilt(device: torch.device | str = "cpu") -> tuple[str, str]:
    """(the module this device type needs, why it cannot run): its import error's first line, else "no CUDA
    device" / "not found"."""
    device = torch.device(device)
    what = "fastfair._native_cuda" if device.type == "cuda" else "fastfair._native"
    err = _CUDA_ERR if device.type == "cuda" else _C_ERR
    err = str(err).strip() if err is not None else ""
    return what, err.splitlines()[0] if err else ("no CUDA device" if device.type == "cuda" else "not found")


def warn_unbuilt(device: torch.device | str = "cpu") -> None:
    """One warning per process that the native extension is missing (used by ops.resolve_backend)."""
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    what, why = unbuilt(device)
    warnings.warn(f"fastfair: native extension {what} is not built ({why}); using the reference backend -- "
                  f"{BUILD_HINT}", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _st(t: Optional[Tensor]) -> list[int]:
    return [] if t is None else list(t.stride())


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


def _require_cpu():
    if _C is None:
        raise RuntimeError(f"fastfair._native is not built: {BUILD_HINT}")
    return _C


def _require_cuda():
    mod = _cuda_module()
    if mod is None:
        raise RuntimeError(f"fastfair._native_cuda is not built ({_CUDA_ERR}): {BUILD_HINT}")
    return mod


_CUDA_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _cuda_compute_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    """fp64 if any is fp64; the common dtype when all agree (fp16/bf16/fp32 read natively); else fp32."""
    dts = {t.dtype for t in ts if t is not None}
    if torch.float64 in dts:
        return torch.float64
    if len(dts) == 1 and next(iter(dts)) in _CUDA_CODES:
        return next(iter(dts))
    return torch.float32


def _stream(device: torch.device) -> int:
    """The raw current stream of ``device`` (the private accessor Triton also uses: no Stream object)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(_dev_index(device))
    return torch.cuda.current_stream(device).cuda_stream


def _dev_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _maps_buffer(q: Tensor, tok: Optional[Tensor], per_head: bool, acc: torch.dtype, zero: bool) -> Tensor:
    B, H, Nq, _ = q.shape
    if tok is None:
        return torch.empty(0, dtype=acc, device=q.device)
    shape = (B, H, tok.shape[1], Nq) if per_head else (B, tok.shape[1], Nq)
    return (torch.zeros if zero else torch.empty)(shape, dtype=acc, device=q.device)


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in dtype, without the cost of a no-op ``.to`` call (~2 us each, several per layer call)."""
    return t if (t is None or t.dtype == dtype) else t.to(dtype)


def _tok(tok: Optional[Tensor]) -> Optional[Tensor]:
    return None if tok is None else _as(tok, torch.int64).contiguous()


# ------------------------------------------------------------------------------------------------
# cross-attention
# ------------------------------------------------------------------------------------------------

def cross_attention_fwd(q: Tensor, k: Tensor, v: Tensor, mk: Optional[Tensor], tok: Optional[Tensor],
                        scale: float, per_head: bool):
    """Returns (out, lse, mlse, maps) exactly as ``naive.cross_attention_fwd``."""
    if q.numel() == 0:  # an empty batch, head or query set: nothing to compute (the kernels divide by these)
        return naive.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    Nm = mk.shape[2] if mk is not None else 0
    acc = naive.acc_dtype(q, k, v, mk)
    tok = _tok(tok)
    T = tok.shape[1] if tok is not None else 0
    lse = torch.empty(B, H, Nq, dtype=acc, device=q.device)
    mlse = torch.empty(B, H, Nq if mk is not None else 0, dtype=acc, device=q.device)
    if q.device.type == "cuda":
        mod = _require_cuda()
        cdt = _cuda_compute_dtype(q, k, v, mk)
        qc, kc, vc, mkc = _as(q, cdt), _as(k, cdt), _as(v, cdt), _as(mk, cdt)
        out = torch.empty(B, H, Nq, Dv, dtype=cdt, device=q.device)
        maps = _maps_buffer(q, tok, per_head, acc, zero=not per_head)
        mod.xattn_fwd(_CUDA_CODES[cdt], _dev_index(q.device), _stream(q.device), B, H, Nq, Nk, Nm, D, Dv, T,
                      float(scale), bool(per_head), _ptr(qc), _st(qc), _ptr(kc), _st(kc), _ptr(vc), _st(vc),
                      _ptr(mkc), _st(mkc), _ptr(tok), _ptr(out), _ptr(lse), _ptr(mlse),
                      _ptr(maps) if T > 0 else 0)
        return _as(out, q.dtype), lse, mlse, maps
    mod = _require_cpu()
    qa, ka, va, mka = _as(q, acc), _as(k, acc), _as(v, acc), _as(mk, acc)
    out = torch.empty(B, H, Nq, Dv, dtype=acc, device=q.device)
    maps = _maps_buffer(q, tok, per_head, acc, zero=False)
    mod.xattn_fwd(acc == torch.float64, B, H, Nq, Nk, Nm, D, Dv, T, float(scale), bool(per_head),
                  _ptr(qa), _st(qa), _ptr(ka), _st(ka), _ptr(va), _st(va), _ptr(mka), _st(mka), _ptr(tok),
                  _ptr(out), _ptr(lse), _ptr(mlse), _ptr(maps) if T > 0 else 0, _nthreads())
    return _as(out, q.dtype), lse, mlse, maps


def cross_attention_bwd(q: Tensor, k: Tensor, v: Tensor, mk: Optional[Tensor], tok: Optional[Tensor],
                        scale: float, per_head: bool, out: Tensor, lse: Tensor, mlse: Optional[Tensor],
                        dout: Optional[Tensor], dmaps: Optional[Tensor], needs=(True, True, True, True)):
    """Returns (dq, dk, dv, dmk) exactly as ``naive.cross_attention_bwd`` (None where not needed)."""
    if q.numel() == 0:
        return naive.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, out, lse, mlse, dout, dmaps, needs)
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    Nm = mk.shape[2] if mk is not None else 0
    need_q, need_k, need_v, need_mk = (bool(x) for x in needs)
    need_mk = need_mk and mk is not None
    acc = naive.acc_dtype(q, k, v, mk)
    tok = _tok(tok)
    T = tok.shape[1] if tok is not None else 0
    has_maps = tok is not None and dmaps is not None and T > 0
    lse = _as(lse, acc).contiguous()
    mlse = _as(mlse, acc).contiguous() if (mk is not None and mlse is not None and mlse.numel()) else None
    if mk is not None and has_maps and mlse is None:
        raise ValueError("cross_attention_bwd with map_keys needs the saved mlse")
    dmaps_a = _as(dmaps, acc).contiguous() if has_maps else None
    dev = q.device

    if dev.type == "cuda":
        mod = _require_cuda()
        cdt = _cuda_compute_dtype(q, k, v, mk)
        qc, kc, vc, mkc, doc = _as(q, cdt), _as(k, cdt), _as(v, cdt), _as(mk, cdt), _as(dout, cdt)
        dq = torch.empty(B, H, Nq, D, dtype=cdt, device=dev) if need_q else None
        dk = torch.empty(B, H, Nk, D, dtype=cdt, device=dev) if need_k else None
        dv_run = need_v and doc is not None
        dv = torch.empty(B, H, Nk, Dv, dtype=cdt, device=dev) if dv_run else None
        dmk_run = need_mk and has_maps
        dmk = torch.empty(B, H, Nm, D, dtype=cdt, device=dev) if dmk_run else None
        ds_buf = torch.empty(B, H, Nq, Nk, dtype=acc, device=dev) if need_k else None
        p_buf = torch.empty(B, H, Nq, Nk, dtype=acc, device=dev) if dv_run else None
        dsm_buf = torch.empty(B, H, Nq, Nm, dtype=acc, device=dev) if dmk_run else None
        mod.xattn_bwd(_CUDA_CODES[cdt], _dev_index(dev), _stream(dev), B, H, Nq, Nk, Nm, D, Dv, T, float(scale),
                      bool(per_head), _ptr(qc), _st(qc), _ptr(kc), _st(kc), _ptr(vc), _st(vc), _ptr(mkc), _st(mkc),
                      _ptr(tok), _ptr(lse), _ptr(mlse), _ptr(doc), _st(doc), _ptr(dmaps_a), _ptr(dq), _ptr(dk),
                      _ptr(dv), _ptr(dmk), _ptr(ds_buf), _ptr(p_buf), _ptr(dsm_buf))
        if need_v and dv is None:
            dv = torch.zeros(B, H, Nk, Dv, dtype=cdt, device=dev)
        if need_mk and dmk is None:
            dmk = torch.zeros(B, H, Nm, D, dtype=cdt, device=dev)
    else:
        mod = _require_cpu()
        qa, ka, va, mka, doa = _as(q, acc), _as(k, acc), _as(v, acc), _as(mk, acc), _as(dout, acc)
        dq = torch.empty(B, H, Nq, D, dtype=acc) if need_q else None
        dk = torch.empty(B, H, Nk, D, dtype=acc) if need_k else None
        dv = torch.empty(B, H, Nk, Dv, dtype=acc) if need_v else None
        dmk = torch.empty(B, H, Nm, D, dtype=acc) if need_mk else None
        mod.xattn_bwd(acc == torch.float64, B, H, Nq, Nk, Nm, D, Dv, T, float(scale), bool(per_head),
                      _ptr(qa), _st(qa), _ptr(ka), _st(ka), _ptr(va), _st(va), _ptr(mka), _st(mka),
                      _ptr(tok) if has_maps else 0, _ptr(lse), _ptr(mlse), _ptr(doa), _st(doa), _ptr(dmaps_a),
                      _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dmk), _nthreads())
    cast = lambda t, like: None if t is None else _as(t, like.dtype)  # noqa: E731
    return cast(dq, q), cast(dk, k), cast(dv, v), (cast(dmk, mk) if need_mk else None)


# ------------------------------------------------------------------------------------------------
# SoftIoU
# ------------------------------------------------------------------------------------------------

def _topk_count(top_k: Optional[float], n: int) -> int:
    if top_k is None:
        return 0
    k = math.floor(top_k * n)
    if not 0 < k < n:
        raise ValueError(f"top_k={top_k} gives k={k} of n={n} elements; need 0 < k < n")
    return k


def _siou_prep(a: Tensor, b: Tensor):
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    acc = torch.float64 if torch.float64 in (a2.dtype, b2.dtype) else torch.float32
    if a.device.type == "cuda":
        cdt = _cuda_compute_dtype(a2, b2)
        return a2.to(cdt).contiguous(), b2.to(cdt).contiguous(), acc, cdt
    return a2.to(acc).contiguous(), b2.to(acc).contiguous(), acc, acc


def _siou_call(a: Tensor, b: Tensor, top_k, gamma, iters, eps, d: Optional[Tensor]):
    a2, b2, acc, cdt = _siou_prep(a, b)
    N, n = a2.shape
    k = _topk_count(top_k, n)
    dev = a.device
    out = torch.empty(N, dtype=acc, device=dev) if d is None else None
    dy = d.to(acc).contiguous() if d is not None else None
    da = torch.empty(N, n, dtype=acc, device=dev) if d is not None else None
    db = torch.empty(N, n, dtype=acc, device=dev) if d is not None else None
    if dev.type == "cuda":
        mod = _require_cuda()
        mod.soft_iou(_CUDA_CODES[cdt], _dev_index(dev), _stream(dev), N, n, k, float(gamma), int(iters), float(eps),
                     _ptr(a2), _ptr(b2), _ptr(out), _ptr(dy), _ptr(da), _ptr(db))
    else:
        _require_cpu().soft_iou(acc == torch.float64, N, n, k, float(gamma), int(iters), float(eps), _ptr(a2),
                                _ptr(b2), _ptr(out), _ptr(dy), _ptr(da), _ptr(db), _nthreads())
    return out, da, db


def soft_iou_fwd(a: Tensor, b: Tensor, top_k: Optional[float], gamma: float, iters: int, eps: float) -> Tensor:
    """``naive.soft_iou(a, b, top_k, gamma, iters, eps)`` for (N, ...) maps -> (N,) in a's dtype."""
    out, _, _ = _siou_call(a, b, top_k, gamma, iters, eps, None)
    return out.to(a.dtype)


def soft_iou_bwd(a: Tensor, b: Tensor, top_k: Optional[float], gamma: float, iters: int, eps: float,
                 d: Tensor) -> tuple[Tensor, Tensor]:
    """Exact gradient of ``soft_iou_fwd`` (through the unrolled Sinkhorn iterations): (da, db)."""
    _, da, db = _siou_call(a, b, top_k, gamma, iters, eps, d)
    return da.reshape(a.shape).to(a.dtype), db.reshape(b.shape).to(b.dtype)
