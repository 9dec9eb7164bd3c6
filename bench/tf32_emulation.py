"""A pytest plugin that gives the CPU machine a GPU's fp32 rounding, to reproduce GPU-only mismatches without a GPU.

* Triton dots: the interpreter computes every fp32 ``tl.dot`` exactly; on a GPU ``input_precision="tf32"`` rounds
  both operands to TF32 (10 mantissa bits) and ``"tf32x3"`` adds the two cross terms of the split operands. This
  plugin makes the interpreter do the same (``"ieee"`` and fp16 / bf16 dots are left as they are).
* With ``EMU_CONV_TF32=1``: fp32 ``nn.Conv2d`` rounds its input and weight to TF32 while
  ``torch.backends.cudnn.allow_tf32`` is on -- what cuDNN does by default on a GPU (straight-through, so
  gradients still flow).

Usage (from the repository root)::

    TRITON_INTERPRET=1 EMU_CONV_TF32=1 PYTHONPATH=bench python -m pytest -p tf32_emulation tests/test_triton_engine.py

It explained the H200 failures of 2026-11-27 (bench/RESULTS.md): with TF32 convolutions emulated, tiny-sd's
Triton-vs-reference maps differed by 2.3e-4 and its guided latents by 1.4% (GPU: 1.4e-4 and 1.8%); with 3xTF32
dots alone everything matched to 1e-5.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from triton.runtime import interpreter as _interp

SEEN: set = set()
_orig_dot = _interp.InterpreterBuilder.create_dot


def _tf32(x):
    return _interp._round_f32_to_tf32(x)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    prec = str(input_precision).upper()
    SEEN.add(prec)
    ad, bd = a.data, b.data
    if ad.dtype == np.float32 and bd.dtype == np.float32 and "IEEE" not in prec:
        ah, bh = _tf32(ad), _tf32(bd)
        out = np.matmul(ah, bh, dtype=np.float32)
        if "X3" in prec:  # 3xTF32: big*big + big*small + small*big (small = the rounding remainder, itself TF32)
            al, bl = _tf32(ad - ah), _tf32(bd - bh)
            out = (np.matmul(al, bh, dtype=np.float32) + np.matmul(ah, bl, dtype=np.float32)) + out
        return _interp.TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)
    return _orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


_interp.InterpreterBuilder.create_dot = _create_dot


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (nearest even at 10 mantissa bits; inf / nan kept), straight-through for autograd."""
    if x.dtype != torch.float32:
        return x
    bits = x.detach().contiguous().view(torch.int32)
    special = (bits & 0x7F800000) == 0x7F800000
    rounded = (bits + (((bits >> 13) & 1) + 0xFFF)) & ~0x1FFF
    y = torch.where(special, bits, rounded).view(torch.float32)
    return x + (y - x).detach() if x.requires_grad else y


if os.environ.get("EMU_CONV_TF32") == "1":
    _orig_conv = torch.nn.Conv2d._conv_forward

    def _conv_forward(self, input, weight, bias):
        if not torch.backends.cudnn.allow_tf32:
            return _orig_conv(self, input, weight, bias)
        return _orig_conv(self, _round_tf32(input), _round_tf32(weight), bias)

    torch.nn.Conv2d._conv_forward = _conv_forward


def pytest_sessionfinish(session, exitstatus):
    print(f"\ntf32_emulation: dot precisions seen: {sorted(SEEN)}; TF32 convolutions: "
          f"{os.environ.get('EMU_CONV_TF32') == '1'}")
