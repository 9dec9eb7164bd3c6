"""Distributional alignment targets and loss (Shen et al., "Finetuning Text-to-Image Diffusion Models
for Fairness", ICLR 2024).

Given classifier probabilities for N generated images and a target distribution t over K classes
(joint classes for several attributes: gender x race x age = 2 x 4 x 2 = 16 in the paper):

1. draw S class-count histograms h_s ~ Multinomial(N, t) (S = 100 by default);
2. for each, solve the exact optimal transport from the uniform distribution over the N images to
   h_s / N with cost C[i, c] = ||p_i - onehot(c)||_2 (for several heads, the norm of the
   concatenation: sqrt(sum_a ||p_i^a - onehot(c_a)||^2)). With unit source masses and integer
   counts the transport polytope has integral vertices, so an optimal plan is an assignment of the
   N images to N unit "slots" (h_s[c] slots of class c), solved exactly by
   ``scipy.optimize.linear_sum_assignment`` (the same optimum as POT's ``ot.emd(ones, h_s, C)``);
3. q = the mean of the S plans (each row a distribution over the K classes); per attribute, the
   marginal of q over the other attributes gives the target label y = argmax and the uncertainty
   1 - max;
4. images whose uncertainty exceeds ``threshold`` (0.2) are dropped for that attribute, and the loss
   is the cross-entropy of each attribute head against its y on the kept images.

The column sums of every plan are the sampled counts, so E[sum_i q_ic] = N t_c: a non-uniform target
is met in expectation. Identical histograms are solved once (with small N many draws repeat).

``samples=0`` replaces the S draws by the exact expectation: every histogram of N into K classes,
weighted by its multinomial probability (at most ``MAX_EXACT_HISTOGRAMS`` of them). For one binary
attribute this is the closed form of the paper's gender code: the image of ascending rank k in
p(class 1) goes to class 1 when the drawn count m of class 1 is >= N - k, so its uncertainty is a
binomial tail (tested against that formula).

Everything here is plain numpy/scipy on detached probabilities, except :func:`alignment_loss`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["TargetError", "AlignmentTargets", "check_target", "joint_target", "joint_classes", "transport_cost",
           "sample_histograms", "all_histograms", "check_exact", "marginals", "exact_transport", "alignment_targets",
           "alignment_loss"]

MAX_EXACT_HISTOGRAMS = 20000


class TargetError(ValueError):
    """A target distribution that is not a distribution over the classifier's classes, or a batch too small
    for the number of classes."""


def check_target(target, n_classes: int, name: str = "target") -> np.ndarray:
    """A probability vector of length ``n_classes`` summing to 1 (within 1e-6), or ``TargetError``."""
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if t.shape[0] != n_classes:
        raise TargetError(f"{name} has {t.shape[0]} entries but there are {n_classes} classes; give one "
                          f"probability per class")
    if not np.isfinite(t).all() or (t < 0).any():
        raise TargetError(f"{name} must be non-negative finite probabilities; got {t.tolist()}")
    if abs(t.sum() - 1.0) > 1e-6:
        raise TargetError(f"{name} sums to {t.sum():.6g}; a target distribution must sum to 1 "
                          f"(got {t.tolist()})")
    return t / t.sum()


def joint_classes(sizes: Sequence[int]) -> np.ndarray:
    """(K, A) class index per attribute for every joint class, row-major (the last attribute varies fastest):
    for gender x age, [(0,0), (0,1), (1,0), (1,1)]."""
    return np.array(list(itertools.product(*[range(int(k)) for k in sizes])), dtype=np.int64).reshape(-1, len(sizes))


def marginals(joint, sizes: Sequence[int]) -> list[np.ndarray]:
    """Each attribute's distribution under a joint one over the row-major joint classes of ``sizes``."""
    cls = joint_classes(sizes)
    joint = np.asarray(joint, dtype=np.float64)
    return [np.array([joint[cls[:, a] == c].sum() for c in range(k)]) for a, k in enumerate(sizes)]


def joint_target(targets: Sequence) -> np.ndarray:
    """The joint distribution of independent per-attribute targets (outer product, row-major)."""
    out = np.ones(1)
    for t in targets:
        out = np.multiply.outer(out, np.asarray(t, dtype=np.float64)).reshape(-1)
    return out


def _as_heads(probs) -> list[np.ndarray]:
    if isinstance(probs, Mapping):
        probs = list(probs.values())
    elif isinstance(probs, (torch.Tensor, np.ndarray)):
        probs = [probs]
    out = []
    for p in probs:
        if isinstance(p, torch.Tensor):
            p = p.detach().double().cpu().numpy()
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] < 2:
            raise TargetError(f"classifier probabilities must be (N, K) with K >= 2; got shape {p.shape}")
        out.append(p)
    n = {p.shape[0] for p in out}
    if len(n) != 1:
        raise TargetError(f"attribute heads disagree on the number of images: {sorted(n)}")
    return out


def transport_cost(probs) -> np.ndarray:
    """(N, K) cost ||p_i - onehot(c)||_2 over the joint classes (one head: its K classes)."""
    heads = _as_heads(probs)
    cls = joint_classes([p.shape[1] for p in heads])
    sq = np.zeros((heads[0].shape[0], cls.shape[0]))
    for a, p in enumerate(heads):
        # ||p - e_c||^2 = ||p||^2 - 2 p_c + 1
        d = (p * p).sum(1, keepdims=True) - 2 * p + 1.0   # (N, K_a)
        sq += d[:, cls[:, a]]
    return np.sqrt(np.maximum(sq, 0.0))


def sample_histograms(target, n: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples, K) class counts, each a draw of Multinomial(n, target)."""
    return rng.multinomial(n, np.asarray(target, dtype=np.float64), size=samples)


def check_exact(target, n: int) -> int:
    """The number of histograms the exact expectation enumerates for ``n`` images (those over the classes with
    nonzero target probability), or a TargetError when it exceeds ``MAX_EXACT_HISTOGRAMS``."""
    from math import comb

    k = int((np.asarray(target, dtype=np.float64) > 0).sum())
    count = comb(n + k - 1, k - 1)
    if count > MAX_EXACT_HISTOGRAMS:
        raise TargetError(f"the exact expectation needs all {count} histograms of {n} images over {k} classes (at "
                          f"most {MAX_EXACT_HISTOGRAMS}); sample them instead (samples > 0, e.g. --ot-samples 100)")
    return count


def all_histograms(target, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every class-count histogram of ``n`` images over the K classes with nonzero target probability, and its
    Multinomial(n, target) probability: ((H, K) counts, (H,) probabilities summing to 1)."""
    from math import lgamma

    check_exact(target, n)
    t = np.asarray(target, dtype=np.float64)
    support = np.flatnonzero(t > 0)
    k = len(support)
    rows, probs = [], []
    logt = np.log(t[support])
    for bars in itertools.combinations(range(n + k - 1), k - 1):   # stars and bars
        parts = np.diff((-1,) + bars + (n + k - 1,)) - 1
        h = np.zeros(len(t), dtype=np.int64)
        h[support] = parts
        rows.append(h)
        probs.append(lgamma(n + 1) - sum(lgamma(c + 1) for c in parts) + float((parts * logt).sum()))
    p = np.exp(np.array(probs))
    return np.stack(rows), p / p.sum()


def exact_transport(cost: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """An optimal transport plan (N, K) with unit mass per image and ``counts`` (summing to N) per class.

    Exact: the counts are expanded into N unit slots and the assignment problem is solved by
    ``linear_sum_assignment``; the plan's rows are one-hot. Divide by N for the plan between the
    uniform distribution and counts / N.
    """
    cost = np.asarray(cost, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    n, k = cost.shape
    if counts.shape != (k,) or counts.sum() != n or (counts < 0).any():
        raise ValueError(f"counts must be K={k} non-negative integers summing to N={n}; got {counts.tolist()}")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the alignment targets need scipy (exact assignment): pip install 'fastfair[train]'") from e

    slot_class = np.repeat(np.arange(k), counts)          # (N,)
    rows, cols = linear_sum_assignment(cost[:, slot_class])
    plan = np.zeros((n, k))
    plan[rows, slot_class[cols]] = 1.0
    return plan


@dataclass
class AlignmentTargets:
    """Per attribute (in the classifier's head order): labels (N,) int64, uncertainty (N,), keep (N,) bool,
    q (N, K_a) the averaged plan's marginal; ``joint_q`` (N, K) over the joint classes."""

    names: list[str]
    labels: dict[str, torch.Tensor]
    uncertainty: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    q: dict[str, np.ndarray]
    joint_q: np.ndarray
    histograms: np.ndarray

    def kept_fraction(self) -> dict[str, float]:
        return {a: float(k.float().mean()) for a, k in self.keep.items()}


def alignment_targets(probs, target, *, samples: int = 100, threshold: float = 0.2,
                      rng: np.random.Generator | int | None = None, names: Sequence[str] | None = None
                      ) -> AlignmentTargets:
    """Dynamic targets of the distributional alignment loss.

    ``probs``: (N, K) probabilities, or {attribute: (N, K_a)} (a list works too) -- several heads are
    aligned jointly over their joint classes. ``target``: (K,) over the classes, or over the joint classes
    in row-major order (see :func:`joint_target` for independent per-attribute targets). ``rng``: a numpy
    Generator or a seed.
    """
    if isinstance(probs, Mapping):
        names = list(probs)
    heads = _as_heads(probs)
    names = list(names) if names is not None else [f"head{i}" for i in range(len(heads))]
    if len(names) != len(heads):
        raise ValueError(f"{len(names)} names for {len(heads)} heads")
    sizes = [p.shape[1] for p in heads]
    K = int(np.prod(sizes))
    what = "target" if len(heads) == 1 else f"joint target over {'x'.join(map(str, sizes))} classes"
    t = check_target(target, K, what)
    N = heads[0].shape[0]
    if N < 1:
        raise TargetError("no images to align")
    # N < K is allowed, as in the paper's code (its gender x race x age runs align whatever faces a step found): each
    # sampled histogram then fills at most N of the K classes, and the plans' average follows the target
    if samples < 0:
        raise ValueError(f"samples must be >= 1 (or 0: the exact expectation); got {samples}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"uncertainty threshold must be in [0, 1]; got {threshold}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    cost = transport_cost(heads)
    if samples == 0:   # the exact expectation over every histogram
        hist, weight = all_histograms(t, N)
        uniq = hist
    else:
        hist = sample_histograms(t, N, samples, rng)
        uniq, mult = np.unique(hist, axis=0, return_counts=True)
        weight = mult / samples
    q = np.zeros((N, K))
    for h, w in zip(uniq, weight):
        q += w * exact_transport(cost, h)
    cls = joint_classes(sizes)
    labels, unc, keep, qs = {}, {}, {}, {}
    for a, (name, k) in enumerate(zip(names, sizes)):
        qa = np.zeros((N, k))
        for c in range(k):
            qa[:, c] = q[:, cls[:, a] == c].sum(1)
        qs[name] = qa
        labels[name] = torch.from_numpy(qa.argmax(1).astype(np.int64))
        u = 1.0 - qa.max(1)
        unc[name] = torch.from_numpy(u)
        keep[name] = torch.from_numpy(u <= threshold + 1e-12)
    return AlignmentTargets(names, labels, unc, keep, qs, q, hist)


def alignment_loss(probs, targets: AlignmentTargets, *, eps: float = 1e-8, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every attribute head against its alignment label, on the kept images.

    ``probs``: {attribute: (N, K_a)} (or one (N, K) tensor) with gradients. ``reduction="mean"`` divides the
    summed cross-entropies by N (dropped images count as zero, as in the paper); ``"none"`` gives (N,).
    """
    if isinstance(probs, torch.Tensor):
        probs = {targets.names[0]: probs}
    total = None
    for name in targets.names:
        p = probs[name]
        y = targets.labels[name].to(p.device)
        keep = targets.keep[name].to(p.device)
        ce = -torch.log(p.gather(1, y[:, None]).squeeze(1).clamp_min(eps))
        ce = torch.where(keep, ce, torch.zeros_like(ce))
        total = ce if total is None else total + ce
    if reduction == "none":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    return total.mean()
