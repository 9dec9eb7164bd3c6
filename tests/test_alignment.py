"""Distributional alignment targets: exact OT against brute force, expectations, errors."""
import itertools
import math

import numpy as np
import pytest
import torch

from fastfair import alignment
from fastfair.alignment import TargetError


def _random_probs(rng, n, k):
    x = rng.gamma(1.0, size=(n, k))
    return x / x.sum(1, keepdims=True)


def _brute_force(cost, counts):
    """Minimum-cost assignment of the N images to classes with exactly `counts` images per class, by
    enumerating every distinct labelling."""
    n, k = cost.shape
    slots = [c for c in range(k) for _ in range(counts[c])]
    best, best_lab = math.inf, None
    for perm in set(itertools.permutations(slots)):
        c = sum(cost[i, perm[i]] for i in range(n))
        if c < best - 1e-12:
            best, best_lab = c, perm
    return best, np.array(best_lab)


@pytest.mark.parametrize("n,k,seed", [(4, 2, 0), (5, 3, 1), (6, 3, 2), (6, 4, 3), (7, 2, 4)])
def test_exact_transport_matches_brute_force(n, k, seed):
    rng = np.random.default_rng(seed)
    p = _random_probs(rng, n, k)
    cost = alignment.transport_cost(p)
    # the cost is the Euclidean distance to the class corners
    for i in range(n):
        for c in range(k):
            assert cost[i, c] == pytest.approx(np.linalg.norm(p[i] - np.eye(k)[c]), abs=1e-12)
    for _ in range(4):
        counts = rng.multinomial(n, np.full(k, 1.0 / k))
        plan = alignment.exact_transport(cost, counts)
        assert plan.sum(1) == pytest.approx(np.ones(n))
        assert plan.sum(0) == pytest.approx(counts)
        best, lab = _brute_force(cost, counts)
        assert (plan * cost).sum() == pytest.approx(best, abs=1e-9)
        assert (plan.argmax(1) == lab).all()  # random probabilities: the optimum is unique


def test_joint_cost_and_classes_brute_force():
    rng = np.random.default_rng(5)
    heads = {"gender": _random_probs(rng, 6, 2), "age": _random_probs(rng, 6, 3)}
    cls = alignment.joint_classes([2, 3])
    assert cls.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    cost = alignment.transport_cost(heads)
    for i in range(6):
        for j, (g, a) in enumerate(cls):
            v = np.concatenate([heads["gender"][i] - np.eye(2)[g], heads["age"][i] - np.eye(3)[a]])
            assert cost[i, j] == pytest.approx(np.linalg.norm(v), abs=1e-12)
    counts = np.array([1, 1, 1, 1, 1, 1])
    plan = alignment.exact_transport(cost, counts)
    best, lab = _brute_force(cost, counts)
    assert (plan * cost).sum() == pytest.approx(best, abs=1e-9)
    assert (plan.argmax(1) == lab).all()


def test_exact_transport_matches_pot_when_installed():
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(7)
    p = _random_probs(rng, 12, 4)
    cost = alignment.transport_cost(p)
    counts = rng.multinomial(12, [0.1, 0.2, 0.3, 0.4])
    plan = alignment.exact_transport(cost, counts)
    ref = ot.emd(np.ones(12), counts.astype(float), cost)
    assert (plan * cost).sum() == pytest.approx((ref * cost).sum(), abs=1e-9)


def test_targets_average_brute_force_plans():
    """alignment_targets = the mean over sampled histograms of the (brute-force) optimal plans."""
    rng = np.random.default_rng(11)
    p = _random_probs(rng, 5, 2)
    t = [0.7, 0.3]
    out = alignment.alignment_targets(p, t, samples=30, threshold=0.2, rng=np.random.default_rng(3))
    hist = np.random.default_rng(3).multinomial(5, t, size=30)
    assert (out.histograms == hist).all()
    cost = alignment.transport_cost(p)
    q = np.zeros((5, 2))
    for h in hist:
        _, lab = _brute_force(cost, h)
        q[np.arange(5), lab] += 1
    q /= 30
    assert out.joint_q == pytest.approx(q)
    h0 = out.names[0]
    assert (out.labels[h0].numpy() == q.argmax(1)).all()
    assert out.uncertainty[h0].numpy() == pytest.approx(1 - q.max(1))
    assert (out.keep[h0].numpy() == (1 - q.max(1) <= 0.2)).all()


def test_ranking_for_binary_targets():
    """Binary attribute, 50/50, clear probabilities: the least class-0 images are relabelled, extremes are certain."""
    p0 = np.array([0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6])
    p = np.stack([p0, 1 - p0], 1)
    out = alignment.alignment_targets(p, [0.5, 0.5], samples=400, rng=0)
    lab, keep = out.labels["head0"].numpy(), out.keep["head0"].numpy()
    assert lab[:3].tolist() == [0, 0, 0] and lab[-3:].tolist() == [1, 1, 1]
    assert keep[0] and keep[-1] and not keep[3] and not keep[4]


@pytest.mark.parametrize("target", [[0.75, 0.25], [0.6, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]])
def test_non_uniform_targets_in_expectation(target):
    rng = np.random.default_rng(0)
    k, n = len(target), 8
    tot, labels = np.zeros(k), np.zeros(k)
    for r in range(300):
        p = _random_probs(rng, n, k)
        out = alignment.alignment_targets(p, target, samples=20, rng=rng)
        tot += out.joint_q.sum(0)
        labels += np.bincount(out.labels["head0"].numpy(), minlength=k)
    # the plans' class marginals are the sampled histograms: E = N t
    assert tot / tot.sum() == pytest.approx(target, abs=0.015)
    # and the argmax labels follow the target too (coarser: argmax of averaged plans)
    assert labels / labels.sum() == pytest.approx(target, abs=0.06)


def test_joint_target_marginals():
    t = alignment.joint_target([[0.5, 0.5], [0.75, 0.25]])
    assert t.tolist() == [0.375, 0.125, 0.375, 0.125]
    rng = np.random.default_rng(1)
    tot = {"g": np.zeros(2), "a": np.zeros(2)}
    for _ in range(150):
        heads = {"g": _random_probs(rng, 8, 2), "a": _random_probs(rng, 8, 2)}
        out = alignment.alignment_targets(heads, t, samples=20, rng=rng)
        for a in tot:
            tot[a] += out.q[a].sum(0)
    assert tot["g"] / tot["g"].sum() == pytest.approx([0.5, 0.5], abs=0.02)
    assert tot["a"] / tot["a"].sum() == pytest.approx([0.75, 0.25], abs=0.02)


def test_loss_is_cross_entropy_on_kept_images():
    p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]], requires_grad=True)
    out = alignment.alignment_targets(p.detach(), [0.5, 0.5], samples=200, rng=0)
    loss = alignment.alignment_loss({"head0": p}, out)
    y, keep = out.labels["head0"], out.keep["head0"]
    ref = sum(-math.log(float(p.detach()[i, y[i]])) for i in range(4) if keep[i]) / 4
    assert float(loss) == pytest.approx(ref)
    loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_errors():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    with pytest.raises(TargetError, match="sums to 0.9"):
        alignment.alignment_targets(p, [0.6, 0.3])
    with pytest.raises(TargetError, match="3 entries but there are 2 classes"):
        alignment.alignment_targets(p, [0.5, 0.25, 0.25])
    with pytest.raises(TargetError, match="non-negative"):
        alignment.alignment_targets(p, [1.5, -0.5])
    with pytest.raises(TargetError, match="no images"):
        alignment.alignment_targets(p[:0], [0.5, 0.5])


def test_fewer_images_than_classes_follow_the_target_in_expectation():
    """N = 3 images, 2 x 2 = 4 joint classes (the paper's code aligns whatever faces a step found, fewer than its 16
    classes too): each plan puts unit mass on each image, and the plans' column sums average to N t -- exactly for
    the exact expectation (a multinomial's mean), within sampling error for 4000 sampled histograms."""
    rng = np.random.default_rng(0)
    g, a = rng.dirichlet([1, 1], size=3), rng.dirichlet([1, 1], size=3)
    t = np.array([0.4, 0.3, 0.2, 0.1])
    exact = alignment.alignment_targets({"g": g, "a": a}, t, samples=0)
    np.testing.assert_allclose(exact.joint_q.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(exact.joint_q.sum(0), 3 * t, atol=1e-12)
    sampled = alignment.alignment_targets({"g": g, "a": a}, t, samples=4000, rng=1)
    np.testing.assert_allclose(sampled.joint_q.sum(0), 3 * t, atol=0.05)  # sd of a count mean: <= 0.014


def test_exact_expectation_is_the_papers_binary_closed_form():
    """samples=0 for one binary attribute: image of ascending rank k in p(class 1) is class 1 with probability
    P(m >= N - k), m ~ Binomial(N, t_1); the paper's gender code labels by rank (class 1 iff k >= N t_0) with
    uncertainty binom.cdf(k, N, t_0) (class 0) or 1 - binom.cdf(k, N, t_0) (class 1). Wherever that
    uncertainty keeps an image (<= 0.2) the labels, uncertainties and keep flags agree."""
    from scipy.stats import binom

    from fastfair.alignment import alignment_targets

    rng = np.random.default_rng(0)
    for N, t0 in ((8, 0.5), (8, 0.25), (16, 0.75), (5, 0.5)):
        p1 = rng.uniform(size=N)
        probs = np.stack([1 - p1, p1], 1)
        t = alignment_targets(probs, [t0, 1 - t0], samples=0, threshold=0.2)
        rank = np.argsort(np.argsort(p1))
        q1 = 1 - binom.cdf(N - rank - 1, N, 1 - t0)                 # P(m >= N - k)
        np.testing.assert_allclose(t.q["head0"][:, 1], q1, atol=1e-12)
        ref_label = (rank >= N * t0).astype(int)
        ref_unc = np.where(ref_label == 1, 1 - binom.cdf(rank, N, t0), binom.cdf(rank, N, t0))
        kept = ref_unc <= 0.2
        assert (t.keep["head0"].numpy() == kept).all()
        np.testing.assert_array_equal(t.labels["head0"].numpy()[kept], ref_label[kept])
        np.testing.assert_allclose(t.uncertainty["head0"].numpy()[kept], ref_unc[kept], atol=1e-12)


def test_exact_expectation_matches_many_samples_and_has_limits():
    from math import comb

    from fastfair.alignment import MAX_EXACT_HISTOGRAMS, TargetError, all_histograms, alignment_targets

    h, w = all_histograms([0.2, 0.3, 0.5], 6)
    assert len(h) == comb(8, 2) and (h.sum(1) == 6).all() and w.sum() == pytest.approx(1.0)
    assert len(np.unique(h, axis=0)) == len(h)
    h0, _ = all_histograms([0.5, 0.0, 0.5], 4)                         # a zero-probability class: never drawn
    assert (h0[:, 1] == 0).all() and len(h0) == 5
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=6)
    exact = alignment_targets(probs, [0.2, 0.3, 0.5], samples=0)
    sampled = alignment_targets(probs, [0.2, 0.3, 0.5], samples=20000, rng=0)
    np.testing.assert_allclose(exact.joint_q, sampled.joint_q, atol=0.02)
    np.testing.assert_allclose(exact.joint_q.sum(0), 6 * np.array([0.2, 0.3, 0.5]), atol=1e-9)
    with pytest.raises(TargetError, match="sample them instead"):
        all_histograms(np.ones(16) / 16, 64)
    assert MAX_EXACT_HISTOGRAMS >= comb(64 + 1, 1)
