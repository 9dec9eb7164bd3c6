"""Metrics on hand-computed cases and against an independent numpy transcription of BiasMap's formulas."""
import math

import numpy as np
import pytest
import torch

from fastfair import metrics


def test_iou_hand_case():
    # 10 values; the 70th percentile (linear) of 0..9 is 6.3 -> masks are the values 7, 8, 9
    a = torch.arange(10.0).reshape(2, 5)
    b = torch.tensor([[9.0, 8, 0, 0, 0], [0, 0, 0, 0, 7]])
    # b sorted: seven 0s, 7, 8, 9; its 70th percentile is 0 + 0.3 * 7 = 2.1 -> B = positions {0, 1, 9}
    assert np.percentile(b.numpy(), 70) == pytest.approx(2.1)
    # IoU = |{9}| / |{0, 1, 7, 8, 9}|
    assert metrics.iou(a, b).item() == pytest.approx(1 / 5)


def test_iou_is_strictly_greater_and_batched():
    a = torch.zeros(3, 4, 4)
    a[:, :2] = 1.0
    b = a.clone()
    out = metrics.iou(a, b, percentile=70)
    assert out.shape == (3,)
    # 70th percentile of half ones/half zeros is 1.0: nothing is strictly greater -> undefined
    assert torch.isnan(out).all()
    assert metrics.iou(a, b, percentile=40).tolist() == [1.0, 1.0, 1.0]
    c = torch.flip(a, dims=[1])
    assert metrics.iou(a, c, percentile=40).tolist() == [0.0, 0.0, 0.0]


def test_iou_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.iou(torch.zeros(4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="percentile"):
        metrics.iou(torch.zeros(4, 4), torch.zeros(4, 4), percentile=170)


def test_plain_soft_iou_hand_case():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None]
    b = torch.tensor([[0.0, 0.5], [0.0, 1.0]])[None]
    # min-max: a unchanged; b unchanged. sum(ab)=0.5, sum(a)=2, sum(b)=1.5 -> 0.5/3
    assert metrics.soft_iou(a, b, top_k=None).item() == pytest.approx(0.5 / 3.0, rel=1e-6)


def numpy_topk_mask(x, percentile=0.3, gamma=0.01, iters=20):
    """BiasMap's differentiable_topk_mask transcribed in numpy float64 (rows of x)."""
    n = x.shape[1]
    k = int(n * percentile)
    C = (x[..., None] - np.array([0.0, 1.0])) ** 2
    S = -C / gamma
    f = np.zeros(x.shape)
    g = np.zeros((x.shape[0], 2))
    log_u = math.log(1.0 / n)
    log_v = np.log(np.array([n - k, k]) / n)

    def lse(z, axis):
        m = z.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)

    for _ in range(iters):
        g = log_v - lse(S + f[:, :, None], 1)
        f = log_u - lse(S + g[:, None, :], 2)
    P = np.exp(S + f[:, :, None] + g[:, None, :])
    return P[:, :, 1] * n


def test_soft_iou_topk_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8))
    b = rng.random((3, 8, 8))
    got = metrics.soft_iou(torch.tensor(a), torch.tensor(b)).numpy()

    def norm(m):
        m = m.reshape(m.shape[0], -1)
        lo, hi = m.min(1, keepdims=True), m.max(1, keepdims=True)
        return (m - lo) / (hi - lo + 1e-8)

    ma, mb = numpy_topk_mask(norm(a)), numpy_topk_mask(norm(b))
    inter = (ma * mb).sum(1)
    expect = inter / (ma.sum(1) + mb.sum(1) - inter + 1e-8)
    np.testing.assert_allclose(got, expect, rtol=1e-10)


def test_soft_iou_is_differentiable_and_orders_overlap():
    base = torch.zeros(1, 16, 16)
    base[:, 4:10, 4:10] = 1.0
    near = torch.roll(base, 1, dims=2)
    far = torch.roll(base, 8, dims=2)
    assert metrics.soft_iou(base, near).item() > metrics.soft_iou(base, far).item()
    x = torch.rand(2, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 8, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: metrics.soft_iou(x, y, gamma=0.1, iters=5), (x,))
