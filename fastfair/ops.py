"""The one op contract of fastfair, with several backends behind it.

``cross_attention(q, k, v, *, map_tokens=None, map_keys=None, scale=None, head_reduce="sum",
backend="auto") -> (out, maps)`` and ``soft_iou(a, b, *, top_k=0.3, ...) -> (N,)``.

Backends (chosen here and nowhere else):

* ``"reference"``: exact chunked PyTorch (``fastfair/kernels/naive.py``); any device.
* ``"triton"``: fused Triton kernels (``fastfair/kernels/``); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` when asked for by name.
* ``"native"``: the C++/CUDA extension from ``csrc/`` when it is built.

``backend="auto"`` picks triton on CUDA tensors of sm_80 / 86 / 89 / 90 GPUs (else native on sm_80 or newer,
else the reference): on an H200 it beat the native CUDA module and the reference at every SD1.5/SDXL shape at
batch >= 8 (bench/RESULTS.md) -- and on
CPU native when the extension is built
(it measures faster than the reference at every SD shape, bench/bench_native_cpu.py)
(else the reference, with a one-time warning saying how to build it); ``soft_iou`` on CUDA prefers
native (its Sinkhorn kernels measured 3.5-4x faster than Triton's there). The environment
variable ``FASTFAIR_BACKEND`` overrides ``auto``. Every backend implements the same row math
(see ``naive.py``) and is wrapped here once, as a ``torch.library.custom_op`` with a fake
implementation and a registered autograd formula, so ``torch.compile`` can trace it. Backward
recomputes probabilities from the saved log-sum-exp: no backend keeps ``Nq x Nk``
probabilities for autograd.

This module imports neither diffusers nor transformers.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .kernels import naive

__all__ = ["cross_attention", "attention_maps", "soft_iou", "available_backends", "resolve_backend", "register_backend"]


@dataclass
class Backend:
    """A backend: module path of an object exposing the naive.py functions, and a device test."""

    name: str
    module: str
    usable: Callable[[torch.device], bool]
    _mod: object = None

    def load(self):
        if self._mod is None:
            self._mod = importlib.import_module(self.module)
        return self._mod


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _native_module():
    """fastfair.native, imported once (None when it cannot be)."""
    try:
        return importlib.import_module("fastfair.native")
    except ImportError:
        return None


def _native_usable(device: torch.device) -> bool:
    mod = _native_module()
    return mod is not None and bool(getattr(mod, "usable", lambda d: False)(device))


def _native_unbuilt_warning(device: torch.device) -> None:
    """Warn once that the native extension is missing and auto runs the reference instead (a backend named
    explicitly raises: resolve_backend)."""
    try:
        importlib.import_module("fastfair.native").warn_unbuilt(device)
    except ImportError:  # pragma: no cover
        pass


_BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", "fastfair.kernels.naive", lambda d: True),
    "triton": Backend("triton", "fastfair.kernels.triton_ops", _triton_usable),
    "native": Backend("native", "fastfair.native", _native_usable),
}


def register_backend(name: str, module: str, usable: Callable[[torch.device], bool]) -> None:
    """Register a backend: ``module`` must provide naive.py's functions with the same signatures."""
    _BACKENDS[name] = Backend(name, module, usable)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    out = []
    for name, be in _BACKENDS.items():
        try:
            if be.usable(device):
                out.append(name)
        except Exception:  # pragma: no cover - a broken optional backend is simply unavailable
            pass
    return out


# CUDA architectures where ``auto`` picks triton: those its launch rules are sized and compile-tested for
# (tests/test_triton_compile.py: sm_90 codegen within sm_80's shared memory; sm_86 codegen within the 99 KiB
# of sm_86 / sm_89, for which the tiles shrink by the device's shared memory). Measured on an H200 only.
TRITON_AUTO_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (9, 0))


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _capability(device: torch.device) -> tuple[int, int]:
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def backend_override() -> str | None:
    """The FASTFAIR_BACKEND environment variable (stripped), which overrides ``backend="auto"``; None when unset."""
    return os.environ.get("FASTFAIR_BACKEND", "").strip() or None


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` (or the FASTFAIR_BACKEND override) to a concrete, usable backend name."""
    env = ""
    if backend == "auto":
        backend = backend_override() or "auto"
        env = "" if backend == "auto" else f" (from the environment variable FASTFAIR_BACKEND={backend}: unset it, or set auto)"
    if backend == "auto":
        if device.type == "cuda":
            # Triton first: on an H200 (bench/RESULTS.md) it was the fastest fastfair backend at every
            # shape at batch >= 8 (the native CUDA module's row kernels run at ~0.9 TFLOP/s and fall
            # behind the reference at large batches); its head-dim-80 backward fault is fixed
            # (the old 64-row x 8-warp tile still faults, the tiles now chosen pass). Only on the
            # architectures its tiles are sized and compile-tested for (TRITON_AUTO_CAPABILITIES; Turing's
            # 64 KiB of shared memory per block is not); native needs sm_80 or newer.
            cc = _capability(device)
            order = (("triton",) if cc in TRITON_AUTO_CAPABILITIES else ()) + (("native",) if cc >= (8, 0) else ())
            for name in order:
                if _BACKENDS[name].usable(device):
                    return name
            return "reference"
        if device.type == "cpu":  # native beats the reference on CPU (bench/bench_native_cpu.py)
            if _native_usable(device):
                return "native"
            _native_unbuilt_warning(device)
        return "reference"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}{env}; choose one of {sorted(_BACKENDS)} or 'auto'")
    if not _BACKENDS[backend].usable(device):
        # a backend asked for by name (argument or FASTFAIR_BACKEND) runs or says why: never another one silently
        # (an explicit 'native' used to fall back to the reference with a warning, recording a run as native's)
        if backend == "native" and device.type not in ("cpu", "cuda"):
            hint = "the native backend runs on CPU and CUDA tensors; use backend='auto' or 'reference'"
        elif backend == "native":
            mod = _native_module()
            what, why = mod.unbuilt(device) if mod is not None else ("fastfair.native", "it does not import")
            build = mod.BUILD_HINT if mod is not None else "reinstall fastfair"
            hint = f"{what} is not built or cannot run here ({why}); {build}; or use backend='auto' / 'reference'"
        else:
            hint = {"triton": "install triton and use CUDA tensors (or set TRITON_INTERPRET=1 on CPU)"}.get(backend, "")
        raise RuntimeError(f"backend {backend!r}{env} is not usable on {device.type} tensors: {hint}")
    return backend


# backend name per (requested backend, device), as the last eager call resolved it: torch.compile
# reads it instead of re-running resolve_backend, whose module imports dynamo cannot trace (one graph
# break per attention layer otherwise).
_RESOLVED: dict = {}


def _resolve_for_call(backend: str, device: torch.device, op: str = "xattn") -> str:
    """resolve_backend for one call of ``op`` ("xattn", or "soft_iou" with its own CUDA choice)."""
    if torch.compiler.is_compiling():
        return _resolve_traced(op, backend, device.type, device.index)
    return _resolve_eager(op, backend, device)


def _resolve_eager(op: str, backend: str, device: torch.device) -> str:
    key = (op, backend, device.type, device.index)
    name = _RESOLVED[key] = (_resolve_soft_iou if op == "soft_iou" else resolve_backend)(backend, device)
    return name


@torch.compiler.assume_constant_result
def _resolve_traced(op: str, backend: str, dev_type: str, dev_index) -> str:
    """The backend while dynamo traces: run eagerly at trace time (module imports cannot be traced), its
    name baked into the graph as a constant -- also when no eager call came first."""
    name = _RESOLVED.get((op, backend, dev_type, dev_index))
    return name if name is not None else _resolve_eager(op, backend, torch.device(dev_type, dev_index))


def _resolve_soft_iou(backend: str, device: torch.device) -> str:
    """SoftIoU's auto on CUDA prefers the native module: its Sinkhorn top-k kernels ran 3.5-4.1x faster than
    the Triton ones on an H200 (0.41-0.48 vs 1.65 ms for 64x64 maps, 1.31 vs 5.43 ms for 128x128, fwd + bwd,
    bench/RESULTS.md). Elsewhere, and when a backend is named, as resolve_backend."""
    if (backend == "auto" and not os.environ.get("FASTFAIR_BACKEND") and device.type == "cuda"
            and _capability(device) >= (8, 0) and _native_usable(device)):
        return "native"
    return resolve_backend(backend, device)


def _mod(backend: str):
    return _BACKENDS[backend].load()


# --------------------------------------------------------------------------------------------
# cross_attention as a custom op
# --------------------------------------------------------------------------------------------

def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if (t is not None and t.numel() > 0) else None


@torch.library.custom_op("fastfair::xattn_fwd", mutates_args=())
def _xattn_fwd(q: Tensor, k: Tensor, v: Tensor, mk: Optional[Tensor], tok: Optional[Tensor],
               scale: float, per_head: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if tok is not None:  # a compiled graph's tokens: dynamo could not check them at trace time
        _check_token_range(tok, (mk if mk is not None else k).shape[2])
    return tuple(_mod(backend).cross_attention_fwd(q, k, v, mk, tok, scale, per_head))


@_xattn_fwd.register_fake
def _(q, k, v, mk, tok, scale, per_head, backend):
    B, H, Nq, _ = q.shape
    acc = naive.acc_dtype(q, k, v, mk)
    out = q.new_empty(B, H, Nq, v.shape[-1])
    lse = q.new_empty(B, H, Nq, dtype=acc)
    mlse = q.new_empty(B, H, Nq if mk is not None else 0, dtype=acc)
    if tok is None:
        maps = q.new_empty(0, dtype=acc)
    else:
        T = tok.shape[1]
        maps = q.new_empty((B, H, T, Nq) if per_head else (B, T, Nq), dtype=acc)
    return out, lse, mlse, maps


@torch.library.custom_op("fastfair::xattn_bwd", mutates_args=())
def _xattn_bwd(q: Tensor, k: Tensor, v: Tensor, mk: Optional[Tensor], tok: Optional[Tensor],
               scale: float, per_head: bool, backend: str, out: Tensor, lse: Tensor, mlse: Tensor,
               dout: Optional[Tensor], dmaps: Optional[Tensor], needs: list[bool]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _mod(backend).cross_attention_bwd(q, k, v, mk, tok, scale, per_head, out, lse, _opt(mlse),
                                              dout, dmaps, tuple(needs))
    like = (q, k, v, mk if mk is not None else q)
    return tuple(g if g is not None else l.new_empty(0) for g, l in zip(grads, like))


@_xattn_bwd.register_fake
def _(q, k, v, mk, tok, scale, per_head, backend, out, lse, mlse, dout, dmaps, needs):
    like = (q, k, v, mk)
    return tuple(l.new_empty(l.shape) if (n and l is not None) else q.new_empty(0) for n, l in zip(needs, like))


_NO_DOUBLE_BACKWARD = (b"fastfair's cross_attention / soft_iou have no second derivative (double backward, e.g. a "
                       b"gradient penalty through them); for soft_iou use backend='reference', which is plain autograd")


def _first_order_only(backward):
    """The backends' backward formulas are not differentiable (the kernels, and the saved log-sum-exp the
    reference recomputes from). Run them without grad and, under ``create_graph=True``, hand back gradients
    whose own backward raises a clear error -- never a silently wrong second derivative. (torch's
    once_differentiable does this only when the incoming gradients require grad.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return out
        # tie the returned gradients to the op's inputs through a node that raises when differentiated: a second
        # backward toward those inputs (or anything upstream of them) then reaches it
        anchors = [t for t in ctx.saved_tensors if isinstance(t, Tensor) and t.requires_grad]
        if not anchors:
            return out
        zero = sum(t.reshape(-1)[:1].sum() * 0 for t in anchors)
        slots = [i for i, g in enumerate(out) if isinstance(g, Tensor) and g.is_floating_point()]
        err = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, len(slots))
        res = err(*[out[i] + zero.to(out[i].dtype) for i in slots])
        res = res if isinstance(res, tuple) else (res,)
        out = list(out)
        for i, r in zip(slots, res):
            out[i] = r
        return tuple(out)

    return wrapper


def _fwd_setup(ctx, inputs, output):
    q, k, v, mk, tok, scale, per_head, backend = inputs
    out, lse, mlse, maps = output
    ctx.save_for_backward(q, k, v, mk, tok, out, lse, mlse)
    ctx.scale, ctx.per_head, ctx.backend = scale, per_head, backend
    ctx.has_mk = mk is not None


def _input_grads(ctx, dout, dmaps, bwd):
    """The 8 input gradients of xattn_fwd from ``bwd(q, k, v, mk, tok, out, lse, mlse, dout, dmaps, needs)``."""
    q, k, v, mk, tok, out, lse, mlse = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if not ctx.has_mk:
        needs[3] = False
    if dmaps is not None and dmaps.numel() == 0:
        dmaps = None
    if dout is None and dmaps is None:
        return (None,) * 8
    dq, dk, dv, dmk = bwd(q, k, v, mk, tok, out, lse, mlse, dout, dmaps, needs)
    pick = lambda g, n: g if n else None  # noqa: E731
    return (pick(dq, needs[0]), pick(dk, needs[1]), pick(dv, needs[2]), pick(dmk, needs[3]),
            None, None, None, None)


@_first_order_only
def _fwd_backward(ctx, dout, dlse, dmlse, dmaps):
    def bwd(q, k, v, mk, tok, out, lse, mlse, dout, dmaps, needs):
        return _xattn_bwd(q, k, v, mk, tok, ctx.scale, ctx.per_head, ctx.backend, out, lse, mlse, dout, dmaps, needs)
    return _input_grads(ctx, dout, dmaps, bwd)


torch.library.register_autograd("fastfair::xattn_fwd", _fwd_backward, setup_context=_fwd_setup)


class _XAttnEager(torch.autograd.Function):
    """The same forward / backward as the custom op, for eager mode without the custom-op dispatch.

    ``torch.ops.fastfair.xattn_fwd`` costs ~50-70 us of Python dispatch per call (measured on CPU,
    bench/RESULTS.md), as much as the whole fused kernel at SD shapes on a GPU. Eager calls
    therefore go straight to the backend through this Function; ``torch.compile`` traces the
    custom op (``cross_attention`` picks it while compiling). Both run the same backend functions.
    """

    @staticmethod
    def forward(ctx, q, k, v, mk, tok, scale, per_head, backend):
        output = _mod(backend).cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
        ctx.set_materialize_grads(False)  # an unused output (out or maps) gives None, not zeros
        _fwd_setup(ctx, (q, k, v, mk, tok, scale, per_head, backend), output)
        return output[0], output[3]

    @staticmethod
    @_first_order_only
    def backward(ctx, dout, dmaps):
        def bwd(q, k, v, mk, tok, out, lse, mlse, dout, dmaps, needs):
            return _mod(ctx.backend).cross_attention_bwd(q, k, v, mk, tok, ctx.scale, ctx.per_head, out, lse,
                                                         _opt(mlse), dout, dmaps, tuple(needs))
        return _input_grads(ctx, dout, dmaps, bwd)


# (tensor given, its version, its data pointer, B, nk, device, normalised): the engine passes one CUDA tensor per
# layer call, and checking it costs a few kernel launches each time. CUDA tensors only: CPU checks are cheap, and
# a CPU tensor can change without a version bump (``.data`` writes, numpy views), which a cached copy would miss.
_TOK_CACHE: list = [None]


def _normalise_tokens(map_tokens, B: int, nk: int, device) -> Tensor:
    cacheable = (isinstance(map_tokens, Tensor) and map_tokens.device.type == "cuda"
                 and not map_tokens.is_inference() and not torch.compiler.is_compiling())
    if cacheable:
        hit = _TOK_CACHE[0]
        if (hit is not None and hit[0] is map_tokens and hit[1:6] == (map_tokens._version, map_tokens.data_ptr(),
                                                                     B, nk, device)):
            return hit[6]
    tok = _check_tokens(map_tokens, B, nk, device)
    if cacheable:
        _TOK_CACHE[0] = (map_tokens, map_tokens._version, map_tokens.data_ptr(), B, nk, device, tok)
    return tok


_TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_tokens(map_tokens, B: int, nk: int, device) -> Tensor:
    if isinstance(map_tokens, (list, tuple)) and len(map_tokens) == 0:
        map_tokens = torch.zeros(0, dtype=torch.int64)  # no tokens (torch.as_tensor([]) would be float)
    tok = torch.as_tensor(map_tokens, device=device)
    if tok.dtype not in _TOKEN_DTYPES:
        raise TypeError(f"map_tokens must be integer key positions, got dtype {tok.dtype}")
    if tok.dim() == 1:
        tok = tok[None].expand(B, -1)
    if tok.dim() != 2 or tok.shape[0] != B:
        raise ValueError(f"map_tokens must be (T,) or (B={B}, T); got shape {tuple(tok.shape)}")
    if not torch.compiler.is_compiling():  # compiled graphs check inside the op (_check_token_range)
        _check_token_range(tok, nk)
    return tok.to(torch.int64).contiguous()


def _check_token_range(tok: Tensor, nk: int) -> None:
    if not tok.numel():
        return
    if tok.device.type != "cpu":  # device-side check: no host sync in the denoising loop
        torch._assert_async(((tok >= 0) & (tok < nk)).all(), "map_tokens out of range")
    elif int(tok.min()) < 0 or int(tok.max()) >= nk:
        raise IndexError(f"map_tokens must lie in [0, {nk}) (the number of keys the maps use); "
                         f"got values in [{int(tok.min())}, {int(tok.max())}]")


def cross_attention(q: Tensor, k: Tensor, v: Tensor, *, map_tokens=None, map_keys: Tensor | None = None,
                    scale: float | None = None, head_reduce: str = "sum", backend: str = "auto"
                    ) -> tuple[Tensor, Tensor | None]:
    """out = softmax(q k^T scale) v, plus per-token attention maps, without materialising P.

    q (B,H,Nq,D); k, v (B,H,Nk,D); ``map_tokens`` (T,) or (B,T) integer key positions;
    ``map_keys`` (B,H,Nm,D): keys of a separate attribution prompt -- the maps' softmax then runs
    over ``map_keys`` and ``map_tokens`` index it. ``head_reduce="sum"`` gives maps (B,T,Nq),
    ``"none"`` gives (B,H,T,Nq). Maps are float32 (float64 for float64 inputs); ``maps`` is None
    when no tokens are asked for. Differentiable in q, k, v and map_keys.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B,H,N,D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("cross_attention needs at least one key")
    if D == 0 or v.shape[3] == 0:
        raise ValueError(f"cross_attention needs head dims >= 1; got q/k {D}, v {v.shape[3]}")
    if head_reduce not in ("sum", "none"):
        raise ValueError(f"head_reduce must be 'sum' or 'none', got {head_reduce!r}")
    if map_keys is not None:
        if map_keys.dim() != 4 or map_keys.shape[:2] != (B, H) or map_keys.shape[3] != D:
            raise ValueError(f"map_keys must be (B={B}, H={H}, Nm, D={D}); got {tuple(map_keys.shape)}")
        if map_tokens is None:
            raise ValueError("map_keys given without map_tokens: say which attribution-prompt tokens to map")
    tok = None
    if map_tokens is not None:
        nk = map_keys.shape[2] if map_keys is not None else k.shape[2]
        tok = _normalise_tokens(map_tokens, B, nk, q.device)
    scale = naive.default_scale(D) if scale is None else float(scale)
    name = _resolve_for_call(backend, q.device)
    per_head = head_reduce == "none"
    if torch.compiler.is_compiling():
        out, _, _, maps = torch.ops.fastfair.xattn_fwd(q, k, v, map_keys, tok, scale, per_head, name)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                      or (map_keys is not None and map_keys.requires_grad)):
        out, maps = _XAttnEager.apply(q, k, v, map_keys, tok, scale, per_head, name)
    else:  # inference: no autograd bookkeeping at all
        out, _, _, maps = _mod(name).cross_attention_fwd(q, k, v, map_keys, tok, scale, per_head)
    return out, (maps if tok is not None else None)


def attention_maps(q: Tensor, map_keys: Tensor, map_tokens, *, scale: float | None = None,
                   head_reduce: str = "sum", backend: str = "reference") -> Tensor:
    """Maps only, for a further attribution prompt in the same pass over ``q``: the ``map_tokens``
    columns of ``softmax(q map_keys^T scale)``, summed over heads ((B,T,Nq)) or not ((B,H,T,Nq)) --
    what ``cross_attention(q, k, v, map_keys=map_keys, map_tokens=map_tokens)`` returns as maps,
    without its attention output.

    ``backend="reference"`` (default) runs in PyTorch on every device (chunked over queries, float32
    accumulation, float64 for float64 inputs) and is differentiable by torch's autograd: enough for a
    UNet's attribution prompt (BOS, its words, EOS: a few keys). An MMDiT's attribution keys are
    [image; text] (thousands): there a fused backend (``"auto"``, ``"native"``, ``"triton"``) computes
    the maps in its fused forward, whose attention output runs over a single zero key (negligible);
    that path is for inference (no gradient) and falls back to the reference when one is needed.
    """
    if q.dim() != 4 or map_keys.dim() != 4:
        raise ValueError(f"q and map_keys must be (B,H,N,D); got {tuple(q.shape)}, {tuple(map_keys.shape)}")
    B, H, Nq, D = q.shape
    if map_keys.shape[:2] != (B, H) or map_keys.shape[3] != D:
        raise ValueError(f"map_keys must be (B={B}, H={H}, Nm, D={D}); got {tuple(map_keys.shape)}")
    if map_keys.shape[2] == 0:
        raise ValueError("attention_maps needs at least one attribution key")
    if head_reduce not in ("sum", "none"):
        raise ValueError(f"head_reduce must be 'sum' or 'none', got {head_reduce!r}")
    if map_tokens is None:
        raise ValueError("attention_maps needs map_tokens: say which attribution-prompt tokens to map")
    tok = _normalise_tokens(map_tokens, B, map_keys.shape[2], q.device)
    scale = naive.default_scale(D) if scale is None else float(scale)
    name = "reference" if backend == "reference" else _resolve_for_call(backend, q.device)
    grad = torch.is_grad_enabled() and (q.requires_grad or map_keys.requires_grad)
    if name == "reference" or grad or torch.compiler.is_compiling():
        return naive.attention_maps(q, map_keys, tok, scale, head_reduce == "none")
    zero = q.new_zeros(B, H, 1, D)  # the fused forward's own attention: one zero key and value
    return _mod(name).cross_attention_fwd(q, zero, zero, map_keys, tok, scale, head_reduce == "none")[3]


# --------------------------------------------------------------------------------------------
# soft_iou
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastfair::soft_iou", mutates_args=())
def _soft_iou_op(a: Tensor, b: Tensor, top_k: float, gamma: float, iters: int, eps: float, backend: str) -> Tensor:
    return _mod(backend).soft_iou_fwd(a, b, None if top_k <= 0 else top_k, gamma, iters, eps)


@_soft_iou_op.register_fake
def _(a, b, top_k, gamma, iters, eps, backend):
    return a.new_empty(a.shape[0])


def _siou_setup(ctx, inputs, output):
    a, b, top_k, gamma, iters, eps, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.args = (None if top_k <= 0 else top_k, gamma, iters, eps)
    ctx.backend = backend


@_first_order_only
def _siou_backward(ctx, d):
    a, b = ctx.saved_tensors
    da, db = _mod(ctx.backend).soft_iou_bwd(a, b, *ctx.args, d)
    return da, db, None, None, None, None, None


torch.library.register_autograd("fastfair::soft_iou", _siou_backward, setup_context=_siou_setup)


def soft_iou(a: Tensor, b: Tensor, *, top_k: float | None = 0.3, gamma: float = 0.01, iters: int = 20,
             eps: float = 1e-8, backend: str = "auto") -> Tensor:
    """BiasMap's differentiable SoftIoU of maps batched over a leading dimension.

    a, b: (N, ...) maps (trailing dims are flattened) -> (N,), in the dtype the two inputs promote to
    (float32 for integer maps); the math runs in float32 (float64 for float64 inputs) on every backend.
    See ``naive.soft_iou``. Each map is min-max normalised first, so a constant (e.g. all-zero) map
    becomes all zeros: two such maps give 0 without ``top_k`` and a small constant with it (the soft
    mask of a flat map spreads its top-k mass evenly) -- not NaN, as ``metrics.iou`` gives for them,
    because guidance differentiates this value.
    """
    if a.shape != b.shape:
        raise ValueError(f"soft_iou needs maps of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"soft_iou expects a batch of maps (N, ...); got shape {tuple(a.shape)}")
    n = math.prod(a.shape[1:])
    a2, b2 = a.reshape(a.shape[0], n), b.reshape(b.shape[0], n)
    dtype = torch.promote_types(a2.dtype, b2.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    a2, b2 = a2.to(dtype), b2.to(dtype)
    if a2.shape[1] == 0:
        raise ValueError(f"soft_iou needs maps with at least one element; got shape {tuple(a.shape)}")
    if top_k is not None and not 0.0 < top_k < 1.0:
        raise ValueError(f"top_k must be in (0, 1) or None; got {top_k}")
    if top_k is not None and (int(iters) != iters or iters < 1):
        raise ValueError(f"iters (Sinkhorn iterations of the top-k mask) must be an integer >= 1; got {iters}")
    if not gamma > 0:
        raise ValueError(f"gamma (the top-k mask's entropic temperature) must be > 0; got {gamma}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    if a2.shape[0] == 0:
        return a2.new_empty(0)
    name = _resolve_for_call(backend, a.device, "soft_iou")
    if name == "reference":  # float32 math for half inputs, as the kernels
        acc = naive.acc_dtype(a2, b2)
        return naive.soft_iou(a2.to(acc), b2.to(acc), top_k, gamma, iters, eps).to(dtype)
    return torch.ops.fastfair.soft_iou(a2.contiguous(), b2.contiguous(), -1.0 if top_k is None else float(top_k),
                                       float(gamma), int(iters), float(eps), name)
