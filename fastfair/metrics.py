"""Overlap metrics between attention maps (BiasMap's entanglement measures).

Maps are the last two dimensions (h, w); any leading dimensions are a batch.
"""
from __future__ import annotations

import torch

from . import ops


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"maps must be (..., h, w); got shape {tuple(a.shape)}")
    lead = a.shape[:-2]
    return a.reshape(-1, a.shape[-2] * a.shape[-1]), b.reshape(-1, b.shape[-2] * b.shape[-1]), lead


def binarize(m: torch.Tensor, percentile: float = 70.0) -> torch.Tensor:
    """Rows of (N, n) -> bool masks: value strictly greater than the row's own percentile
    (linear interpolation, as numpy.percentile)."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100]; got {percentile}")
    thr = torch.quantile(m.double(), percentile / 100.0, dim=-1, keepdim=True)
    return m.double() > thr


def iou(a: torch.Tensor, b: torch.Tensor, percentile: float = 70.0) -> torch.Tensor:
    """BiasMap's IoU: binarise each map at its own percentile (strictly greater), then |A&B| / |A|B|.

    Returns a float64 tensor of the leading (batch) shape. Where both masks are empty (constant
    maps) the IoU is undefined and NaN is returned.
    """
    if not 0 <= percentile < 100:
        raise ValueError(f"percentile must be in [0, 100); got {percentile} (at 100 no pixel lies above the "
                         "threshold; BiasMap uses 70)")
    a2, b2, lead = _check(a, b)
    A, B = binarize(a2, percentile), binarize(b2, percentile)
    inter = (A & B).sum(-1).double()
    union = (A | B).sum(-1).double()
    out = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, float("nan")))
    return out.reshape(lead)


def soft_iou(a: torch.Tensor, b: torch.Tensor, top_k: float | None = 0.3, gamma: float = 0.01, iters: int = 20,
             eps: float = 1e-8, backend: str = "auto") -> torch.Tensor:
    """BiasMap's differentiable SoftIoU (see ``fastfair.ops.soft_iou``).

    With ``top_k`` each min-max-normalised map becomes a Sinkhorn soft top-k mask
    (mass k = floor(top_k * n) on 1, cost (x - y)^2 / gamma, ``iters`` log-domain iterations);
    with ``top_k=None`` the min-max-normalised maps are compared directly.
    Result: sum(ab) / (sum(a) + sum(b) - sum(ab) + eps), of the leading (batch) shape.
    """
    a2, b2, lead = _check(a, b)
    return ops.soft_iou(a2, b2, top_k=top_k, gamma=gamma, iters=iters, eps=eps, backend=backend).reshape(lead)
